"""CPAL's prototype-aware CAM (eq. 13, weighted by the neighbour weights)."""

from __future__ import annotations

import torch
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast, to_compute
from wsss_blocks._validate import Dims, check_bool, check_shape
from wsss_blocks.cpal._common import unit
from wsss_blocks.tokens import features_as_grid

__all__ = ["pacam"]


def pacam(
    features: Tensor,
    context: Tensor,
    neighbor_weights: Tensor,
    *,
    size: tuple[int, int] | None = None,
    normalize: bool = False,
) -> Tensor:
    """Prototype-aware CAM (eq. 13, weighted): ``ReLU(sum_i W_i cos(f(j), p_i))``.

    Computed through the collapsed query ``q = W @ normalize(p)`` and one einsum with the
    unit features (eps ``1e-6``, so a zero feature gives 0), never as per-prototype maps.
    Invariant to a positive per-pixel rescaling of ``features``. Gradient flows into
    ``features`` (and into ``context`` / ``neighbor_weights`` if they require it). With
    ``normalize`` each map is divided by its maximum ``+ 1e-5``.

    Args:
        features: projected features: a map, or tokens with ``size``.
        context: context prototypes.
        neighbor_weights: dense neighbour weights from
            ``neighbor_weights`` (0 for inactive channels).
        size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
            disagrees with it is an error).
        normalize: max-normalise each ``(image, channel)`` map.

    Shape:
        - features: ``(B, P, h, w)``, or tokens ``(B, h*w, P)`` with ``size=(h, w)``; context:
          ``(C, M, P)``; neighbor_weights: ``(B, C, M)``
        - output: ``(B, C, h, w)`` fp32 (fp64 for fp64 inputs)

    Raises:
        ShapeError: a wrong shape, or tokens without ``size``.

    Examples:
        >>> features = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        >>> context = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
        >>> pacam(features, context, torch.tensor([[[0.75, 0.25]]])).flatten().tolist()
        [0.75]
    """
    dims = Dims()
    features = features_as_grid("features", features, size, dims, channels="P", dtype="float")
    normalize = check_bool("normalize", normalize)
    check_shape("context", context, ["C", "M", "P"], dims, dtype="float")
    check_shape("neighbor_weights", neighbor_weights, ["B", "C", "M"], dims, dtype="float")
    with no_autocast(features.device.type):
        unit_f = unit(features, 1)
        dtype = compute_dtype(features, context)
        query = torch.einsum("bcm,cmp->bcp", to_compute(neighbor_weights).to(dtype), unit(context, -1).to(dtype))
        out = torch.einsum("bcp,bphw->bchw", query, unit_f.to(dtype)).relu()
        if normalize:
            out = out / (out.amax(dim=(-2, -1), keepdim=True) + 1e-5)
    return out
