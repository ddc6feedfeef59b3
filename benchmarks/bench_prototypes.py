"""Benchmark wsss_blocks.prototypes: batched kmeans and ClassBank.update vs straightforward loops.

Shapes default to CPAL's (C=21 classes, bank L=1000, P=256, M=50 prototypes, 20 Lloyd
steps; batch B=16). Writes ``benchmarks/results/prototypes_<device>.json``.

    python benchmarks/bench_prototypes.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _timing import environment, median_ms

from wsss_blocks.prototypes import ClassBank, kmeans


def kmeans_loop(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Straightforward per-group k-means (Python loop over groups, cdist + index_add)."""
    out = []
    for gi in range(x.shape[0]):
        pts = x[gi]
        gen = torch.Generator(device=x.device).manual_seed(seed)
        idx = [int(torch.randint(pts.shape[0], (1,), generator=gen, device=x.device))]
        for _ in range(k - 1):
            d = torch.cdist(pts, pts[idx]).amin(1).pow(2)
            idx.append(int(torch.multinomial(d, 1, generator=gen)))
        c = pts[idx].clone()
        for _ in range(iters):
            a = torch.cdist(pts, c).argmin(1)
            s = torch.zeros_like(c).index_add_(0, a, pts)
            n = torch.bincount(a, minlength=k).to(pts.dtype)[:, None]
            c = torch.where(n > 0, s / n.clamp_min(1), c)
        out.append(c)
    return torch.stack(out)


def bank_update_loop(bank: ClassBank, items: torch.Tensor, valid: torch.Tensor) -> None:
    """Straightforward update: Python loops over batch and classes."""
    for b in range(items.shape[0]):
        for c in range(items.shape[1]):
            if valid[b, c]:
                p = int(bank.ptr[c])
                bank.memory[c, p] = items[b, c]
                bank.ptr[c] = (p + 1) % bank.capacity
                bank.count[c] = min(int(bank.count[c]) + 1, bank.capacity)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.classes, args.capacity, args.dim, args.clusters, args.iters = 4, 100, 32, 8, 5
    dev = args.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.classes, args.capacity, args.dim, generator=gen).to(dev)
    items = torch.randn(args.batch, args.classes, args.dim, generator=gen).to(dev)
    valid = (torch.rand(args.batch, args.classes, generator=gen) > 0.5).to(dev)
    bank = ClassBank(args.classes, args.capacity, args.dim, device=dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def ms(fn) -> float:
        return median_ms(fn, min_run_time=args.min_run_time, device=dev)

    env = environment(dev)
    res = {
        "device": env["device_name"],
        "torch": env["torch"],
        "python": env["python"],
        "threads": env["threads"],
        "shapes": {k: v for k, v in vars(args).items() if k not in ("min_run_time", "out")},
        "kmeans_batched_ms": ms(lambda: kmeans(x, args.clusters, iters=args.iters)),
        "kmeans_loop_ms": ms(lambda: kmeans_loop(x, args.clusters, args.iters, 0)),
        "bank_update_batched_ms": ms(lambda: bank.update(items, valid)),
        "bank_update_loop_ms": ms(lambda: bank_update_loop(bank, items, valid)),
    }
    if dev == "cuda":
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["kmeans_speedup"] = res["kmeans_loop_ms"] / res["kmeans_batched_ms"]
    res["bank_speedup"] = res["bank_update_loop_ms"] / res["bank_update_batched_ms"]
    name = "prototypes_quick" if args.quick else "prototypes"
    path = args.out or Path(__file__).parent / "results" / f"{name}_{dev}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
