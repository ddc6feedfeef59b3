"""Benchmark of the SWTformer-V2 block (matmul forms) against SIPE's official broadcast forms.

Target shapes: ``swin_tiny_patch4_window7_224`` at 224 (S4 7x7, ``F_hie`` 14x14x384) and at
384 (``window_size=12``; S4 12x12, ``F_hie`` 24x24x384), B=16, K=20.

* (b) **block**: the V2 block -- CAM head, background, seeds, HFF, prototypes, R-CAM, CLS +
  GSC + CCL -- on precomputed Swin-T stage maps, forward + backward, through the public API
  (``SwinCAMHead``, ``swin_cam``, ``cams_with_background``, ``locate_seeds``, ``HFF``,
  ``refine_cams``, ``gsc_loss``, ``ccl_loss``), vs the same block with SIPE's broadcasts
  (``tests/oracles/swtformer.py``: ``(B, K+1, HW, HW)`` seed product, ``(B, K+1, D, HW)``
  prototype product and broadcast ``cosine_similarity``). Both share the head and HFF
  weights; the run checks that their losses agree.
* (a) **step**: a full V1 step vs a V2 step (``SWTformer`` on a random-init Swin-T),
  forward + backward. On CPU this is scaled down (B=2 at 224, B=1 at 384) and recorded.

Peak memory on CPU: growth of the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) of a fresh subprocess running one forward + backward, with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the OS; on CUDA
``torch.cuda.max_memory_allocated``. The GPU half runs only when CUDA is available.

Run: ``python benchmarks/bench_swtformer.py`` (writes ``benchmarks/results/swtformer_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _timing import cuda_peak_extra_bytes, repeat_ms  # noqa: E402
from oracles.swtformer import naive_v2_block  # noqa: E402

from wsss_blocks.swtformer import (  # noqa: E402
    HFF,
    SwinCAMHead,
    SWTformer,
    cams_with_background,
    ccl_loss,
    gsc_loss,
    locate_seeds,
    refine_cams,
    swin_cam,
)

DIMS = (96, 192, 384, 768)  # Swin-T
SHAPES = {224: (56, 28, 14, 7), 384: (96, 48, 24, 12)}


def make_inputs(img: int, b: int, k: int = 20, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, s, s, generator=gen).to(device).requires_grad_()
            for c, s in zip(DIMS, SHAPES[img], strict=True)]
    labels = torch.zeros(b, k)
    for i in range(b):
        labels[i, torch.randperm(k, generator=gen)[:2]] = 1.0
    torch.manual_seed(seed)
    head = SwinCAMHead(DIMS[-1], k, device=device)
    hff = HFF(DIMS, device=device)
    return maps, labels.to(device), head, hff


def ours_block(head, hff, maps, labels):
    cams, logits = head(maps[-1])
    m = cams_with_background(swin_cam(cams), labels)
    seeds = locate_seeds(maps[-1], m, labels).seeds
    rcams = refine_cams(hff(maps), seeds)
    cls = F.multilabel_soft_margin_loss(logits, labels)
    return cls + gsc_loss(m, rcams) + ccl_loss(m, rcams, labels)


def naive_block(head, hff, maps, labels):
    return naive_v2_block(head, hff, maps, labels)


BLOCKS = {"ours": ours_block, "sipe_broadcast": naive_block}


def _swin(img: int, device: str):
    import timm

    kw = {"pretrained": False, "num_classes": 0, "drop_path_rate": 0.0}
    if img == 384:
        kw.update(img_size=384, window_size=12)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **kw).to(device)


def _step_fn(version: str, img: int, b: int, device: str):
    model = SWTformer(_swin(img, device), 20, version=version, device=device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, img, img, generator=gen).to(device)
    y = torch.zeros(b, 20)
    y[:, :2] = 1
    y = y.to(device)

    def fn():
        model.zero_grad(set_to_none=True)
        model(x, y).loss.backward()

    return fn


# ----------------------------------------------------------------------------- CPU memory
def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _peak_child(which: str, img: int, b: int) -> None:
    """In a fresh process: print the peak RSS growth (bytes) of one forward + backward."""
    if which.startswith("step_"):
        fn = _step_fn(which[5:], img, b, "cpu")
        fn()
    else:
        maps, labels, head, hff = make_inputs(img, b)
        BLOCKS[which](head, hff, [m[:1] for m in maps], labels[:1]).backward()  # warm-up

        def fn():
            BLOCKS[which](head, hff, maps, labels).backward()

    Path("/proc/self/clear_refs").write_text("5")
    base = _rss("VmRSS:")
    fn()
    print(_rss("VmHWM:") - base)


def cpu_peak(which: str, img: int, b: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, __file__, "--_peak", which, "--img", str(img), "--b", str(b),
                           "--threads", str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- runs
def bench_block(img: int, b: int, device: str, repeats: int) -> dict:
    maps, labels, head, hff = make_inputs(img, b, device=device)
    out: dict = {"img": img, "B": b, "K": 20, "stage_grids": SHAPES[img], "F_hie": (384, SHAPES[img][2])}
    losses = {}
    for name, block in BLOCKS.items():
        def fn(block=block):
            for m in maps:
                m.grad = None
            head.zero_grad(set_to_none=True)
            hff.zero_grad(set_to_none=True)
            loss = block(head, hff, maps, labels)
            loss.backward()
            return loss

        losses[name] = float(fn().detach())  # sync-ok: benchmark
        out[f"{name}_time"] = repeat_ms(fn, repeats=repeats, device=device)
        if device == "cuda":
            out[f"{name}_peak_bytes"] = cuda_peak_extra_bytes(fn, device)
        else:
            out[f"{name}_peak_bytes"] = cpu_peak(name, img, b)
    out["loss_ours"], out["loss_sipe_broadcast"] = losses["ours"], losses["sipe_broadcast"]
    out["loss_abs_diff"] = abs(losses["ours"] - losses["sipe_broadcast"])
    hw, k1, d = SHAPES[img][3] ** 2, 21, 384
    out["analytic_broadcast_bytes"] = {
        "seed_product_B_K1_HW_HW": 4 * b * k1 * hw * hw,
        "prototype_product_B_K1_D_HWf": 4 * b * k1 * d * SHAPES[img][2] ** 2,
    }
    out["speedup_time"] = out["sipe_broadcast_time"]["median_ms"] / out["ours_time"]["median_ms"]
    out["memory_ratio_naive_over_ours"] = out["sipe_broadcast_peak_bytes"] / max(out["ours_peak_bytes"], 1)
    return out


def bench_step(img: int, b: int, device: str, repeats: int) -> dict:
    out: dict = {"img": img, "B": b, "K": 20}
    for version in ("v1", "v2"):
        fn = _step_fn(version, img, b, device)
        out[f"{version}_time"] = repeat_ms(fn, repeats=repeats, device=device)
        out[f"{version}_peak_bytes"] = (cuda_peak_extra_bytes(fn, device) if device == "cuda"
                                        else cpu_peak(f"step_{version}", img, b))
    out["v2_over_v1_time"] = out["v2_time"]["median_ms"] / out["v1_time"]["median_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-batch", type=int, default=16)
    parser.add_argument("--step-batch", type=int, nargs=2, default=[2, 1], help="CPU step batch at 224 / 384")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--b", type=int, default=16)
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._peak:
        _peak_child(args._peak, args.img, args.b)
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        t0 = time.time()
        res: dict = {
            "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "memory_method": ("peak RSS growth (VmHWM reset via /proc/self/clear_refs) of a fresh subprocess, "
                              "one fwd+bwd" if device == "cpu" else "torch.cuda.max_memory_allocated growth"),
            "block": {}, "step": {},
        }
        step_b = {224: args.step_batch[0], 384: args.step_batch[1]} if device == "cpu" else {224: 16, 384: 16}
        for img in (224, 384):
            res["block"][str(img)] = bench_block(img, args.block_batch, device, args.repeats)
            print(device, "block", img, json.dumps({k: v for k, v in res["block"][str(img)].items()
                                                    if "time" in k or "peak" in k or "ratio" in k}), flush=True)
            if not args.skip_step:
                res["step"][str(img)] = bench_step(img, step_b[img], device, max(1, args.repeats - 1))
                print(device, "step", img, json.dumps(res["step"][str(img)]), flush=True)
        if device == "cpu":
            res["scaled"] = (f"CPU: the block runs at the target shapes (B={args.block_batch}, K=20); the full V1/V2 "
                             f"step is scaled to B={step_b[224]} at 224 and B={step_b[384]} at 384 (random-init "
                             "Swin-T), 2 shared CPU cores")
        b384 = res["block"]["384"]
        res["targets"] = {"block peak memory >= 4x below the naive reference at 384":
                          b384["memory_ratio_naive_over_ours"] >= 4.0}
        if res["step"].get("384"):
            res["targets"]["V2 step <= 1.2x V1 step at 384"] = res["step"]["384"]["v2_over_v1_time"] <= 1.2
        res["wall_s"] = time.time() - t0
        name = "swtformer_cpu.json" if device == "cpu" else "swtformer_cuda.json"
        path = ROOT / "benchmarks" / "results" / name
        path.write_text(json.dumps(res, indent=2) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
