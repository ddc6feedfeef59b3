"""Small helpers shared across the core and the methods (private)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["no_autocast"]


def no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device_type`` (no-op for unknown types).

    Reductions and small matrix products that must stay in the input's precision run
    inside it, after casting their inputs to fp32 where the caller wants fp32.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
