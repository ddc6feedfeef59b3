"""Test helpers shared across test modules: host-sync guard and a free TCP port for gloo."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

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
