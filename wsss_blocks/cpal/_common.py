"""Private helpers shared by the CPAL functions: unit vectors, the present mask, checks."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import to_compute
from wsss_blocks._validate import check_range, check_shape

__all__: list[str] = []

NORM_EPS = 1e-6


def unit(x: Tensor, dim: int) -> Tensor:
    """``x`` normalised along ``dim`` in the compute precision (eps ``1e-6``: a zero vector stays 0)."""
    return F.normalize(to_compute(x), dim=dim, eps=NORM_EPS)


def check_threshold(name: str, value: float) -> float:
    """A CAM threshold strictly inside ``(0, 1)``."""
    return float(check_range(name, value, 0.0, 1.0, low_inclusive=False, high_inclusive=False))


def check_context(context: Tensor, context_valid: Tensor, dims: MutableMapping[str, int]) -> None:
    check_shape("context", context, ["C", "M", "P"], dims, dtype="float")
    check_shape("context_valid", context_valid, ["C", "M"], dims, dtype="bool")


def present(labels: Tensor, like: Tensor) -> Tensor:
    """``y+ = [1 | labels]`` as bool ``(B, C)`` on ``like``'s device."""
    fg = labels.to(device=like.device) != 0
    return torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)
