"""Slow: end-to-end segmentation (``--seg``) against CAM-only training on the synthetic scenes.

Every recipe of the default synthetic comparison (``baseline``, ``cpews``, ``mct``, ``doei``,
``pcm``) trains with its default CPU configuration (tiny random-init ViT, 300 steps) twice per
seed: as is, and with ``--seg`` (a LargeFOV decoder on the final features, trained with
``seg_loss`` on PAR-refined two-threshold pseudo labels of the recipe's CAM from step 150 on,
and ``--seg-crf``: the decoder's probabilities are also scored after the dense CRF).
The final evaluation (128 val images, GT image labels for the CAM metrics, none for the
decoder) gives CAM / pseudo-mask mIoU for both and **seg mIoU** of the decoder for the second.
Each run without ``--seg`` also exports pseudo masks of its first 300 training images with
``examples/make_pseudo_masks.py`` under every refinement (none, PAR, CRF, PAR + CRF) and scores
them against the ground truth. Writes ``benchmarks/results/reproduce_seg_cpu.json`` with
markdown tables. Asserts only
sanity; whether ``--seg`` helps at this scale is reported, not asserted.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from _synthetic_runs import aggregate, chance_levels, run, write

RECIPES = ("baseline", "cpews", "mct", "doei", "pcm")
SEEDS = tuple(range(int(os.environ.get("WSSS_REPRO_SEEDS", "3"))))
# mct / doei take the synthetic defaults of DATASET_DEFAULTS through parse_config (last_k=4, no refine)
MASK_IMAGES = int(os.environ.get("WSSS_REPRO_MASK_IMAGES", "300"))
REFINES = ("none", "par", "crf", "par+crf")


def export_masks(run_dir: Path, out: Path) -> dict[str, dict[str, float]]:
    """Pseudo masks of the first ``MASK_IMAGES`` training images of a finished run, every refinement:
    mIoU (confident pixels) and coverage against the synthetic ground truth."""
    import make_pseudo_masks

    from wsss_blocks.refine import crf_available

    res = {}
    for mode in REFINES:
        if mode.endswith("crf") and not crf_available():
            continue
        s = make_pseudo_masks.main(["--checkpoint", str(run_dir), "--output", str(out / mode.replace("+", "_")),
                                    "--refine", mode, "--limit", str(MASK_IMAGES), "--device", "cpu",
                                    "--quiet", "--no-progress"])
        res[mode] = {"miou": s["miou"], "coverage": s["coverage"], "time_s": s["time_s"]}
    return res


def mask_table(masks: dict[str, list[dict[str, dict[str, float]]]]) -> tuple[dict[str, Any], str]:
    summary: dict[str, Any] = {}
    lines = ["| run | " + " | ".join(f"{m} mIoU / coverage" for m in REFINES) + " |",
             "|---|" + "---|" * len(REFINES)]
    for label, per_seed in masks.items():
        summary[label] = {}
        cells = []
        for mode in REFINES:
            if not all(mode in r for r in per_seed):
                cells.append("-")
                continue
            agg = {}
            for key in ("miou", "coverage"):
                vals = [r[mode][key] for r in per_seed]
                agg[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            summary[label][mode] = agg
            cells.append(f"{100 * agg['miou']['mean']:.1f} ± {100 * agg['miou']['std']:.1f} / "
                         f"{100 * agg['coverage']['mean']:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nexamples/make_pseudo_masks.py on the first {MASK_IMAGES} training images of each "
                 "run (single-scale CAM, low 0.25 / high 0.7); mIoU on the confident pixels, coverage = "
                 "confident fraction, percent, mean ± std over seeds")
    return summary, "\n".join(lines)


def _pct(agg: dict[str, Any], m: str) -> str:
    if m not in agg:
        return "-"
    return f"{100 * agg[m]['mean']:.1f} ± {100 * agg[m]['std']:.1f}"


def seg_markdown(rows: dict[str, dict[str, Any]], n_seeds: int) -> str:
    lines = ["| run | CAM mIoU (thr 0.3) | best CAM mIoU | pseudo mIoU | coverage | seg mIoU | seg + CRF mIoU "
             "| CPU s |", "|---|---|---|---|---|---|---|---|"]
    for name, agg in rows.items():
        lines.append(f"| {name} | {_pct(agg, 'cam_miou')} | {_pct(agg, 'cam_miou_best')} "
                     f"| {_pct(agg, 'pseudo_miou')} | {_pct(agg, 'pseudo_coverage')} "
                     f"| {_pct(agg, 'seg_miou')} | {_pct(agg, 'seg_crf_miou')} | {agg['cpu_s']['mean']:.0f} |")
    lines.append(f"\nmean ± std over {n_seeds} seeds, percent; seg mIoU is the decoder's argmax "
                 "(single scale, no image labels), seg + CRF the same probabilities after the dense CRF (ToCo's "
                 "settings)")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(10800)
def test_reproduce_seg(tmp_path: Path) -> None:
    chance = chance_levels()
    per: dict[str, list[dict[str, Any]]] = {}
    masks: dict[str, list[dict[str, dict[str, float]]]] = {}
    for recipe in RECIPES:
        per[recipe] = [run(tmp_path / f"{recipe}_{s}", recipe, s) for s in SEEDS]
        masks[recipe] = [export_masks(tmp_path / f"{recipe}_{s}", tmp_path / f"{recipe}_{s}_masks")
                         for s in SEEDS]
        per[f"{recipe} --seg"] = [run(tmp_path / f"{recipe}_seg_{s}", recipe, s, extra=["--seg", "--seg-crf"])
                                  for s in SEEDS]
    rows = {label: aggregate(v) for label, v in per.items()}
    table = seg_markdown(rows, len(SEEDS))
    mask_summary, masks_md = mask_table(masks)

    def mean(label: str, m: str) -> float:
        return float(rows[label][m]["mean"])

    comparisons = {r: {
        "seg_miou_minus_cam_miou_best_of_same_run":
            mean(f"{r} --seg", "seg_miou") - mean(f"{r} --seg", "cam_miou_best"),
        "seg_miou_minus_cam_miou_of_same_run": mean(f"{r} --seg", "seg_miou") - mean(f"{r} --seg", "cam_miou"),
        "cam_miou_best_with_seg_minus_without": mean(f"{r} --seg", "cam_miou_best") - mean(r, "cam_miou_best"),
        "pseudo_miou_with_seg_minus_without": mean(f"{r} --seg", "pseudo_miou") - mean(r, "pseudo_miou"),
        "seg_miou_minus_cam_miou_best_without_seg": mean(f"{r} --seg", "seg_miou") - mean(r, "cam_miou_best"),
        "seg_crf_miou_minus_seg_miou": mean(f"{r} --seg", "seg_crf_miou") - mean(f"{r} --seg", "seg_miou"),
    } for r in RECIPES}
    write("reproduce_seg_cpu.json", {
        "what": "each recipe's default `python examples/train.py` synthetic configuration (tiny "
                "random-init ViT, 64 px, patch 8, 300 steps, batch 16) without and with --seg "
                "(LargeFOV decoder, seg_loss on PAR two-threshold pseudo labels from step 150) and "
                "--seg-crf; "
                "final evaluation on 128 val images. CAM metrics use the GT image labels, seg "
                "mIoU (decoder argmax, single scale; without and with the dense CRF) does not",
        "seeds": list(SEEDS), "chance": chance, "per_seed": per, "summary": rows,
        "comparisons": comparisons, "table_markdown": table,
        "train_masks": {"images": MASK_IMAGES, "per_seed": masks, "summary": mask_summary,
                        "table_markdown": masks_md}})
    print("\n" + table + "\n\n" + masks_md)
    # sanity on the CAM-only runs (the reference); a --seg run may legitimately end worse (the
    # backbone also learns from the decoder's loss on noisy pseudo labels; pcm seed 1 fell to
    # 16.4 best CAM mIoU with --seg in the committed run) and is reported, not asserted
    margin = max(chance.values()) + 0.05
    for label, runs in per.items():
        for r in runs:
            assert r["steps"] == 300
            assert ("seg_miou" in r) == label.endswith("--seg"), (label, r)
            if "seg_miou" in r:
                assert 0.0 <= r["seg_miou"] <= 1.0 and 0.0 <= r["seg_crf_miou"] <= 1.0, (label, r)
                assert r["cam_miou_best"] > max(chance.values()) - 0.05, (label, r, chance)  # not broken
            else:
                assert r["cam_miou_best"] > margin, (label, r, chance)
