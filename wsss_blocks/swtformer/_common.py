"""Private helpers of the SWTformer package: label/valid masks on a grid, precision."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor

from wsss_blocks._validate import ShapeError, check_labels, check_shape
from wsss_blocks.cam import valid_to_grid

__all__ = ["compute_dtype", "allowed_channels", "valid_on_grid"]


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """``promote_types(dtype, float32)`` over the inputs (fp32 under autocast, fp64 stays fp64)."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def allowed_channels(
    labels: Tensor | None, dims: MutableMapping[str, int], like: Tensor, name: str = "labels"
) -> Tensor:
    """``a = [1, y]`` as a ``(B, K+1)`` bool mask; ``labels=None`` allows every class."""
    b, k1 = dims["B"], dims["K1"]
    if labels is None:
        return torch.ones(b, k1, dtype=torch.bool, device=like.device)
    check_labels(name, labels, dims, pattern=("B", "K"))
    if dims["K"] + 1 != k1:
        raise ShapeError(
            f"{name}: expected (B, K={k1 - 1}) labels for K+1={k1} channels, got {tuple(labels.shape)}"
        )
    fg = labels != 0
    return torch.cat([torch.ones(b, 1, dtype=torch.bool, device=fg.device), fg], dim=1)


def valid_on_grid(
    valid: Tensor | None, dims: MutableMapping[str, int], size: tuple[int, int], name: str = "valid"
) -> Tensor | None:
    """A ``(B, H', W')`` bool mask at any resolution resampled to ``size`` (None stays None)."""
    if valid is None:
        return None
    check_shape(name, valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
    return valid_to_grid(valid, size)
