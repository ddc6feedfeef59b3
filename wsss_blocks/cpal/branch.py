"""One CPAL step on projected features, composed from the pure functions (no bank, no state)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from wsss_blocks._validate import Dims, check_bool, check_labels, check_option, check_shape
from wsss_blocks.cam import add_background
from wsss_blocks.cpal._common import check_context, present
from wsss_blocks.cpal.alignment import alignment_shift
from wsss_blocks.cpal.loss import self_loss
from wsss_blocks.cpal.neighbors import (
    WEIGHTINGS,
    Similarity,
    Weighting,
    _neighbor_weights,
    positiveness,
    soft_neighbors,
)
from wsss_blocks.cpal.prototype_cam import pacam
from wsss_blocks.cpal.prototypes import instance_prototypes
from wsss_blocks.tokens import features_as_grid

__all__ = ["CPALOutput", "cpal_forward"]


class CPALOutput(NamedTuple):
    """Result of ``cpal_forward`` and ``CPAL.forward <wsss_blocks.cpal.CPAL.forward>``.

    Attributes:
        pacam: ``(B, C, h, w)`` the prototype-aware CAM (0 on inactive channels).
        cams_with_bg: ``(B, C, h, w)`` the CAMs with background the loss compares it with
            (graph kept).
        prototypes: ``(B, C, P)`` the batch's instance prototypes, detached and unshifted:
            what ``CPAL.update <wsss_blocks.cpal.CPAL.update>`` banks.
        prototype_valid: ``(B, C)`` bool, which prototypes exist.
        active: ``(B, C)`` bool, the channels the loss averages over (present, with a
            prototype and with context).
        loss: ``()`` the self-supervised loss, unweighted (the paper's total is
            ``BCE + loss``).
        terms: ``{"self": loss}``.
    """

    pacam: Tensor
    cams_with_bg: Tensor
    prototypes: Tensor
    prototype_valid: Tensor
    active: Tensor
    loss: Tensor
    terms: dict[str, Tensor]


def cpal_forward(
    features: Tensor,
    norm_cams: Tensor,
    labels: Tensor,
    context: Tensor,
    context_valid: Tensor,
    *,
    threshold: float = 0.1,
    bg_threshold: float | None = None,
    top_k: int = 20,
    temperature: float | None = None,
    similarity: Similarity = "dot",
    weighting: Weighting = "positiveness",
    align: bool = True,
    normalize_pacam: bool = False,
    detach_pacam: bool = False,
) -> CPALOutput:
    """One CPAL step on projected features with given context prototypes; changes nothing.

    ``M = add_background(norm_cams, labels)``; anchors = instance prototypes (+ the alignment
    shift when ``align``), detached; neighbours, positiveness and weights under ``no_grad``;
    ``active = y+ & prototype_valid & (class has context)``; PACAM from ``features``; the loss
    from ``M`` and the PACAM. Without any context every channel is inactive and the loss is 0
    with a graph.

    Args:
        features: projected features (the CPAL head's output): a map, or tokens (the grid is
            the CAM's).
        norm_cams: foreground CAMs in ``[0, 1]`` on the features' grid.
        labels: multi-hot image labels.
        context: context prototypes (see ``context_prototypes``).
        context_valid: which context prototypes exist.
        threshold: see ``instance_prototypes``.
        bg_threshold: see ``instance_prototypes``.
        top_k: see ``soft_neighbors``.
        temperature: see ``positiveness``.
        similarity: see ``positiveness``.
        weighting: see ``neighbor_weights``.
        align: apply ``alignment_shift`` to the anchors.
        normalize_pacam: ``normalize`` of ``pacam``.
        detach_pacam: see ``self_loss``.

    Returns:
        ``CPALOutput`` ``(pacam, cams_with_bg, prototypes, prototype_valid, active, loss,
        terms)``.

    Shape:
        - features: ``(B, P, h, w)`` or tokens ``(B, h*w, P)``; norm_cams: ``(B, K, h, w)``;
          labels: ``(B, K)``
        - context: ``(K+1, M, P)``; context_valid: ``(K+1, M)`` bool
        - pacam, cams_with_bg: ``(B, K+1, h, w)``; prototypes: ``(B, K+1, P)``;
          prototype_valid, active: ``(B, K+1)``; loss: ``()``

    Examples:
        >>> features = torch.randn(2, 8, 3, 4, requires_grad=True)
        >>> cams = torch.rand(2, 2, 3, 4, requires_grad=True)
        >>> out = cpal_forward(features, cams, torch.tensor([[1, 0], [1, 1]]), torch.randn(3, 5, 8),
        ...                    torch.ones(3, 5, dtype=torch.bool), top_k=2)
        >>> out.pacam.shape, out.active.tolist()
        (torch.Size([2, 3, 3, 4]), [[True, True, False], [True, True, True]])
        >>> out.loss.backward()
    """
    dims = check_shape("norm_cams", norm_cams, ["B", "K", "h", "w"], dtype="float")
    features = features_as_grid(
        "features", features, (dims["h"], dims["w"]), dims, channels="P", grid_source="norm_cams", dtype="float"
    )
    check_labels("labels", labels, dims)
    dims["C"] = dims["K"] + 1
    if isinstance(dims, Dims):
        dims.sources["C"] = "norm_cams (K + 1)"
    check_context(context, context_valid, dims)
    align = check_bool("align", align)
    normalize_pacam = check_bool("normalize_pacam", normalize_pacam)
    detach_pacam = check_bool("detach_pacam", detach_pacam)
    cams_with_bg = add_background(norm_cams, labels)
    with torch.no_grad():
        protos, valid = instance_prototypes(features, cams_with_bg, labels, threshold=threshold,
                                            bg_threshold=bg_threshold)
        anchors = protos
        if align:
            anchors = protos + alignment_shift(protos, valid, context, context_valid)[None]
        indices, selected = soft_neighbors(anchors, context, context_valid, top_k=top_k)
        weights = _neighbor_weights(
            positiveness(anchors, context, context_valid, temperature=temperature, similarity=similarity),
            indices, selected, check_option("weighting", weighting, WEIGHTINGS),
        )
        active = present(labels, features) & valid & context_valid.any(-1)[None]
        weights = weights * active.to(weights.dtype)[:, :, None]
    prototype_aware = pacam(features, context, weights, normalize=normalize_pacam)
    loss = self_loss(cams_with_bg, prototype_aware, active=active, detach_pacam=detach_pacam)
    return CPALOutput(prototype_aware, cams_with_bg, protos, valid, active, loss, {"self": loss})
