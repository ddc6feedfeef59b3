"""Small helpers shared across the core and the methods (private)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["no_autocast", "compute_dtype", "to_compute", "promoted_dtype", "promote", "autocast_on", "call_promoted"]


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


def promoted_dtype(*tensors: Tensor | None) -> torch.dtype | None:
    """The floating dtype mixed floating inputs are computed in (``torch.promote_types``), or ``None``.

    Integer, bool and ``None`` entries take no part.

    Examples:
        >>> promoted_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1), None)
        torch.float32
        >>> promoted_dtype(torch.zeros(1, dtype=torch.long)) is None
        True
    """
    dtype: torch.dtype | None = None
    for x in tensors:
        if x is not None and x.is_floating_point():
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return dtype


def promote(*tensors: Tensor) -> list[Tensor]:
    """The floating tensors cast to their promoted dtype (a no-op when they agree); others as given.

    Examples:
        >>> [t.dtype for t in promote(torch.zeros(1, dtype=torch.float64), torch.zeros(1), torch.zeros(1).long())]
        [torch.float64, torch.float64, torch.int64]
    """
    dtype = promoted_dtype(*tensors)
    return [x.to(dtype) if dtype is not None and x.is_floating_point() else x for x in tensors]


def autocast_on(device_type: str) -> bool:
    """Whether autocast is active on ``device_type`` (it then decides the precision of matmuls).

    Examples:
        >>> autocast_on("cpu")
        False
    """
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False


def call_promoted(module: nn.Module, *inputs: Tensor) -> Any:
    """``module(*inputs)``, with mixed floating dtypes of inputs and parameters computed in the promoted one.

    When the inputs' floating dtype differs from the module's parameters (``float64`` features
    into a ``float32`` head, ``float16`` into ``float32``), the parameters are cast for this call
    (gradients reach them in their own dtype) and the inputs too. Under autocast, or when the
    dtypes agree, this is ``module(*inputs)``.

    Examples:
        >>> lin = nn.Linear(2, 1)
        >>> call_promoted(lin, torch.ones(1, 2, dtype=torch.float64)).dtype
        torch.float64
    """
    params = [p for p in module.parameters() if p.is_floating_point()]
    floats = [x for x in inputs if x.is_floating_point()]
    if not params or not floats or autocast_on(floats[0].device.type):
        return module(*inputs)
    dtype = promoted_dtype(*floats, *params)
    if all(x.dtype == dtype for x in floats) and all(p.dtype == dtype for p in params):
        return module(*inputs)
    cast = {n: p.to(dtype) for n, p in module.named_parameters() if p.is_floating_point()}
    args = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    return torch.func.functional_call(module, cast, args)


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
