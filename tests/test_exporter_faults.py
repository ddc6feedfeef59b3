"""Fault injection on examples/make_pseudo_masks.py: bad kept masks, bad flags, unreadable images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import make_pseudo_masks as mpm  # noqa: E402
import train  # noqa: E402
from _config import ConfigError  # noqa: E402
from PIL import Image  # noqa: E402
from test_make_pseudo_masks import QUIET, TINY  # noqa: E402
from test_train import _fake_voc  # noqa: E402

from wsss_blocks.constants import VOC_PALETTE  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "baseline"
    train.main([*TINY, "--recipe", "baseline", "--output", str(out)])
    return out


def _export(run_dir: Path, out: Path, *extra: str) -> dict:
    return mpm.main(["--checkpoint", str(run_dir), "--output", str(out), *QUIET, *extra])


def test_kept_mask_with_values_outside_the_classes_is_named_and_rewritten(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "masks"
    first = _export(run_dir, out, "--limit", "4")
    good = (out / "train_000002.png").read_bytes()
    bad = out / "train_000002.png"
    im = Image.frombytes("P", (32, 32), bytes([77]) * 1024)  # the right size and mode, values of no class
    im.putpalette(VOC_PALETTE.tobytes())
    im.save(bad)
    again = _export(run_dir, out, "--limit", "4")
    assert (again["rewritten_broken"], again["kept"], again["written"]) == (1, 3, 0)
    assert again["rewritten_files"] == [f"{bad}: holds values [77] outside 0..6 and 255; written again"]
    assert f"warning: {bad}: holds values [77]" in capsys.readouterr().err
    assert bad.read_bytes() == good and again["miou"] == first["miou"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--batch-size", "0"], r"--batch-size: expected an integer >= 1, got 0"),
        (["--batch-size", "-1"], r"--batch-size: expected an integer >= 1, got -1"),
        (["--scales", "nan"], r"--scales: expected factors in \(0, 4\], got nan"),
        (["--scales", "1.0,inf"], r"--scales: expected factors in \(0, 4\]"),
        (["--scales", "0"], r"--scales: expected factors in \(0, 4\]"),
        (["--low", "nan"], r"--low/--high"),
        (["--par-scale", "nan"], r"--par-scale: expected in \(0, 1\]"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_written(run_dir: Path, tmp_path: Path, argv: list[str],
                                                         match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _export(run_dir, tmp_path / "m", *argv)
    assert not list((tmp_path / "m").glob("*.png"))


def test_bad_flag_is_exit_status_2(run_dir: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(EXAMPLES / "make_pseudo_masks.py"), "--checkpoint", str(run_dir),
                          "--output", str(tmp_path / "m"), "--batch-size", "0", *QUIET],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "--batch-size: expected an integer >= 1, got 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"--checkpoint: {ckpt} is not a readable checkpoint"):
        _export(ckpt, tmp_path / "m")


def test_unreadable_training_image_is_skipped_named_and_counted(tmp_path: Path) -> None:
    root = _fake_voc(tmp_path / "voc")
    run = tmp_path / "run"
    train.main([*TINY, "--data", "voc", "--data-root", str(root), "--model", "vit_tiny_patch16_224",
                "--recipe", "baseline", "--workers", "0", "--eval-batch-size", "1", "--output", str(run)])
    jpg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    out = tmp_path / "masks"
    summary = _export(run, out, "--data-root", str(root))
    assert (summary["written"], summary["skipped"]) == (3, 1)
    assert len(summary["skipped_files"]) == 1 and str(jpg) in summary["skipped_files"][0]
    assert sorted(p.stem for p in out.glob("*.png")) == ["2007_000000", "2007_000002", "2007_000003"]
    assert json.loads((out / "pseudo_masks.json").read_text())["skipped"] == 1
    assert 0.0 <= summary["miou"] <= 1.0 and np.isfinite(summary["coverage"])
