"""Benchmark wsss_blocks.prototypes: batched kmeans and ClassBank.update vs straightforward loops.

Shapes default to CPAL's (C=21 classes, bank L=1000, P=256, M=50 prototypes, 20 Lloyd
steps; batch B=16). Writes ``benchmarks/results/prototypes_<device>.json``.

k-means is also split into its parts and set against its floor, the matmuls it cannot avoid:
``kmeans_seed_ms`` (``iters=0``: centring + k-means++), ``kmeans_lloyd_ms`` (total minus
seeding), ``floor_seed_ms`` (the k - 1 seeding matvecs alone), ``floor_lloyd_ms`` (``iters`` x the
assignment matmul + the one-hot update matmul), ``kmeans_vs_floor`` =
total / (seed + Lloyd floor). When scikit-learn is importable (bench-only dependency:
``pip install -e .[bench]``) it also times ``sklearn.cluster.KMeans`` fitted per class
(lloyd, k-means++, n_init=1, max_iter=iters, tol=0) with its thread pool limited to torch's
thread count. The k-means variants are timed in ``--repeats`` interleaved rounds (one call of
each per round after a warm-up round, each after ``--settle`` seconds of idle so that the
previous variant's spinning worker threads do not share the cores with it), wall time (``*_ms``) and process CPU time
(``cpu_time_ms``, the robust one on a loaded machine with one thread; with several threads it
also counts spinning); medians. The machine load (``os.getloadavg``) is recorded before and
after.

    python benchmarks/bench_prototypes.py [--device cuda] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
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


def kmeans_sklearn(x, k: int, iters: int, seed: int, threads: int):
    """scikit-learn ``KMeans`` fitted once per group (CPU, numpy), or ``None`` if not installed."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    pts = x.cpu().numpy()

    def run():
        with threadpool_limits(limits=threads):
            return [
                KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd",
                       random_state=seed).fit(p).cluster_centers_
                for p in pts
            ]

    return run


def seed_floor(x: torch.Tensor, k: int):
    """The k - 1 matvecs k-means++ seeding cannot avoid (kmeans' layout: centre times x^T)."""
    xt = x.transpose(1, 2).contiguous()
    xx = x.pow(2).sum(-1)[:, None, :]
    c = x[:, :1]

    def run():
        for _ in range(k - 1):
            torch.baddbmm(xx, c, xt, alpha=-2.0)

    return run


def lloyd_floor(x: torch.Tensor, k: int, iters: int):
    """``iters`` x (assignment matmul + one-hot update matmul), the two bmm of a Lloyd step,
    in kmeans' own layouts (centres times x^T into (G,k,N); one-hot (G,k,N) times x)."""
    g, n, _ = x.shape
    xt = x.transpose(1, 2).contiguous()
    c = x[:, :k].contiguous()
    cc = (c * c).sum(-1)[:, :, None]
    onehot = torch.zeros(g, k + 1, n, device=x.device)[:, :k]

    def run():
        for _ in range(iters):
            torch.baddbmm(cc, c, xt, alpha=-2.0)
            torch.bmm(onehot, x)

    return run


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
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds of the k-means variants")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds of idle before each timed call (default 0.3 on CPU, 0 on CUDA)")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the per-group torch loop (slow)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.settle is None:
        args.settle = 0.0 if args.device.startswith("cuda") else 0.3
    if args.quick:
        args.classes, args.capacity, args.dim, args.clusters, args.iters = 4, 100, 32, 8, 5
    dev = args.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.classes, args.capacity, args.dim, generator=gen).to(dev)
    items = torch.randn(args.batch, args.classes, args.dim, generator=gen).to(dev)
    valid = (torch.rand(args.batch, args.classes, generator=gen) > 0.5).to(dev)
    bank = ClassBank(args.dim, args.classes, capacity=args.capacity, device=dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def ms(fn) -> float:
        return median_ms(fn, min_run_time=args.min_run_time, device=dev)

    env = environment(dev)
    load_before = os.getloadavg()
    k, iters = args.clusters, args.iters

    # the k-means variants run in interleaved rounds (one call each per round, after one
    # warm-up call) so that load drift on a shared machine hits them alike; wall and CPU time
    variants = {
        "kmeans_batched": lambda: kmeans(x, k, num_iters=iters),
        "kmeans_seed": lambda: kmeans(x, k, num_iters=0),
        "floor_seed": seed_floor(x, k),
        "floor_lloyd": lloyd_floor(x, k, iters),
    }
    if not args.skip_loop:
        variants["kmeans_loop"] = lambda: kmeans_loop(x, k, iters, 0)
    sk = kmeans_sklearn(x, k, iters, 0, torch.get_num_threads())
    if sk is not None:
        variants["sklearn_per_class"] = sk
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats + 1):
        for name, fn in variants.items():
            if dev == "cuda":
                torch.cuda.synchronize()
            # let the previous variant's worker threads (OpenMP/BLAS spin-wait after a parallel
            # region) go idle, so that they do not steal the cores from this one
            time.sleep(args.settle)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            if r:  # round 0 is the warm-up
                wall[name].append(1e3 * (time.perf_counter() - w0))
                cpu[name].append(1e3 * (time.process_time() - c0))

    res = {
        "device": env["device_name"],
        "torch": env["torch"],
        "python": env["python"],
        "threads": env["threads"],
        "shapes": {a: v for a, v in vars(args).items() if a not in ("min_run_time", "out")},
        **{f"{name}_ms": statistics.median(v) for name, v in wall.items()},
        "cpu_time_ms": {name: statistics.median(v) for name, v in cpu.items()},
        "bank_update_batched_ms": ms(lambda: bank.update(items, valid)),
        "bank_update_loop_ms": ms(lambda: bank_update_loop(bank, items, valid)),
    }
    res.setdefault("sklearn_per_class_ms", None)
    if dev == "cuda":
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["loadavg_before"] = list(load_before)
    res["loadavg_after"] = list(os.getloadavg())
    res["kmeans_lloyd_ms"] = res["kmeans_batched_ms"] - res["kmeans_seed_ms"]
    res["kmeans_vs_floor"] = res["kmeans_batched_ms"] / (res["floor_seed_ms"] + res["floor_lloyd_ms"])
    res["lloyd_vs_floor"] = res["kmeans_lloyd_ms"] / res["floor_lloyd_ms"]
    res["speedup_vs_sklearn"] = (
        res["sklearn_per_class_ms"] / res["kmeans_batched_ms"] if res["sklearn_per_class_ms"] else None
    )
    c = res["cpu_time_ms"]
    res["cpu_time_ratios"] = {
        "kmeans_vs_floor": c["kmeans_batched"] / (c["floor_seed"] + c["floor_lloyd"]),
        "lloyd_vs_floor": (c["kmeans_batched"] - c["kmeans_seed"]) / c["floor_lloyd"],
        "seed_vs_floor": c["kmeans_seed"] / c["floor_seed"],
        "speedup_vs_sklearn": c["sklearn_per_class"] / c["kmeans_batched"] if "sklearn_per_class" in c else None,
        "speedup_vs_loop": c["kmeans_loop"] / c["kmeans_batched"] if "kmeans_loop" in c else None,
    }
    res["kmeans_speedup"] = res["kmeans_loop_ms"] / res["kmeans_batched_ms"] if "kmeans_loop_ms" in res else None
    res["bank_speedup"] = res["bank_update_loop_ms"] / res["bank_update_batched_ms"]
    name = "prototypes_quick" if args.quick else "prototypes"
    if args.threads and not args.quick:
        name += f"_t{args.threads}"
    path = args.out or Path(__file__).parent / "results" / f"{name}_{dev}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
