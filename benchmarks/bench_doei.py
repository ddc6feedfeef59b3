"""Benchmark DOEI: patched vs unpatched timm ViT, and a naive dense implementation.

(a) CPU: ViT-S/16 224, B=8, ``fused_attn=False`` in every model, default DOEIConfig,
    C=1 and C=20 (both models converted with ``mct.add_class_tokens``): eval forward and
    training forward+backward time; bytes saved for backward (CPU has no peak-memory
    counter). Target: patched eval forward <= 1.3x unpatched.
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
import os
import platform
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils import benchmark

from wsss_blocks import doei, mct
from wsss_blocks.doei import DOEIConfig, doei_delta, hybrid_attention, patch_color_affinity, progressive_count


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
    """Straightforward DOEI: explicit (B, H, N, N) attention and the dense functions."""
    p0 = model.num_prefix_tokens
    big_l = len(model.blocks)
    pe = model.patch_embed
    r = patch_color_affinity(img, pe.patch_size, sigma=cfg.rgb_sigma, mean=model.pretrained_cfg["mean"],
                             std=model.pretrained_cfg["std"])
    x = model.norm_pre(model.patch_drop(model._pos_embed(pe(img))))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        xn = blk.norm1(x)
        b, n_all, _ = xn.shape
        qkv = a.qkv(xn).reshape(b, n_all, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.softmax((a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-1, -2), dim=-1)
        y = a.proj((attn @ v).transpose(1, 2).reshape(b, n_all, -1))
        w = hybrid_attention(attn.mean(1), xn, r, num_prefix_tokens=p0, alpha=cfg.alpha)
        n = n_all - p0
        y = y + doei_delta(
            y, w, num_class_tokens=c, num_prefix_tokens=p0,
            t_p2c=progressive_count(n, i, big_l, cfg.st_p2c), t_c2c=progressive_count(c - 1, i, big_l, cfg.st_c2c),
            af_p2c=cfg.af_p2c, sf_p2c=cfg.sf_p2c, af_c2c=cfg.af_c2c, sf_c2c=cfg.sf_c2c,
        )
        x = x + blk.ls1(y)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.norm(x)


def median_s(fn: Callable[[], object], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = DOEIConfig()
    img = torch.randn(args.batch, 3, 224, 224)
    rows = []
    for c in (1, 20):
        model = build("vit_small_patch16_224", 224, c, fused=False, device="cpu")
        res: dict = {"C": c}
        model.eval()
        with torch.no_grad():
            res["eval_forward_s"] = {"unpatched": median_s(lambda: model.forward_features(img), args.min_run_time)}
            with doei.patch(model, config=cfg):
                res["eval_forward_s"]["patched"] = median_s(lambda: model.forward_features(img), args.min_run_time)
            res["eval_forward_s"]["naive"] = median_s(lambda: naive_forward(model, img, cfg, c), args.min_run_time)
        model.train()

        def step(fn: Callable[[], Tensor]) -> Callable[[], None]:
            def run() -> None:
                model.zero_grad(set_to_none=True)
                fn().float().square().mean().backward()
            return run

        res["train_fwd_bwd_s"] = {"unpatched": median_s(step(lambda: model.forward_features(img)), args.min_run_time)}
        res["saved_for_backward_MB"] = {"unpatched": saved_bytes(lambda: model.forward_features(img)) / 2**20}
        with doei.patch(model, config=cfg):
            res["train_fwd_bwd_s"]["patched"] = median_s(step(lambda: model.forward_features(img)), args.min_run_time)
            res["saved_for_backward_MB"]["patched"] = saved_bytes(lambda: model.forward_features(img)) / 2**20
        res["train_fwd_bwd_s"]["naive"] = median_s(step(lambda: naive_forward(model, img, cfg, c)), args.min_run_time)
        res["saved_for_backward_MB"]["naive"] = saved_bytes(lambda: naive_forward(model, img, cfg, c)) / 2**20
        res["eval_forward_ratio_patched_over_unpatched"] = (
            res["eval_forward_s"]["patched"] / res["eval_forward_s"]["unpatched"]
        )
        res["train_ratio_patched_over_unpatched"] = (
            res["train_fwd_bwd_s"]["patched"] / res["train_fwd_bwd_s"]["unpatched"]
        )
        rows.append(res)
        print(json.dumps(res, indent=1), flush=True)
    return {
        "setting": "ViT-S/16 224, B=%d, fused_attn=False in all models, default DOEIConfig" % args.batch,
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
        fn()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        t = median_s(lambda: (fn(), torch.cuda.synchronize()), args.min_run_time)
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
    parser.add_argument("--min-run-time", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    body = bench_cpu(args) if args.device == "cpu" else bench_cuda(args)
    result = {
        "benchmark": "doei",
        "device": args.device,
        "device_name": platform.processor() or platform.machine() if args.device == "cpu" else body.get("gpu"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        **body,
    }
    out = args.out or Path(__file__).parent / "results" / f"doei_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
