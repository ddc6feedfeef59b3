"""The ``swtformer`` recipe in the reference trainer: a few steps on a tiny Swin, V1 and V2."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import ConfigError  # noqa: E402

TINY_SWIN = [
    "--iterations", "2", "--img-size", "32", "--batch-size", "4", "--train-length", "16",
    "--eval-every", "2", "--eval-images", "4", "--eval-batch-size", "4", "--vis-images", "2",
    "--warmup", "1", "--log-every", "1", "--no-progress", "--quiet", "--baseline", "off", "--no-plots",
    "--model", "swin_tiny_patch4_window7_224", "--patch-size", "2", "--depths", "1,1,1,1",
    "--embed-dim", "8", "--num-heads", "1,1,2,2", "--window-size", "2",
]


@pytest.mark.parametrize("opts", [["version=v1"], ["version=v2"], ["version=v2", "eval_map=cam", "ccl_variant=plain"],
                                  ["preset=official", "similarity=abs_cos"]])
def test_swtformer_recipe_trains(tmp_path: Path, opts: list[str]) -> None:
    flat = [x for o in opts for x in ("--opt", o)]
    summary = train.main([*TINY_SWIN, "--recipe", "swtformer", *flat, "--output", str(tmp_path)])
    assert summary["finished"] and summary["steps"] == 2
    assert 0.0 <= summary["final"]["cam_miou_best"] <= 1.0
    rec = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert rec and all("nan" not in line.lower() for line in rec)
    if "version=v1" not in opts:
        assert '"loss/gsc"' in rec[-1] and '"loss/ccl"' in rec[-1]
    assert all(math.isfinite(v) for v in summary["final"].values() if isinstance(v, float))


def test_swtformer_recipe_pads_odd_sizes_and_refuses_vit(tmp_path: Path) -> None:
    import torch
    from _config import parse_config
    from recipes import get_recipe, parse_options

    cfg = parse_config([*TINY_SWIN, "--recipe", "swtformer"])
    backbone = train.build_backbone(cfg)
    cls = get_recipe("swtformer")
    recipe = cls(backbone, 3, cfg, parse_options(cls, {}), {})
    cam = recipe.cam(backbone.eval(), torch.randn(1, 3, 37, 50), torch.tensor([[1, 0, 1]]))
    assert cam.shape == (1, 3, 6, 8)  # padded to 48 x 64 (final stride 16); R-CAM at stride 8
    with pytest.raises(ConfigError, match="swtformer"):
        train.main(["--iterations", "1", "--recipe", "swtformer", "--output", str(tmp_path / "vit")])


def test_swtformer_recipe_options_presets_and_ranges() -> None:
    from _config import parse_config
    from recipes import get_recipe, parse_options

    cfg = parse_config([*TINY_SWIN, "--recipe", "swtformer"])
    backbone = train.build_backbone(cfg)
    cls = get_recipe("swtformer")
    paper = cls(backbone, 3, cfg, parse_options(cls, {}), {}).heads
    assert paper.similarity == "abs_cos" and paper.loss_weights == {"gsc": 1.0, "ccl": 1.0}
    official = cls(backbone, 3, cfg, parse_options(cls, {"preset": "official", "gsc_weight": "0.5"}), {}).heads
    assert official.similarity == "relu_cos" and official.loss_weights == {"gsc": 0.5, "ccl": 0.0}
    parse_options(cls, {"ccl_weight": "0", "bg_scale": "1", "head_kernel_size": "3"})
    for key, value in (("gsc_weight", "-1"), ("ccl_weight", "nan"), ("bg_scale", "inf"),
                       ("head_kernel_size", "2"), ("head_kernel_size", "0")):
        with pytest.raises(ValueError, match=f"--opt {key}: expected"):
            parse_options(cls, {key: value})
