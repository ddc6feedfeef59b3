"""Slow: SWTformer on the synthetic scenes -- the paper's Table 3 direction and V1 vs V2.

Rows (all on the same tiny random-init Swin, default synthetic configuration otherwise):

* ``v1``: SWTformer-V1, CLS only, evaluated on the CAM head -- the paper's Table 3 row 1
  (49.84 there is V1's seed mIoU of Table 2);
* ``v2_cls``: V2 heads with ``gsc_weight=0, ccl_weight=0``, evaluated on the R-CAM: shows
  what the refinement gives with an untrained HFF;
* ``v2_cls_gsc``: ``ccl_weight=0`` (Table 3 row 2);
* ``v2_cls_gsc_ccl``: the full V2 (Table 3 row 3);
* ``v2_bg_scale1``: the full V2 with SIPE's background IoU factor 0.5 switched off
  (``bg_scale=1``), a diagnostic: at this scale the near-uniform token affinity plus the x0.5
  leaves few background seeds (about 9 % of tokens on validation images after training), so
  the background prototype is often empty and GSC pulls the background CAM towards 0.

Only V1 must beat the trivial predictors (the V2 rows sit near chance at this scale: that is
the reported finding, not a broken run).

Writes ``benchmarks/results/reproduce_swtformer_cpu.json`` (+ a markdown table inside it).
Asserts only sanity (every run finishes, beats trivial predictors); the directions are
reported, not asserted. Seeds via ``WSSS_REPRO_SEEDS`` (default 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _synthetic_runs import aggregate, chance_levels, markdown, run, write

SWIN = ["--model", "swin_tiny_patch4_window7_224", "--patch-size", "2", "--depths", "1,1,1,1",
        "--embed-dim", "24", "--num-heads", "1,2,3,6", "--window-size", "4"]
ROWS = {
    "v1": {"version": "v1"},
    "v2_cls": {"version": "v2", "gsc_weight": 0.0, "ccl_weight": 0.0},
    "v2_cls_gsc": {"version": "v2", "ccl_weight": 0.0},
    "v2_cls_gsc_ccl": {"version": "v2"},
    "v2_bg_scale1": {"version": "v2", "bg_scale": 1.0},
}
SEEDS = tuple(range(int(os.environ.get("WSSS_REPRO_SEEDS", "3"))))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_reproduce_swtformer(tmp_path: Path) -> None:
    chance = chance_levels()
    per: dict[str, list[dict]] = {}
    for row, opts in ROWS.items():
        per[row] = [run(tmp_path / f"{row}_{s}", "swtformer", s, opts, extra=SWIN) for s in SEEDS]
    rows = {r: aggregate(v) for r, v in per.items()}
    table = markdown(rows, len(SEEDS))

    def delta(a: str, b: str, m: str = "cam_miou_best") -> float:
        return rows[a][m]["mean"] - rows[b][m]["mean"]

    directions = {
        "table3_gsc_over_cls": delta("v2_cls_gsc", "v1"),
        "table3_ccl_over_gsc": delta("v2_cls_gsc_ccl", "v2_cls_gsc"),
        "v2_over_v1": delta("v2_cls_gsc_ccl", "v1"),
        "bg_scale1_over_v2": delta("v2_bg_scale1", "v2_cls_gsc_ccl"),
        "paper": {"table3_gsc_over_cls": 54.58 - 49.84, "table3_ccl_over_gsc": 55.16 - 54.58,
                  "v2_over_v1": 55.16 - 49.84, "unit": "VOC train seed mIoU points"},
    }
    write("reproduce_swtformer_cpu.json", {
        "what": "swtformer recipe on the synthetic scenes (tiny random-init Swin: patch 2, depths 1,1,1,1, "
                "embed 24, heads 1,2,3,6, window 4; stage grids 32/16/8/4 at 64x64), default synthetic "
                "configuration (300 steps), final evaluation on 128 val images; V2 rows evaluate the "
                "foreground R-CAM channels, v1 the CAM head",
        "swin_flags": SWIN, "rows": ROWS, "seeds": list(SEEDS), "chance": chance, "per_seed": per,
        "summary": rows, "directions_cam_miou_best": directions, "table_markdown": table})
    print("\n" + table)
    margin = max(chance.values()) + 0.05
    for row, runs in per.items():
        for r in runs:
            assert r["steps"] == 300
            assert 0.0 <= r["cam_miou_best"] <= 1.0
            if row == "v1":  # the V2 rows may sit near chance at this scale (reported, not asserted)
                assert r["cam_miou_best"] > margin, (row, r, chance)
