"""Slow: ViT-PCM ablation (paper Table 1: MCE -> +ET -> +HV-BiLSTM) on the synthetic scenes.

Default CPU trainer configuration (tiny random-init ViT, 300 steps), ``WSSS_REPRO_SEEDS`` seeds
(3 by default), the ``baseline`` recipe as reference. Writes
``benchmarks/results/reproduce_pcm_cpu.json`` with a markdown table. Asserts only sanity (every
run finishes above trivial predictors); whether the paper's direction reproduces is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _synthetic_runs import chance_levels, markdown, mean_deltas, run_rows, write

ROWS = {
    "baseline": ("baseline", {}),
    "pcm: MCE": ("pcm", {"hv_lstm": "false", "et": "false"}),
    "pcm: MCE + ET": ("pcm", {"hv_lstm": "false", "et": "true"}),
    "pcm: MCE + ET + HV-BiLSTM": ("pcm", {"hv_lstm": "true", "et": "true"}),
    # not in the paper: ET switched on after 150 MCE-only steps (our random-init backbone gives an
    # untrained teacher at step 1; the official backbone is pretrained and frozen for a warm-up)
    "pcm: full, ET from step 150": ("pcm", {"hv_lstm": "true", "et": "true", "et_start": "150"}),
}
SEEDS = tuple(range(int(os.environ.get("WSSS_REPRO_SEEDS", "3"))))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_reproduce_pcm(tmp_path: Path) -> None:
    chance = chance_levels()
    per, rows = run_rows(tmp_path, ROWS, SEEDS)
    table = markdown(rows, len(SEEDS))
    names = list(ROWS)
    steps = mean_deltas(rows, list(zip(names[1:3], names[2:4], strict=True)))
    write("reproduce_pcm_cpu.json", {
        "what": "ViT-PCM Table 1 ablation direction on the synthetic scenes: default "
                "`python examples/train.py` configuration (tiny random-init ViT, 64 px, patch 8, "
                "300 steps, batch 16), final evaluation on 128 val images; CAM = "
                "(Q_k / (Q_k + Q_bg))^gamma of the label-renormalised patch probabilities",
        "seeds": list(SEEDS), "chance": chance, "per_seed": per, "summary": rows,
        "ablation_steps": steps, "table_markdown": table})
    print("\n" + table)
    margin = max(chance.values()) + 0.05
    for label, runs in per.items():
        for r in runs:
            assert r["steps"] == 300
            assert r["cam_miou_best"] > margin, (label, r, chance)
