"""CPAL's pure functions (Tang et al., CVPR 2024, eqs. 3-14 as amended by ``specs/cpal.md``).

The branch, step by step (``C = K + 1`` channels with the background at 0):

1. :func:`instance_prototypes` -- per-(image, channel) mean of the projected features over
   the thresholded CAM (eq. 4);
2. :func:`context_prototypes` -- k-means of a class's prototype bank (eq. 5);
3. :func:`alignment_shift` -- the feature-distribution shift of the anchors (eqs. 9-12);
4. :func:`soft_neighbors` -- the top-T context prototypes by cosine (eq. 6);
5. :func:`positiveness` -- a softmax of the anchor-context score over the context (eq. 7);
6. :func:`neighbor_weights` -- the positiveness renormalised over the chosen neighbours
   (Claim 1), as dense ``(B, C, M)`` weights;
7. :func:`pacam` -- the prototype-aware CAM (eq. 13, weighted);
8. :func:`self_loss` -- the L1 self-supervision of the CAM by the PACAM (eq. 14).

:func:`cpal_forward` chains 2-8 for one batch (no bank side effects). Steps 2-6 select and
weight prototypes: they run under ``torch.no_grad()``. Gradient reaches the CAM through the
loss and the features through the PACAM.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import (
    ShapeError,
    check_int,
    check_labels,
    check_option,
    check_range,
    check_shape,
)
from wsss_blocks.cam import add_background
from wsss_blocks.prototypes import kmeans

__all__ = [
    "Score",
    "Weighting",
    "instance_prototypes",
    "context_prototypes",
    "alignment_shift",
    "soft_neighbors",
    "positiveness",
    "neighbor_weights",
    "pacam",
    "self_loss",
    "cpal_forward",
]

Score = Literal["dot", "cosine", "l2", "l1"]
Weighting = Literal["positiveness", "uniform"]
SCORES = ("dot", "cosine", "l2", "l1")
WEIGHTINGS = ("positiveness", "uniform")
_NORM_EPS = 1e-6


def _wide(x: Tensor) -> Tensor:
    """fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit(x: Tensor, dim: int) -> Tensor:
    return F.normalize(_wide(x), dim=dim, eps=_NORM_EPS)


def _check_tau(name: str, value: float) -> float:
    return float(check_range(name, value, 0.0, 1.0, low_inclusive=False, high_inclusive=False))


def _check_context(context: Tensor, context_valid: Tensor, dims: MutableMapping[str, int]) -> None:
    check_shape("context", context, ["C", "M", "P"], dims, dtype="float")
    check_shape("context_valid", context_valid, ["C", "M"], dims, dtype="bool")


def _present(labels: Tensor, like: Tensor) -> Tensor:
    """``y+ = [1 | labels]`` as bool ``(B, C)`` on ``like``'s device."""
    fg = labels.to(device=like.device) != 0
    return torch.cat([torch.ones_like(fg[:, :1]), fg], dim=1)


def instance_prototypes(
    z: Tensor,
    cams_with_bg: Tensor,
    labels: Tensor,
    *,
    tau: float = 0.1,
    bg_tau: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Instance prototypes (eq. 4): mean of ``z`` where a present channel's CAM exceeds tau.

    ``mask = (M > tau_c) & y+`` with ``tau_0 = bg_tau`` (or ``tau``) for the background and
    ``tau`` for the classes; ``P = einsum(mask, z) / max(|mask|, 1)``; an empty mask (or an
    absent class) gives a zero row that is not valid. Gradient flows into ``z`` only (the
    mask is a threshold); CPAL itself calls this under ``no_grad`` (the anchors only select
    and weight neighbours).

    Args:
        z: projected features on the CAM grid.
        cams_with_bg: CAMs in ``[0, 1]`` with the background at channel 0 (e.g.
            :func:`wsss_blocks.cam.add_background`).
        labels: multi-hot image labels (no background column).
        tau: foreground threshold, ``0 < tau < 1``.
        bg_tau: background threshold (``None``: ``tau``).

    Returns:
        ``(prototypes, valid)``.

    Shape:
        - z: ``(B, P, h, w)``; cams_with_bg: ``(B, C, h, w)`` with ``C = K + 1``; labels: ``(B, K)``
        - prototypes: ``(B, C, P)`` fp32 (fp64 for fp64 ``z``); valid: ``(B, C)`` bool

    Example:
        >>> z = torch.arange(4.0).view(1, 1, 2, 2)                      # P = 1
        >>> cams = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])
        >>> protos, valid = instance_prototypes(z, cams, torch.tensor([[1]]))
        >>> protos.flatten().tolist(), valid.tolist()
        ([2.5, 0.5], [[True, True]])
    """
    dims = check_shape("z", z, ["B", "P", "h", "w"], dtype="float")
    check_shape("cams_with_bg", cams_with_bg, ["B", "C", "h", "w"], dims, dtype="float")
    if dims["C"] < 1:
        raise ShapeError(f"cams_with_bg: expected a background channel, got shape {tuple(cams_with_bg.shape)}")
    dims["K"] = dims["C"] - 1
    check_labels("labels", labels, dims)
    tau = _check_tau("tau", tau)
    tau0 = tau if bg_tau is None else _check_tau("bg_tau", bg_tau)
    channels = dims["C"]
    with no_autocast(z.device.type):
        zz = _wide(z).flatten(2)  # (B,P,N)
        thr = torch.full((channels,), tau, dtype=torch.float32, device=z.device)
        thr[0] = tau0
        mask = (cams_with_bg.flatten(2).float() > thr[None, :, None]) & _present(labels, z)[:, :, None]
        count = mask.sum(-1)  # (B,C)
        protos = torch.einsum("bcn,bpn->bcp", mask.to(zz.dtype), zz)
        protos = protos / count.clamp_min(1)[:, :, None].to(zz.dtype)
    return protos, count > 0


@torch.no_grad()
def context_prototypes(
    memory: Tensor,
    count: Tensor,
    num_prototypes: int = 50,
    *,
    iters: int = 20,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Context prototypes (eq. 5): k-means of each class's banked prototypes (no gradient).

    Slots ``[0, count[c])`` of ``memory[c]`` are the filled ones (a
    :class:`~wsss_blocks.prototypes.ClassBank`'s layout). A class with at most
    ``num_prototypes`` entries uses the entries themselves as centres (the rest invalid);
    an empty class gives all-invalid zeros. Euclidean k-means on the raw prototypes
    (their norm matters to the dot score), k-means++ seeded by ``seed``; no host sync.

    Args:
        memory: the bank.
        count: filled slots per class.
        num_prototypes: ``M``, centres per class (``>= 1``).
        iters: Lloyd steps (``>= 0``).
        seed: k-means++ seed (CPAL uses ``seed + recluster index``).

    Returns:
        ``(context, context_valid)``.

    Shape:
        - memory: ``(C, L, P)``; count: ``(C,)`` int
        - context: ``(C, M, P)`` fp32 (fp64 for fp64 memory); context_valid: ``(C, M)`` bool

    Example:
        >>> memory = torch.tensor([[[0.0], [0.2], [5.0], [5.2]], [[1.0], [0.0], [0.0], [0.0]]])
        >>> ctx, ok = context_prototypes(memory, torch.tensor([4, 1]), 2, iters=5)
        >>> ctx[0].flatten().sort().values.double().round(decimals=4).tolist(), ctx[1].flatten().tolist()
        ([0.1, 5.1], [1.0, 0.0])
        >>> ok.tolist()
        [[True, True], [True, False]]
    """
    dims = check_shape("memory", memory, ["C", "L", "P"], dtype="float")
    check_shape("count", count, ["C"], dims, dtype="int")
    m = check_int("num_prototypes", num_prototypes, low=1)
    filled = torch.arange(dims["L"], device=memory.device)[None, :] < count.to(memory.device)[:, None]
    return kmeans(memory, m, point_valid=filled, num_iters=iters, seed=seed)


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
    context mean; with one anchor the shifted anchor *is* the context mean (literal eq. 12,
    see the spec's decision 5.4). No gradient.

    Args:
        anchors: instance prototypes.
        anchor_valid: which anchors exist.
        context: context prototypes.
        context_valid: which context prototypes exist.

    Shape:
        - anchors: ``(B, C, P)``; anchor_valid: ``(B, C)`` bool
        - context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - output: ``(C, P)`` fp32 (fp64 for fp64 inputs)

    Example:
        >>> anchors = torch.tensor([[[0.0, 2.0]], [[0.0, 4.0]]])      # B=2, C=1
        >>> context = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])         # M=2
        >>> ok = torch.ones(2, 1, dtype=torch.bool)
        >>> alignment_shift(anchors, ok, context, torch.ones(1, 2, dtype=torch.bool)).tolist()
        [[2.0, -3.0]]
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    check_shape("anchor_valid", anchor_valid, ["B", "C"], dims, dtype="bool")
    _check_context(context, context_valid, dims)
    dtype = torch.promote_types(_wide(anchors).dtype, _wide(context).dtype)
    with no_autocast(anchors.device.type):
        av = anchor_valid.to(dtype)
        cv = context_valid.to(dtype)
        q = av.sum(0)  # (C,)
        m = cv.sum(1)  # (C,)
        anchor_mean = torch.einsum("bc,bcp->cp", av, anchors.to(dtype)) / q.clamp_min(1)[:, None]
        context_mean = torch.einsum("cm,cmp->cp", cv, context.to(dtype)) / m.clamp_min(1)[:, None]
        delta = context_mean - anchor_mean
        return torch.where(((q > 0) & (m > 0))[:, None], delta, torch.zeros_like(delta))


@torch.no_grad()
def soft_neighbors(
    anchors: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    top_k: int = 20,
) -> tuple[Tensor, Tensor]:
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
        ``(indices, selected)``: indices into ``M`` and whether each pick is a real neighbour.

    Shape:
        - anchors: ``(B, C, P)``; context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - indices: ``(B, C, T)`` int64; selected: ``(B, C, T)`` bool

    Example:
        >>> anchors = torch.tensor([[[1.0, 0.0]]])
        >>> context = torch.tensor([[[0.0, 3.0], [5.0, 0.1], [-1.0, 0.0]]])
        >>> idx, sel = soft_neighbors(anchors, context, torch.tensor([[True, True, False]]), top_k=3)
        >>> idx.tolist(), sel.tolist()
        ([[[1, 0, 2]]], [[[True, True, False]]])
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    _check_context(context, context_valid, dims)
    t = check_int("top_k", top_k, low=1, high=dims["M"])
    with no_autocast(anchors.device.type):
        dtype = torch.promote_types(_wide(anchors).dtype, _wide(context).dtype)
        cos = torch.einsum("bcp,cmp->bcm", _unit(anchors, -1).to(dtype), _unit(context, -1).to(dtype))
        cos = cos.masked_fill(~context_valid[None], float("-inf"))
        indices = cos.topk(t, dim=-1).indices
    selected = context_valid[None].expand(indices.shape[0], -1, -1).gather(-1, indices)
    return indices, selected


@torch.no_grad()
def positiveness(
    anchors: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    gamma: float | None = None,
    score: Score = "dot",
) -> Tensor:
    """Positiveness (eq. 7): ``softmax_i(score(a, p_i) / gamma)`` over the class's valid context.

    ``score`` is ``a.p`` (``"dot"``, the paper's choice), the cosine, ``-||a - p||_2`` or
    ``-||a - p||_1``. ``gamma`` is a temperature inside the softmax (``None``: ``sqrt(P)``);
    the softmax subtracts its row maximum, so a tiny ``gamma`` stays finite. A row without a
    valid context prototype is all 0. No gradient.

    Args:
        anchors: (aligned) instance prototypes.
        context: context prototypes.
        context_valid: which context prototypes exist.
        gamma: softmax temperature, ``> 0``.
        score: ``"dot" | "cosine" | "l2" | "l1"``.

    Shape:
        - anchors: ``(B, C, P)``; context: ``(C, M, P)``; context_valid: ``(C, M)`` bool
        - output: ``(B, C, M)`` fp32 (fp64 for fp64 inputs); rows sum to 1 or are all 0

    Example:
        >>> w = positiveness(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]),
        ...                  torch.ones(1, 2, dtype=torch.bool), gamma=1.0)
        >>> [round(v, 4) for v in w.flatten().tolist()]    # [e^2, 1] / (e^2 + 1)
        [0.8808, 0.1192]
    """
    dims = check_shape("anchors", anchors, ["B", "C", "P"], dtype="float")
    _check_context(context, context_valid, dims)
    check_option("score", score, SCORES)
    g = math.sqrt(dims["P"]) if gamma is None else float(check_range("gamma", gamma, 0.0, low_inclusive=False))
    with no_autocast(anchors.device.type):
        dtype = torch.promote_types(_wide(anchors).dtype, _wide(context).dtype)
        a, p = anchors.to(dtype), context.to(dtype)
        if score == "dot":
            s = torch.einsum("bcp,cmp->bcm", a, p)
        elif score == "cosine":
            s = torch.einsum("bcp,cmp->bcm", _unit(a, -1), _unit(p, -1))
        elif score == "l2":
            aa = a.pow(2).sum(-1)[:, :, None]
            pp = p.pow(2).sum(-1)[None]
            s = -(aa + pp - 2.0 * torch.einsum("bcp,cmp->bcm", a, p)).clamp_min(0).sqrt()
        else:  # l1: (B, C, M, P), the one allowed exception to the O(B*C*P) rule
            s = -(a[:, :, None, :] - p[None]).abs().sum(-1)
        valid = context_valid[None].expand_as(s)
        logits = torch.where(valid, s / g, torch.full_like(s, float("-inf")))
        top = logits.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.where(valid, (logits - top).exp(), torch.zeros_like(s))
        return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


@torch.no_grad()
def neighbor_weights(
    positiveness: Tensor,
    indices: Tensor,
    selected: Tensor,
    *,
    weighting: Weighting = "positiveness",
) -> Tensor:
    """Dense neighbour weights ``W`` (Claim 1): the positiveness renormalised over the neighbours.

    ``"positiveness"``: ``W = scatter(indices, w * selected) / max(row sum, 1e-12)`` -- a
    softmax of the scores over the selected neighbours. ``"uniform"`` (literal eq. 13):
    ``1 / (number of selected)`` on each selected neighbour. Entries outside the neighbours
    are 0; a row with no selected neighbour is all 0. No gradient.

    Note:
        With a very small ``gamma`` the positiveness of every selected neighbour can underflow
        to 0 (the highest score is not among the top-T by cosine); that row is then all 0.

    Args:
        positiveness: from :func:`positiveness`.
        indices: neighbour indices from :func:`soft_neighbors`.
        selected: which picks are real neighbours.
        weighting: ``"positiveness" | "uniform"``.

    Shape:
        - positiveness: ``(B, C, M)``; indices, selected: ``(B, C, T)``
        - output: ``(B, C, M)``, same dtype as ``positiveness``

    Example:
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
    sel = selected.to(positiveness.dtype)
    if weighting == "positiveness":
        picked = positiveness.gather(-1, indices) * sel
        dense = torch.zeros_like(positiveness).scatter(-1, indices, picked)
        return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)
    dense = torch.zeros_like(positiveness).scatter(-1, indices, sel)
    return dense / sel.sum(-1, keepdim=True).clamp_min(1.0)


def pacam(z: Tensor, context: Tensor, weights: Tensor, *, normalize: bool = False) -> Tensor:
    """Prototype-aware CAM (eq. 13, weighted): ``ReLU(sum_i W_i cos(z(j), p_i))``.

    Computed through the collapsed query ``q = W @ normalize(p)`` and one einsum with the
    unit features (eps ``1e-6``, so a zero feature gives 0), never as per-prototype maps.
    Invariant to a positive per-pixel rescaling of ``z``. Gradient flows into ``z`` (and into
    ``context`` / ``weights`` if they require it). With ``normalize`` each map is divided by
    its maximum ``+ 1e-5``.

    Args:
        z: projected features.
        context: context prototypes.
        weights: dense neighbour weights from :func:`neighbor_weights` (0 for inactive channels).
        normalize: max-normalise each ``(image, channel)`` map.

    Shape:
        - z: ``(B, P, h, w)``; context: ``(C, M, P)``; weights: ``(B, C, M)``
        - output: ``(B, C, h, w)`` fp32 (fp64 for fp64 inputs)

    Example:
        >>> z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        >>> context = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
        >>> pacam(z, context, torch.tensor([[[0.75, 0.25]]])).flatten().tolist()
        [0.75]
    """
    dims = check_shape("z", z, ["B", "P", "h", "w"], dtype="float")
    check_shape("context", context, ["C", "M", "P"], dims, dtype="float")
    check_shape("weights", weights, ["B", "C", "M"], dims, dtype="float")
    with no_autocast(z.device.type):
        unit_z = _unit(z, 1)
        dtype = torch.promote_types(unit_z.dtype, _wide(context).dtype)
        query = torch.einsum("bcm,cmp->bcp", _wide(weights).to(dtype), _unit(context, -1).to(dtype))
        out = torch.einsum("bcp,bphw->bchw", query, unit_z.to(dtype)).relu()
        if normalize:
            out = out / (out.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    return out


def self_loss(
    cams_with_bg: Tensor,
    pacam: Tensor,
    active: Tensor | None = None,
    *,
    detach_pacam: bool = False,
) -> Tensor:
    """CPAL's self-supervised loss (eq. 14): ``sum active * |M - M~| / (B * C * N)``.

    Inactive channels add 0 but the denominator stays ``B*C*N`` (spec decision 5.9), so a
    channel whose PACAM is undefined is not pushed to 0. With no active channel the loss is 0
    with a graph attached. Gradient flows into both maps unless ``detach_pacam``.

    Args:
        cams_with_bg: the CAM network's maps ``M`` with background.
        pacam: the prototype-aware CAM ``M~``.
        active: ``(B, C)`` bool, which channels take part (``None``: all).
        detach_pacam: stop the gradient through ``M~`` (SIPE-style).

    Shape:
        - cams_with_bg, pacam: ``(B, C, h, w)``; active: ``(B, C)`` bool
        - output: ``()`` fp32 (fp64 for fp64 inputs)

    Example:
        >>> cams = torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]]]])
        >>> self_loss(cams, torch.zeros_like(cams), torch.tensor([[True, False]])).item()
        0.25
    """
    dims = check_shape("cams_with_bg", cams_with_bg, ["B", "C", "h", "w"], dtype="float")
    check_shape("pacam", pacam, ["B", "C", "h", "w"], dims, dtype="float")
    if active is not None:
        check_shape("active", active, ["B", "C"], dims, dtype="bool")
    target = pacam.detach() if detach_pacam else pacam
    with no_autocast(cams_with_bg.device.type):
        diff = (_wide(cams_with_bg) - _wide(target)).abs()
        if active is not None:
            diff = diff * active.to(diff.dtype)[:, :, None, None]
        return diff.sum() / diff.numel() if diff.numel() else diff.sum()


def cpal_forward(
    z: Tensor,
    cams: Tensor,
    labels: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    tau: float = 0.1,
    bg_tau: float | None = None,
    top_k: int = 20,
    gamma: float | None = None,
    score: Score = "dot",
    weighting: Weighting = "positiveness",
    align: bool = True,
    normalize_pacam: bool = False,
    detach_pacam: bool = False,
) -> dict[str, Tensor]:
    """One CPAL step on projected features, without touching a bank (steps 0 and 2-8 of the spec).

    ``M = add_background(cams, labels)``; anchors = instance prototypes (+ the alignment
    shift when ``align``), detached; neighbours, positiveness and weights under ``no_grad``;
    ``active = y+ & valid & (class has context)``; PACAM from ``z``; ``loss_self`` from ``M``
    and the PACAM. Before any context exists every channel is inactive and ``loss_self`` is 0
    with a graph.

    Args:
        z: projected features (the CPAL head's output).
        cams: foreground CAMs in ``[0, 1]`` on z's grid.
        labels: multi-hot image labels.
        context: context prototypes (see :func:`context_prototypes`).
        context_valid: which context prototypes exist.
        tau, bg_tau: see :func:`instance_prototypes`.
        top_k: see :func:`soft_neighbors`.
        gamma, score: see :func:`positiveness`.
        weighting: see :func:`neighbor_weights`.
        align: apply :func:`alignment_shift` to the anchors.
        normalize_pacam: see :func:`pacam`.
        detach_pacam: see :func:`self_loss`.

    Returns:
        ``pacam (B, C, h, w)``, ``loss_self ()`` (unweighted), ``prototypes (B, C, P)``
        (detached, unshifted), ``prototype_valid (B, C)``, ``active (B, C)`` and
        ``cams_with_bg (B, C, h, w)`` (graph kept).

    Shape:
        - z: ``(B, P, h, w)``; cams: ``(B, K, h, w)``; labels: ``(B, K)``
        - context: ``(K+1, M, P)``; context_valid: ``(K+1, M)`` bool

    Example:
        >>> z = torch.randn(2, 8, 3, 4, requires_grad=True)
        >>> cams = torch.rand(2, 2, 3, 4, requires_grad=True)
        >>> out = cpal_forward(z, cams, torch.tensor([[1, 0], [1, 1]]), torch.randn(3, 5, 8),
        ...                    torch.ones(3, 5, dtype=torch.bool), top_k=2)
        >>> out["pacam"].shape, out["active"].tolist()
        (torch.Size([2, 3, 3, 4]), [[True, True, False], [True, True, True]])
        >>> out["loss_self"].backward()
    """
    dims = check_shape("z", z, ["B", "P", "h", "w"], dtype="float")
    check_shape("cams", cams, ["B", "K", "h", "w"], dims, dtype="float")
    check_labels("labels", labels, dims)
    dims["C"] = dims["K"] + 1
    _check_context(context, context_valid, dims)
    cams_with_bg = add_background(cams, labels)
    with torch.no_grad():
        protos, valid = instance_prototypes(z, cams_with_bg, labels, tau=tau, bg_tau=bg_tau)
        anchors = protos
        if align:
            anchors = protos + alignment_shift(protos, valid, context, context_valid)[None]
        indices, selected = soft_neighbors(anchors, context, context_valid, top_k=top_k)
        weights = neighbor_weights(
            positiveness(anchors, context, context_valid, gamma=gamma, score=score),
            indices, selected, weighting=weighting,
        )
        active = _present(labels, z) & valid & context_valid.any(-1)[None]
        weights = weights * active.to(weights.dtype)[:, :, None]
    prototype_aware = pacam(z, context, weights, normalize=normalize_pacam)
    loss = self_loss(cams_with_bg, prototype_aware, active, detach_pacam=detach_pacam)
    return {
        "pacam": prototype_aware,
        "loss_self": loss,
        "prototypes": protos,
        "prototype_valid": valid,
        "active": active,
        "cams_with_bg": cams_with_bg,
    }
