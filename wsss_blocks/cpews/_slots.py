"""Helpers shared by PDL and SSL (private): prototype checks, the present-class slots and the
unbuilt-pool fallback.

PDL and SSL evaluate only present (image, class) pairs. The *dense* path uses slot ``k`` =
class ``k`` for every image; the *compact* path gives each image ``S`` slots holding its
present classes (``S`` = the largest present-class count, read on the host).
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping

import torch
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype
from wsss_blocks._validate import check_bool, check_shape

__all__ = ["check_prototypes", "class_slots", "take_slots", "per_slot", "PoolLoss"]


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
    compact = check_bool("compact", compact)
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


class PoolLoss(nn.Module):
    """Base of the losses that read a ``PrototypePool``: the unbuilt-pool fallback.

    While the pool is unbuilt the loss is a graph-attached zero, and ``warn_unbuilt``
    warns once per instance (``_warned`` records it).
    """

    warn_unbuilt: bool
    _warned: bool

    def __init__(self, *, warn_unbuilt: bool = True) -> None:
        super().__init__()
        self.warn_unbuilt = check_bool("warn_unbuilt", warn_unbuilt)
        self._warned = False

    def _unbuilt_zero(self, features: Tensor, cams: Tensor) -> Tensor:
        """``0 * (sum(cams) + sum(features))`` in the compute precision (zero gradients)."""
        if self.warn_unbuilt and not self._warned:
            warnings.warn(
                f"{type(self).__name__}: the prototype pool is not built yet; the loss is 0 "
                "(call pool.build(...) after the warm-up, or pass warn_unbuilt=False)",
                stacklevel=3,
            )
            self._warned = True
        dtype = compute_dtype(features, cams)
        return (cams.to(dtype).sum() + features.to(dtype).sum()) * 0.0 + 0.0  # + 0.0: no -0.0
