"""CPEWS region embeddings: the CAM-weighted mean feature of every (image, class) (paper eq. 6)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from wsss_blocks._validate import check_range, check_shape
from wsss_blocks.cam import masked_average_pool, normalize_cam
from wsss_blocks.tokens import features_as_tokens

__all__ = ["RegionEmbeddings", "region_embeddings"]


class RegionEmbeddings(NamedTuple):
    """Output of ``region_embeddings``: one prototype per (image, class) and its validity.

    Attributes:
        prototypes: ``(B, K, D)`` region embeddings ``A_bc`` (zeros where the region is empty).
        prototype_valid: ``(B, K)`` bool, ``True`` where the region is non-empty.

    Examples:
        >>> out = region_embeddings(torch.ones(1, 2, 3), torch.ones(1, 1, 1, 2))
        >>> out.prototypes.shape, out.prototype_valid.tolist()
        (torch.Size([1, 1, 3]), [[True]])
    """

    prototypes: torch.Tensor
    prototype_valid: torch.Tensor


def region_embeddings(
    features: Tensor,
    cams: Tensor,
    *,
    threshold: float | None = None,
    valid: Tensor | None = None,
    eps: float = 1e-5,
) -> RegionEmbeddings:
    """CAM-weighted mean feature of every (image, class) region (CPEWS eq. 6).

    ``w = relu(cams) / (max relu(cams) + 1e-5)`` from the **detached** raw CAMs; with
    ``threshold=t`` the weights become the mask ``w > t`` (official code: 0.1);
    ``valid`` zeroes padded tokens. ``A = bmm(w, F) / (sum_n w + eps)``, one ``bmm`` via
    ``wsss_blocks.cam.masked_average_pool``. Gradients flow into ``features`` only.

    Args:
        features: token features on the CAMs' grid.
        cams: raw CAMs (classifier scores, any sign); normalised here.
        threshold: optional binarisation threshold in ``[0, 1)`` on the normalised CAMs.
        valid: padding mask at any resolution (a token needs >= 50 % valid area).
        eps: added to the denominator.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``
        - output: ``RegionEmbeddings``: ``prototypes (B, K, D)`` fp32 (fp64 for fp64
          input), ``prototype_valid (B, K)`` bool

    Examples:
        >>> feats = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])       # (1, N=2, D=2)
        >>> cams = torch.tensor([[[[1.0, -1.0]], [[-1.0, -2.0]]]])  # (1, K=2, 1, 2)
        >>> regions = region_embeddings(feats, cams, eps=0.0)
        >>> regions.prototypes[0, 0].tolist(), regions.prototype_valid.tolist()
        ([2.0, 0.0], [[True, False]])
    """
    dims = check_shape("cams", cams, ["B", "K", "h", "w"], dtype="float")
    features_as_tokens("features", features, (dims["h"], dims["w"]), dims, dtype="float")
    if threshold is not None:
        check_range("threshold", threshold, 0.0, 1.0, high_inclusive=False)
    weights = normalize_cam(cams.detach(), mode="max")
    pooled, nonempty = masked_average_pool(features, weights, threshold=threshold, valid=valid, eps=eps)
    return RegionEmbeddings(pooled, nonempty)
