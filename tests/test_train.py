"""Fast tests of the reference trainer (examples/train.py) and its recipes, on CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import ConfigError, parse_config  # noqa: E402
from _data import StepBatchSampler  # noqa: E402
from _optim import build_optimizer, build_scheduler, poly_warmup_factor  # noqa: E402
from recipes import RECIPES  # noqa: E402

TINY = [
    "--iterations", "3", "--img-size", "32", "--patch-size", "8", "--depth", "3",
    "--embed-dim", "48", "--num-heads", "3", "--batch-size", "4", "--train-length", "32",
    "--eval-every", "3", "--eval-images", "4", "--eval-batch-size", "4", "--vis-images", "2",
    "--warmup", "1", "--log-every", "1", "--no-progress", "--quiet", "--baseline", "off",
]
RECIPE_OPTS = {
    "baseline": [],
    "cpal": ["--opt", "proj_dim=8", "--opt", "capacity=16", "--opt", "num_prototypes=4", "--opt", "top_k=2"],
    "cpews": ["--opt", "pool_step=1", "--opt", "pool_images=8", "--opt", "num_prototypes=2",
              "--opt", "capacity=16"],
    "mct": [],
    "doei": [],
    "pcm": [],
}


SWIN_ONLY_RECIPES = {"swtformer"}  # trained on a tiny Swin in tests/test_swtformer_recipe.py


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss/total"] for r in _records(out) if r["kind"] == "train"}


@pytest.mark.parametrize("name", sorted(RECIPE_OPTS))
def test_recipe_trains_three_steps(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    summary = train.main([*TINY, "--recipe", name, *RECIPE_OPTS[name], "--output", str(out),
                          "--no-plots"])
    assert summary["recipe"] == name and summary["steps"] == 3 and summary["finished"]
    final = summary["final"]
    for key in ("cam_miou", "cam_miou_best", "pseudo_miou", "pseudo_coverage"):
        assert 0.0 <= final[key] <= 1.0, (key, final[key])
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in losses.values())
    for f in ("metrics.jsonl", "summary.json", "config.json", "last.pt"):
        assert (out / f).is_file(), f
    if name == "cpews":
        recs = [r for r in _records(out) if r["kind"] == "train"]
        assert recs[0]["pool/positives_per_class"] > 0  # built after step 1
        assert any(r["loss/pdl"] > 0 for r in recs[1:])  # PDL active once the pool exists


def test_every_registered_recipe_is_tested() -> None:
    assert set(RECIPES) == set(RECIPE_OPTS) | SWIN_ONLY_RECIPES


def test_pictures_curves_and_comparison(tmp_path: Path) -> None:
    args = [a for a in TINY if a not in ("--baseline", "off")]
    i = args.index("--quiet")
    del args[i]
    summary = train.main([*args, "--recipe", "mct", "--baseline", "on", "--output", str(tmp_path)])
    assert set(summary["comparison"]) == {"baseline", "mct"}
    assert (tmp_path / "comparison.md").read_text().count("|") > 10
    for p in summary["pictures"]:
        assert Path(p).is_file() and Path(p).stat().st_size > 0
    assert len(summary["pictures"]) == 2
    assert Path(summary["curves"]).is_file()
    assert (tmp_path / "baseline" / "summary.json").is_file()


def test_resume_is_exact(tmp_path: Path) -> None:
    # drop-path makes every step draw from the global torch RNG, so a resume that loses or
    # shifts the RNG state changes the losses after the stop; the stop (step 3) is not a
    # checkpoint step (--ckpt-every 4), and the pool is built before it (step 2)
    args = [*TINY, "--recipe", "cpews", "--iterations", "6", "--eval-every", "6", "--ckpt-every", "4",
            "--drop-path", "0.5", "--opt", "pool_step=2", "--opt", "pool_images=8",
            "--opt", "num_prototypes=2", "--opt", "capacity=16", "--no-plots"]
    full = train.main([*args, "--output", str(tmp_path / "full")])
    part = train.main([*args, "--output", str(tmp_path / "split"), "--stop-after", "3"])
    assert not part["finished"] and part["steps"] == 3
    resumed = train.main([*args, "--output", str(tmp_path / "split"), "--resume", "auto"])
    assert resumed["start_step"] == 3 and resumed["finished"]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert a[step] == b[step], (step, a[step], b[step])
    assert full["final"] == resumed["final"]


def test_resume_without_rng_restore_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume test above can fail: skipping the RNG restore changes the resumed losses."""
    args = [*TINY, "--recipe", "baseline", "--iterations", "4", "--eval-every", "4",
            "--drop-path", "0.5", "--no-plots"]
    train.main([*args, "--output", str(tmp_path / "full")])
    train.main([*args, "--output", str(tmp_path / "split"), "--stop-after", "2"])
    monkeypatch.setattr(train, "set_rng_state", lambda state: None)
    train.main([*args, "--output", str(tmp_path / "split"), "--resume", "auto"])
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert [a[s] == b[s] for s in (1, 2)] == [True, True]
    assert a[3] != b[3]


def test_log_keeps_recipe_values_and_flushes_at_stop(tmp_path: Path) -> None:
    # pool statistics come at step 1, which is not a logging step (--log-every 2); the stop
    # after step 3 is mid-interval: its partial loss mean must still be written
    train.main([*TINY, "--recipe", "cpews", "--iterations", "6", "--log-every", "2", "--stop-after", "3",
                "--opt", "pool_step=1", "--opt", "pool_images=8", "--opt", "num_prototypes=2",
                "--opt", "capacity=16", "--no-plots", "--output", str(tmp_path)])
    recs = [r for r in _records(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [2, 3]
    assert recs[0]["pool/positives_per_class"] > 0 and "pool/positives_per_class" not in recs[1]
    assert math.isfinite(recs[1]["loss/total"])


def test_step_sampler_is_a_function_of_step() -> None:
    whole = list(StepBatchSampler(10, 3, seed=1, start_step=0, steps=8))
    tail = list(StepBatchSampler(10, 3, seed=1, start_step=5, steps=8))
    assert tail == whole[5:]
    idx = [i for b in whole[:3] for i, _ in b]  # first 9 of epoch 0: distinct
    assert len(set(idx)) == 9
    r0 = list(StepBatchSampler(10, 2, seed=1, start_step=0, steps=2, rank=0, world=2))
    r1 = list(StepBatchSampler(10, 2, seed=1, start_step=0, steps=2, rank=1, world=2))
    assert not {i for b in r0 for i, _ in b} & {i for b in r1 for i, _ in b}


def test_poly_warmup_schedule_and_head_lr() -> None:
    backbone = torch.nn.ModuleDict({"fc": torch.nn.Linear(3, 3), "norm": torch.nn.LayerNorm(3)})
    heads = torch.nn.Linear(3, 2)
    opt = build_optimizer(backbone, heads, lr=0.1, head_lr_mult=10.0, weight_decay=0.01)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["backbone", "backbone_norm", "heads"]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1, 1.0]
    sched = build_scheduler(opt, warmup=4, max_steps=20, warmup_ratio=1e-6, power=0.9)
    seen = []
    for _ in range(22):
        seen.append(opt.param_groups[2]["lr"])
        opt.step()
        sched.step()
    for t, lr in enumerate(seen):
        if t < 4:
            expect = 1.0 * (1 - (1 - t / 4) * (1 - 1e-6))
        elif t < 20:
            expect = (1 - t / 20) ** 0.9
        else:
            expect = 0.0
        assert lr == pytest.approx(expect, rel=1e-12, abs=1e-15), t
    assert seen[0] == pytest.approx(1e-6)
    assert poly_warmup_factor(4, warmup=4, max_steps=20) == pytest.approx(0.8 ** 0.9)  # ToCo's jump


def _real_optimizer(name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    from _data import build_datasets
    from recipes import parse_options

    cfg = parse_config([*TINY, "--recipe", name, *RECIPE_OPTS[name]])
    backbone = train.build_backbone(cfg)
    _, _, info = build_datasets(cfg)
    recipe_cls = RECIPES[name]
    recipe = recipe_cls(backbone, info["num_classes"], cfg, parse_options(recipe_cls, cfg.opts),
                        dict(info, data=cfg.data))
    opt = build_optimizer(backbone, recipe, lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                          weight_decay=cfg.weight_decay)
    return backbone, recipe, opt


@pytest.mark.parametrize("name", sorted(RECIPE_OPTS))
def test_real_recipe_parameter_groups(name: str) -> None:
    backbone, recipe, opt = _real_optimizer(name)
    groups = {g["name"]: g for g in opt.param_groups}
    lr = groups["backbone"]["lr"]
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in [*backbone.parameters(), *recipe.parameters()])
    if name in ("baseline", "cpal", "cpews", "pcm"):  # new classifier heads at 10x
        heads = {id(p) for p in groups["heads"]["params"]}
        assert heads and heads == {id(p) for p in recipe.parameters()}
        assert groups["heads"]["lr"] == pytest.approx(10 * lr)
    else:  # mct / doei: the K class tokens live in the backbone and train at 1x (MCTformer)
        assert "heads" not in groups and not list(recipe.parameters())
        assert backbone.cls_token.shape[1] == recipe.num_classes
        assert any(p is backbone.cls_token for p in groups["backbone"]["params"])


def test_clip_grad_is_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):  # noqa: ANN001, ANN202 - test double
        params = list(params)
        before = original(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.main([*TINY, "--recipe", "baseline", "--iterations", "2", "--clip-grad", "1e-3",
                "--no-plots", "--output", str(tmp_path)])
    assert len(seen) == 2
    for max_norm, before, after in seen:
        assert max_norm == 1e-3 and before > 1e-3 and after <= 1e-3 * (1 + 1e-4)


class _EncodedCAM(torch.nn.Module):
    """Evaluation stand-in: the 'CAM' of an image is its first K channels (patch size 1)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Identity()  # no patch_embed: CAM at pixel resolution
        self.recipe = torch.nn.Module()
        self.recipe.cam = lambda backbone, images, labels: images[:, :k]


def _eval_cfg(**kw: float) -> object:
    import types

    base = dict(eval_scales=(1.0,), eval_flip=False, cam_threshold=0.4, low=0.25, high=0.7)
    return types.SimpleNamespace(**(base | kw))


def test_evaluate_perfect_cam_scores_one() -> None:
    from _evaluate import evaluate

    k = 3
    mask = torch.randint(0, k + 1, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    mask[:, 0, 0] = 3
    mask[:, -1, :] = 255  # ignored pixels are not counted
    onehot = torch.nn.functional.one_hot(mask.clamp(max=k), k + 2).permute(0, 3, 1, 2).float()
    images = onehot[:, 1:k + 1]  # class c + 1 -> channel c
    labels = images.amax(dim=(2, 3))
    batch = {"image": images, "labels": labels, "mask": mask}
    out = evaluate(_EncodedCAM(k), [batch], num_classes=k, cfg=_eval_cfg(), device=torch.device("cpu"))
    assert out["cam_miou"] == 1.0 and out["cam_miou_best"] == 1.0
    assert out["pseudo_miou"] == 1.0 and out["pseudo_coverage"] == 1.0


def test_evaluate_known_answer() -> None:
    """One class, GT row [bg, bg, fg, fg], CAM row [0, 0.5, 1, 1] (hand-computed metrics)."""
    from _evaluate import evaluate

    cam = torch.tensor([0.0, 0.5, 1.0, 1.0]).view(1, 1, 1, 4)
    batch = {"image": cam.repeat(1, 3, 1, 1), "labels": torch.ones(1, 1),
             "mask": torch.tensor([[[0, 0, 1, 1]]])}
    out = evaluate(_EncodedCAM(1), [batch], num_classes=1, cfg=_eval_cfg(), device=torch.device("cpu"))
    # threshold 0.4: prediction [bg, fg, fg, fg]: IoU bg 1/2, fg 2/3
    assert out["cam_miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # thresholds >= 0.5 put the 0.5 pixel in the background: perfect, first at 0.5
    assert out["cam_miou_best"] == 1.0 and out["best_threshold"] == 0.5
    # pseudo labels (low 0.25, high 0.7): [bg, ignore, fg, fg] -> exact on 3 of 4 pixels
    assert out["pseudo_miou"] == 1.0 and out["pseudo_coverage"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "-1"], "--lr"),
        (["--low", "0.8", "--high", "0.7"], "--low/--high"),
        (["--data", "voc"], "--data-root"),
        (["--data", "voc", "--data-root", ".", "--eval-batch-size", "4"], "different sizes"),
        (["--pretrained", "/nonexistent/weights.pth"], "never downloads"),
        (["--opt", "novalue"], "KEY=VALUE"),
        (["--iterations", "0"], "--iterations"),
        (["--embed-dim", "50", "--num-heads", "3"], "--embed-dim"),
        (["--eval-scales", "1.0,0.5", "--no-dynamic-size"], "--eval-scales"),
        (["--data", "imagenet"], "invalid choice"),
    ],
)
def test_config_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_runtime_config_errors(tmp_path: Path) -> None:
    base = [*TINY, "--output", str(tmp_path), "--no-plots"]
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        train.main([*base, "--recipe", "nope"])
    with pytest.raises(ConfigError, match="unknown option"):
        train.main([*base, "--recipe", "cpews", "--opt", "pool_stepz=3"])
    with pytest.raises(ConfigError, match="expected int"):
        train.main([*base, "--recipe", "cpews", "--opt", "pool_step=soon"])
    with pytest.raises(ConfigError, match="--model"):
        train.main([*base, "--recipe", "baseline", "--model", "no_such_model_xyz"])
    # recipe constructor checks against the model become ConfigErrors too (clean CLI exit)
    with pytest.raises(ConfigError, match="--recipe cpews: block index -3 is out of range"):
        train.main([*base, "--recipe", "cpews", "--depth", "2"])  # default mid_layer=-3
    with pytest.raises(ConfigError, match="--opt last_k: expected a value >= 1, got 0"):
        train.main([*base, "--recipe", "mct", "--opt", "last_k=0"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs CUDA"):
            train.main([*base, "--recipe", "baseline", "--amp", "fp16"])


def test_defaults_are_the_cpu_main_job() -> None:
    cfg = parse_config([])
    assert (cfg.data, cfg.recipe, cfg.baseline, cfg.device) == ("synthetic", "cpews", "auto", "auto")
    assert (cfg.model, cfg.img_size, cfg.depth, cfg.patch_size) == ("vit_tiny_patch16_224", 64, 4, 8)
    assert cfg.output.startswith("runs" + os.sep)
    mct = parse_config(["--recipe", "mct", "--opt", "last_k=2"])
    assert mct.opts == {"last_k": "2"}  # no per-dataset recipe options
    assert parse_config(["--recipe", "mct", "--data", "voc", "--data-root", "."]).opts == {}
    # voc / coco: the recipe's paper settings (CPEWS: 2,000 warm-up iterations, batch 4 on COCO too)
    coco = parse_config(["--data", "coco", "--data-root", "."])
    assert (coco.iterations, coco.img_size, coco.high, coco.lr, coco.warmup, coco.batch_size) == (
        80000, 448, 0.65, 6e-5, 2000, 4)
    assert (coco.eval_batch_size, coco.eval_images, coco.workers) == (1, 5000, 4)  # runtime values
    toco = parse_config(["--data", "coco", "--data-root", ".", "--recipe", "baseline"])
    assert (toco.warmup, toco.batch_size) == (1500, 8)
    mct_voc = parse_config(["--data", "voc", "--data-root", ".", "--recipe", "mct", "--warmup", "7"])
    assert (mct_voc.model, mct_voc.img_size, mct_voc.weight_decay, mct_voc.warmup) == (
        "deit_small_patch16_224", 224, 0.05, 7)


def _fake_voc(root: Path) -> Path:
    """A six-image VOC tree with images of different sizes (PIL)."""
    import numpy as np
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"2007_00000{i}" for i in range(6)]
    for i, name in enumerate(names):
        h, w = 40 + 4 * i, 52 - 4 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            base / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[5:25, 8:30] = 1 + (3 * i) % 20
        mask[30:, :10] = 255
        Image.fromarray(mask, mode="L").save(base / "SegmentationClass" / f"{name}.png")
    seg = base / "ImageSets" / "Segmentation"
    (seg / "train_aug.txt").write_text("\n".join(names[:4]) + "\n")
    (seg / "val.txt").write_text("\n".join(names[4:]) + "\n")
    return root


@pytest.mark.parametrize("recipe", sorted(RECIPE_OPTS))
def test_voc_layout_variable_sizes(tmp_path: Path, recipe: str) -> None:
    root = _fake_voc(tmp_path / "voc")
    args = [a for a in TINY]
    summary = train.main([*args, "--data", "voc", "--data-root", str(root), "--model",
                          "vit_tiny_patch16_224", "--recipe", recipe, *RECIPE_OPTS[recipe],
                          "--workers", "0", "--eval-scales", "1.0,0.75", "--eval-flip",
                          "--eval-batch-size", "1",
                          "--output", str(tmp_path / "run")])
    assert summary["config"]["num_classes"] == 20 and summary["config"]["eval_batch_size"] == 1
    assert summary["finished"] and len(summary["pictures"]) == 2
    assert 0.0 <= summary["final"]["cam_miou"] <= 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_OPTS = {name: RECIPE_OPTS[name] for name in ("cpews", "cpal")}  # recipes with banks or pools


@pytest.mark.parametrize("name", sorted(DDP_OPTS))
def test_ddp_two_process_gloo_smoke(tmp_path: Path, name: str) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(EXAMPLES / "train.py"), *TINY, "--recipe", name, "--device", "cpu",
           *DDP_OPTS[name], "--no-plots", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["ddp_state_in_sync"] is True  # parameters and the prototype pool / bank agree
    assert summary["final"]["cam_miou"] >= 0.0


@pytest.mark.parametrize(("world_size", "code"), [("1", 0), ("1", 3), ("2", 0), ("2", 3)])
def test_exit_process_keeps_the_status_and_flushes(world_size: str, code: int) -> None:
    # Under a launcher the scripts leave without interpreter shutdown (gloo's worker threads may
    # still free finished collectives then, which aborts the process): the status is the run's and
    # the buffered output still arrives.
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from _process import exit_process; "
              "print('written', end=''); print('err', end='', file=sys.stderr); exit_process(int(sys.argv[2]))")
    env = dict(os.environ, WORLD_SIZE=world_size)
    res = subprocess.run([sys.executable, "-c", script, str(EXAMPLES), str(code)], capture_output=True,
                         text=True, timeout=60, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (code, "written", "err")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(RECIPE_OPTS))
def test_gpu_bf16_run(tmp_path: Path, name: str) -> None:
    summary = train.main([*TINY, "--recipe", name, *RECIPE_OPTS[name], "--device", "cuda",
                          "--amp", "bf16", "--output", str(tmp_path), "--no-plots"])
    assert summary["device"].startswith("cuda") and summary["amp"] == "bf16"
    assert all(math.isfinite(v) for v in _losses(tmp_path).values())


# ----------------------------------------------------------------------------- recipe options
@dataclasses.dataclass
class _Options:
    mode: Literal["point", "box"] = "point"
    level: Literal[1, 2] = 1
    weight: float | None = None
    steps: Optional[int] = None  # noqa: UP045 - the typing.Optional spelling is one of the cases
    ratio: float = 0.5
    count: int = 3
    flag: bool = False
    name: str = "x"


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("mode", "box", "box"),  # a Literal of strings is not parsed as int ("point" contains "int")
        ("mode", " point ", "point"),
        ("level", "2", 2),
        ("weight", "none", None),
        ("weight", "None", None),
        ("weight", "0.25", 0.25),
        ("steps", "none", None),
        ("steps", "7", 7),
        ("ratio", "1e-3", 1e-3),
        ("count", "-2", -2),
        ("flag", "true", True),
        ("flag", "Off", False),
        ("flag", "1", True),
        ("name", "none", "none"),  # a plain str keeps the text
    ],
)
def test_parse_option_from_type_hints(key: str, text: str, value: object) -> None:
    from recipes.base import option_types, parse_option

    hints = option_types(_Options)
    got = parse_option(key, text, hints[key])
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("key", "text", "match"),
    [
        ("mode", "circle", r"--opt mode: expected one of 'point', 'box', got 'circle'"),
        ("mode", "1", r"--opt mode: expected one of 'point', 'box'"),
        ("level", "3", r"--opt level: expected one of 1, 2, got '3'"),
        ("weight", "heavy", r"--opt weight: expected float or none, got 'heavy'"),
        ("steps", "1.5", r"--opt steps: expected int or none, got '1.5'"),
        ("count", "2.0", r"--opt count: expected int, got '2.0'"),
        ("count", "none", r"--opt count: expected int, got 'none'"),
        ("ratio", "half", r"--opt ratio: expected float, got 'half'"),
        ("flag", "maybe", r"--opt flag: expected true/false, got 'maybe'"),
    ],
)
def test_parse_option_errors_name_option_and_allowed(key: str, text: str, match: str) -> None:
    from recipes.base import OptionError, option_types, parse_option

    with pytest.raises(OptionError, match=match):
        parse_option(key, text, option_types(_Options)[key])


def test_unsupported_option_type_is_refused_at_registration() -> None:
    import dataclasses

    from recipes import Recipe, register

    @dataclasses.dataclass
    class Options:
        sizes: list[int] = dataclasses.field(default_factory=list)

    class Bad(Recipe):
        name = "bad_option_type"

    Bad.Options = Options  # type: ignore[misc]
    with pytest.raises(TypeError, match="option 'sizes': unsupported type"):
        register(Bad)
    assert "bad_option_type" not in RECIPES


@pytest.mark.parametrize("name", sorted(RECIPE_OPTS))
def test_registered_recipe_options_round_trip(name: str) -> None:
    """Every option of every recipe parses back from the text of its default."""
    import dataclasses

    from recipes import option_types, parse_options

    cls = RECIPES[name]
    defaults = cls.Options()
    raw = {f.name: ("none" if (v := getattr(defaults, f.name)) is None else str(v).lower() if isinstance(v, bool)
                    else str(v)) for f in dataclasses.fields(defaults)}
    assert parse_options(cls, raw) == defaults
    assert set(option_types(cls.Options)) == set(raw)


def test_recipe_none_options_replace_sentinels() -> None:
    from recipes import parse_options

    cpews = parse_options(RECIPES["cpews"], {"ism_weight": "none", "pdl_weight": "0.5", "preset": "official"})
    assert (cpews.ism_weight, cpews.pdl_weight, cpews.preset) == (None, 0.5, "official")
    assert parse_options(RECIPES["doei"], {"st_c2c": "none"}).st_c2c is None
    with pytest.raises(ValueError, match=r"--opt preset: expected one of 'paper', 'official', got 'papr'"):
        parse_options(RECIPES["cpews"], {"preset": "papr"})
    with pytest.raises(ValueError, match=r"--opt reduction: expected one of 'sum', 'mean'"):
        parse_options(RECIPES["mct"], {"reduction": "max"})


def test_bad_opt_value_is_a_cli_error_exit_2(tmp_path: Path) -> None:
    cmd = [sys.executable, str(EXAMPLES / "train.py"), "--recipe", "cpews", "--opt", "preset=papr",
           "--output", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--opt preset: expected one of 'paper', 'official', got 'papr'" in res.stderr
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------- Swin backbones
SWIN = ["--model", "swin_tiny_patch4_window7_224", "--depths", "1,1", "--embed-dim", "32",
        "--num-heads", "2,4", "--window-size", "4"]
SWIN_TINY = [a for i, a in enumerate(TINY) if not ({a, TINY[i - 1]} & {"--patch-size", "--depth", "--embed-dim",
                                                                     "--num-heads"})]


def _tiny_swin() -> torch.nn.Module:
    cfg = parse_config([*SWIN_TINY, *SWIN])
    return train.build_backbone(cfg)


def test_swin_final_feature_map_is_nchw_on_a_non_square_grid() -> None:
    from _backbone import backbone_kind, feature_dim, feature_stride, final_feature_map, final_tokens

    torch.manual_seed(0)
    m = _tiny_swin().eval()
    assert backbone_kind(m) == "swin" and feature_dim(m) == 64 and feature_stride(m) == (8, 8)
    x = torch.randn(2, 3, 32, 48)
    fmap = final_feature_map(m, x)
    assert fmap.shape == (2, 64, 4, 6)  # (B, C, h, w): never a sqrt(N) guess
    # independent oracle: timm's NCHW intermediates with the final norm
    ref = m.forward_intermediates(x, indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
    torch.testing.assert_close(fmap, ref)
    tokens, grid = final_tokens(m, x)
    assert grid == (4, 6) and torch.equal(tokens[:, 7], fmap[:, :, 1, 1])  # row-major: 1 * 6 + 1
    # a size that is not a multiple of the stride is padded bottom/right to whole cells
    assert final_feature_map(m, torch.randn(1, 3, 36, 44)).shape == (1, 64, 5, 6)


def test_swin_baseline_trains_and_evaluates(tmp_path: Path) -> None:
    summary = train.main([*SWIN_TINY, *SWIN, "--recipe", "baseline", "--eval-scales", "1.0,0.75",
                          "--eval-flip", "--output", str(tmp_path)])
    assert summary["finished"] and summary["steps"] == 3 and len(summary["pictures"]) == 2
    assert summary["config"]["depths"] == (1, 1) and summary["config"]["num_heads"] == (2, 4)
    assert all(math.isfinite(v) for v in _losses(tmp_path).values())
    assert 0.0 <= summary["final"]["cam_miou"] <= 1.0


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([*SWIN, "--depth", "2"], "--depth: a Swin model takes per-stage --depths"),
        ([*SWIN[:-4], "--num-heads", "2,4,8", "--window-size", "4"], "--num-heads: expected one value per stage"),
        ([*SWIN[:-4], "--num-heads", "3,4", "--window-size", "4"], "stage 0 width 32 .* not divisible by 3"),
        (["--depths", "1,1"], "--depths: only for Swin"),
        (["--window-size", "4"], "--window-size: only for Swin"),
        (["--num-heads", "3,3"], "--num-heads: a ViT takes one value"),
        (["--depths", "1,x"], "comma-separated integers"),
    ],
)
def test_swin_config_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_vit_only_recipe_refuses_swin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--recipe cpews: supports vit backbones, --model swin_tiny.* is a swin"):
        train.main([*SWIN_TINY, *SWIN, "--recipe", "cpews", "--output", str(tmp_path)])


# ----------------------------------------------------------------------------- one config source
def test_parser_is_built_from_the_config_fields() -> None:
    from _config import DATASET_DEFAULTS, TrainConfig, build_parser

    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
    # the parser states no default of its own: unset flags give the dataclass defaults
    # (dataset defaults fill only the None fields)
    cfg, plain = parse_config(["--output", "x"]), TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in DATASET_DEFAULTS["synthetic"] and f.name not in ("output", "opts"):
            assert getattr(cfg, f.name) == getattr(plain, f.name), f.name
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    assert choices == {"baseline": ["auto", "on", "off"], "data": ["synthetic", "voc", "coco"],
                       "amp": ["auto", "bf16", "fp16", "off"]}


def test_every_existing_flag_still_parses() -> None:
    cfg = parse_config([
        "--recipe", "mct", "--baseline", "on", "--opt", "last_k=2", "--data", "synthetic", "--train-length", "8",
        "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2",
        "--embed-dim", "48", "--num-heads", "3", "--no-dynamic-size", "--drop-path", "0.1",
        "--iterations", "5", "--batch-size", "2", "--lr", "0.01", "--head-lr-mult", "5", "--warmup", "0",
        "--warmup-ratio", "0.5", "--power", "1.0", "--weight-decay", "0", "--clip-grad", "2",
        "--low", "0.2", "--high", "0.8", "--cam-threshold", "0.4", "--eval-every", "5", "--eval-images", "4",
        "--eval-batch-size", "2", "--eval-scales", "1.0", "--eval-flip", "--vis-images", "0",
        "--device", "cpu", "--amp", "off", "--compile", "--seed", "3", "--deterministic", "--workers", "0",
        "--threads", "1", "--output", "o", "--resume", "auto", "--ckpt-every", "2", "--stop-after", "1",
        "--log-every", "2", "--no-progress", "--no-plots", "--quiet",
    ])
    assert (cfg.recipe, cfg.baseline, cfg.opts, cfg.num_heads, cfg.dynamic_size, cfg.eval_flip) == (
        "mct", "on", {"last_k": "2"}, (3,), False, True)
    assert (cfg.compile, cfg.deterministic, cfg.progress, cfg.plots, cfg.quiet) == (True, True, False, False, True)
    assert (cfg.clip_grad, cfg.stop_after, cfg.eval_scales, cfg.head_lr_mult) == (2.0, 1, (1.0,), 5.0)


def test_argparse_errors_are_config_errors_not_exits() -> None:
    for argv, match in ((["--amp", "fp8"], "invalid choice"), (["--iterations", "x"], "invalid int"),
                        (["--nope"], "unrecognized arguments")):
        with pytest.raises(ConfigError, match=match):
            parse_config(argv)


def _step_once(scaler: torch.amp.GradScaler, clip: float | None) -> torch.Tensor:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = lin(torch.randn(5, 4)).pow(2).sum() * 100
    train._optimizer_step(loss, opt, scaler, lin.parameters(), clip)
    return torch.cat([p.detach().flatten() for p in lin.parameters()])


@pytest.mark.parametrize("clip", [None, 1e-2])
def test_optimizer_step_is_the_same_for_every_amp_mode(clip: float | None) -> None:
    """A disabled scaler (off / bf16) is plain backward/clip/step; an active one (fp16) scales the
    loss and unscales before clipping, so the update is the same (the scale is a power of 2)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    (lin(torch.randn(5, 4)).pow(2).sum() * 100).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(lin.parameters(), clip)
    opt.step()
    plain = torch.cat([p.detach().flatten() for p in lin.parameters()])
    off = _step_once(torch.amp.GradScaler("cpu", enabled=False), clip)
    scaled = _step_once(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), clip)
    assert torch.equal(off, plain)
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)


def test_seg_trains_evaluates_checkpoints_and_resumes(tmp_path: Path) -> None:
    """--seg: the decoder's loss starts after the warm-up, seg_miou is reported, the decoder is in
    the checkpoint and a stopped run resumes to the same result as an uninterrupted one."""
    args = [*TINY, "--recipe", "baseline", "--seg", "--seg-warmup", "0.25", "--iterations", "4",
            "--eval-every", "4", "--ckpt-every", "4", "--no-plots"]
    full = train.main([*args, "--output", str(tmp_path / "full")])
    assert 0.0 <= full["final"]["seg_miou"] <= 1.0
    recs = [r for r in _records(tmp_path / "full") if r["kind"] == "train"]
    assert [("loss/seg" in r) for r in recs] == [False, True, True, True]  # seg_start = 1
    assert all(math.isfinite(r["loss/seg"]) for r in recs[1:])
    state = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=False)
    flat = json.dumps(sorted(str(k) for k in _flatten_keys(state)))
    assert "decoder.classifier.weight" in flat
    part = train.main([*args, "--output", str(tmp_path / "split"), "--stop-after", "2"])
    assert not part["finished"]
    resumed = train.main([*args, "--output", str(tmp_path / "split"), "--resume", "auto"])
    assert resumed["start_step"] == 2 and resumed["finished"]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert all(a[s] == b[s] for s in range(1, 5)), (a, b)
    assert full["final"] == resumed["final"]
    table = train.main([*TINY, "--recipe", "baseline", "--output", str(tmp_path / "plain"), "--no-plots"])
    assert "seg_miou" not in table["final"]


def _flatten_keys(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj] + [k for v in obj.values() for k in _flatten_keys(v)]
    return []


def test_seg_table_column_only_with_seg() -> None:
    from _report import format_table

    assert "seg mIoU" not in format_table([("a", {"cam_miou": 0.5}, 1.0)])
    assert "| 25.0 |" in format_table([("a", {"cam_miou": 0.5, "seg_miou": 0.25}, 1.0)])


def test_seg_on_swin_and_warmup_error(tmp_path: Path) -> None:
    summary = train.main([*SWIN_TINY, *SWIN, "--recipe", "baseline", "--seg", "--seg-warmup", "0",
                          "--output", str(tmp_path), "--no-plots"])
    assert all("loss/seg" in r for r in _records(tmp_path) if r["kind"] == "train")
    assert 0.0 <= summary["final"]["seg_miou"] <= 1.0
    with pytest.raises(ConfigError, match="--seg-warmup"):
        parse_config(["--seg", "--seg-warmup", "1.0"])


def test_seg_eval_scales_flip_and_crf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--eval-scales/--eval-flip apply to the decoder too; --seg-crf adds seg_crf_miou."""
    from _backbone import final_feature_map
    from _evaluate import seg_prediction, seg_probs

    from wsss_blocks.refine import crf_available

    extra = ["--seg-crf"] if crf_available() else []
    out = tmp_path / "ms"
    summary = train.main([*TINY, "--recipe", "baseline", "--seg", "--seg-warmup", "0", "--iterations", "2",
                          "--eval-every", "2", "--eval-scales", "1.0,0.5", "--eval-flip", "--no-plots",
                          *extra, "--output", str(out)])
    assert 0.0 <= summary["final"]["seg_miou"] <= 1.0
    assert ("seg_crf_miou" in summary["final"]) == bool(extra)
    if extra:
        assert 0.0 <= summary["final"]["seg_crf_miou"] <= 1.0
        assert "seg+CRF mIoU" in train.format_table([("b", summary["final"], 1.0)])
    # rebuild the trained net and compare seg_probs with the decoder's logits directly
    cfg = parse_config([*TINY, "--recipe", "baseline", "--seg", "--output", str(out)])
    info = {"num_classes": 6}
    net, _ = train._build_net(cfg, info)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    net.load_state_dict(state)
    net.eval()
    images = torch.randn(2, 3, 32, 40)
    logits = net.decoder(final_feature_map(net.backbone, images))
    direct = torch.nn.functional.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=False)
    single = seg_probs(net, images)
    torch.testing.assert_close(single, direct.softmax(dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(seg_prediction(net, images), direct.argmax(dim=1))
    multi = seg_probs(net, images, scales=(1.0, 0.5), flip=True)
    torch.testing.assert_close(multi.sum(dim=1), torch.ones(2, 32, 40))
    assert not torch.allclose(multi, single)  # the scales and the flip are used
    # by hand: mean over scales of the flip-max of the per-scale softmax, renormalised
    half = torch.nn.functional.interpolate(images, size=(16, 20), mode="bilinear", align_corners=False)
    parts = []
    for x in (images, half):
        both = torch.cat([x, x.flip(-1)])
        p = seg_probs(net, both)
        p = torch.nn.functional.interpolate(p, size=(32, 40), mode="bilinear", align_corners=False)
        parts.append(torch.maximum(p[:2], p[2:].flip(-1)))
    ref = (parts[0] + parts[1]) / 2
    torch.testing.assert_close(multi, ref / ref.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_seg_crf_flag_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--seg-crf: .*add --seg"):
        parse_config(["--seg-crf"])
    import wsss_blocks.refine as refine

    monkeypatch.setattr(refine, "crf_available", lambda: False)
    with pytest.raises(ConfigError, match=r"--seg-crf: needs the optional crf extra .*wsss_blocks\[crf\]"):
        parse_config(["--seg", "--seg-crf"])
