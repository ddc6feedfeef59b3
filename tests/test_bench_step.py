"""Smoke test of benchmarks/bench_step.py on a tiny config: it runs every chosen recipe's full
training step through the trainer's code and writes a JSON with times, memory and ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("timm")


def test_bench_step_tiny(tmp_path):
    import bench_step

    out = tmp_path / "step.json"
    res = bench_step.main(["--tiny", "--device", "cpu", "--in-process", "--recipes", "baseline,mct,swtformer",
                           "--steps", "1", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    names = [r["recipe"] for r in res["recipes"]]
    assert names == ["mct", "swtformer"]  # baseline is the reference, run first and last per backbone
    for row in res["recipes"]:
        assert "error" not in row, row
        assert row["step_median_ms"] > 0 and row["vs_plain"] > 0
        assert row["plain_step_ms"] > 0 and "maxrss_delta_mb" in row
    assert res["recipes"][1]["model"].startswith("swin")  # swtformer compared on its own Swin
    assert len(res["plain_runs"]["vit"]) == 2 and len(res["plain_runs"]["swin"]) == 2
    assert "loadavg_before" in res and res["config"] == "tiny"


def test_bench_step_reports_failures(tmp_path):
    import bench_step

    res = bench_step.main(["--tiny", "--device", "cpu", "--in-process", "--recipes", "nosuch", "--steps", "1",
                           "--warmup", "0", "--out", str(tmp_path / "s.json")])
    assert res["recipes"][0]["recipe"] == "nosuch" and "error" in res["recipes"][0]
