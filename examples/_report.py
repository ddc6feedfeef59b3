"""Reporting of the reference trainer: metrics.jsonl, the curve plot and the comparison table.

One concept: turning a run's numbers into files and text a person reads.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["JsonlWriter", "read_jsonl", "plot_curves", "format_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = (
    ("cam_miou", "CAM mIoU"),
    ("cam_miou_best", "best CAM mIoU"),
    ("best_threshold", "(bg thr)"),
    ("pseudo_miou", "pseudo mIoU"),
    ("pseudo_coverage", "coverage"),
    ("seg_miou", "seg mIoU"),  # only with --seg: shown when a row has it
    ("seg_crf_miou", "seg+CRF mIoU"),  # only with --seg-crf
)
_OPTIONAL_COLUMNS = ("seg_miou", "seg_crf_miou")


class JsonlWriter:
    """Append one JSON object per line (rank 0 only; pass ``path=None`` elsewhere)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``[]`` when it does not exist). A last line without its
    newline that does not parse was cut off by a killed process and is dropped; any other line
    that does not parse raises ``ValueError`` naming the file and the line."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        lines = fh.readlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err})") from None
    return out


def plot_curves(metrics_path: str, out_path: str, title: str = "") -> str | None:
    """Loss terms (left) and mIoU (right) against the step, from ``metrics.jsonl``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the [train] extra
        return None
    records = read_jsonl(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    grads = [r for r in records if r.get("kind") == "grad"]
    fig, axes = plt.subplots(1, 3 if grads else 2, figsize=(15 if grads else 10, 3.6))
    ax1, ax2 = axes[0], axes[1]
    terms = sorted({k[5:] for r in train for k in r if k.startswith("loss/")})
    for term in terms:
        pts = [(r["step"], r[f"loss/{term}"]) for r in train if f"loss/{term}" in r]
        if pts and any(math.isfinite(v) and v != 0 for _, v in pts):
            steps, values = zip(*pts, strict=True)  # unzip (step, value) pairs
            ax1.plot(steps, values, label=term, lw=1.2)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (unweighted terms)")
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.legend(fontsize=7)
    for key, label in (("cam_miou", "CAM mIoU"), ("cam_miou_best", "best CAM mIoU"),
                       ("pseudo_miou", "pseudo mIoU")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax2.plot(steps, values, marker="o", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("mIoU")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    if grads:  # --grad-norms: per-term gradient norm, backbone solid, heads dashed
        ax3 = axes[2]
        keys = sorted({k for r in grads for k in r if k.startswith("grad/")})
        for i, key in enumerate(k for k in keys if k.endswith("/backbone")):
            term = key.split("/")[1]
            for group, style in (("backbone", "-"), ("heads", "--")):
                pts = [(r["step"], r[f"grad/{term}/{group}"]) for r in grads if f"grad/{term}/{group}" in r]
                if pts and any(v > 0 for _, v in pts):
                    steps, values = zip(*pts, strict=True)
                    ax3.plot(steps, values, style, color=f"C{i}", lw=1.2, label=f"{term} ({group})")
        ax3.set_xlabel("step")
        ax3.set_ylabel("gradient norm (weighted term)")
        ax3.set_yscale("symlog", linthresh=1e-4)
        ax3.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def format_table(rows: list[tuple[str, dict[str, float], float]]) -> str:
    """A markdown table: one row per ``(recipe, final metrics, seconds)``."""
    columns = [(k, lab) for k, lab in TABLE_COLUMNS if k not in _OPTIONAL_COLUMNS or any(k in m for _, m, _ in rows)]
    head = "| recipe | " + " | ".join(label for _, label in columns) + " | time (s) |"
    sep = "|" + "---|" * (len(columns) + 2)
    lines = [head, sep]
    for name, m, secs in rows:
        cells = []
        for key, _ in columns:
            v = m.get(key, float("nan"))
            cells.append(f"{v:.2f}" if key == "best_threshold" else f"{100 * v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)
