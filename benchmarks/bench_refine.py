"""Benchmark of PAR (``wsss_blocks.refine.par``) against ToCo's per-image form, same run.

Shape (ToCo's setting): B=4 crops of 448x448, PAR at half resolution, so 224x224 images
and K=21 maps (background + 20 VOC classes) at 224x224; dilations 1, 2, 4, 8, 12, 24
(48 neighbours), 10 iterations, under ``torch.no_grad()`` (pseudo labels).

* ``ours``: :func:`wsss_blocks.refine.par`, all images and classes at once, the maps
  accumulated over the 48 stencil offsets (no neighbour stack);
* ``per_image``: the form of ToCo's ``PAR`` module in a Python loop over images (ToCo calls
  it per image in ``refine_cams_with_bkg_v2``): for every step a ``(1, K, 48, H, W)``
  neighbour stack is built and reduced (``tests/oracles/refine.py:par_per_image``).

Times are medians from the shared ``benchmarks/_timing.py`` (``paired_median_ms``: ours and the
reference in alternating rounds, so load drift on a shared machine hits both alike).
Peak memory on CPU is the growth of the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) of a fresh subprocess running one call, with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS; the analytic size of the
largest intermediate of each form is reported too. On CUDA (GPU half, only with a GPU) the
peak is ``torch.cuda.max_memory_allocated`` growth (``cuda_peak_extra_bytes``).

Run: ``python benchmarks/bench_refine.py`` (writes ``benchmarks/results/refine_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import cuda_peak_extra_bytes, environment, paired_median_ms  # noqa: E402
from oracles.refine import par_per_image  # noqa: E402

from wsss_blocks.refine import par  # noqa: E402

B, K, CROP = 4, 21, 448
H = W = CROP // 2
J = 48


def make_inputs(device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    crops = torch.rand(B, 3, CROP, CROP, generator=gen)
    images = torch.nn.functional.interpolate(crops, scale_factor=0.5, mode="bilinear", align_corners=False)
    cams = torch.rand(B, K, H, W, generator=gen).softmax(dim=1)
    return images.to(device), cams.to(device)


def _forms(images, cams):
    return {
        "ours": lambda: par(images, cams),
        "per_image": lambda: par_per_image(images, cams),
    }


def _peak_child(which: str) -> None:
    """Runs in a fresh process: print the peak RSS growth (bytes) of one call."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    images, cams = make_inputs()
    fn = _forms(images, cams)[which]
    with torch.no_grad():
        _forms(images[:1, :, :16, :16], cams[:1, :, :16, :16])[which]()  # warm-up

        def rss(field: str) -> int:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
            raise RuntimeError(field)

        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
        base = rss("VmRSS:")
        fn()
        print(rss("VmHWM:") - base)


def measure_cpu_peaks(threads: int) -> dict:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "BENCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    out = {}
    for which in ("ours", "per_image"):
        res = subprocess.run(
            [sys.executable, __file__, "--peak-child", which], env=env, capture_output=True, text=True, check=True
        )
        out[which] = int(res.stdout.strip().splitlines()[-1])
    return out


def run(device: str, rounds: int, min_run_time: float, threads: int) -> dict:
    images, cams = make_inputs(device)
    forms = _forms(images, cams)
    result: dict = {"device": device}
    with torch.no_grad():
        ours = forms["ours"]()
        ref = forms["per_image"]()
        result["max_abs_diff_vs_per_image"] = float((ours - ref).abs().max())  # sync-ok: benchmark
        del ours, ref
        ours_ms, ref_ms = paired_median_ms(
            forms["ours"], forms["per_image"], min_run_time=min_run_time, rounds=rounds, device=device
        )
        result["ours_ms"], result["per_image_ms"] = ours_ms, ref_ms
        if device == "cuda":
            for name, fn in forms.items():
                result[f"{name}_peak_bytes"] = cuda_peak_extra_bytes(fn, device)
    if device == "cpu":
        peaks = measure_cpu_peaks(threads)
        result["ours_peak_bytes"] = peaks["ours"]
        result["per_image_peak_bytes"] = peaks["per_image"]
    result["speedup"] = result["per_image_ms"] / result["ours_ms"]
    result["memory_ratio"] = result["per_image_peak_bytes"] / max(result["ours_peak_bytes"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child)
        return
    torch.set_num_threads(args.threads)
    f4 = 4  # fp32 bytes
    result = {
        "benchmark": "PAR (ToCo) at half resolution: batched wsss_blocks.refine.par vs per-image ToCo form",
        "shape": {"B": B, "K": K, "crop": CROP, "par_size": [H, W], "neighbours": J, "num_iter": 10},
        "environment": environment("cpu"),
        "load_average_at_start": list(os.getloadavg()),
        "no_grad": True,
        "memory_method_cpu": "peak RSS growth (VmHWM reset via /proc/self/clear_refs) of a fresh subprocess "
        "running one call, MALLOC_MMAP_THRESHOLD_=65536",
        "analytic_largest_intermediate_bytes": {
            "ours": {
                "affinity (B, 48, H, W)": B * J * H * W * f4,
                "maps + padded maps": 2 * B * K * (H + 48) * (W + 48) * f4,
            },
            "per_image": {"neighbour stack (1, K, 48, H, W)": K * J * H * W * f4},
        },
        "results": {},
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if device == "cuda":
            result["gpu"] = torch.cuda.get_device_name()
        r = run(device, args.rounds, args.min_run_time, args.threads)
        r["environment"] = environment(device)
        r["load_average_at_end"] = list(os.getloadavg())
        result["results"][device] = r
        print(json.dumps(r, indent=1), flush=True)
        out = args.out or ROOT / "benchmarks" / "results" / f"refine_{device}.json"
        out.write_text(json.dumps({**result, "results": {device: r}}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
