"""Shared helpers of the slow synthetic reproductions: run the trainer, aggregate, write tables."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

METRICS = ("cam_miou", "cam_miou_best", "pseudo_miou", "pseudo_coverage")
OPTIONAL = ("seg_miou", "seg_crf_miou")  # only in runs that have them (``--seg``, ``--seg-crf``)


def run(out: Path, recipe: str, seed: int, opts: dict[str, Any] | None = None,
        extra: list[str] | None = None) -> dict[str, Any]:
    """One default-config synthetic run (CPU) of ``recipe``; returns final metrics + timing."""
    import train

    argv = ["--recipe", recipe, "--baseline", "off", "--seed", str(seed), "--device", "cpu",
            "--output", str(out), "--no-plots", "--no-progress", "--quiet", *(extra or [])]
    for k, v in (opts or {}).items():
        argv += ["--opt", f"{k}={v}"]
    t0, c0 = time.time(), time.process_time()
    summary = train.main(argv)
    final = summary["final"]
    return {**{m: final[m] for m in METRICS}, **{m: final[m] for m in OPTIONAL if m in final},
            "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "steps": summary["steps"], "options": summary["recipe_options"]}


def run_rows(out: Path, rows: dict[str, tuple[str, dict[str, Any]]], seeds: tuple[int, ...],
             extra: list[str] | None = None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Every row ``label -> (recipe, opts)`` for every seed: ``(per_seed, summary)`` (see :func:`aggregate`)."""
    per = {label: [run(out / f"{recipe}_{i}_{s}", recipe, s, opts, extra=extra) for s in seeds]
           for i, (label, (recipe, opts)) in enumerate(rows.items())}
    return per, {label: aggregate(v) for label, v in per.items()}


def mean_deltas(summary: dict[str, dict[str, Any]], pairs: list[tuple[str, str]],
                metrics: tuple[str, ...] = ("cam_miou", "cam_miou_best", "pseudo_miou")) -> dict[str, dict[str, float]]:
    """``"before -> after"``: the difference of the seed means of ``metrics`` for each pair."""
    return {f"{b} -> {a}": {m: summary[a][m]["mean"] - summary[b][m]["mean"] for m in metrics} for b, a in pairs}


def chance_levels(num_images: int = 128) -> dict[str, float]:
    """mIoU of two trivial predictors on the evaluation images (GT labels known)."""
    from wsss_blocks.data import SyntheticScenes
    from wsss_blocks.metrics import MeanIoU

    ds = SyntheticScenes(split="val", length=num_images, image_size=64, seed=0)
    bg, fill = MeanIoU(7), MeanIoU(7)
    for i in range(num_images):
        item = ds[i]
        mask = item["mask"][None]
        bg.update(torch.zeros_like(mask), mask)
        first = int(item["labels"].argmax()) + 1
        fill.update(torch.full_like(mask, first), mask)
    return {"all_background": bg.compute().miou, "fill_first_present_class": fill.compute().miou}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in (*METRICS, *OPTIONAL, "wall_s", "cpu_s"):
        if not all(m in r for r in per_seed):
            continue
        vals = [r[m] for r in per_seed]
        out[m] = {"mean": statistics.fmean(vals),
                  "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def markdown(rows: dict[str, dict[str, Any]], n_seeds: int) -> str:
    head = ("| run | CAM mIoU (thr 0.3) | best CAM mIoU | pseudo mIoU | coverage | CPU s |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for name, agg in rows.items():
        def fmt(m: str, agg: dict[str, Any] = agg) -> str:
            return f"{100 * agg[m]['mean']:.1f} ± {100 * agg[m]['std']:.1f}"
        lines.append(f"| {name} | {fmt('cam_miou')} | {fmt('cam_miou_best')} | {fmt('pseudo_miou')} "
                     f"| {fmt('pseudo_coverage')} | {agg['cpu_s']['mean']:.0f} |")
    lines.append(f"\nmean ± std over {n_seeds} seeds, percent")
    return "\n".join(lines)


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), **payload}
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
