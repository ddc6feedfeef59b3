"""The ``mct`` / ``doei`` recipes: option bounds checked at parse time, and one training step."""

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
from recipes.base import check_options  # noqa: E402

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "24", "--num-heads", "2",
        "--batch-size", "2", "--train-length", "8"]


@pytest.mark.parametrize("name", ["mct", "doei"])
def test_defaults_validate(name: str) -> None:
    check_options(RECIPES[name].Options())


@pytest.mark.parametrize(
    "name, opts, bad",
    [("mct", {"last_k": "0"}, "last_k"), ("doei", {"last_k": "-1"}, "last_k"),
     ("doei", {"st": "1.5"}, "st"), ("doei", {"st": "nan"}, "st"), ("doei", {"st_c2c": "-0.1"}, "st_c2c"),
     ("doei", {"af": "-1"}, "af"), ("doei", {"sf": "inf"}, "sf"), ("doei", {"alpha": "1.2"}, "alpha"),
     ("doei", {"rgb_sigma": "0"}, "rgb_sigma")],
)
def test_validate_names_the_option(name: str, opts: dict[str, str], bad: str) -> None:
    with pytest.raises(ValueError, match=rf"--opt {bad}: expected"):
        parse_options(RECIPES[name], opts)


def test_doei_validate_accepts_the_range_ends() -> None:
    parse_options(RECIPES["doei"], {"st": "0", "st_c2c": "1", "af": "0", "sf": "3", "alpha": "1"})


@pytest.mark.parametrize("name", ["mct", "doei"])
def test_one_step_and_cams(name: str) -> None:
    cfg = parse_config([*TINY, "--recipe", name, "--opt", "reduction=mean"])
    torch.manual_seed(0)
    backbone = train.build_backbone(cfg)
    recipe_cls = RECIPES[name]
    recipe = recipe_cls(backbone, 3, cfg, parse_options(recipe_cls, cfg.opts), {"num_classes": 3})
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    terms = recipe(backbone.train(), {"image": images, "labels": labels}, 1)
    terms["cls"].value.backward()
    assert torch.isfinite(terms["cls"].value) and backbone.cls_token.grad is not None
    cams = recipe.cam(backbone.eval(), images, labels)
    assert cams.shape == (2, 3, 4, 4) and torch.isfinite(cams).all()
