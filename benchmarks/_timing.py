"""Shared timing and memory helpers for the scripts in ``benchmarks/``.

Every benchmark measures through these functions so that all results mean the same thing:

* :func:`median_s` / :func:`median_ms`: median wall time of ``fn()`` from
  ``torch.utils.benchmark.Timer.blocked_autorange`` (CUDA work is synchronised inside the
  timed statement when ``device`` is CUDA);
* :func:`paired_median_ms`: ours and a reference measured in alternating rounds so that load
  drift on a shared machine hits both alike;
* :func:`saved_bytes`: bytes autograd saves for backward (CPU has no peak-memory counter);
* :func:`cuda_peak_extra_bytes`: ``torch.cuda.max_memory_allocated`` growth over the
  allocation before the call;
* :func:`environment`: device name, torch/python versions and thread count for the JSON.

Import from a benchmark script as ``from _timing import ...`` (``python benchmarks/bench_x.py``
puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils import benchmark


def _is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _synced(fn: Callable[[], object], device: str | torch.device | None) -> Callable[[], object]:
    if not _is_cuda(device):
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def block_times_s(
    fn: Callable[[], object], *, min_run_time: float = 1.0, device: str | torch.device | None = None,
    num_threads: int | None = None, timer: Callable[[], float] | None = None,
) -> list[float]:
    """Per-call times (seconds) of the blocks ``blocked_autorange`` measured for ``fn()``.

    ``num_threads`` / ``timer`` go to ``torch.utils.benchmark.Timer`` (e.g. ``time.process_time``
    for CPU time instead of wall time).
    """
    run = _synced(fn, device)
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    kw: dict[str, Any] = {} if num_threads is None else {"num_threads": num_threads}
    if timer is not None:
        kw["timer"] = timer
    measured = benchmark.Timer(stmt="fn()", globals={"fn": run}, **kw).blocked_autorange(min_run_time=min_run_time)
    return list(measured.times)


def median_s(
    fn: Callable[[], object], *, min_run_time: float = 1.0, device: str | torch.device | None = None,
    num_threads: int | None = None, timer: Callable[[], float] | None = None,
) -> float:
    """Median seconds per call of ``fn()`` (``blocked_autorange``)."""
    times = block_times_s(fn, min_run_time=min_run_time, device=device, num_threads=num_threads, timer=timer)
    return _median(times)


def median_ms(
    fn: Callable[[], object], *, min_run_time: float = 1.0, device: str | torch.device | None = None,
) -> float:
    """:func:`median_s` in milliseconds."""
    return median_s(fn, min_run_time=min_run_time, device=device) * 1e3


def paired_median_ms(
    ours: Callable[[], object], ref: Callable[[], object], *, min_run_time: float = 1.0, rounds: int = 3,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Median ms of ``ours`` and ``ref`` measured in ``rounds`` alternating rounds (one warm-up each)."""
    ours()
    ref()
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("ref", ref)):
            times[name].extend(block_times_s(fn, min_run_time=min_run_time / rounds, device=device))
    return _median(times["ours"]) * 1e3, _median(times["ref"]) * 1e3


def repeat_ms(fn: Callable[[], object], *, repeats: int, device: str | torch.device | None = None) -> dict[str, Any]:
    """Median and min ms of ``repeats`` timed calls after one warm-up: for calls too slow for
    ``blocked_autorange`` (seconds each on CPU)."""
    run = _synced(fn, device)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * _median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn()`` runs.

    Views of one buffer are counted each time they are saved: a proxy for activation memory
    where no peak counter exists (CPU).
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def cuda_peak_extra_bytes(fn: Callable[[], object], device: str | torch.device = "cuda") -> int:
    """Peak ``torch.cuda.max_memory_allocated`` during ``fn()`` minus the allocation before it.

    Runs ``fn`` once to warm up (allocator, kernels), then once measured.
    """
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a result was measured: device, its name, torch/python versions, threads, CPU count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "device": dev.type,
        "device_name": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
