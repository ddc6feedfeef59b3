"""Benchmark DOEI: patched vs unpatched timm ViT, and a naive dense implementation.

(a) CPU: ViT-S/16 224, B=8, ``fused_attn=False`` in every model (``--fused``: timm's
    fused SDPA attention in the patched and unpatched models), default DOEIConfig, C=1 and
    C=20 (both models converted with ``mct.add_class_tokens``): eval forward and training
    forward+backward time; bytes saved for backward (CPU has no peak-memory counter).
    Target: patched eval forward <= 1.3x unpatched.
(b) GPU (when CUDA is available): ViT-B/16 448, B=4, C=20, bf16 autocast, training
    forward+backward: unpatched (fused), patched (fused) and naive (explicit (B,H,N,N)
    attention + the dense functions). Time and peak memory
    (``torch.cuda.max_memory_allocated``). Targets: time <= 1.5x unpatched; extra peak
    memory <= 0.5x the naive version's extra.

Usage::

    python benchmarks/bench_doei.py --device cpu            # writes results/doei_cpu.json
    python benchmarks/bench_doei.py --device cuda           # writes results/doei_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import _timing
import timm
import torch
from _timing import saved_bytes
from torch import Tensor, nn

from wsss_blocks import doei, mct
from wsss_blocks.doei import DOEIConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from oracles.doei import reference_features  # noqa: E402


def build(name: str, img: int, c: int, fused: bool, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=img, num_classes=c)
    if c > 1:
        mct.add_class_tokens(model, c)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model.to(device)


def naive_forward(model: nn.Module, img: Tensor, cfg: DOEIConfig, c: int) -> Tensor:
    """Straightforward DOEI: explicit (B, H, N, N) attention and the dense functions (the tested oracle)."""
    return reference_features(model, img, cfg, c)


def median_s(fn: Callable[[], object], min_run_time: float) -> float:
    return _timing.median_s(fn, min_run_time=min_run_time)


def bench_cpu_classes(c: int, img: Tensor, cfg: DOEIConfig, min_run_time: float, fused: bool = False) -> dict:
    """One row of the CPU table: ViT-S/16 with ``c`` class tokens."""
    model = build("vit_small_patch16_224", img.shape[-1], c, fused=fused, device="cpu")
    res: dict = {"C": c}

    def plain() -> Tensor:
        return model.forward_features(img)

    def naive() -> Tensor:
        return naive_forward(model, img, cfg, c)

    def step(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            fn().float().square().mean().backward()
        return run

    model.eval()
    with torch.no_grad():
        res["eval_forward_s"] = {"unpatched": median_s(plain, min_run_time)}
        with doei.patch(model, config=cfg):
            res["eval_forward_s"]["patched"] = median_s(plain, min_run_time)
        res["eval_forward_s"]["naive"] = median_s(naive, min_run_time)
    model.train()
    res["train_fwd_bwd_s"] = {"unpatched": median_s(step(plain), min_run_time)}
    res["saved_for_backward_MB"] = {"unpatched": saved_bytes(plain) / 2**20}
    with doei.patch(model, config=cfg):
        res["train_fwd_bwd_s"]["patched"] = median_s(step(plain), min_run_time)
        res["saved_for_backward_MB"]["patched"] = saved_bytes(plain) / 2**20
    res["train_fwd_bwd_s"]["naive"] = median_s(step(naive), min_run_time)
    res["saved_for_backward_MB"]["naive"] = saved_bytes(naive) / 2**20
    res["eval_forward_ratio_patched_over_unpatched"] = (
        res["eval_forward_s"]["patched"] / res["eval_forward_s"]["unpatched"]
    )
    res["train_ratio_patched_over_unpatched"] = (
        res["train_fwd_bwd_s"]["patched"] / res["train_fwd_bwd_s"]["unpatched"]
    )
    return res


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = DOEIConfig()
    img = torch.randn(args.batch, 3, args.img, args.img)
    rows = []
    for c in (1, 20):
        res = bench_cpu_classes(c, img, cfg, args.min_run_time, fused=args.fused)
        rows.append(res)
        print(json.dumps(res, indent=1), flush=True)
    return {
        "setting": f"ViT-S/16 {args.img}, B={args.batch}, fused_attn={args.fused} in the patched and unpatched "
                   "models (the naive reference is explicit), default DOEIConfig",
        "target": "eval forward patched <= 1.3x unpatched",
        "threads": torch.get_num_threads(),
        "note": "saved_for_backward_MB sums every tensor autograd saves (views of one buffer counted "
                "each time): a proxy, CPU has no peak counter. Medians of blocked_autorange; on a shared "
                "machine expect +-15% noise.",
        "results": rows,
    }


def bench_cuda(args: argparse.Namespace) -> dict:
    device = "cuda"
    c, batch = 20, 4
    cfg = DOEIConfig()
    model = build("vit_base_patch16_224", 448, c, fused=True, device=device).train()
    img = torch.randn(batch, 3, 448, 448, device=device)

    def run(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def go() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn()
            out.float().square().mean().backward()
        return go

    def measure(fn: Callable[[], None]) -> tuple[float, float]:
        peak = _timing.cuda_peak_extra_bytes(fn, device) / 2**20
        t = _timing.median_s(fn, min_run_time=args.min_run_time, device=device)
        return t, peak

    res: dict = {}
    res["unpatched_fused"] = measure(run(lambda: model.forward_features(img)))
    with doei.patch(model, config=cfg):
        res["patched_fused"] = measure(run(lambda: model.forward_features(img)))
    res["naive"] = measure(run(lambda: naive_forward(model, img, cfg, c)))
    out = {k: {"fwd_bwd_s": v[0], "peak_extra_MB": v[1]} for k, v in res.items()}
    base_t, base_m = res["unpatched_fused"]
    out["time_ratio_patched"] = res["patched_fused"][0] / base_t
    out["time_ratio_naive"] = res["naive"][0] / base_t
    naive_extra = res["naive"][1] - base_m
    out["extra_memory_ratio_patched_over_naive"] = (res["patched_fused"][1] - base_m) / max(naive_extra, 1e-6)
    return {
        "setting": "ViT-B/16 448, B=4, C=20, bf16 autocast, training forward+backward",
        "targets": "time <= 1.5x unpatched; extra peak memory <= 0.5x naive extra",
        "gpu": torch.cuda.get_device_name(),
        "results": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--img", type=int, default=224, help="CPU image size (smaller for a smoke run)")
    parser.add_argument("--min-run-time", type=float, default=3.0)
    parser.add_argument("--fused", action="store_true",
                        help="CPU: timm's fused (SDPA) attention in the patched and unpatched models")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    body = bench_cpu(args) if args.device == "cpu" else bench_cuda(args)
    env = _timing.environment(args.device)
    result = {
        "benchmark": "doei",
        "device": args.device,
        "device_name": env["device_name"],
        "cpu_count": env["cpu_count"],
        "torch": env["torch"],
        "python": env["python"],
        "timm": timm.__version__,
        **body,
    }
    out = args.out or Path(__file__).parent / "results" / f"doei_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
