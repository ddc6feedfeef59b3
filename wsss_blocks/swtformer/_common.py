"""Private helpers of the SWTformer package: label/valid masks on a grid, NCHW/NHWC input."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

import torch
from torch import Tensor

from wsss_blocks._validate import Dims, ShapeError, check_labels, check_shape
from wsss_blocks.cam import valid_to_grid
from wsss_blocks.tokens import features_as_grid

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
        src = dims.sources.get("K1") if isinstance(dims, Dims) else None
        of = "" if src is None else f" of {src}"
        raise ShapeError(
            f"{name}: expected (B, K={k1 - 1}) labels for the K+1={k1} channels{of}, got {tuple(labels.shape)}"
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
    """Check a ``channels``-wide stage map in ``input_fmt`` and return it as NCHW.

    Stage maps are 4-dim only (no tokens: a stage has no grid argument). A map that fails the
    NCHW check but would pass as NHWC (timm's Swin hands stage maps over channels-last) gets
    an error that ends with ``hint`` (by default: name ``input_fmt="NHWC"``); see
    ``wsss_blocks.tokens.features_as_grid``.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        pattern: list[str | int] = ["B", h, w, channels] if input_fmt == "NHWC" else ["B", channels, h, w]
        check_shape(name, x, pattern, dims, dtype="float")  # raises: a wrong rank
    return features_as_grid(
        name, x, None, dims, channels=channels, grid=(h, w), input_fmt=input_fmt, hint=hint, dtype="float"
    )
