"""The ``cpal`` recipe in the reference trainer: a few steps on a tiny ViT and a tiny Swin."""

from __future__ import annotations

import json
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

TINY = [
    "--iterations", "6", "--img-size", "32", "--batch-size", "4", "--train-length", "8",
    "--eval-every", "6", "--eval-images", "4", "--eval-batch-size", "4", "--vis-images", "2",
    "--warmup", "1", "--log-every", "1", "--no-progress", "--quiet", "--baseline", "off", "--no-plots",
    "--recipe", "cpal", "--opt", "proj_dim=8", "--opt", "capacity=16", "--opt", "num_prototypes=4",
    "--opt", "top_k=2",
]


VIT = ["--depth", "1", "--embed-dim", "16", "--num-heads", "2", "--patch-size", "8"]


def _train_lines(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


@pytest.mark.parametrize("opts", [[], ["weighting=uniform", "align=false", "pooling=gap"], ["similarity=l2"]])
def test_cpal_recipe_trains_and_reclusters_every_epoch(tmp_path: Path, opts: list[str]) -> None:
    flat = [x for o in opts for x in ("--opt", o)]
    summary = train.main([*TINY, *VIT, *flat, "--output", str(tmp_path)])
    assert summary["finished"] and summary["steps"] == 6
    assert all(math.isfinite(v) for v in summary["final"].values() if isinstance(v, float))
    rec = _train_lines(tmp_path)
    assert all("loss/self" in r and math.isfinite(r["loss/self"]) for r in rec)
    assert rec[0]["loss/self"] == 0.0  # no context before the first (warm-up) recluster
    assert max(r["loss/self"] for r in rec) > 0.0
    # epoch = 8 images / batch 4 = 2 steps: reclusters at 1 (warm-up), 2, 4, 6
    assert [r["reclusters"] for r in rec] == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0]


def test_cpal_recipe_explicit_period_swin_and_bad_options(tmp_path: Path) -> None:
    swin = ["--model", "swin_tiny_patch4_window7_224", "--patch-size", "2", "--depths", "1,1,1,1",
            "--embed-dim", "8", "--num-heads", "1,1,2,2", "--window-size", "2"]
    summary = train.main([*TINY, *swin, "--opt", "recluster_every=5", "--opt", "warmup_reclusters=false",
                          "--output", str(tmp_path / "swin")])
    assert summary["finished"]
    assert [r["reclusters"] for r in _train_lines(tmp_path / "swin")] == [0.0] * 4 + [1.0, 1.0]
    with pytest.raises(ValueError, match="recluster_every"):
        train.main([*TINY, *VIT, "--opt", "recluster_every=-1", "--output", str(tmp_path / "bad")])
    with pytest.raises(ConfigError, match="weighting"):
        train.main([*TINY, *VIT, "--opt", "weighting=soft", "--output", str(tmp_path / "bad2")])


def test_cpal_recipe_resume_is_exact(tmp_path: Path) -> None:
    """Bank, context and recluster counters come back from the checkpoint: the resumed run reclusters
    at the same steps with the same seeds and reproduces every loss."""
    args = [*TINY, *VIT, "--ckpt-every", "4"]
    train.main([*args, "--output", str(tmp_path / "full")])
    part = train.main([*args, "--output", str(tmp_path / "split"), "--stop-after", "3"])
    assert not part["finished"]
    train.main([*args, "--output", str(tmp_path / "split"), "--resume", "auto"])
    full, split = _train_lines(tmp_path / "full"), _train_lines(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, split, strict=True):
        assert (a["loss/total"], a["reclusters"]) == (b["loss/total"], b["reclusters"]), a["step"]


@pytest.mark.parametrize(("name", "value"), [
    ("threshold", 0.0), ("threshold", 1.0), ("threshold", float("nan")), ("temperature", 0.0),
    ("temperature", float("inf")), ("self_weight", -1.0), ("self_weight", float("nan")), ("proj_dim", 0),
    ("capacity", 0), ("num_prototypes", 1001), ("top_k", 0), ("top_k", 51), ("top_k", 2.0),
    ("recluster_every", -1), ("pooling", "max"), ("similarity", "cos"), ("weighting", "soft"),
])
def test_cpal_options_check_names_the_option(name: str, value: object) -> None:
    from recipes.base import check_options
    from recipes.cpal import CPALRecipe

    check_options(CPALRecipe.Options())
    check_options(CPALRecipe.Options(temperature=0.5, recluster_every=0, num_prototypes=1000, top_k=1000))
    with pytest.raises(ValueError, match=f"^--opt {name}: "):
        check_options(CPALRecipe.Options(**{name: value}))
