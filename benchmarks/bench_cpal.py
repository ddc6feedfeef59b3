"""Benchmark of CPAL (:mod:`wsss_blocks.cpal`) at a VOC-like training shape, against the loop oracle.

Shape: B = 16, K = 20 (C = 21), D = 768, a 32x32 grid, P = 256, a full bank of L = 1000 per class,
M = 50 context prototypes, T = 20 neighbours.

* ``head``: the projection head alone, forward + backward (``z.sum()``);
* ``head_cpal_update``: ``CPAL.forward`` (head, prototypes, alignment, neighbours, positiveness,
  PACAM, the loss) + ``CPAL.update`` + backward, on a step that does not recluster;
* ``cpal_after_head``: the same without the head (``cpal_forward`` on the projected features +
  ``CPAL.update`` + backward): the target is that this costs less than ``head``;
* ``recluster``: k-means of the full bank (21 x 1000 x 256 -> 50 centres, 20 Lloyd steps);
* ``oracle``: ``cpal_forward`` + backward against ``tests/oracles/cpal.py`` (per image, per
  class, per pixel) in the same run, at a size the loop finishes in seconds (B = 4, 16x16 grid;
  K, P, M, T as above).

Memory: CUDA peak allocation growth; on CPU the bytes autograd saves for backward (no peak
counter exists there).

Run: ``python benchmarks/bench_cpal.py [--device cuda]`` (writes ``benchmarks/results/cpal_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "tests", ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from _timing import cuda_peak_extra_bytes, environment, repeat_ms, saved_bytes  # noqa: E402
from oracles.cpal import cpal_loop  # noqa: E402

from wsss_blocks.cpal import CPAL, cpal_forward  # noqa: E402

B, K, D, GRID, P, L, M, T = 16, 20, 768, 32, 256, 1000, 50, 20
C = K + 1


def make_module(device: torch.device) -> CPAL:
    """A CPAL with a full bank and context, that does not recluster during the timed steps."""
    torch.manual_seed(0)
    cpal = CPAL(D, K, proj_dim=P, capacity=L, num_prototypes=M, top_k=T, recluster_every=10**9,
                warmup_reclusters=False, warn_unbuilt=False, device=device)
    cpal.bank.memory.copy_(torch.randn(C, L, P, device=device))
    cpal.bank.count.fill_(L)
    cpal.recluster()
    return cpal


def make_batch(b: int, grid: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, D, grid, grid, generator=g)
    cams = torch.rand(b, K, grid, grid, generator=g)
    labels = torch.rand(b, K, generator=g) < 0.15
    labels[:, 0] = True
    return {"features": feats.to(device), "norm_cams": cams.to(device), "labels": labels.to(device)}


def run(device: torch.device, repeats: int) -> dict[str, Any]:
    cpal = make_module(device)
    x = make_batch(B, GRID, device)
    feats = x["features"].requires_grad_(True)
    cams = x["norm_cams"].requires_grad_(True)
    labels = x["labels"]
    z_fixed = cpal.project(feats).detach()

    def head() -> None:
        cpal.project(feats).sum().backward()

    def head_cpal_update() -> None:
        out = cpal(feats, cams, labels)
        cpal.update(out.prototypes, out.prototype_valid)
        out.loss.backward()

    def cpal_after_head() -> torch.Tensor:
        z = z_fixed.requires_grad_(True)
        out = cpal_forward(z, cams, labels, cpal.context, cpal.context_valid, top_k=T)
        cpal.update(out.prototypes, out.prototype_valid)
        out.loss.backward()
        return out.loss

    res: dict[str, Any] = {"shape": {"B": B, "K": K, "D": D, "grid": [GRID, GRID], "P": P, "L": L, "M": M,
                                      "T": T}}
    for name, fn in (("head", head), ("head_cpal_update", head_cpal_update),
                     ("cpal_after_head", cpal_after_head), ("recluster", cpal.recluster)):
        res[name] = repeat_ms(fn, repeats=repeats, device=device)
        print(name, res[name], flush=True)
    if device.type == "cuda":
        for name, fn in (("head", head), ("head_cpal_update", head_cpal_update), ("cpal_after_head", cpal_after_head)):
            res[name]["peak_extra_bytes"] = cuda_peak_extra_bytes(fn, device)
    else:
        res["head"]["saved_bytes"] = saved_bytes(lambda: cpal.project(feats))
        res["head_cpal_update"]["saved_bytes"] = saved_bytes(lambda: cpal(feats, cams, labels))
        res["cpal_after_head"]["saved_bytes"] = saved_bytes(lambda: cpal_forward(
            z_fixed.requires_grad_(True), cams, labels, cpal.context, cpal.context_valid, top_k=T))
    res["cpal_after_head_over_head"] = res["cpal_after_head"]["median_ms"] / res["head"]["median_ms"]

    # same-run comparison with the loop oracle at a size the loop can finish
    small = make_batch(4, 16, device, seed=1)
    zs = cpal.project(small["features"]).detach()
    ctx, ctx_ok = cpal.context, cpal.context_valid

    def batched_small() -> None:
        cpal_forward(zs.clone().requires_grad_(True), small["norm_cams"], small["labels"], ctx, ctx_ok,
                     top_k=T).loss.backward()

    def loop_small() -> None:
        cpal_loop(zs.clone().requires_grad_(True), small["norm_cams"], small["labels"], ctx, ctx_ok,
                  top_k=T)["loss"].backward()

    batched = repeat_ms(batched_small, repeats=max(repeats, 5), device=device)
    loop = repeat_ms(loop_small, repeats=1, device=device)
    res["oracle"] = {"shape": {"B": 4, "grid": [16, 16]}, "batched": batched, "loop": loop,
                     "speedup": loop["median_ms"] / batched["median_ms"]}
    print("oracle", res["oracle"], flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"benchmark": "cpal", "environment": environment(device), "results": run(device, args.repeats)}
    out = args.out or ROOT / "benchmarks" / "results" / f"cpal_{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
