"""Slow: every ViT recipe from random init and from the committed fractal-pretrained checkpoint.

Default synthetic configuration (tiny ViT depth 4 / width 96 / patch 8, 64 px, 300 steps,
batch 16), ``WSSS_REPRO_SEEDS`` seeds (3 by default); the second regime adds
``--pretrained examples/weights/vit_tiny_p8_64_fractal.pth`` (``examples/pretrain.py``: IFS
fractal classification, no natural images, no class of the scenes). MCT and DOEI run with the
same options in both regimes (all blocks, no patch-affinity refinement) so that only the
backbone's initialisation differs; two extra rows run them with MCTformer's refinement on the
pretrained backbone. Writes ``benchmarks/results/reproduce_pretrained_cpu.json`` (a line per run
is appended to ``reproduce_pretrained_cpu.jsonl`` as it finishes). Asserts only that every run
finishes; the verdicts are reported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _synthetic_runs import RESULTS, ROOT, aggregate, chance_levels, markdown, run, write

WEIGHTS = ROOT / "examples" / "weights" / "vit_tiny_p8_64_fractal.pth"
UNREFINED = {"refine": "false", "last_k": "4"}
RECIPES = {"baseline": {}, "cpews": {}, "cpal": {}, "mct": UNREFINED, "doei": UNREFINED, "pcm": {}}
EXTRA_PRETRAINED = {"mct, refine=true last_k=3": ("mct", {"refine": "true", "last_k": "3"}),
                    "doei, refine=true last_k=3": ("doei", {"refine": "true", "last_k": "3"})}
SEEDS = tuple(range(int(os.environ.get("WSSS_REPRO_SEEDS", "3"))))


def rows() -> dict[str, tuple[str, dict[str, str], list[str]]]:
    out = {}
    for recipe, opts in RECIPES.items():
        out[f"{recipe} | random init"] = (recipe, opts, [])
        out[f"{recipe} | fractal-pretrained"] = (recipe, opts, ["--pretrained", str(WEIGHTS)])
    for label, (recipe, opts) in EXTRA_PRETRAINED.items():
        out[f"{label} | fractal-pretrained"] = (recipe, opts, ["--pretrained", str(WEIGHTS)])
    return out


@pytest.mark.slow
@pytest.mark.timeout(14400)
def test_reproduce_pretrained(tmp_path: Path) -> None:
    chance = chance_levels()
    log = RESULTS / "reproduce_pretrained_cpu.jsonl"
    per: dict[str, list[dict]] = {}
    for i, (label, (recipe, opts, extra)) in enumerate(rows().items()):
        per[label] = []
        for s in SEEDS:
            res = run(tmp_path / f"{i}_{s}", recipe, s, opts, extra=extra)
            per[label].append(res)
            with log.open("a") as fh:
                fh.write(json.dumps({"row": label, "seed": s, **res}) + "\n")
    summary = {r: aggregate(v) for r, v in per.items()}
    table = markdown(summary, len(SEEDS))
    gains = {recipe: {m: summary[f"{recipe} | fractal-pretrained"][m]["mean"]
                      - summary[f"{recipe} | random init"][m]["mean"] for m in ("cam_miou_best", "pseudo_miou")}
             for recipe in RECIPES}
    vs_baseline = {regime: {recipe: summary[f"{recipe} | {regime}"]["cam_miou_best"]["mean"]
                            - summary[f"baseline | {regime}"]["cam_miou_best"]["mean"]
                            for recipe in RECIPES if recipe != "baseline"}
                   for regime in ("random init", "fractal-pretrained")}
    write("reproduce_pretrained_cpu.json", {
        "what": "each ViT recipe in the default synthetic configuration (tiny ViT, 64 px, patch 8, 300 "
                "steps) from random init and from examples/weights/vit_tiny_p8_64_fractal.pth",
        "weights": str(WEIGHTS.relative_to(ROOT)), "seeds": list(SEEDS), "chance": chance,
        "per_seed": per, "summary": summary, "pretrained_minus_random": gains,
        "best_cam_minus_baseline_per_regime": vs_baseline, "table_markdown": table})
    print("\n" + table)
    for runs in per.values():
        for r in runs:
            assert r["steps"] == 300 and 0.0 <= r["cam_miou_best"] <= 1.0
