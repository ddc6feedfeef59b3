"""DOEI's pure functions: the dense reference of what a patched block computes.

``progressive_count``, ``select_top_bottom``, ``patch_color_affinity``,
``hybrid_attention`` and ``doei_delta`` work on full matrices; the patched forward
(``wsss_blocks.doei.patching``) reuses the private helpers here on the few rows it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_floats,
    check_int,
    check_labels,
    check_range,
    check_shape,
    check_tensor,
)
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "TopBottom",
    "progressive_count",
    "patch_color_affinity",
    "hybrid_attention",
    "select_top_bottom",
    "doei_delta",
]


def progressive_count(num_candidates: int, *, block_index: int, num_blocks: int, st: float) -> int:
    """Number of top (and of bottom) candidates a block modulates.

    ``t = floor(n (L - 1 - i) st + 1e-6)``, clamped to ``[0, floor(n / 2)]`` so the top and
    bottom sets never overlap; the last block (``i = L - 1``) does nothing. Python scalars
    only (no device synchronisation).

    Args:
        num_candidates: ``n``, the candidates per row (patches, or ``C - 1`` classes).
        block_index: ``i``, 0-based position among the ``L`` supported attention modules.
        num_blocks: ``L``.
        st: the step in ``[0, 1]``.

    Examples:
        >>> progressive_count(196, block_index=0, num_blocks=12, st=0.02)
        43
        >>> progressive_count(196, block_index=11, num_blocks=12, st=0.02)
        0
    """
    n = check_int("num_candidates", num_candidates)
    i = check_int("block_index", block_index)
    L = check_int("num_blocks", num_blocks)
    if n < 0:
        raise ValueError(f"num_candidates: expected >= 0, got {num_candidates}")
    if L < 1:
        raise ValueError(f"num_blocks: expected >= 1, got {num_blocks}")
    if not 0 <= i < L:
        raise ValueError(f"block_index: expected a value in [0, {L}), got {block_index}")
    check_range("st", st, 0.0, 1.0)
    t = math.floor(n * (L - 1 - i) * float(st) + 1e-6)
    return max(0, min(t, n // 2))


class TopBottom(NamedTuple):
    """The two masks ``select_top_bottom`` returns (unpacks as ``top, bottom``).

    Attributes:
        top: bool mask of the ``t`` largest entries of every row.
        bottom: bool mask of the ``t`` smallest entries of every row.

    Examples:
        >>> out = select_top_bottom(torch.tensor([[3.0, 1.0, 2.0]]), t=1)
        >>> out.top.tolist(), out.bottom.tolist()
        ([[True, False, False]], [[False, True, False]])
    """

    top: Tensor
    bottom: Tensor


@torch.no_grad()
def select_top_bottom(scores: Tensor, *, t: int, exclude_diagonal: bool = False) -> TopBottom:
    """Masks of the ``t`` largest and the ``t`` smallest entries of every row.

    A stable descending sort decides ties (the lower index ranks higher), so the sets are
    deterministic and disjoint. With ``exclude_diagonal`` (square scores) the diagonal is
    ranked first and skipped, so it is in neither set. Runs under ``torch.no_grad()``.

    Args:
        scores: the scores; rows are the last-but-one dimension.
        t: entries per set, ``0 <= t <= floor(M' / 2)`` with ``M' = M`` (or ``M - 1``).
        exclude_diagonal: leave ``scores[..., r, r]`` out of both sets.

    Returns:
        ``TopBottom`` ``(top, bottom)``, disjoint bool masks.

    Shape:
        - scores: ``(..., R, M)``
        - top, bottom: ``(..., R, M)``

    Examples:
        >>> top, bottom = select_top_bottom(torch.tensor([[0.5, 0.4, 0.4, 0.2]]), t=1)
        >>> top.int().tolist(), bottom.int().tolist()
        ([[1, 0, 0, 0]], [[0, 0, 0, 1]])
    """
    check_tensor("scores", scores, dtype="float")
    if scores.dim() < 2:
        raise ShapeError(f"scores: expected at least 2 dims (..., R, M), got shape {tuple(scores.shape)}")
    exclude_diagonal = check_bool("exclude_diagonal", exclude_diagonal)
    rows, m = scores.shape[-2], scores.shape[-1]
    if exclude_diagonal and rows != m:
        raise ShapeError(f"scores: exclude_diagonal needs square (..., M, M) scores, got {tuple(scores.shape)}")
    m_eff = m - 1 if exclude_diagonal else m
    t = check_int("t", t)
    if not 0 <= t <= max(m_eff, 0) // 2:
        raise ValueError(
            f"t: expected a value in [0, {max(m_eff, 0) // 2}] for {m_eff} candidates per row of scores "
            f"(shape {tuple(scores.shape)}), got {t}"
        )
    top = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    bottom = torch.zeros_like(top)
    if t == 0:
        return TopBottom(top, bottom)
    s = scores.detach()
    start = 0
    if exclude_diagonal:
        eye = torch.eye(m, dtype=torch.bool, device=s.device)
        s = s.masked_fill(eye, float("inf"))
        start = 1
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    top.scatter_(-1, order[..., start : start + t], True)
    bottom.scatter_(-1, order[..., m - t :], True)
    return TopBottom(top, bottom)


@torch.no_grad()
def patch_color_affinity(
    images: Tensor,
    patch_size: int | tuple[int, int],
    *,
    rgb_sigma: float = 0.1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad: bool = False,
) -> Tensor:
    """Gaussian affinity of the patches' mean colours (HFA's RGB term). No gradient.

    The normalised image is cropped (or, with ``pad``, zero-padded bottom/right as timm's
    ``dynamic_img_pad``) to whole patches, de-normalised with ``mean`` / ``std`` (no clamp),
    average-pooled per patch (row-major), and
    ``R_jk = exp(-|c_j - c_k|^2 / (2 rgb_sigma^2))``. Computed in fp32 (fp64 for fp64 input).

    Args:
        images: normalised images.
        patch_size: ``p`` or ``(ph, pw)``.
        rgb_sigma: kernel width, colours on ``[0, 1]``.
        mean: per-channel mean used by the normalisation.
        std: per-channel std used by the normalisation.
        pad: pad to whole patches instead of cropping.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``(B, n, n)``, ``n = (H // ph) * (W // pw)`` (ceil with ``pad``)

    Examples:
        >>> patch_color_affinity(torch.zeros(2, 3, 32, 48), 16).shape
        torch.Size([2, 6, 6])
    """
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    sizes = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if len(sizes) != 2:
        raise ValueError(f"patch_size: expected an int or (ph, pw), got {patch_size!r}")
    ph, pw = (check_int("patch_size", v) for v in sizes)
    if ph < 1 or pw < 1:
        raise ValueError(f"patch_size: expected positive sizes, got {patch_size!r}")
    check_range("rgb_sigma", rgb_sigma, 0.0, low_inclusive=False)
    mean = check_floats("mean", mean, length=3)
    std = check_floats("std", std, length=3, low=0.0, low_inclusive=False)
    pad = check_bool("pad", pad)
    dtype = compute_dtype(images)
    with no_autocast(images.device.type):
        img = images.to(dtype)
        h, w = img.shape[-2:]
        if pad:
            img = F.pad(img, (0, (-w) % pw, 0, (-h) % ph))
        else:
            img = img[..., : (h // ph) * ph, : (w // pw) * pw]
        if img.shape[-1] == 0 or img.shape[-2] == 0:
            raise ShapeError(f"images: {tuple(images.shape)} is smaller than one patch {(ph, pw)}")
        m = torch.as_tensor(mean, dtype=dtype, device=img.device).view(1, 3, 1, 1)
        s = torch.as_tensor(std, dtype=dtype, device=img.device).view(1, 3, 1, 1)
        colors = F.avg_pool2d(img * s + m, (ph, pw)).flatten(2).transpose(1, 2)  # (B, n, 3)
        dist2 = (colors[:, :, None, :] - colors[:, None, :, :]).square().sum(-1)
        return torch.exp(dist2 / (-2.0 * float(rgb_sigma) ** 2))


def _emb_affinity_rows(
    tokens: Tensor,
    color_affinity: Tensor,
    num_prefix_tokens: int,
    rows: slice,
) -> tuple[Tensor, Tensor, Tensor]:
    """relu(d_emb E) for query ``rows``, split into prefix and patch columns, + row sums.

    ``d_emb = X^ X^T`` (cosine), ``E = blockdiag(I_P0, R)``; the patch block uses the cheaper
    of ``(X^ X^T) R`` and ``X^ (X^T R)`` for the number of rows actually needed.
    """
    p0 = num_prefix_tokens
    xh = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    xr = xh[:, rows]
    xp = xh[:, p0:]
    r = color_affinity.to(xh.dtype)
    g_pre = torch.relu(xr @ xh[:, :p0].transpose(1, 2))  # (B, R, P0)
    num_rows, n, d = xr.shape[1], xp.shape[1], xp.shape[2]
    # multiply-adds per image: (R x d)(d x n) then (R x n)(n x n), or (d x n)(n x n) then (R x d)(d x n)
    if d * n * n + num_rows * d * n < num_rows * d * n + num_rows * n * n:
        g_pat = torch.relu(xr @ (xp.transpose(1, 2) @ r))  # (B, R, n)
    else:
        g_pat = torch.relu((xr @ xp.transpose(1, 2)) @ r)
    row_sum = (g_pre.sum(-1) + g_pat.sum(-1)).clamp_min(1e-6)
    return g_pre, g_pat, row_sum


def hybrid_attention(
    tokens: Tensor,
    attn: Tensor,
    color_affinity: Tensor,
    *,
    num_prefix_tokens: int,
    alpha: float = 0.35,
) -> Tensor:
    """HFA: ``(1 - alpha) attn + alpha G`` on full matrices (the dense reference).

    ``G = rownorm(relu(d_emb E))`` with ``d_emb`` the cosine similarity of ``tokens``,
    ``E = blockdiag(I_P0, R)`` and ``rownorm(g) = g / max(sum_j g, 1e-6)``; ``G`` is shared
    by all heads. Computed in at least fp32.

    Args:
        tokens: the attention input (after ``norm1``).
        attn: post-softmax attention, head-mean or per head.
        color_affinity: ``R`` from ``patch_color_affinity``.
        num_prefix_tokens: ``P0``; prefix tokens have no colour (identity block of ``E``).
        alpha: mixing weight in ``[0, 1]``.

    Shape:
        - tokens: ``(B, N, D)``
        - attn: ``(B, N, N)`` or ``(B, H, N, N)``
        - color_affinity: ``(B, n, n)``, ``n = N - P0``
        - output: shape of ``attn``

    Examples:
        >>> a = torch.softmax(torch.randn(2, 5, 5), -1)
        >>> out = hybrid_attention(torch.randn(2, 5, 8), a, torch.eye(4).expand(2, 4, 4), num_prefix_tokens=1)
        >>> torch.allclose(out.sum(-1), torch.ones(2, 5))
        True
    """
    dims = Dims()
    check_shape("tokens", tokens, ["B", "N", "D"], dims, dtype="float")
    check_tensor("attn", attn, dtype="float")
    if attn.dim() == 3:
        check_shape("attn", attn, ["B", "N", "N"], dims)
    else:
        check_shape("attn", attn, ["B", "H", "N", "N"], dims)
    p0 = check_int("num_prefix_tokens", num_prefix_tokens)
    if not 0 <= p0 <= dims["N"]:
        raise ValueError(f"num_prefix_tokens: expected 0..{dims['N']}, got {num_prefix_tokens}")
    dims["n"] = dims["N"] - p0
    dims.sources["n"] = f"the tokens' N={dims['N']} minus num_prefix_tokens={p0}"
    check_shape("color_affinity", color_affinity, ["B", "n", "n"], dims, dtype="float")
    check_range("alpha", alpha, 0.0, 1.0)
    s = compute_dtype(attn, tokens)
    with no_autocast(attn.device.type):
        g_pre, g_pat, row_sum = _emb_affinity_rows(tokens.to(s), color_affinity, p0, slice(None))
        g = torch.cat([g_pre, g_pat], dim=-1) / row_sum[..., None]
        if attn.dim() == 4:
            g = g[:, None]
        return (1.0 - alpha) * attn.to(s) + alpha * g


def _delta_from_scores(
    p_scores: Tensor | None,
    s_scores: Tensor | None,
    y_cls: Tensor,
    t_p: int,
    t_c: int,
    factors: tuple[float, float, float, float],
    row_mask: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Steps 7-8: select, modulate, multiply with the class outputs.

    ``p_scores`` (..., C, n) and ``s_scores`` (..., C, C) may be ``None`` (branch off);
    ``y_cls`` (..., C, D); ``row_mask`` bool broadcastable to (..., C, 1). Returns
    ``(delta_cls (..., C, D) | None, delta_patch (..., n, D) | None)``.
    """
    af_p, sf_p, af_c, sf_c = factors
    d_cls = d_patch = None
    if p_scores is not None:
        top, bottom = select_top_bottom(p_scores, t=t_p)
        if row_mask is not None:
            top, bottom = top & row_mask, bottom & row_mask
        f = top.to(p_scores.dtype) * af_p - bottom.to(p_scores.dtype) * sf_p
        d_patch = (p_scores * f).transpose(-1, -2) @ y_cls
    if s_scores is not None:
        top, bottom = select_top_bottom(s_scores, t=t_c, exclude_diagonal=True)
        if row_mask is not None:
            top, bottom = top & row_mask, bottom & row_mask
        f = top.to(s_scores.dtype) * af_c - bottom.to(s_scores.dtype) * sf_c
        d_cls = (s_scores * f) @ y_cls
    return d_cls, d_patch


def _assemble(y: Tensor, d_cls: Tensor | None, d_patch: Tensor | None, c: int, p0: int) -> Tensor:
    """``cat([y_cls + d_cls, y_reg, y_patch + d_patch])`` along the token dim (-2)."""
    parts = [y[..., :c, :] if d_cls is None else y[..., :c, :] + d_cls.to(y.dtype), y[..., c:p0, :]]
    parts.append(y[..., p0:, :] if d_patch is None else y[..., p0:, :] + d_patch.to(y.dtype))
    return torch.cat(parts, dim=-2)


def doei_delta(
    attn_output: Tensor,
    attn: Tensor,
    *,
    num_class_tokens: int,
    num_prefix_tokens: int,
    t_p2c: int,
    t_c2c: int,
    af_p2c: float = 1.0,
    sf_p2c: float = 1.0,
    af_c2c: float = 1.0,
    sf_c2c: float = 1.0,
    labels: Tensor | None = None,
) -> Tensor:
    """PPDO + CPDO on full matrices: the change DOEI adds to an attention output.

    ``P = W[:C, P0:] + W[P0:, :C]^T`` and ``S = W[:C, :C] + W[:C, :C]^T``; the top-t / bottom-t
    entries of each row (``select_top_bottom``, diagonal of ``S`` excluded) are scaled by
    ``af`` / ``-sf``, others by 0; then ``dY_patch = (P o F_p)^T Y_cls``,
    ``dY_cls = (S o F_c) Y_cls``, and ``dY = 0`` on tokens ``C..P0-1`` (registers), with
    ``Y = attn_output``. Gradients flow through ``attn`` and ``attn_output``, not through the
    selection.

    Args:
        attn_output: the attention output ``Y`` (or the per-head outputs).
        attn: the (hybrid) scores, head-mean or per head.
        num_class_tokens: ``C``, the leading class tokens.
        num_prefix_tokens: ``P0 >= C``.
        t_p2c: PPDO count (0 = off), at most ``n // 2``.
        t_c2c: CPDO count (0 = off), at most ``(C - 1) // 2``.
        af_p2c: PPDO amplification factor.
        sf_p2c: PPDO suppression factor.
        af_c2c: CPDO amplification factor.
        sf_c2c: CPDO suppression factor.
        labels: optional ``(B, C)`` {0, 1}; rows of absent classes are not modulated.

    Shape:
        - attn_output: ``(B, N, D)`` with attn ``(B, N, N)``, or ``(B, H, N, d)`` with
          ``(B, H, N, N)``
        - output: shape of ``attn_output`` (its dtype)

    Examples:
        >>> y, a = torch.randn(1, 5, 4), torch.softmax(torch.randn(1, 5, 5), -1)
        >>> d = doei_delta(y, a, num_class_tokens=1, num_prefix_tokens=1, t_p2c=1, t_c2c=0)
        >>> d.shape, bool(d[:, 0].abs().sum() == 0)
        (torch.Size([1, 5, 4]), True)
    """
    y = attn_output
    check_tensor("attn_output", y, dtype="float")
    check_tensor("attn", attn, dtype="float")
    if y.dim() not in (3, 4):
        raise ShapeError(
            f"attn_output: expected 3 dims (B, N, D) or 4 per-head dims (B, H, N, D), got shape {tuple(y.shape)}"
        )
    if attn.dim() != y.dim():
        raise ShapeError(
            f"attn: expected {y.dim()} dims like attn_output ((B, N, N) with (B, N, D), (B, H, N, N) with "
            f"(B, H, N, D)), got shape {tuple(attn.shape)} with attn_output {tuple(y.shape)}"
        )
    if y.dim() == 3:
        dims = check_shape("attn_output", y, ["B", "N", "D"])
        check_shape("attn", attn, ["B", "N", "N"], dims)
    else:
        dims = check_shape("attn_output", y, ["B", "H", "N", "D"])
        check_shape("attn", attn, ["B", "H", "N", "N"], dims)
    c = check_int("num_class_tokens", num_class_tokens)
    p0 = check_int("num_prefix_tokens", num_prefix_tokens)
    t_p, t_c = check_int("t_p2c", t_p2c, low=0), check_int("t_c2c", t_c2c, low=0)
    factors = (check_range("af_p2c", af_p2c, 0.0), check_range("sf_p2c", sf_p2c, 0.0),
               check_range("af_c2c", af_c2c, 0.0), check_range("sf_c2c", sf_c2c, 0.0))
    if not 1 <= c <= p0 <= dims["N"]:
        raise ValueError(
            f"num_class_tokens / num_prefix_tokens: expected 1 <= C <= P0 <= N={dims['N']}, got C={c}, P0={p0}"
        )
    n = dims["N"] - p0
    if t_p > n // 2:
        raise ValueError(
            f"t_p2c: t: expected a value in [0, {n // 2}] for {n} candidates (the patch tokens of attn_output / "
            f"attn: N={dims['N']} minus num_prefix_tokens={p0}), got {t_p}"
        )
    if t_c > (c - 1) // 2:
        raise ValueError(
            f"t_c2c: t: expected a value in [0, {(c - 1) // 2}] for {c - 1} candidates (the other class tokens of "
            f"num_class_tokens={c}), got {t_c}"
        )
    row_mask = None
    if labels is not None:
        dims["C"] = c
        check_labels("labels", labels, dims, pattern=("B", "C"))
        row_mask = (labels != 0)[:, :, None]
        if y.dim() == 4:
            row_mask = row_mask[:, None]
    s = compute_dtype(attn, y)
    with no_autocast(y.device.type):
        w = attn.to(s)
        p_scores = w[..., :c, p0:] + w[..., p0:, :c].transpose(-1, -2) if t_p > 0 else None
        wcc = w[..., :c, :c]
        s_scores = wcc + wcc.transpose(-1, -2) if t_c > 0 else None
        d_cls, d_patch = _delta_from_scores(
            p_scores, s_scores, y[..., :c, :].to(s), t_p, t_c,
            factors, row_mask,
        )
        return _assemble(torch.zeros_like(y), d_cls, d_patch, c, p0)

