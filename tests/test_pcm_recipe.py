"""The ``pcm`` recipe's teacher pass: shared with the student's backbone pass or separate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import parse_config  # noqa: E402
from recipes import RECIPES, parse_options  # noqa: E402

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "24", "--num-heads", "2",
        "--batch-size", "4", "--train-length", "8", "--recipe", "pcm"]


def _recipe(*extra: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = parse_config([*TINY, *extra])
    torch.manual_seed(0)
    backbone = train.build_backbone(cfg)
    recipe_cls = RECIPES["pcm"]
    info = {"num_classes": 3, "class_names": ["background", "a", "b", "c"], "palette": None, "superclasses": None}
    recipe = recipe_cls(backbone, 3, cfg, parse_options(recipe_cls, cfg.opts), info)
    return backbone.train(), recipe.train()


def _step(backbone: torch.nn.Module, recipe: torch.nn.Module, teacher: str) -> tuple[dict, list]:
    recipe.options.teacher = teacher
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=gen),
             "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]])}
    backbone.zero_grad()
    recipe.zero_grad()
    torch.manual_seed(2)  # dihedral codes, head dropout, mosaic crops
    terms = recipe(backbone, batch, 1)
    sum(t.weight * t.value for t in terms.values()).backward()
    grads = [p.grad.clone() for p in [*backbone.parameters(), *recipe.parameters()] if p.grad is not None]
    return {k: t.value.detach() for k, t in terms.items()}, grads


def test_shared_teacher_gives_the_separate_pass_losses_and_gradients() -> None:
    backbone, recipe = _recipe()
    # head dropout on: the shared teacher must still run the head in eval mode (without it this
    # test fails)
    assert recipe.pcm.training and recipe.pcm.classifier.dropout.p > 0
    shared, g_shared = _step(backbone, recipe, "shared")
    separate, g_separate = _step(backbone, recipe, "separate")
    assert shared.keys() == separate.keys() and "et" in shared
    assert float(shared["et"]) > 0
    for key in shared:
        torch.testing.assert_close(shared[key], separate[key], atol=1e-6, rtol=1e-5)
    assert len(g_shared) == len(g_separate)
    for a, b in zip(g_shared, g_separate, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert recipe.pcm.training and backbone.training  # modes restored


def test_auto_shares_only_for_a_mode_independent_backbone() -> None:
    backbone, recipe = _recipe()
    assert recipe._shares_teacher(backbone)
    backbone, recipe = _recipe("--drop-path", "0.1")
    assert not recipe._shares_teacher(backbone)
    backbone, recipe = _recipe()
    backbone.blocks.append(torch.nn.Dropout(0.0))  # p = 0 changes nothing
    assert recipe._shares_teacher(backbone)
    backbone.blocks.append(torch.nn.Dropout(0.1))
    assert not recipe._shares_teacher(backbone)
    backbone, recipe = _recipe()
    backbone.blocks.append(torch.nn.BatchNorm1d(4))
    assert not recipe._shares_teacher(backbone)
    backbone, recipe = _recipe("--opt", "teacher=separate")
    assert not recipe._shares_teacher(backbone)


def test_bad_teacher_option() -> None:
    with pytest.raises(ValueError, match="teacher"):
        _recipe("--opt", "teacher=both")


def test_options_check_names_the_option() -> None:
    from recipes.base import check_options

    options = RECIPES["pcm"].Options
    check_options(options())  # the defaults are valid
    check_options(options(crop_prob=1.0, crop=0, scale=1.5, dropout=0.0, l2=0.0, cam_gamma=0.0, et_start=1))
    bad = {"et_start": 0, "crop_prob": 1.5, "crop": -8, "scale": 0.0, "dropout": -0.1, "l2": -1.0,
           "cam_gamma": float("nan"), "target_norm": "patch", "background": "from_labels"}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"--opt {name}: "):
            check_options(options(**{name: value}))
    with pytest.raises(ValueError, match="crop_prob"):
        _recipe("--opt", "crop_prob=2")
