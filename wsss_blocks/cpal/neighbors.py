"""CPAL's neighbour selection: positiveness (eq. 7), soft neighbours (eq. 6), their weights (Claim 1).

All three select and weight context prototypes for each anchor; they run without gradient.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_class_values, check_int, check_option, check_range, check_shape
from wsss_blocks.cpal._common import check_context, unit

__all__ = [
    "Similarity",
    "Weighting",
    "SoftNeighbors",
    "positiveness",
    "soft_neighbors",
    "neighbor_weights",
]

Similarity = Literal["dot", "cosine", "l2", "l1"]
Weighting = Literal["positiveness", "uniform"]
SIMILARITIES = ("dot", "cosine", "l2", "l1")
WEIGHTINGS = ("positiveness", "uniform")


class SoftNeighbors(NamedTuple):
    """Result of ``soft_neighbors``.

    Attributes:
        indices: ``(B, C, T)`` int64 indices of the picked context prototypes.
        selected: ``(B, C, T)`` bool, whether each pick is a real (valid) neighbour.
    """

    indices: Tensor
    selected: Tensor


@torch.no_grad()
def positiveness(
    anchors: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    temperature: float | None = None,
    similarity: Similarity = "dot",
) -> Tensor:
    """Positiveness (eq. 7): ``softmax_i(s(a, p_i) / temperature)`` over the class's valid context.

    The similarity ``s`` is ``a.p`` (``"dot"``, the paper's choice), the cosine,
    ``-||a - p||_2`` or ``-||a - p||_1``. ``temperature`` is the paper's scaling factor gamma,
    applied inside the softmax (``None``: ``sqrt(P)``); the softmax subtracts its row maximum,
    so a tiny temperature stays finite. A row without a valid context prototype is all 0. No
    gradient.

    Args:
        anchors: (aligned) instance prototypes.
        context: context prototypes.
        context_valid: which context prototypes exist.
        temperature: softmax temperature, ``> 0`` (``None``: ``sqrt(P)``).
        similarity: ``"dot" | "cosine" | "l2" | "l1"``.

    Shape:
        - anchors: ``(B, C, P)``; context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - output: ``(B, C, M)`` fp32 (fp64 for fp64 inputs); rows sum to 1 or are all 0

    Examples:
        >>> w = positiveness(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]),
        ...                  torch.ones(1, 2, dtype=torch.bool), temperature=1.0)
        >>> [round(v, 4) for v in w.flatten().tolist()]    # [e^2, 1] / (e^2 + 1)
        [0.8808, 0.1192]
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    check_context(context, context_valid, dims)
    check_option("similarity", similarity, SIMILARITIES)
    t = (math.sqrt(dims["P"]) if temperature is None
         else float(check_range("temperature", temperature, 0.0, low_inclusive=False)))
    with no_autocast(anchors.device.type):
        dtype = compute_dtype(anchors, context)
        a, p = anchors.to(dtype), context.to(dtype)
        if similarity == "dot":
            s = torch.einsum("bcp,cmp->bcm", a, p)
        elif similarity == "cosine":
            s = torch.einsum("bcp,cmp->bcm", unit(a, -1), unit(p, -1))
        elif similarity == "l2":
            aa = a.pow(2).sum(-1)[:, :, None]
            pp = p.pow(2).sum(-1)[None]
            s = -(aa + pp - 2.0 * torch.einsum("bcp,cmp->bcm", a, p)).clamp_min(0).sqrt()
        else:  # l1: (B, C, M, P), the one intermediate larger than O(B*C*max(M, P))
            s = -(a[:, :, None, :] - p[None]).abs().sum(-1)
        valid = context_valid[None].expand_as(s)
        logits = torch.where(valid, s / t, torch.full_like(s, float("-inf")))
        top = logits.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.where(valid, (logits - top).exp(), torch.zeros_like(s))
        return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


@torch.no_grad()
def soft_neighbors(
    anchors: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    top_k: int = 20,
) -> SoftNeighbors:
    """Soft neighbours (eq. 6): the ``top_k`` context prototypes of the anchor's class by cosine.

    Invalid context prototypes score ``-inf``; when a class has fewer than ``top_k`` valid
    ones, the extra picks are marked not ``selected``. Cosine ranking is invariant to positive
    rescaling of the context. No gradient.

    Args:
        anchors: (aligned) instance prototypes.
        context: context prototypes.
        context_valid: which context prototypes exist.
        top_k: ``T``, ``1 <= T <= M``.

    Returns:
        ``SoftNeighbors`` ``(indices, selected)``: indices into ``M`` and whether each
        pick is a real neighbour.

    Shape:
        - anchors: ``(B, C, P)``; context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - indices: ``(B, C, T)`` int64; selected: ``(B, C, T)`` bool

    Examples:
        >>> anchors = torch.tensor([[[1.0, 0.0]]])
        >>> context = torch.tensor([[[0.0, 3.0], [5.0, 0.1], [-1.0, 0.0]]])
        >>> idx, sel = soft_neighbors(anchors, context, torch.tensor([[True, True, False]]), top_k=3)
        >>> idx.tolist(), sel.tolist()
        ([[[1, 0, 2]]], [[[True, True, False]]])
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    check_context(context, context_valid, dims)
    t = check_int("top_k", top_k, low=1)
    if t > dims["M"]:
        raise ValueError(f"top_k: expected at most M={dims['M']} (the prototypes per class of context), got {t}")
    with no_autocast(anchors.device.type):
        dtype = compute_dtype(anchors, context)
        cos = torch.einsum("bcp,cmp->bcm", unit(anchors, -1).to(dtype), unit(context, -1).to(dtype))
        cos = cos.masked_fill(~context_valid[None], float("-inf"))
        indices = cos.topk(t, dim=-1).indices
    selected = context_valid[None].expand(indices.shape[0], -1, -1).gather(-1, indices)
    return SoftNeighbors(indices, selected)


@torch.no_grad()
def neighbor_weights(
    positiveness: Tensor,
    indices: Tensor,
    selected: Tensor,
    *,
    weighting: Weighting = "positiveness",
) -> Tensor:
    """Dense neighbour weights (Claim 1): the positiveness renormalised over the neighbours.

    ``"positiveness"``: ``W = scatter(indices, w * selected) / max(row sum, 1e-12)`` -- a
    softmax of the similarities over the selected neighbours. ``"uniform"`` (literal eq. 13):
    ``1 / (number of selected)`` on each selected neighbour. Entries outside the neighbours
    are 0; a row with no selected neighbour is all 0. No gradient.

    Note:
        With a very small ``temperature`` the positiveness of every selected neighbour can
        underflow to 0 (the highest similarity is not among the top-T by cosine); that row is
        then all 0.

    Args:
        positiveness: from ``positiveness``.
        indices: neighbour indices from ``soft_neighbors``, in ``[0, M)`` (checked for CPU
            tensors).
        selected: which picks are real neighbours.
        weighting: ``"positiveness" | "uniform"``.

    Shape:
        - positiveness: ``(B, C, M)``; indices, selected: ``(B, C, T)``
        - output: ``(B, C, M)``, same dtype as ``positiveness``

    Examples:
        >>> w = torch.tensor([[[0.5, 0.3, 0.2]]])
        >>> idx, sel = torch.tensor([[[0, 2]]]), torch.tensor([[[True, True]]])
        >>> neighbor_weights(w, idx, sel).double().round(decimals=4).tolist()     # [0.5, 0.2] / 0.7
        [[[0.7143, 0.0, 0.2857]]]
        >>> neighbor_weights(w, idx, sel, weighting="uniform").tolist()
        [[[0.5, 0.0, 0.5]]]
    """
    dims = check_shape("positiveness", positiveness, ["B", "C", "M"], dtype="float")
    check_shape("indices", indices, ["B", "C", "T"], dims, dtype="int")
    check_shape("selected", selected, ["B", "C", "T"], dims, dtype="bool")
    check_option("weighting", weighting, WEIGHTINGS)
    check_class_values("indices", indices, dims["M"], bound_from="M of positiveness")
    return _neighbor_weights(positiveness, indices.long(), selected, weighting)


def _neighbor_weights(positiveness: Tensor, indices: Tensor, selected: Tensor, weighting: str) -> Tensor:
    """``neighbor_weights`` on checked input (the training path: ``soft_neighbors``' own indices)."""
    sel = selected.to(positiveness.dtype)
    if weighting == "positiveness":
        picked = positiveness.gather(-1, indices) * sel
        dense = torch.zeros_like(positiveness).scatter(-1, indices, picked)
        return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)
    dense = torch.zeros_like(positiveness).scatter(-1, indices, sel)
    return dense / sel.sum(-1, keepdim=True).clamp_min(1.0)
