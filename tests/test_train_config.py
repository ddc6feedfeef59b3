"""examples/train.py --config FILE and the recipes' paper settings in examples/configs/."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import (  # noqa: E402
    CONFIG_DIR,
    PAPER_KEYS,
    ConfigError,
    TrainConfig,
    is_swin_name,
    load_config_file,
    paper_config_path,
    parse_config,
)
from recipes import RECIPES, get_recipe  # noqa: E402
from test_train import TINY  # noqa: E402


def _write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_a_runs_config_json_replays_the_run(tmp_path: Path) -> None:
    flags = [*TINY, "--recipe", "baseline", "--opt", "pooling=gmp_cam", "--seed", "3", "--no-plots"]
    first = train.main([*flags, "--output", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "resume" not in saved and "stop_after" not in saved and "config" not in saved  # per invocation
    replay = parse_config(["--config", str(tmp_path / "a" / "config.json"), "--output", str(tmp_path / "b")])
    expect = parse_config([*flags, "--output", str(tmp_path / "b"), "--device", "cpu", "--amp", "off"])
    assert replay.to_json() == expect.to_json()
    second = train.main(["--config", str(tmp_path / "a" / "config.json"), "--output", str(tmp_path / "b")])
    assert second["final"] == first["final"]  # the same run again
    # a run's config.json names its own folder: replaying it there without --resume is refused
    with pytest.raises(ConfigError, match="already holds files"):
        train.main(["--config", str(tmp_path / "a" / "config.json")])


def test_flags_override_the_file_and_options_merge(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.json", {"notes": "a subset", "recipe": "cpews", "lr": 0.5, "seed": 7,
                                     "eval_scales": [1.0, 0.5], "opts": {"pool_step": 2, "ism_weight": None,
                                                                         "preset": "official"},
                                     "scene": {"num_classes": 8}, "eval_flip": True})
    cfg = parse_config(["--config", str(f), "--lr", "0.25", "--opt", "pool_step=3"])
    assert (cfg.lr, cfg.seed, cfg.eval_scales, cfg.eval_flip) == (0.25, 7, (1.0, 0.5), True)
    assert cfg.opts == {"pool_step": "3", "ism_weight": "none", "preset": "official"}
    assert cfg.scene == {"num_classes": 8}
    assert cfg.model == "vit_tiny_patch16_224" and cfg.iterations == 300  # the dataset layer below the file


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"lrr": 1e-4}, r"c.json: unknown key 'lrr'"),
        ({"config": "other.json"}, r"c.json: unknown key 'config'"),
        ({"lr": "fast"}, r"c.json: key 'lr': expected a number, got 'fast'"),
        ({"iterations": 2.5}, r"key 'iterations': expected an integer, got 2.5"),
        ({"eval_flip": "yes"}, r"key 'eval_flip': expected true or false"),
        ({"data": "imagenet"}, r"key 'data': expected one of 'synthetic', 'voc', 'coco'"),
        ({"eval_scales": []}, r"key 'eval_scales': expected a non-empty list"),
        ({"opts": ["pool_step=1"]}, r"key 'opts': expected an object of recipe options"),
        ({"scene": {"colour": "red"}}, r"key 'scene': --scene: unknown key 'colour'"),
        ({"notes": 3}, r"key 'notes': expected a string or a list of strings"),
        ({"lr": float("inf")}, r"^--lr: expected a finite number > 0, got inf"),
        ([1, 2], r"must hold a JSON object"),
    ],
)
def test_config_file_errors_name_the_key_and_the_file(tmp_path: Path, content: object, match: str) -> None:
    f = _write(tmp_path / "c.json", content)
    with pytest.raises(ConfigError, match=match):
        parse_config(["--config", str(f)])


def test_config_file_that_is_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: .*nope.json not found"):
        parse_config(["--config", str(tmp_path / "nope.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{'lr': 1}")
    with pytest.raises(ConfigError, match=r"--config: .*bad.json is not valid JSON"):
        parse_config(["--config", str(bad)])


def test_run_facts_of_config_json_are_accepted_and_unused(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.json", {"recipe_options": {"pool_step": 9}, "num_classes": 6, "world_size": 2})
    assert parse_config(["--config", str(f)]).opts == {}


# ----------------------------------------------------------------------------- paper settings
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))


def test_every_recipe_has_voc_and_coco_paper_settings() -> None:
    assert {p.name for p in SHIPPED} == {f"{r}_{d}.json" for r in RECIPES for d in ("voc", "coco")}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_parses_and_validates(tmp_path: Path, path: Path) -> None:
    import timm

    raw = json.loads(path.read_text())
    recipe, data = path.stem.rsplit("_", 1)
    assert (raw["recipe"], raw["data"]) == (recipe, data) and raw["notes"]
    assert set(PAPER_KEYS) <= set(raw), sorted(set(PAPER_KEYS) - set(raw))
    assert load_config_file(path)  # types
    cfg = parse_config(["--config", str(path), "--data-root", str(tmp_path)])  # + validate
    for key in PAPER_KEYS:
        assert getattr(cfg, key) == raw[key], key
    assert cfg.eval_batch_size == 1 and cfg.workers == 4  # the runtime values of DATASET_DEFAULTS
    assert timm.is_model(cfg.model), cfg.model
    cls = get_recipe(recipe)
    assert ("swin" if is_swin_name(cfg.model) else "vit") in cls.backbones
    train.recipe_options(cls, cfg.opts)
    # the same values are the defaults of --recipe R --data D (one source of truth)
    plain = parse_config(["--recipe", recipe, "--data", data, "--data-root", str(tmp_path)])
    assert dataclasses.replace(plain, output=cfg.output, config=cfg.config) == cfg
    assert paper_config_path(recipe, data) == path


def test_a_recipe_without_its_own_file_takes_the_baseline_schedule() -> None:
    assert paper_config_path("my_method", "voc") == CONFIG_DIR / "baseline_voc.json"


def test_help_lists_config_and_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    assert "--config FILE" in text and "examples/configs/<recipe>_<data>.json" in text
    assert "--allow-config-change" in text
    assert len([f for f in dataclasses.fields(TrainConfig)]) == text.count("\n  --")
