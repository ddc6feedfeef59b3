"""Small helpers shared across the core and the methods (private)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "no_autocast",
    "compute_dtype",
    "to_compute",
    "promoted_dtype",
    "promote",
    "autocast_on",
    "call_promoted",
    "to_model_dtype",
    "empty_batch",
]


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


def to_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """Floating ``x`` in the dtype of ``model``'s parameters (a backbone the library does not own).

    A user's backbone computes in its own precision: floating input of another dtype is cast to
    it (as autocast would). Under autocast, or for a model without floating parameters, ``x``
    is returned as it is.

    Examples:
        >>> to_model_dtype(nn.Linear(2, 2).double(), torch.zeros(1, 2)).dtype
        torch.float64
    """
    if not x.is_floating_point() or autocast_on(x.device.type):
        return x
    for p in model.parameters():
        if p.is_floating_point():
            return x if p.dtype == x.dtype else x.to(p.dtype)
    return x


def empty_batch(model: nn.Module, fn: Callable[[Tensor], Any], x: Tensor) -> Any:
    """What ``fn`` returns for the empty batch ``x`` (``B = 0``), for a backbone that cannot run on one.

    ``fn`` runs once on one zero sample, in eval mode and without gradient, and every tensor
    of its result is cut to its first 0 rows: the shapes and dtypes of a real call, with batch 0.

    Examples:
        >>> out = empty_batch(nn.Identity(), lambda x: [x * 2], torch.zeros(0, 3))
        >>> out[0].shape
        torch.Size([0, 3])
    """
    from wsss_blocks.utils import eval_mode

    with eval_mode(model), torch.no_grad():
        out = fn(x.new_zeros((1, *x.shape[1:])))
    return _cut(out)


def _cut(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out[:0] if out.dim() else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_cut(v) for v in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_cut(v) for v in out)
    if isinstance(out, dict):
        return {k: _cut(v) for k, v in out.items()}
    return out


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
