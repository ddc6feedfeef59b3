"""The ``cpews`` trainer recipe: option ranges checked at parse time, loss terms from LossOutput."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import recipes.cpews as rc  # noqa: E402
from _backbone import build_backbone  # noqa: E402
from _config import ConfigError, parse_config  # noqa: E402
from recipes.base import LossTerm, check_options, parse_options  # noqa: E402

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "3", "--embed-dim", "48", "--num-heads", "3",
        "--batch-size", "2", "--iterations", "10", "--baseline", "off"]


@pytest.mark.parametrize("name,text,value,interval", [
    ("pool_fraction", "7", 7.0, "in (0, 1]"),
    ("pool_fraction", "0", 0.0, "in (0, 1]"),
    ("pool_fraction", "nan", float("nan"), "in (0, 1]"),
    ("pool_step", "0", 0, ">= 1"),
    ("pool_refresh", "-1", -1, ">= 0"),
    ("pool_images", "0", 0, ">= 1"),
    ("num_prototypes", "0", 0, ">= 1"),
    ("capacity", "0", 0, ">= 1"),
    ("ssl_weight", "-0.1", -0.1, ">= 0"),
    ("ssl_source_share", "1.5", 1.5, "in (0, 1]"),
])
def test_options_out_of_range_fail_at_parse_time(name, text, value, interval):
    message = re.escape(f"{name}: expected a value {interval}, got {value!r}")
    with pytest.raises(ValueError, match=message):
        parse_options(rc.CPEWSRecipe, {name: text})
    with pytest.raises(ValueError, match=message):  # the same check on Options built in code
        check_options(rc.CPEWSRecipe.Options(**{name: value}))


def test_options_in_range_and_unset_values_pass():
    o = parse_options(rc.CPEWSRecipe, {"pool_fraction": "1", "pool_step": "none", "pool_refresh": "0",
                                       "ssl_source_share": "none", "ism_weight": "0", "mid_layer": "-1"})
    assert (o.pool_fraction, o.pool_step, o.ssl_source_share, o.ism_weight) == (1.0, None, None, 0.0)
    check_options(o)
    o.pool_fraction = 2.0  # mutated after parsing: the check still catches it
    with pytest.raises(ValueError, match="pool_fraction"):
        check_options(o)


def test_trainer_rejects_a_bad_range_before_training(tmp_path: Path):
    import train

    with pytest.raises(ConfigError, match=r"pool_fraction: expected a value in \(0, 1\], got 7.0"):
        train.main([*TINY, "--recipe", "cpews", "--opt", "pool_fraction=7", "--output", str(tmp_path)])


def test_pool_step_default_follows_pool_fraction():
    cfg = parse_config([*TINY, "--recipe", "cpews"])
    backbone = build_backbone(cfg)
    r = rc.CPEWSRecipe(backbone, 6, cfg, parse_options(rc.CPEWSRecipe, {"pool_fraction": "0.5"}), {})
    assert r.pool_step == 5
    r = rc.CPEWSRecipe(backbone, 6, cfg, parse_options(rc.CPEWSRecipe, {"pool_step": "3"}), {})
    assert r.pool_step == 3


def test_forward_terms_are_the_loss_output_terms_and_weights():
    cfg = parse_config([*TINY, "--recipe", "cpews"])
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    r = rc.CPEWSRecipe(backbone, 6, cfg, parse_options(rc.CPEWSRecipe, {"preset": "official"}), {})
    batch = {"image": torch.randn(2, 3, 32, 32), "labels": torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]]),
             "valid": torch.ones(2, 32, 32, dtype=torch.bool)}
    terms = r(backbone, batch, 1)
    assert list(terms) == ["cls_mid", "cls_final", "ism", "pdl", "ssl"]
    assert all(isinstance(t, LossTerm) for t in terms.values())
    assert {k: t.weight for k, t in terms.items()} == {"cls_mid": 1.0, "cls_final": 1.0, "ism": 0.2,
                                                      "pdl": 0.12, "ssl": 1.5e-4}
    taps, out = r._heads(backbone, batch["image"])
    assert r.mid_index == 0 and list(taps.intermediate) == [0]  # mid_layer=-3 of 3 blocks
    assert out.cams_final.shape == (2, 6, 4, 4)
