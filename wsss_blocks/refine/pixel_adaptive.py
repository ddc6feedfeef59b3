"""PAR: pixel-adaptive refinement of CAMs / label probabilities (ToCo, CVPR 2023).

Every pixel ``i`` looks at a fixed stencil of neighbours: for each dilation ``d`` the 8
cells of a 3x3 window scaled by ``d`` (ToCo: ``d`` in 1, 2, 4, 8, 12, 24, so 48
neighbours, the centre excluded). From the image it builds, once, affinities::

    kappa_ij = mean_c -( |I_ci - I_cj| / (sigma_ci + eps) / T )^2
    pi_j     = -( r_j / (sigma_r + eps) / T )^2
    a_ij     = softmax_j(kappa_ij) + w_pos * softmax_j(pi_j)

with ``sigma_ci`` the (unbiased) standard deviation of channel ``c`` over the neighbours of
``i``, ``r_j`` the stencil distance (``d`` or ``sqrt(2) d``), ``sigma_r`` the standard
deviation of those distances, the kernel width ``T = 0.3`` and ``w_pos = 0.01``. The maps
are then propagated ``num_iters`` times: ``m_i <- sum_j a_ij m_j``. Out-of-image neighbours repeat
the border pixel (replicate padding), as in ToCo's ``PAR`` module.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_int, check_range, check_shape
from wsss_blocks.cam import valid_to_grid

__all__ = ["par", "PAR", "par_affinity", "par_stencil"]

_TOCO_DILATIONS = (1, 2, 4, 8, 12, 24)
# the 3x3 window without its centre, row by row
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def par_stencil(*, dilations: Sequence[int] = _TOCO_DILATIONS) -> tuple[list[tuple[int, int]], Tensor]:
    """The neighbour offsets ``(dy, dx)`` and their distances for a list of dilations.

    Args:
        dilations: positive ints; each contributes the 8 cells of a 3x3 window scaled by it.

    Returns:
        ``(offsets, distances)``: ``8 * len(dilations)`` offsets and a float64 tensor of
        their Euclidean lengths (``d`` or ``sqrt(2) d``).

    Examples:
        >>> offsets, dist = par_stencil(dilations=(1, 2))
        >>> len(offsets), offsets[0], round(dist[0].item(), 4), dist[-1].item()
        (16, (-1, -1), 1.4142, 2.8284271247461903)
    """
    dils = _check_dilations(dilations)
    offsets = [(dy * d, dx * d) for d in dils for dy, dx in _RING]
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=torch.float64)
    return offsets, dist


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    try:
        dils = tuple(dilations)
    except TypeError:
        raise ValueError(f"dilations: expected a sequence of ints, got {dilations!r}") from None
    if not dils:
        raise ValueError("dilations: expected at least one dilation, got an empty sequence")
    return tuple(check_int(f"dilations[{i}]", d, low=1) for i, d in enumerate(dils))


def _shift(padded: Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """View of ``padded`` (padded by ``pad`` on each side) at offset ``(dy, dx)``."""
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over dim 1; with ``mask``, masked entries get 0 and all-masked rows are 0."""
    if mask is None:
        return logits.softmax(dim=1)
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    prob = filled.softmax(dim=1) * mask
    return prob / prob.sum(dim=1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


def _check_valid(valid: Tensor | None, dims: MutableMapping[str, int], h: int, w: int) -> Tensor | None:
    """A padding mask at any resolution, resampled to the image's ``(h, w)``."""
    if valid is None:
        return None
    check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
    return valid_to_grid(valid, (h, w))


def par_affinity(
    images: Tensor,
    *,
    valid: Tensor | None = None,
    dilations: Sequence[int] = _TOCO_DILATIONS,
    kernel_width: float = 0.3,
    pos_weight: float = 0.01,
    eps: float = 1e-8,
) -> Tensor:
    """PAR's neighbour affinities ``a_ij`` from the image (no iteration), see ``par``.

    Neighbour ``j`` of pixel ``i`` is ``i + offsets[j]`` with the offsets of
    ``par_stencil``. Without ``valid`` every row sums to ``1 + pos_weight``. With
    ``valid``, neighbours outside it get weight 0, ``sigma`` is taken over the valid
    neighbours only, and both softmaxes run over the valid neighbours.

    Args:
        images: the image, any per-channel affine normalisation (the colour term divides
            by the local standard deviation, so ImageNet-normalised and ``[0, 1]`` images
            give the same affinities up to ``eps``).
        valid: padding mask at any resolution (resampled to the image's), True on real pixels.
        dilations: stencil dilations (ToCo: 1, 2, 4, 8, 12, 24).
        kernel_width: ``T`` (ToCo's ``w1 = 0.3``), divides both the colour and the
            position term.
        pos_weight: ``w_pos`` (ToCo's ``w2 = 0.01``).
        eps: added to the standard deviations, ``> 0``.

    Shape:
        - images: ``(B, C, H, W)`` float; valid: ``(B, H', W')`` bool
        - output: ``(B, 8 * len(dilations), H, W)`` (no gradient to ``images``), fp32 (fp64 for fp64 images)

    Examples:
        >>> aff = par_affinity(torch.rand(1, 3, 5, 6), dilations=(1, 2))
        >>> aff.shape, torch.allclose(aff.sum(1), torch.full((1, 5, 6), 1.01))
        (torch.Size([1, 16, 5, 6]), True)
    """
    dims = check_shape("images", images, ["B", "C", "H", "W"], dtype="float")
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    valid = _check_valid(valid, dims, h, w)
    offsets, dist = par_stencil(dilations=dilations)
    t = float(check_range("kernel_width", kernel_width, 0.0, low_inclusive=False))
    w_pos = float(check_range("pos_weight", pos_weight, 0.0))
    eps = float(check_range("eps", eps, 0.0, low_inclusive=False))
    dtype = compute_dtype(images)
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    with no_autocast(images.device.type):
        # the affinities are a fixed function of the image: no gradient into ``images``
        # (the std is 0 on flat patches, where sqrt has no derivative)
        img = F.pad(images.detach().to(dtype), [pad] * 4, mode="replicate")
        nb_valid: list[Tensor] | None = None
        count: Tensor | float = float(len(offsets))
        if valid is not None:
            vpad = F.pad(valid[:, None].to(dtype), [pad] * 4, mode="replicate") > 0.5
            nb_valid = [_shift(vpad, pad, dy, dx, h, w) for dy, dx in offsets]  # (B, 1, H, W)
            count = torch.stack(nb_valid).sum(0).to(dtype)  # (B, 1, H, W)
        # per-channel mean and unbiased std over the (valid) neighbours, two passes
        total = torch.zeros_like(images, dtype=dtype)
        for j, (dy, dx) in enumerate(offsets):
            nb = _shift(img, pad, dy, dx, h, w)
            total += nb if nb_valid is None else nb * nb_valid[j]
        mean = total / (count.clamp_min(1.0) if isinstance(count, Tensor) else count)
        sq = torch.zeros_like(total)
        for j, (dy, dx) in enumerate(offsets):
            dev = (_shift(img, pad, dy, dx, h, w) - mean).square()
            sq += dev if nb_valid is None else dev * nb_valid[j]
        denom = (count - 1.0).clamp_min(1.0) if isinstance(count, Tensor) else max(count - 1, 1)
        scale = (sq / denom).sqrt() + eps  # (B, C, H, W)
        centre = _shift(img, pad, 0, 0, h, w)
        inv = 1.0 / (scale * t)
        kappa = img.new_empty((b, len(offsets), h, w))  # filled per offset: no list + stack copy
        for j, (dy, dx) in enumerate(offsets):
            kappa[:, j] = ((_shift(img, pad, dy, dx, h, w) - centre) * inv).square().mean(dim=1).neg()
        dist = dist.to(device=images.device, dtype=dtype)
        pi = -(dist / (dist.std() + eps) / t).square()  # (J,)
        if nb_valid is None:
            aff = kappa.softmax(dim=1)
            del kappa
            return aff + w_pos * pi.softmax(dim=0)[None, :, None, None]
        mask = torch.cat(nb_valid, dim=1)  # (B, J, H, W)
        aff = _masked_softmax(kappa, mask)
        del kappa
        return aff + w_pos * _masked_softmax(pi[None, :, None, None].expand_as(aff), mask)


def par(
    images: Tensor,
    maps: Tensor,
    *,
    valid: Tensor | None = None,
    dilations: Sequence[int] = _TOCO_DILATIONS,
    num_iters: int = 10,
    kernel_width: float = 0.3,
    pos_weight: float = 0.01,
    eps: float = 1e-8,
) -> Tensor:
    """Pixel-adaptive refinement (ToCo's PAR): propagate maps along colour/position affinities.

    Computes the affinities of ``par_affinity`` once from ``images`` and applies
    ``m_i <- sum_j a_ij m_j`` ``num_iters`` times to every channel of ``maps`` (all images
    and classes at once). ``maps`` at another resolution are first resized to the image's
    (bilinear, ``align_corners=True``, as ToCo). ToCo runs PAR on the images and CAMs
    downsampled by 2 (224x224 for 448x448 crops), on CAMs with a constant background
    channel prepended and a softmax over the present classes, and takes the argmax.

    With ``valid``, pixels outside it neither give nor take: their affinity weight is 0
    for every neighbour and they keep their input values. A valid pixel with no valid
    neighbour keeps its value too.

    Differentiable in ``maps`` (the affinities are built from ``images.detach()``); for
    pseudo labels call it under ``torch.no_grad()`` as ToCo does.

    Args:
        images: ``(B, C, H, W)`` image (per-channel affine normalisation does not matter).
        maps: the maps to refine: CAMs or label probabilities.
        valid: padding mask at any resolution (resampled to the image's), True on real pixels.
        dilations: stencil dilations (ToCo: 1, 2, 4, 8, 12, 24).
        num_iters: propagation steps (ToCo: 10); 0 only resizes.
        kernel_width: ``T`` of the colour and position terms (ToCo: 0.3).
        pos_weight: weight of the position softmax (ToCo: 0.01).
        eps: added to the standard deviations.

    Shape:
        - images: ``(B, C, H, W)`` float; maps: ``(B, C', h, w)`` float; valid: ``(B, H', W')``
        - output: ``(B, C', H, W)`` in ``maps``' dtype (computed in fp32, fp64 for fp64)

    Note:
        Memory: the affinities are one ``(B, 8 * len(dilations), H, W)`` tensor; each step
        pads the maps once (replicate, by the largest dilation) and accumulates the 48
        shifted views in place (``addcmul_``), so no ``(B, K, 48, H, W)`` neighbour stack (ToCo's
        form) is ever built. The only Python loop is over the fixed stencil offsets.

    Examples:
        >>> images = torch.zeros(1, 3, 6, 8)
        >>> images[..., 4:] = 1.0                    # two flat halves
        >>> maps = torch.zeros(1, 1, 6, 8)
        >>> maps[..., 0] = 1.0                       # a seed at the left border
        >>> out = par(images, maps, dilations=(1, 2))
        >>> bool(out[..., 4:].max() < 0.01 < 0.4 < out[..., :4].min())  # the edge holds
        True
    """
    dims = check_shape("images", images, ["B", "C", "H", "W"], dtype="float")
    check_shape("maps", maps, ["B", "C_maps", "h", "w"], dims, dtype="float")
    n_iter = check_int("num_iters", num_iters, low=0)
    h, w = images.shape[-2], images.shape[-1]
    valid = _check_valid(valid, dims, h, w)
    aff = par_affinity(
        images,
        valid=valid,
        dilations=dilations,
        kernel_width=kernel_width,
        pos_weight=pos_weight,
        eps=eps,
    )
    offsets, _ = par_stencil(dilations=dilations)
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    dtype = compute_dtype(maps)
    with no_autocast(maps.device.type):
        m = maps.to(dtype)
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=True)
        aff = aff.to(dtype)
        take = None
        if valid is not None:
            take = (valid & (aff.sum(dim=1) > 0))[:, None]  # (B, 1, H, W)
        for _ in range(n_iter):
            padded = F.pad(m, [pad] * 4, mode="replicate")
            dy, dx = offsets[0]
            out = aff[:, :1] * _shift(padded, pad, dy, dx, h, w)
            for j in range(1, len(offsets)):  # in place: no new (B, K, H, W) per offset
                dy, dx = offsets[j]
                out.addcmul_(aff[:, j : j + 1], _shift(padded, pad, dy, dx, h, w))
            m = out if take is None else torch.where(take, out, m)
    return m.to(maps.dtype)


class PAR(nn.Module):
    """Module form of ``par`` (stores the keyword arguments; no parameters).

    Args:
        dilations: see ``par``.
        num_iters: see ``par``.
        kernel_width: see ``par``.
        pos_weight: see ``par``.
        eps: see ``par``.

    Shape:
        - images: ``(B, C, H, W)``; maps: ``(B, C', h, w)``; valid: ``(B, H', W')`` bool
        - output: ``(B, C', H, W)``

    Examples:
        >>> refine = PAR()
        >>> refine
        PAR(dilations=(1, 2, 4, 8, 12, 24), num_iters=10, kernel_width=0.3, pos_weight=0.01)
        >>> refine(torch.rand(2, 3, 28, 20), torch.rand(2, 4, 14, 10)).shape
        torch.Size([2, 4, 28, 20])
    """

    def __init__(
        self,
        *,
        dilations: Sequence[int] = _TOCO_DILATIONS,
        num_iters: int = 10,
        kernel_width: float = 0.3,
        pos_weight: float = 0.01,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.dilations = _check_dilations(dilations)
        self.num_iters = check_int("num_iters", num_iters, low=0)
        self.kernel_width = float(check_range("kernel_width", kernel_width, 0.0, low_inclusive=False))
        self.pos_weight = float(check_range("pos_weight", pos_weight, 0.0))
        self.eps = float(check_range("eps", eps, 0.0, low_inclusive=False))

    def extra_repr(self) -> str:
        return (
            f"dilations={self.dilations}, num_iters={self.num_iters}, "
            f"kernel_width={self.kernel_width}, pos_weight={self.pos_weight}"
        )

    def forward(self, images: Tensor, maps: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """See ``par``."""
        return par(
            images,
            maps,
            valid=valid,
            dilations=self.dilations,
            num_iters=self.num_iters,
            kernel_width=self.kernel_width,
            pos_weight=self.pos_weight,
            eps=self.eps,
        )
