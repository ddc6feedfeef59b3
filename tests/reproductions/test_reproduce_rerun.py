"""Slow: rerun committed reproduction rows after a change to code they use, seed by seed.

Each row below names a committed reproduction JSON, the row's label in it and the recipe; the
rerun uses the options the committed run recorded (plus ``EXTRA`` where a recipe's defaults
have moved since, so that the rerun is the same configuration) and the same seeds. Writes
``benchmarks/results/reproduce_rerun_cpu.json``: per seed the committed and the new best CAM
mIoU / pseudo mIoU and their difference. Nothing is asserted beyond sanity; a difference
larger than the row's seed spread says the committed table no longer describes the code.

Rows now: the k-means and DOEI speed-ups (k-means++ draws: cpews' prototype pool; doei's fused
attention path, same values up to rounding; pcm's teacher shared with the student's backbone
pass, same losses up to rounding).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from _synthetic_runs import RESULTS, run, write

ROWS = {  # name -> (committed JSON, row label there, recipe)
    "cpews (paper-form SSL)": ("reproduce_synthetic_cpu.json", "cpews", "cpews"),
    "doei": ("reproduce_synthetic_cpu.json", "doei", "doei"),
    "pcm: MCE + ET + HV-BiLSTM": ("reproduce_pcm_cpu.json", "pcm: MCE + ET + HV-BiLSTM", "pcm"),
}
# the committed cpews rows predate the recipe's new SSL default: pin the paper form they ran
EXTRA = {"cpews (paper-form SSL)": {"ssl_source_share": "none", "ssl_denominator": "phi"}}
SEEDS = tuple(range(int(os.environ.get("WSSS_REPRO_SEEDS", "3"))))
# recipe options renamed since the committed runs recorded them (cpews: the library's names)
RENAMED = {"cpews": {"aux_layer": "mid_layer", "ssl_reduction": "ssl_denominator"}}
# recorded values that meant "unset" and are None now (cpews pool_step 0: from pool_fraction)
UNSET = {"cpews": {"pool_step": 0}}


def _opt(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _recorded_options(recipe: str, options: dict) -> dict[str, str]:
    """The committed run's options as ``--opt`` strings under today's names, unset ones left out."""
    renamed, unset = RENAMED.get(recipe, {}), UNSET.get(recipe, {})
    # older runs recorded -1 for "unset" (the preset's value), which is now None: leave it out
    return {renamed.get(k, k): _opt(v) for k, v in options.items()
            if v is not None and v != -1.0 and not (k in unset and v == unset[k])}


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_reproduce_rerun(tmp_path: Path) -> None:
    out: dict[str, dict] = {}
    for name, (source, label, recipe) in ROWS.items():
        committed = json.loads((RESULTS / source).read_text())["per_seed"][label]
        rows = []
        for s in SEEDS:
            old = committed[s]
            opts = _recorded_options(recipe, old["options"])
            opts.update(EXTRA.get(name, {}))
            new = run(tmp_path / f"{recipe}_{s}", recipe, s, opts)
            assert new["steps"] == old["steps"]
            rows.append({"seed": s, **{f"{m}_{w}": 100 * r[m] for m in ("cam_miou_best", "pseudo_miou")
                                       for w, r in (("committed", old), ("rerun", new))}})
        deltas = [r["cam_miou_best_rerun"] - r["cam_miou_best_committed"] for r in rows]
        spread = statistics.stdev(r["cam_miou_best_committed"] for r in rows) if len(rows) > 1 else 0.0
        out[name] = {"source": source, "label": label, "per_seed": rows,
                     "mean_delta_cam_miou_best": statistics.fmean(deltas),
                     "committed_seed_std_cam_miou_best": spread}
    write("reproduce_rerun_cpu.json", {
        "what": "committed reproduction rows rerun seed by seed after code changes they depend on "
                "(best CAM mIoU and pseudo mIoU in %, committed vs rerun)", "seeds": list(SEEDS), "rows": out})
    for name, row in out.items():
        print(name, [round(r["cam_miou_best_rerun"] - r["cam_miou_best_committed"], 1) for r in row["per_seed"]])
