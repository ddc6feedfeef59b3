"""Benchmark SyntheticScenes generation speed on one CPU core.

Measures items/s of ``SyntheticScenes.__getitem__`` (full item: rasterise, compose,
noise, normalise, tensors) at several sizes, and of a DataLoader with ``collate``; compares
the vectorised bounding-box rasteriser with a straightforward per-pixel Python rasteriser of
the same objects (and checks they agree). Target: >= 2,000 images/s at 64x64.

    python benchmarks/bench_synthetic.py [--items 400] [--out benchmarks/results/synthetic_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader

from wsss_blocks.data import SyntheticScenes, collate
from wsss_blocks.data.synthetic import _shape_metric


def naive_paint(ds: SyntheticScenes, objs: list[dict]) -> np.ndarray:
    """Straightforward reference: loop over pixels and objects with scalar geometry."""
    h, w = ds.image_size
    top = np.zeros((h, w), np.int16)
    for i, o in enumerate(objs):
        full = np.zeros((h, w), bool)
        part = np.zeros((h, w), bool)
        full[o["box"]] = o["inside"]
        part[o["box"]] = o["part"]
        for y in range(h):
            for x in range(w):
                if full[y, x]:
                    top[y, x] = 2 * i + (1 if part[y, x] else 2)
    return top


def naive_rasterise(ds: SyntheticScenes, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel inside tests over the full frame for freshly drawn objects (same maths)."""
    h, w = ds.image_size
    short = min(h, w)
    n = int(rng.integers(1, ds.max_objects + 1))
    r = rng.random((n, 7))
    top = np.zeros((h, w), np.int16)
    for i in range(n):
        kind = min(int(r[i, 1] * 4), 3)
        cy, cx = (0.15 + 0.7 * r[i, 2]) * h, (0.15 + 0.7 * r[i, 3]) * w
        a = (0.16 + 0.14 * r[i, 4]) * short
        b = a * (0.55 + 0.35 * r[i, 5])
        ang = 2.0 * math.pi * r[i, 6]
        ca, sa = math.cos(ang), math.sin(ang)
        for y in range(h):
            for x in range(w):
                dx, dy = x - cx, y - cy
                u = (dx * ca + dy * sa) / a
                v = (dy * ca - dx * sa) / b
                if float(_shape_metric(kind, np.float64(u), np.float64(v))) <= 1.0:
                    top[y, x] = 2 * i + (1 if u > ds._taus[kind] else 2)
    return top


def items_per_s(ds: SyntheticScenes, n: int, timer=time.perf_counter) -> float:
    t = Timer("for i in range(n): ds[i]", globals={"ds": ds, "n": n}, num_threads=1, timer=timer)
    m = t.blocked_autorange(min_run_time=2.0)
    return n / m.median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)

    sizes = [(64, 64), (32, 32), (48, 80), (128, 128), (224, 224)]
    rows = []
    for size in sizes:
        ds = SyntheticScenes(image_size=size, length=args.items)
        ips = items_per_s(ds, args.items)
        cpu_ips = items_per_s(ds, args.items, timer=time.process_time)
        rows.append({"image_size": list(size), "items_per_s": round(ips, 1),
                     "us_per_item": round(1e6 / ips, 1),
                     "items_per_cpu_s": round(cpu_ips, 1)})
        print(f"SyntheticScenes {size}: {ips:8.0f} items/s wall, {cpu_ips:8.0f} items per CPU-second")

    ds = SyntheticScenes(length=2048)
    loader = DataLoader(ds, batch_size=64, collate_fn=collate, num_workers=0)
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in loader)
    loader_ips = n / (time.perf_counter() - t0)
    print(f"DataLoader(batch 64, collate, 0 workers) 64x64: {loader_ips:8.0f} items/s")

    # vectorised rasteriser vs per-pixel reference (same objects), 64x64
    rng = np.random.default_rng(0)
    objs_list = [ds._objects(rng) for _ in range(20)]
    for objs in objs_list:
        assert np.array_equal(ds._paint(objs), naive_paint(ds, objs))
    t_vec = Timer("for o in objs_list: ds._objects(rng); ds._paint(o)",
                  globals={"ds": ds, "objs_list": objs_list, "rng": np.random.default_rng(1)},
                  num_threads=1).blocked_autorange(min_run_time=1.0).median / len(objs_list)
    t_naive = Timer("naive_rasterise(ds, rng)",
                    globals={"ds": ds, "naive_rasterise": naive_rasterise, "rng": np.random.default_rng(1)},
                    num_threads=1).blocked_autorange(min_run_time=2.0).median
    print(f"rasterise objects 64x64: vectorised {t_vec * 1e6:.0f} us, per-pixel loop {t_naive * 1e6:.0f} us "
          f"({t_naive / t_vec:.0f}x)")

    res = {
        "benchmark": "SyntheticScenes generation (one CPU thread)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "note": ("shared 2-core machine under load from other jobs: items_per_s is wall-clock, "
                 "items_per_cpu_s uses process CPU time (one thread) and is the single-core figure; "
                 "medians of blocked_autorange"),
        "items": rows,
        "dataloader_64x64_batch64_items_per_s": round(loader_ips, 1),
        "rasterise_64x64_us": {"vectorised_bbox": round(t_vec * 1e6, 1),
                               "per_pixel_loop_reference": round(t_naive * 1e6, 1),
                               "speedup": round(t_naive / t_vec, 1)},
        "target_items_per_s_64x64": 2000,
        "meets_target": rows[0]["items_per_cpu_s"] >= 2000,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
