"""Helpers shared by PDL and SSL (private): prototype checks and the present-class slots.

PDL and SSL evaluate only present (image, class) pairs. The *dense* path uses slot ``k`` =
class ``k`` for every image; the *compact* path gives each image ``S`` slots holding its
present classes (``S`` = the largest present-class count, read on the host).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor

from wsss_blocks._validate import check_shape

__all__ = ["check_prototypes", "class_slots", "take_slots", "per_slot"]


def check_prototypes(
    dims: MutableMapping[str, int], pos: Tensor, pos_valid: Tensor, neg: Tensor, neg_mask: Tensor,
    neg_mask_name: str,
) -> None:
    check_shape("pos", pos, ["K", "M", "D"], dims, dtype="float")
    check_shape("pos_valid", pos_valid, ["K", "M"], dims, dtype="bool")
    check_shape("neg", neg, ["K", "M_neg", "D"], dims, dtype="float")
    check_shape(neg_mask_name, neg_mask, ["K", "M_neg"], dims, dtype="bool")


def class_slots(labels: Tensor, compact: bool | None) -> Tensor | None:
    """Which class each (image, slot) evaluates: ``None`` = dense (slot ``k`` is class ``k``).

    Only present (image, class) pairs contribute to PDL and SSL. The compact path gives
    every image ``S`` slots, ``S`` = the largest number of present classes in an image,
    holding its present classes (then absent ones as padding): ``K/S`` times less work.
    ``S`` is read on the host: one sync, free on CPU but a stall on an accelerator, so
    ``compact=None`` picks compact for CPU tensors and dense (never syncs) otherwise.
    """
    if compact is None:
        compact = labels.device.type == "cpu"
    if not compact:
        return None
    present = labels != 0
    count = present.sum(1)
    # sync-ok: CPU fast path, dense path on accelerators
    num_slots = int(count.amax()) if count.numel() else 0
    return present.float().topk(num_slots, dim=1).indices  # (B, S), all present classes


def take_slots(x: Tensor, slots: Tensor | None) -> Tensor:
    """Per-image, per-class ``(B, K, ...)`` -> per slot ``(B, S, ...)`` (differentiable)."""
    if slots is None:
        return x
    return x[torch.arange(x.shape[0], device=x.device)[:, None], slots]


def per_slot(x: Tensor, slots: Tensor | None) -> Tensor:
    """Per-class ``(K, ...)`` -> per slot: shared ``(K, ...)`` (dense) or ``(B, S, ...)``."""
    return x if slots is None else x[slots]


