"""benchmarks/perf_tables.py builds the README performance tables from the committed JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_tables_from_json(tmp_path, monkeypatch):
    import perf_tables

    monkeypatch.setattr(perf_tables, "RESULTS", tmp_path)
    assert perf_tables.step_table().startswith("(no step_cpu.json)")
    step = {"device": "x86_64", "threads": 2, "cpu_count": 2, "loadavg_before": [3.0, 2.0, 1.0],
            "shapes": {"model": "vit_small_patch16_224", "img_size": 224, "batch": 4, "swin": "swin_t"},
            "steps": 5, "warmup": 2, "memory": "rss",
            "plain_runs": {"vit": [{"step_median_ms": 100.0, "step_min_ms": 90.0, "maxrss_delta_mb": 50.0},
                                   {"step_median_ms": 110.0, "step_min_ms": 95.0, "maxrss_delta_mb": 51.0}]},
            "recipes": [{"recipe": "mct", "step_median_ms": 131.25, "vs_plain": 1.25, "step_min_ms": 120.0,
                         "maxrss_delta_mb": 60.0},
                        {"recipe": "bad", "error": "boom"}]}
    (tmp_path / "step_cpu.json").write_text(json.dumps(step))
    table = perf_tables.step_table()
    assert "| mct | 131 ms | 1.25x | 120 ms | 60 MiB |" in table
    assert "| plain (`baseline`, vit; first, last run) | 100, 110 ms | 1.00x | 90, 95 ms | 50 MiB |" in table
    assert "| bad | failed | | | |" in table
    assert "load average 3.0 on 2 cores" in table


def test_committed_json_renders():
    import perf_tables

    out = perf_tables.ism_table()
    assert "/ floor" in out or out.startswith("(no ")
