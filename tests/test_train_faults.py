"""Fault injection on examples/train.py: nothing lost, nothing silently wrong.

Tiny synthetic runs (and a tiny VOC tree for file faults): a rerun into a used folder, a
resume with other flags, output folders that cannot take the run, bad flag values, damaged
checkpoints, a killed process, a diverged loss and unreadable data files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
from _config import ConfigError, parse_config  # noqa: E402
from test_train import TINY, _fake_voc, _losses, _records  # noqa: E402

BASE = [*TINY, "--recipe", "baseline", "--no-plots", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- the run folder
def test_rerun_into_a_used_folder_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main([*BASE, "--iterations", "4", "--eval-every", "4", "--output", str(out)])
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=rf"--output: {out} already holds files \(config.json, last.pt, .*\); "
                                          rf"continue that run with --resume auto, or .* --output {out}-2"):
        train.main([*BASE, "--iterations", "2", "--output", str(out)])
    assert _snapshot(out) == before
    # on the command line: exit status 2, no traceback
    res = _cli(*BASE, "--iterations", "2", "--output", str(out))
    assert res.returncode == 2 and "--resume auto" in res.stderr and "Traceback" not in res.stderr
    assert _snapshot(out) == before
    # a comparison refuses too, before its first part trains
    with pytest.raises(ConfigError, match="already holds files"):
        train.main([*BASE, "--recipe", "mct", "--baseline", "on", "--output", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_resume_auto_needs_a_checkpoint_in_a_used_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match=r"--resume auto: .* holds files but no checkpoint \(last.pt\)"):
        train.main([*BASE, "--output", str(out), "--resume", "auto"])
    # an empty (or missing) folder with --resume auto is a fresh start
    s = train.main([*BASE, "--output", str(tmp_path / "fresh"), "--resume", "auto"])
    assert s["start_step"] == 0 and s["finished"]


def test_resume_from_a_file_into_another_runs_folder_is_refused(tmp_path: Path) -> None:
    train.main([*BASE, "--output", str(tmp_path / "a"), "--baseline", "off"])
    train.main([*BASE, "--output", str(tmp_path / "b"), "--seed", "1"])
    with pytest.raises(ConfigError, match=r"--output: .*b holds another run"):
        train.main([*BASE, "--output", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "last.pt")])
    forked = train.main([*BASE, "--output", str(tmp_path / "c"), "--resume", str(tmp_path / "a" / "last.pt")])
    assert forked["start_step"] == 3


@pytest.mark.parametrize("case", ["file", "last_pt_folder", "metrics_folder", "vis_file"])
def test_output_that_cannot_take_the_run_fails_before_training(tmp_path: Path, case: str) -> None:
    out = tmp_path / "run"
    if case == "file":
        out.write_text("x")
        match, argv = rf"--output: {out} is a file, not a folder", []
    else:
        train.main([*BASE, "--output", str(out), "--stop-after", "1"])
        name = {"last_pt_folder": "last.pt", "metrics_folder": "metrics.jsonl", "vis_file": "vis"}[case]
        target = out / name
        target.unlink() if target.is_file() else None
        target.mkdir() if case != "vis_file" else target.write_text("x")
        match = rf"{target} is a (folder|file), but the run writes"
        argv = ["--resume", "auto"]
    with pytest.raises(ConfigError, match=match):
        train.main([*BASE, "--output", str(out), *argv])
    assert not list(tmp_path.rglob("*.tmp"))


def _creatable(folder: Path) -> bool:
    try:
        folder.mkdir()
    except OSError:
        return False
    folder.rmdir()
    return True


def test_unwritable_output_fails_before_training(tmp_path: Path) -> None:
    kernel = Path("/sys/wsss-blocks-test")  # sysfs takes no new folders, even from root
    if Path("/sys").is_dir() and not _creatable(kernel):
        with pytest.raises(ConfigError, match=rf"--output: cannot write to {kernel}"):
            train.main([*BASE, "--output", str(kernel)])
    if os.geteuid() != 0:  # permissions do not bind root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ConfigError, match=rf"--output: cannot write to {ro} \(Permission denied\)"):
                train.main([*BASE, "--output", str(ro)])
        finally:
            ro.chmod(0o755)


# ----------------------------------------------------------------------------- resume with other flags
def test_resume_with_flags_that_alter_the_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main([*BASE, "--iterations", "6", "--eval-every", "6", "--output", str(out), "--stop-after", "2"])
    before = _snapshot(out)
    with pytest.raises(ConfigError) as info:
        train.main([*BASE, "--iterations", "6", "--eval-every", "6", "--output", str(out), "--resume", "auto",
                    "--seed", "1", "--batch-size", "2", "--opt", "pooling=gmp_cam"])
    text = str(info.value)
    assert "--seed 0 -> 1" in text and "--batch-size 4 -> 2" in text
    assert "--opt pooling 'gmp_feat' -> 'gmp_cam'" in text and "--allow-config-change" in text
    assert _snapshot(out) == before
    # flags that do not alter the run may differ
    s = train.main([*BASE, "--iterations", "6", "--eval-every", "6", "--output", str(out), "--resume", "auto",
                    "--log-every", "3", "--stop-after", "1", "--vis-images", "1", "--ckpt-every", "5",
                    "--workers", "0", "--data-root", str(tmp_path)])
    assert s["start_step"] == 2 and s["steps"] == 3


def test_allow_config_change_continues_and_records_the_change(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train.main([*BASE, "--iterations", "4", "--eval-every", "4", "--output", str(out), "--stop-after", "2"])
    s = train.main([*BASE, "--iterations", "4", "--eval-every", "4", "--output", str(out), "--resume", "auto",
                    "--lr", "0.002", "--allow-config-change"])
    assert s["start_step"] == 2 and s["finished"] and s["config"]["lr"] == 0.002
    assert "--allow-config-change: --lr 0.001 -> 0.002 from step 3" in capsys.readouterr().err
    change = [r for r in _records(out) if r["kind"] == "config_change"]
    assert change == [{"kind": "config_change", "step": 2, "changes": {"--lr": [0.001, 0.002]}}]
    assert json.loads((out / "config.json").read_text())["lr"] == 0.002


def test_incompatible_weights_name_the_flag(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main([*BASE, "--output", str(out), "--stop-after", "1"])
    with pytest.raises(ConfigError, match=r"--resume: the weights in .*last.pt do not fit this model .*--embed-dim"):
        train.main([*BASE, "--output", str(out), "--resume", "auto", "--embed-dim", "96", "--allow-config-change"])


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_damaged_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    out = tmp_path / "run"
    train.main([*BASE, "--output", str(out), "--stop-after", "1"])
    ckpt = out / "last.pt"
    if damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    match = "is not a checkpoint of train.py" if damage == "foreign" else "is not a readable checkpoint"
    with pytest.raises(ConfigError, match=rf"--resume: {ckpt} {match}"):
        train.main([*BASE, "--output", str(out), "--resume", "auto"])
    res = _cli(*BASE, "--output", str(out), "--resume", "auto")
    assert res.returncode == 2 and str(ckpt) in res.stderr and "Traceback" not in res.stderr


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """A process killed mid-run (maybe mid-write) resumes from its last checkpoint to the same
    losses as an uninterrupted run; every run is a subprocess with one thread."""
    args = [*BASE, "--iterations", "40", "--eval-every", "40", "--ckpt-every", "5", "--drop-path", "0.5",
            "--threads", "1"]
    full = _cli(*args, "--output", str(tmp_path / "full"), timeout=240)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "train.py"), *args, "--output", str(killed)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"step": 12' in metrics.read_text():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = _cli(*args, "--output", str(killed), "--resume", "auto", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(tmp_path / "full"), _losses(killed)
    assert sorted(b) == list(range(1, 41)) and a == b
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["start_step"] >= 10 and summary["final"] == json.loads(
        (tmp_path / "full" / "summary.json").read_text())["final"]


# ----------------------------------------------------------------------------- flag values
@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "inf"], r"--lr: expected a finite number > 0, got inf"),
        (["--lr", "nan"], r"--lr: expected a finite number > 0, got nan"),
        (["--head-lr-mult", "inf"], r"--head-lr-mult: expected a finite number > 0"),
        (["--weight-decay", "inf"], r"--weight-decay: expected a finite number >= 0"),
        (["--power", "nan"], r"--power: expected a finite number >= 0, got nan"),
        (["--power", "-1"], r"--power: expected a finite number >= 0, got -1.0"),
        (["--warmup-ratio", "0"], r"--warmup-ratio: expected a number in \(0, 1\]"),
        (["--drop-path", "nan"], r"--drop-path: expected a number in \[0, 1\)"),
        (["--clip-grad", "inf"], r"--clip-grad: expected a finite number > 0"),
        (["--cam-threshold", "nan"], r"--cam-threshold: expected a number in \[0, 1\]"),
        (["--seg", "--seg-warmup", "inf"], r"--seg-warmup: expected a number in \[0, 1\)"),
        (["--low", "nan"], r"--low: expected a number in \[0, 1\]"),
        (["--eval-scales", "inf"], r"--eval-scales: expected factors in \(0, 4\], got inf"),
        (["--eval-scales", "1.0,nan"], r"--eval-scales: expected factors in \(0, 4\]"),
        (["--eval-scales", "1,0"], r"--eval-scales: expected factors in \(0, 4\]"),
        (["--seed", "-1"], r"--seed: expected an integer >= 0, got -1"),
        (["--seed", str(2 ** 32)], r"--seed: expected an integer < 2\*\*32"),
        (["--workers", "-1"], r"--workers: expected an integer >= 0"),
        (["--threads", "0"], r"--threads: expected an integer >= 1"),
        (["--vis-images", "-1"], r"--vis-images: expected an integer >= 0"),
        (["--log-every", "0"], r"--log-every: expected an integer >= 1"),
        (["--train-length", "0"], r"--train-length: expected an integer >= 1"),
    ],
)
def test_bad_flag_values_are_refused_at_parse_time(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_bad_flag_is_exit_status_2_without_traceback(tmp_path: Path) -> None:
    res = _cli("--lr", "inf", "--output", str(tmp_path / "x"))
    assert res.returncode == 2 and "train.py: error: --lr: expected a finite number > 0, got inf" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x").exists()


def test_recipe_options_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--opt pool_fraction: expected a value in \(0, 1\], got nan"):
        train.main([*BASE, "--recipe", "cpews", "--opt", "pool_fraction=nan", "--output", str(tmp_path / "a")])
    with pytest.raises(ConfigError, match=r"--opt threshold: expected a value in \(0, 1\), got inf"):
        train.main([*BASE, "--recipe", "cpal", "--opt", "threshold=inf", "--output", str(tmp_path / "b")])

    from recipes import Recipe
    from recipes.base import option

    class Ranged(Recipe):  # not registered: recipe_options is the trainer-side hook
        name = "ranged"

        @dataclasses.dataclass
        class Options:
            fraction: float = option(0.3, bounds="(0, 1]")
            weight: float = 1.0
            low: float = 0.1
            high: float = 0.9

            def validate(self) -> None:
                if not self.low < self.high:
                    raise ValueError(f"low: expected a value below high={self.high}, got {self.low}")

    assert train.recipe_options(Ranged, {"fraction": "1"}).fraction == 1.0
    with pytest.raises(ConfigError, match=r"^--opt fraction: expected a value in \(0, 1\], got 7.0$"):
        train.recipe_options(Ranged, {"fraction": "7"})
    with pytest.raises(ConfigError, match=r"^--opt weight: expected a finite number, got inf$"):
        train.recipe_options(Ranged, {"weight": "inf"})
    with pytest.raises(ConfigError, match=r"^--opt low: expected a value below high=0.2, got 0.5$"):
        train.recipe_options(Ranged, {"low": "0.5", "high": "0.2"})


def test_a_diverged_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    original = train.TrainNet.forward

    def poisoned(self, batch, step):  # noqa: ANN001, ANN202 - test double
        terms = original(self, batch, step)
        if step >= 3:
            name = next(iter(terms))
            terms[name] = terms[name]._replace(value=terms[name].value * float("nan"))
        return terms

    monkeypatch.setattr(train.TrainNet, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train.RunError, match=r"step 4: the loss is not finite \(.*total nan.*\), so training "
                                             r"diverged; the checkpoint .*last.pt of step 2 is kept"):
        train.main([*BASE, "--iterations", "6", "--eval-every", "6", "--ckpt-every", "2", "--log-every", "4",
                    "--output", str(out)])
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == 2


# ----------------------------------------------------------------------------- data
def test_empty_validation_set_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--data synthetic: the validation set is empty"):
        train.main([*BASE, "--scene", "val_length=0", "--output", str(tmp_path / "s")])
    root = _fake_voc(tmp_path / "voc")
    (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    with pytest.raises(ConfigError, match=r"--data-root: .*val.txt: the list names no images"):
        train.main([*BASE, "--data", "voc", "--data-root", str(root), "--model", "vit_tiny_patch16_224",
                    "--eval-batch-size", "1", "--output", str(tmp_path / "v")])
    assert not (tmp_path / "v").exists()


def test_unusable_data_files_are_skipped_named_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    root = _fake_voc(tmp_path / "voc")
    base = root / "VOCdevkit" / "VOC2012"
    jpg = base / "JPEGImages" / "2007_000001.jpg"  # a training image, cut off
    jpg.write_bytes(jpg.read_bytes()[:300])
    bad_values = base / "SegmentationClass" / "2007_000002.png"  # a training mask with a value outside 0..20
    m = np.asarray(Image.open(bad_values)).copy()
    m[0, 0] = 30
    Image.fromarray(m, mode="L").save(bad_values)
    ignored = base / "SegmentationClass" / "2007_000005.png"  # a validation mask without any label
    Image.fromarray(np.full(np.asarray(Image.open(ignored)).shape, 255, np.uint8), mode="L").save(ignored)
    s = train.main([*BASE, "--data", "voc", "--data-root", str(root), "--model", "vit_tiny_patch16_224",
                    "--eval-batch-size", "1", "--iterations", "4", "--eval-every", "4", "--workers", "0",
                    "--output", str(tmp_path / "run")])
    assert s["finished"] and all(np.isfinite(v) for v in _losses(tmp_path / "run").values())
    skipped = s["skipped_files"]
    assert len(skipped) == 3, skipped
    assert any(str(jpg) in m and "cannot read the image" in m for m in skipped)
    assert any(str(bad_values) in m and "values must be 0, 1..20 or 255, got [7, 30]" in m for m in skipped)
    assert any(str(ignored) in m and "every pixel is 255" in m for m in skipped)
    err = capsys.readouterr().err
    assert err.count("warning: skipped an unusable file") == 3  # once per file, however often it is met
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == skipped
