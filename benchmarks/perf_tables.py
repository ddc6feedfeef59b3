"""Markdown tables for the README's performance section, generated from the committed JSON.

    python benchmarks/perf_tables.py            # prints the tables (k-means, training step, ISM)

Every number comes from ``benchmarks/results/*.json``; a missing file gives a line saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _load_str(data: dict[str, Any]) -> str:
    load = data.get("loadavg_before") or data.get("load_average_at_start")
    return f"load average {load[0]:.1f} on {data.get('cpu_count', 2)} cores" if load else "load not recorded"


def kmeans_table(name: str = "prototypes_t1_cpu.json") -> str:
    """k-means against its matmul floor and scikit-learn (``bench_prototypes.py --threads N``)."""
    r = _load(name)
    if r is None:
        return f"(no {name})\n"
    s = r["shapes"]
    c, q = r["cpu_time_ms"], r["cpu_time_ratios"]
    lines = [
        f"`prototypes.kmeans` on ({s['classes']}, {s['capacity']}, {s['dim']}), {s['clusters']} centres, "
        f"{s['iters']} Lloyd steps; CPU, {r['threads']} thread(s), {_load_str(r)}; median of "
        f"{s['repeats']} interleaved rounds (`benchmarks/results/{name}`).",
        "",
        "| | CPU time | wall time |",
        "|---|---|---|",
        f"| `kmeans` (seeding + Lloyd) | {c['kmeans_batched']:.0f} ms | {r['kmeans_batched_ms']:.0f} ms |",
        f"| seeding alone (`iters=0`) | {c['kmeans_seed']:.0f} ms | {r['kmeans_seed_ms']:.0f} ms |",
        f"| floor: the {s['clusters'] - 1} seeding matvecs | {c['floor_seed']:.0f} ms | {r['floor_seed_ms']:.0f} ms |",
        f"| floor: {s['iters']} x (assignment + update matmul) | {c['floor_lloyd']:.0f} ms | "
        f"{r['floor_lloyd_ms']:.0f} ms |",
    ]
    if "kmeans_loop" in c:
        lines.append(f"| per-class torch loop (cdist) | {c['kmeans_loop']:.0f} ms | {r['kmeans_loop_ms']:.0f} ms |")
    if "sklearn_per_class" in c:
        lines.append(f"| scikit-learn `KMeans` per class (lloyd, n_init=1) | {c['sklearn_per_class']:.0f} ms | "
                     f"{r['sklearn_per_class_ms']:.0f} ms |")
    lines += [
        "",
        f"CPU-time ratios: total / floor {q['kmeans_vs_floor']:.2f}x (target 1.5x), Lloyd / its matmuls "
        f"{q['lloyd_vs_floor']:.2f}x, seeding / its matvecs {q['seed_vs_floor']:.2f}x"
        + (f", speed-up over the loop {q['speedup_vs_loop']:.1f}x" if q.get("speedup_vs_loop") else "")
        + (f", over scikit-learn {q['speedup_vs_sklearn']:.2f}x (target 10x)." if q.get("speedup_vs_sklearn")
           else "."),
    ]
    return "\n".join(lines) + "\n"


def step_table(name: str = "step_cpu.json") -> str:
    r = _load(name)
    if r is None:
        return f"(no {name})\n"
    sh = r["shapes"]
    mem_key = "peak_extra_mb" if r["recipes"] and "peak_extra_mb" in r["recipes"][0] else "maxrss_delta_mb"
    lines = [
        f"One training step (forward, backward, AdamW, the recipe's state update) on {r['device']}, "
        f"{r['threads']} thread(s), {_load_str(r)}: {sh['model']} at {sh['img_size']}, B={sh['batch']} "
        f"(swtformer: {sh['swin']}); median of {r['steps']} steps after {r['warmup']} warm-up steps; memory = "
        f"{r['memory']} (`benchmarks/results/{name}`).",
        "",
        "| recipe | step (median) | vs plain step | fastest step | memory |",
        "|---|---|---|---|---|",
    ]
    for kind, runs in r["plain_runs"].items():
        ok = [p for p in runs if "error" not in p]
        if ok:
            times = ", ".join(f"{p['step_median_ms']:.0f}" for p in ok)
            fastest = ", ".join(f"{p['step_min_ms']:.0f}" for p in ok)
            lines.append(f"| plain (`baseline`, {kind}; first, last run) | {times} ms | 1.00x | {fastest} ms | "
                         f"{ok[0][mem_key]:.0f} MiB |")
    for row in r["recipes"]:
        if "error" in row:
            lines.append(f"| {row['recipe']} | failed | | | |")
            continue
        lines.append(f"| {row['recipe']} | {row['step_median_ms']:.0f} ms | {row['vs_plain']:.2f}x | "
                     f"{row['step_min_ms']:.0f} ms | {row[mem_key]:.0f} MiB |")
    by_name = {row["recipe"]: row for row in r["recipes"] if "error" not in row}
    if "doei" in by_name and "mct" in by_name:  # the trainer's doei recipe is DOEI on top of MCT
        ratio = by_name["doei"]["step_median_ms"] / by_name["mct"]["step_median_ms"]
        lines += ["", f"doei against its own base, the mct step (same class tokens, DOEI patch off): {ratio:.2f}x."]
    return "\n".join(lines) + "\n"


def ism_table(name: str = "cpews_ism_floor_cpu.json") -> str:
    r = _load(name)
    if r is None:
        return f"(no {name})\n"
    b, n, d = r["shape"]
    return "\n".join([
        f"ISM forward + backward at B={b}, N={n}, D={d} against the bare `(B, N, N)` similarity bmm "
        f"forward + backward it cannot avoid; CPU, {r['threads']} thread(s), {_load_str(r)} "
        f"(`benchmarks/results/{name}`).",
        "",
        "| | time | / floor |",
        "|---|---|---|",
        f"| floor: `bmm(f, f^T)` fwd + bwd | {r['floor_bmm_fwd_bwd_ms']:.0f} ms | 1.00x |",
        f"| `ism_loss` | {r['ism_ms']:.0f} ms | {r['ism_over_floor']:.2f}x |",
        f"| ToCo's form | {r['toco_ms']:.0f} ms | {r['toco_over_floor']:.2f}x |",
    ]) + "\n"


def main() -> None:
    sys.stdout.write("\n".join([kmeans_table(), kmeans_table("prototypes_t2_cpu.json"), step_table(),
                                 ism_table()]))


if __name__ == "__main__":
    main()
