"""Test helpers shared across test modules: host-sync guard and two-process gloo runs."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Make the usual host-sync entry points raise while the block runs."""
    names = ["item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_nonzero = torch.nonzero

    def boom(*args, **kwargs):
        raise AssertionError("host sync on the training path")

    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        torch.nonzero = boom
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.nonzero = saved_nonzero


def free_port() -> int:
    """A free localhost TCP port (for ``init_process_group`` in spawned test workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world: int, port: int, body: Callable[[int], Any], out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(body(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still uses it (abort at exit)
    finally:
        dist.destroy_process_group()


def run_gloo(body: Callable[[int], Any], world: int = 2) -> list[Any]:
    """Run ``body(rank)`` in ``world`` spawned CPU processes of one gloo group; return each rank's
    result (``torch.save``-able; ``body`` must be a module-level function)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_entry, args=(world, free_port(), body, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
