"""Small helpers shared across the core and the methods (private)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["no_autocast", "compute_dtype", "to_compute"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The precision reductions run in: float32, or float64 when any input is float64.

    Half and bfloat16 inputs (autocast) are computed in float32; integer and bool inputs do
    not raise the precision.

    Examples:
        >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long))
        torch.float32
        >>> compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64))
        torch.float64
    """
    dtype = torch.float32
    for x in tensors:
        if x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def to_compute(x: Tensor) -> Tensor:
    """``x`` in ``compute_dtype`` precision (a no-op for float32 and float64 input).

    Examples:
        >>> to_compute(torch.ones(2, dtype=torch.float16)).dtype
        torch.float32
    """
    return x.to(compute_dtype(x))


def no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device_type`` (no-op for unknown types).

    Reductions and small matrix products that must stay in the input's precision run
    inside it, after casting their inputs to fp32 where the caller wants fp32.

    Examples:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
