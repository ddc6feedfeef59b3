"""Private helpers of the SWTformer package: label/valid masks on a grid, NCHW/NHWC input."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

from wsss_blocks._validate import ShapeError, check_labels, check_shape
from wsss_blocks.cam import valid_to_grid

__all__ = ["allowed_channels", "valid_on_grid", "to_nchw"]


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


def to_nchw(
    name: str,
    x: Tensor,
    channels: int,
    dims: MutableMapping[str, int],
    input_fmt: Literal["NCHW", "NHWC"],
    h: str = "h",
    w: str = "w",
    hint: str = 'pass input_fmt="NHWC"',
) -> Tensor:
    """Check a ``channels``-wide map in ``input_fmt`` and return it as NCHW.

    A map that fails the NCHW check but would pass as NHWC (timm's Swin hands stage maps
    over channels-last) gets an error that ends with ``hint`` (by default: name
    ``input_fmt="NHWC"``).
    """
    if input_fmt == "NHWC":
        check_shape(name, x, ["B", h, w, channels], dims, dtype="float")
        return rearrange(x, "b h w c -> b c h w")
    try:
        check_shape(name, x, ["B", channels, h, w], dims, dtype="float")
    except ShapeError as err:
        if x.dim() == 4 and x.shape[-1] == channels and x.shape[1] != channels:
            raise ShapeError(
                f"{err}; the map looks channels-last (B, h, w, {channels}), as timm's Swin hands it "
                f"over: {hint}"
            ) from None
        raise
    return x
