"""Figures for the documentation site, drawn from the committed JSON in ``benchmarks/results``.

    python benchmarks/plot_results.py            # writes docs/img/*.png

Rerun it after a reproduction or benchmark rewrites its JSON, and commit the PNGs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"

MATRIX_ROWS = ("baseline", "cpews (paper, SSL raw)", "cpews (SSL learned+gate)", "mct", "doei", "pcm", "cpal")


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _save(fig: Any, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def matrix_figure() -> Path:
    """Best CAM mIoU of the main ViT recipes on every data configuration of the matrix."""
    d = _load("reproduce_matrix_cpu.json")
    cfgs = list(d["summary"])
    rows = [r for r in MATRIX_ROWS if all(r in d["summary"][c] for c in cfgs)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        means = [100 * d["summary"][c][r]["cam_miou_best"]["mean"] for c in cfgs]
        stds = [100 * d["summary"][c][r]["cam_miou_best"]["std"] for c in cfgs]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cfgs))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=r)
    ax.set_xticks(range(len(cfgs)), cfgs)
    ax.set_ylabel("best CAM mIoU (%)")
    ax.set_title(f"Synthetic data configurations, tiny random-init ViT, {d['steps']} steps, "
                 f"seeds {', '.join(map(str, d['seeds']))}, CPU", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, "matrix_best_cam.png")


def pretrained_figure() -> Path:
    """Best CAM mIoU per seed, random init against the fractal-pretrained checkpoint."""
    d = _load("reproduce_pretrained_cpu.json")
    recipes = list(d["pretrained_minus_random"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for j, regime in enumerate(("random init", "fractal-pretrained")):
        for i, r in enumerate(recipes):
            vals = [100 * x["cam_miou_best"] for x in d["per_seed"][f"{r} | {regime}"]]
            x = i + (j - 0.5) * 0.3
            ax.scatter([x] * len(vals), vals, s=14, color=f"C{j}", label=regime if i == 0 else None)
            ax.hlines(sum(vals) / len(vals), x - 0.12, x + 0.12, color=f"C{j}")
    ax.set_xticks(range(len(recipes)), recipes)
    ax.set_ylabel("best CAM mIoU (%)")
    ax.set_title(f"Default synthetic scenes, seeds {', '.join(map(str, d['seeds']))} (dots), mean (line), CPU",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, "pretrained_best_cam.png")


def step_figure() -> Path:
    """Training step of each recipe against the plain step, with the 1.25x goal."""
    d = _load("step_cpu.json")
    rows = [r for r in d["recipes"] if "vs_plain" in r]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar([r["recipe"] for r in rows], [r["vs_plain"] for r in rows], color="C0")
    ax.axhline(1.25, color="C3", linestyle="--", label="goal 1.25x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("step time / plain step")
    ax.set_title(f"{d['shapes']['model']} at {d['shapes']['img_size']}, B={d['shapes']['batch']} "
                 f"(swtformer: against the plain Swin step); CPU, {d['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, "step_vs_plain.png")


FIGURES = (matrix_figure, pretrained_figure, step_figure)


def main() -> None:
    for fn in FIGURES:
        sys.stdout.write(f"{fn().relative_to(ROOT)}\n")


if __name__ == "__main__":
    main()
