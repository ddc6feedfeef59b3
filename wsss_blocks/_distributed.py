"""torch.distributed plumbing shared by the stateful parts (private).

``world_size``, ``all_gather_rows`` and ``broadcast_from_rank0`` let a bank, a
prototype pool or a metric hold the same state on every rank; outside an initialised process group they are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from wsss_blocks._validate import ShapeError

__all__ = ["world_size", "all_gather_rows", "broadcast_from_rank0"]


def world_size() -> int:
    """Number of ranks of the initialised ``torch.distributed`` group, else 1.

    Examples:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """All-gather batch-first tensors from every rank, in rank order; ranks may differ in B.

    Each rank's rows are padded with zeros to the largest batch, gathered, and
    concatenated in rank order. The last returned tensor marks the real (non-padding)
    rows. Bool tensors are sent as uint8 and come back as bool. Outside an initialised
    ``torch.distributed`` run (or with one rank) the inputs come back as they are. One
    host read of the largest batch size is needed to pad (after a collective).

    Args:
        tensors: tensors sharing their first dimension ``B`` (on the process group's device).

    Shape:
        - tensors: ``(B, ...)`` each
        - output: ``(B_total, ...)`` each, then ``real (B_total,)`` bool

    Examples:
        >>> x, real = all_gather_rows(torch.ones(3, 2))   # single process: unchanged
        >>> x.shape, real.tolist()
        (torch.Size([3, 2]), [True, True, True])
    """
    if not tensors:
        raise ValueError("all_gather_rows: expected at least one tensor")
    batch = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != batch:
            raise ShapeError(f"tensors[{i}]: expected first dim {batch}, got shape {tuple(t.shape)}")
    real = torch.ones(batch, dtype=torch.bool, device=tensors[0].device)
    world = world_size()
    if world == 1:
        return (*tensors, real)
    size = torch.tensor([batch], dtype=torch.long, device=real.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    bmax = int(torch.cat(sizes).max())  # sync-ok: after a collective, needed to pad
    out = []
    for t in (*tensors, real):
        send = t.to(torch.uint8) if t.dtype == torch.bool else t
        if bmax > batch:
            send = torch.cat([send, send.new_zeros((bmax - batch, *send.shape[1:]))])
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send.contiguous())
        joined = torch.cat(parts)
        out.append(joined.bool() if t.dtype == torch.bool else joined)
    return tuple(out)


def broadcast_from_rank0(*buffers: Tensor) -> None:
    """Overwrite ``buffers`` in place with rank 0's values (bool tensors travel as uint8).

    A no-op outside an initialised multi-process ``torch.distributed`` run. Used after a
    computation that may drift in floating point between ranks (k-means), so every rank
    keeps bit-identical state.

    Examples:
        >>> x = torch.ones(2)
        >>> broadcast_from_rank0(x)      # single process: unchanged
        >>> x.tolist()
        [1.0, 1.0]
    """
    if world_size() == 1:
        return
    for buf in buffers:
        if buf.dtype == torch.bool:
            tmp = buf.to(torch.uint8)
            dist.broadcast(tmp, src=0)
            buf.copy_(tmp.bool())
        else:
            dist.broadcast(buf, src=0)
