"""CPAL's feature-distribution alignment of the anchors (eqs. 9-12)."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_shape
from wsss_blocks.cpal._common import check_context

__all__ = ["alignment_shift"]


@torch.no_grad()
def alignment_shift(
    anchors: Tensor,
    anchor_valid: Tensor,
    context: Tensor,
    context_valid: Tensor,
) -> Tensor:
    """Feature-distribution alignment (eqs. 9-12): ``delta_n = mean(context_n) - mean(anchors_n)``.

    Eq. 12's double sum, separated: the mean of a class's valid context prototypes minus the
    mean of its valid anchors over the batch. ``delta_n = 0`` when the class has no valid
    anchor or no valid context. Adding ``delta`` moves the batch's anchors so their mean is the
    context mean; with one anchor the shifted anchor *is* the context mean (literal eq. 12).
    No gradient.

    Args:
        anchors: instance prototypes.
        anchor_valid: which anchors exist.
        context: context prototypes.
        context_valid: which context prototypes exist.

    Shape:
        - anchors: ``(B, C, P)``; anchor_valid: ``(B, C)`` bool
        - context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - output: ``(C, P)`` fp32 (fp64 for fp64 inputs)

    Examples:
        >>> anchors = torch.tensor([[[0.0, 2.0]], [[0.0, 4.0]]])      # B=2, C=1
        >>> context = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])         # M=2
        >>> ok = torch.ones(2, 1, dtype=torch.bool)
        >>> alignment_shift(anchors, ok, context, torch.ones(1, 2, dtype=torch.bool)).tolist()
        [[2.0, -3.0]]
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    check_shape("anchor_valid", anchor_valid, ["B", "C"], dims, dtype="bool")
    check_context(context, context_valid, dims)
    dtype = compute_dtype(anchors, context)
    with no_autocast(anchors.device.type):
        av = anchor_valid.to(dtype)
        cv = context_valid.to(dtype)
        q = av.sum(0)  # (C,)
        m = cv.sum(1)  # (C,)
        anchor_mean = torch.einsum("bc,bcp->cp", av, anchors.to(dtype)) / q.clamp_min(1)[:, None]
        context_mean = torch.einsum("cm,cmp->cp", cv, context.to(dtype)) / m.clamp_min(1)[:, None]
        delta = context_mean - anchor_mean
        return torch.where(((q > 0) & (m > 0))[:, None], delta, torch.zeros_like(delta))
