"""The shared benchmark helpers in ``benchmarks/_timing.py`` measure what they claim."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _timing  # noqa: E402


def test_saved_bytes_counts_what_autograd_saves():
    a = torch.randn(10, 20, requires_grad=True)
    b = torch.randn(20, 30, requires_grad=True)
    assert _timing.saved_bytes(lambda: a @ b) == (10 * 20 + 20 * 30) * 4  # mm saves both operands
    with torch.no_grad():
        assert _timing.saved_bytes(lambda: a @ b) == 0


def test_median_and_paired_times_track_sleep():
    t = _timing.median_s(lambda: time.sleep(0.002), min_run_time=0.05)
    assert 0.0015 < t < 0.05
    ours, ref = _timing.paired_median_ms(lambda: None, lambda: time.sleep(0.002), min_run_time=0.06, rounds=2)
    assert ours < 1.0 < ref < 50.0


def test_environment_record():
    env = _timing.environment("cpu")
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads() and env["python"].count(".") == 2
    assert isinstance(env["device_name"], str) and env["device_name"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_extra_bytes():
    n = 1 << 20
    extra = _timing.cuda_peak_extra_bytes(lambda: torch.empty(n, device="cuda").fill_(1.0))
    assert extra >= 4 * n
    assert _timing.environment("cuda")["device"] == "cuda"
