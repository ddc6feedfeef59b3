"""Shared private pieces of the ViT-PCM losses: the background policy, its targets, safe divisions."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

import torch
from torch import Tensor

from wsss_blocks._validate import Dims, ShapeError, check_labels, check_option

__all__ = ["Background", "BACKGROUNDS"]

Background = Literal["always_one", "from_labels", "ignore"]
BACKGROUNDS = ("always_one", "from_labels", "ignore")


def _targets(labels: Tensor, channels: int, background: str, dims: MutableMapping[str, int],
             like: Tensor, probs_name: str = "probs") -> Tensor:
    """``(B, C)`` targets: ``[1, labels]`` (``always_one`` / ``ignore``) or ``labels`` (``from_labels``)."""
    check_option("background", background, BACKGROUNDS)
    if background == "from_labels":
        check_labels("labels", labels, dims, pattern=("B", "C"))
        return labels.to(device=like.device, dtype=like.dtype)
    if channels < 2:
        raise ShapeError(f"{probs_name}: background={background!r} needs a background channel, got C={channels}")
    if "K" not in dims:
        dims["K"] = channels - 1
        if isinstance(dims, Dims):
            dims.sources["K"] = f"{probs_name} (C - 1)"
    check_labels("labels", labels, dims, pattern=("B", "K"))
    y = labels.to(device=like.device, dtype=like.dtype)
    return torch.cat([torch.ones_like(y[:, :1]), y], dim=1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """Keras ``divide_no_nan``: ``num / den`` where ``den != 0``, else 0 (no NaN gradient)."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def _mask_max(probs: Tensor, y: Tensor) -> Tensor:
    """Label-mask ``probs`` by ``y`` and divide each (image, class) map by its spatial max."""
    m = probs * y[:, :, None, None]
    return _safe_div(m, m.amax(dim=(-2, -1), keepdim=True))


def _class_renorm(m: Tensor) -> Tensor:
    """Divide every patch by its sum over the classes (0 where the sum is 0)."""
    return _safe_div(m, m.sum(dim=1, keepdim=True))
