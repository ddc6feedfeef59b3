"""Slow: DOEI defaults sweep and Table 4 ablation on the synthetic scenes.

One factor at a time around the paper defaults (st=0.02, af=sf=1): st in {.01,.02,.04},
af in {.5,1,2}, sf in {.5,1,2}; ablation MCT, +CPDO, +PPDO, +CPDO+PPDO, +HFA (= full DOEI).
Writes ``benchmarks/results/doei_sweep_cpu.json``. Asserts sanity only; whether the paper
defaults are best is reported in the JSON, never used to change library defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _synthetic_runs import aggregate, markdown, run, write

SEEDS = tuple(range(int(os.environ.get("WSSS_SWEEP_SEEDS", "2"))))
OFF_HFA = {"use_hfa": "false"}
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "MCT (no DOEI)": ("mct", {}),
    "+CPDO": ("doei", {"use_ppdo": "false", **OFF_HFA}),
    "+PPDO": ("doei", {"use_cpdo": "false", **OFF_HFA}),
    "+CPDO+PPDO": ("doei", OFF_HFA),
    "+CPDO+PPDO+HFA (defaults: st=.02, af=sf=1)": ("doei", {}),
    "st=0.01": ("doei", {"st": "0.01"}),
    "st=0.04": ("doei", {"st": "0.04"}),
    "af=0.5": ("doei", {"af": "0.5"}),
    "af=2": ("doei", {"af": "2"}),
    "sf=0.5": ("doei", {"sf": "0.5"}),
    "sf=2": ("doei", {"sf": "2"}),
}
DEFAULT = "+CPDO+PPDO+HFA (defaults: st=.02, af=sf=1)"


@pytest.mark.slow
@pytest.mark.timeout(10800)
def test_doei_sweep(tmp_path: Path) -> None:
    per = {name: [run(tmp_path / f"{i}_{s}", recipe, s, opts) for s in SEEDS]
           for i, (name, (recipe, opts)) in enumerate(CONFIGS.items())}
    rows = {name: aggregate(v) for name, v in per.items()}
    sweep = [n for n in rows if n.startswith(("st=", "af=", "sf=")) or n == DEFAULT]
    best = max(sweep, key=lambda n: rows[n]["cam_miou_best"]["mean"])
    table = markdown(rows, len(SEEDS))
    write("doei_sweep_cpu.json", {
        "what": "MCT + DOEI on the synthetic scenes (default trainer config: tiny random-init "
                "ViT, depth 4, 300 steps, unrefined attention CAMs of all blocks), one factor "
                "at a time around the paper defaults, plus the Table 4 ablation",
        "seeds": list(SEEDS), "configs": {n: {"recipe": r, "opts": o} for n, (r, o) in CONFIGS.items()},
        "per_seed": per, "summary": rows, "best_of_sweep_by_cam_miou_best": best,
        "paper_defaults_best": best == DEFAULT, "table_markdown": table})
    print("\n" + table)
    for name, runs in per.items():
        for r in runs:
            assert r["steps"] == 300 and 0.0 < r["cam_miou_best"] <= 1.0, (name, r)


CONFIRM_SEEDS = tuple(range(2, 2 + int(os.environ.get("WSSS_CONFIRM_SEEDS", "4"))))


@pytest.mark.slow
@pytest.mark.timeout(10800)
def test_doei_af_confirmation(tmp_path: Path) -> None:
    """More seeds (disjoint from the sweep's) for the sweep's best (af=0.5) vs the defaults."""
    contenders = {DEFAULT: CONFIGS[DEFAULT], "af=0.5": CONFIGS["af=0.5"]}
    per = {name: [run(tmp_path / f"{i}_{s}", recipe, s, opts) for s in CONFIRM_SEEDS]
           for i, (name, (recipe, opts)) in enumerate(contenders.items())}
    rows = {name: aggregate(v) for name, v in per.items()}
    diffs = [a["cam_miou_best"] - d["cam_miou_best"] for a, d in zip(per["af=0.5"], per[DEFAULT], strict=True)]
    table = markdown(rows, len(CONFIRM_SEEDS))
    write("doei_af_confirm_cpu.json", {
        "what": "confirmation of the sweep's best setting (af=0.5) against the paper defaults on "
                "seeds disjoint from the sweep's; paired differences of best CAM mIoU",
        "seeds": list(CONFIRM_SEEDS), "per_seed": per, "summary": rows,
        "paired_diff_cam_miou_best": diffs, "table_markdown": table})
    print("\n" + table + f"\npaired af=0.5 - default (best CAM mIoU): {diffs}")
    for runs in per.values():
        for r in runs:
            assert r["steps"] == 300 and 0.0 < r["cam_miou_best"] <= 1.0
