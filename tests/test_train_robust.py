"""Trainer pieces: --grad-norms, defaults chosen by --pretrained, --scene, the VOC exporter."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import ConfigError, parse_config  # noqa: E402
from recipes.base import LossTerm  # noqa: E402

TINY = [
    "--iterations", "4", "--img-size", "32", "--patch-size", "8", "--depth", "3",
    "--embed-dim", "48", "--num-heads", "3", "--batch-size", "4", "--train-length", "32",
    "--eval-every", "4", "--eval-images", "4", "--eval-batch-size", "4", "--vis-images", "0",
    "--warmup", "1", "--log-every", "1", "--no-progress", "--quiet", "--baseline", "off", "--device", "cpu",
]
CPEWS = ["--recipe", "cpews", "--opt", "pool_step=1", "--opt", "pool_images=8", "--opt", "num_prototypes=2",
         "--opt", "capacity=16"]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for line in (out / "metrics.jsonl").read_text().splitlines() if (r := json.loads(line))["kind"] == kind]


# ----------------------------------------------------------------------------- --grad-norms
def test_grad_norms_known_answer() -> None:
    """Hand-built: loss terms on two parameter groups with known gradients."""
    a = nn.Parameter(torch.tensor([3.0, 4.0]))  # "backbone"
    b = nn.Parameter(torch.tensor([1.0]))  # "heads"
    terms = {
        "x": LossTerm(2.0, (a * a).sum() / 2),  # weighted grad on a: 2 * a = (6, 8) -> 10; b: 0
        "y": LossTerm(1.0, (b * a[0]).sum()),  # grad a: (1, 0) -> 1; b: 3 -> 3
        "off": LossTerm(0.0, (a * b).sum()),  # weight 0 -> exactly 0
        "flat": LossTerm(1.0, torch.zeros(())),  # no graph -> 0
    }
    out = {k: float(v) for k, v in train.grad_norms(terms, {"backbone": [a], "heads": [b]}).items()}
    assert out["grad/x/backbone"] == pytest.approx(10.0) and out["grad/x/heads"] == 0.0
    assert out["grad/y/backbone"] == pytest.approx(1.0) and out["grad/y/heads"] == pytest.approx(3.0)
    assert out["grad/off/backbone"] == 0.0 and out["grad/off/heads"] == 0.0
    assert out["grad/flat/backbone"] == 0.0
    assert out["grad/total/backbone"] == pytest.approx(math.hypot(7.0, 8.0))  # (6+1, 8+0)
    assert out["grad/total/heads"] == pytest.approx(3.0)
    assert a.grad is None and b.grad is None  # .grad untouched


def test_grad_norms_in_the_trainer(tmp_path: Path) -> None:
    out = tmp_path / "gn"
    train.main([*TINY, *CPEWS, "--opt", "pdl_weight=0", "--grad-norms", "2", "--output", str(out)])
    recs = _records(out, "grad")
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        for term in ("cls_mid", "cls_final", "ism", "pdl", "ssl", "total"):
            for group in ("backbone", "heads"):
                v = r[f"grad/{term}/{group}"]
                assert math.isfinite(v) and v >= 0, (term, group, v)
        assert r["grad/pdl/backbone"] == 0.0 and r["grad/pdl/heads"] == 0.0  # weight 0
        assert r["grad/cls_final/heads"] > 0 and r["grad/cls_final/backbone"] > 0
        assert r["grad/ism/heads"] == 0.0 and r["grad/ism/backbone"] > 0  # ISM: tokens only
    assert (out / "curves.png").is_file()


def test_grad_norms_off_by_default_and_do_not_change_training(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train.main([*TINY, "--recipe", "baseline", "--output", str(a), "--no-plots", "--deterministic"])
    sb = train.main([*TINY, "--recipe", "baseline", "--output", str(b), "--no-plots", "--deterministic",
                     "--grad-norms", "1"])
    assert _records(a, "grad") == [] and len(_records(b, "grad")) == 4
    la = [r["loss/total"] for r in _records(a, "train")]
    lb = [r["loss/total"] for r in _records(b, "train")]
    assert la == lb and sa["final"]["cam_miou"] == sb["final"]["cam_miou"]


def test_grad_norms_flag_validation() -> None:
    with pytest.raises(ConfigError, match="--grad-norms"):
        parse_config(["--grad-norms", "0"])
    assert parse_config([]).grad_norms is None


# ----------------------------------------------------------------------------- defaults by --pretrained
@pytest.mark.parametrize("name", ["mct", "doei"])
def test_mct_defaults_follow_pretrained_not_dataset(tmp_path: Path, name: str) -> None:
    s = train.main([*TINY, "--recipe", name, "--output", str(tmp_path / "r"), "--no-plots", "--iterations", "1",
                    "--eval-every", "1", "--depth", "2"])
    assert (s["recipe_options"]["refine"], s["recipe_options"]["last_k"]) == (False, 2)  # all blocks
    assert parse_config(["--recipe", name]).opts == {}  # no per-dataset recipe options
    # with weights: MCTformer's values
    from _backbone import build_backbone

    cfg = parse_config([*TINY, "--recipe", name])
    weights = tmp_path / "w.pth"
    torch.save(build_backbone(cfg).state_dict(), weights)
    s = train.main([*TINY, "--recipe", name, "--output", str(tmp_path / "p"), "--no-plots", "--iterations", "1",
                    "--eval-every", "1", "--pretrained", str(weights)])
    assert (s["recipe_options"]["refine"], s["recipe_options"]["last_k"]) == (True, 3)
    with pytest.warns(UserWarning, match="refine=true without --pretrained"):
        train.main([*TINY, "--recipe", name, "--output", str(tmp_path / "f"), "--no-plots", "--iterations", "1",
                    "--eval-every", "1", "--opt", "refine=true"])


# ----------------------------------------------------------------------------- --scene and the VOC copy
def test_scene_flag(tmp_path: Path) -> None:
    cfg = parse_config(["--scene", "num_classes=8", "--scene", "superclass_layout=crossed"])
    assert cfg.scene == {"num_classes": 8, "superclass_layout": "crossed"}
    with pytest.raises(ConfigError, match="--scene: unknown key"):
        parse_config(["--scene", "colour=red"])
    with pytest.raises(ConfigError, match="--scene num_classes: expected int"):
        parse_config(["--scene", "num_classes=many"])
    with pytest.raises(ConfigError, match="--scene: superclass_layout"):
        train.main([*TINY, "--recipe", "baseline", "--output", str(tmp_path / "x"), "--scene",
                    "superclass_layout=diagonal"])
    s = train.main([*TINY, *CPEWS, "--output", str(tmp_path / "s"), "--no-plots", "--scene", "num_classes=8",
                    "--scene", "superclass_layout=crossed"])
    assert s["config"]["num_classes"] == 8


def test_voc_export_round_trip(tmp_path: Path) -> None:
    import synthetic_to_voc
    from PIL import Image

    from wsss_blocks.data import VOC, SyntheticScenes

    m = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    assert synthetic_to_voc.boundary_band(m).tolist() == [[0, 255, 255, 1], [255, 255, 255, 255],
                                                          [255, 255, 255, 255]]
    scene = {"num_classes": 8, "superclass_layout": "crossed"}
    root = synthetic_to_voc.export_voc(tmp_path / "v", train=6, val=3, img_size=48, scene=scene)
    with Image.open(root / "SegmentationClass" / "train_000000.png") as im:
        assert im.mode == "P"
    voc = VOC(tmp_path / "v", split="train_aug")
    ref = SyntheticScenes(split="train", length=6, image_size=48, **scene)
    cmap = torch.tensor(synthetic_to_voc.CROSSED_VOC_MAP)
    for i in range(6):
        item, want = voc[i], ref[i]
        mask = item["mask"]
        keep = mask != 255
        expected = torch.where(want["mask"] > 0, cmap[(want["mask"] - 1).clamp_min(0)] + 1, 0)
        assert torch.equal(mask[keep], expected[keep])
        assert keep.float().mean() > 0.5
        got = item["labels"].nonzero().flatten()
        assert set(got.tolist()) <= set(cmap[want["labels"].nonzero().flatten()].tolist())
    # partners (2i, 2i+1) land in different VOC superclasses
    from wsss_blocks.cpews import superclass_index

    sup = superclass_index("voc", 20)
    assert all(sup[cmap[2 * i]] != sup[cmap[2 * i + 1]] for i in range(4))


# ----------------------------------------------------------------------------- cpews SSL default
def test_cpews_ssl_default_and_paper_form(tmp_path: Path) -> None:
    s = train.main([*TINY, *CPEWS, "--output", str(tmp_path / "d"), "--no-plots", "--iterations", "2",
                    "--eval-every", "2"])
    o = s["recipe_options"]
    assert (o["ssl_denominator"], o["ssl_source_share"], o["ssl_cam_scale"], o["preset"]) == (
        "gate", 0.5, "raw", "paper")
    import recipes.cpews as rc
    from _backbone import build_backbone
    from recipes.base import parse_options

    cfg = parse_config([*TINY, *CPEWS])
    spec = parse_options(rc.CPEWSRecipe, {"ssl_denominator": "phi", "ssl_source_share": "none"})
    r = rc.CPEWSRecipe(build_backbone(cfg), 6, cfg, spec, {"superclasses": None})
    assert (r.loss.ssl.denominator, r.loss.ssl.source_share, r.loss.loss_weights["ssl"]) == ("phi", None, 0.2)
    d = rc.CPEWSRecipe(build_backbone(cfg), 6, cfg, parse_options(rc.CPEWSRecipe, {}), {"superclasses": None})
    assert (d.loss.ssl.denominator, d.loss.ssl.source_share) == ("gate", 0.5)
