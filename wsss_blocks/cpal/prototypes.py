"""CPAL's prototypes: per-image instance prototypes (eq. 4) and a bank's context prototypes (eq. 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from wsss_blocks._utils import no_autocast, to_compute
from wsss_blocks._validate import Dims, ShapeError, check_int, check_labels, check_shape
from wsss_blocks.cpal._common import check_threshold, present
from wsss_blocks.prototypes import kmeans
from wsss_blocks.tokens import features_as_grid

__all__ = ["InstancePrototypes", "ContextPrototypes", "instance_prototypes", "context_prototypes"]


class InstancePrototypes(NamedTuple):
    """Result of ``instance_prototypes``.

    Attributes:
        prototypes: ``(B, C, P)`` the mean feature of each (image, channel) region; a zero row
            where the region is empty or the class absent.
        prototype_valid: ``(B, C)`` bool, which prototypes exist.
    """

    prototypes: Tensor
    prototype_valid: Tensor


class ContextPrototypes(NamedTuple):
    """Result of ``context_prototypes``.

    Attributes:
        context: ``(C, M, P)`` the k-means centres of each class's bank.
        context_valid: ``(C, M)`` bool, which centres exist.
    """

    context: Tensor
    context_valid: Tensor


def instance_prototypes(
    features: Tensor,
    cams_with_bg: Tensor,
    labels: Tensor,
    *,
    threshold: float = 0.1,
    bg_threshold: float | None = None,
) -> InstancePrototypes:
    """Instance prototypes (eq. 4): mean of ``features`` where a present channel's CAM exceeds a threshold.

    ``mask = (M > t_c) & y+`` with ``t_0 = bg_threshold`` (or ``threshold``) for the background
    and ``threshold`` for the classes; ``P = einsum(mask, features) / max(|mask|, 1)``; an empty
    mask (or an absent class) gives a zero row that is not valid. Gradient flows into
    ``features`` only (the mask is a threshold); CPAL itself calls this under ``no_grad`` (the
    anchors only select and weight neighbours).

    Args:
        features: projected features on the CAM grid: a map, or tokens (the grid is the CAM's).
        cams_with_bg: CAMs in ``[0, 1]`` with the background at channel 0 (e.g.
            ``wsss_blocks.cam.add_background``).
        labels: multi-hot image labels (no background column).
        threshold: foreground threshold, ``0 < threshold < 1``.
        bg_threshold: background threshold (``None``: ``threshold``).

    Returns:
        ``InstancePrototypes`` ``(prototypes, prototype_valid)``.

    Shape:
        - features: ``(B, P, h, w)`` or tokens ``(B, h*w, P)``; cams_with_bg: ``(B, C, h, w)``
          with ``C = K + 1``; labels: ``(B, K)``
        - prototypes: ``(B, C, P)`` fp32 (fp64 for fp64 ``features``); prototype_valid:
          ``(B, C)`` bool

    Raises:
        ShapeError: a wrong shape, or features off the grid of ``cams_with_bg``.

    Examples:
        >>> features = torch.arange(4.0).view(1, 1, 2, 2)                # P = 1
        >>> cams = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])
        >>> protos, valid = instance_prototypes(features, cams, torch.tensor([[1]]))
        >>> protos.flatten().tolist(), valid.tolist()
        ([2.5, 0.5], [[True, True]])
    """
    dims = check_shape("cams_with_bg", cams_with_bg, ["B", "C", "h", "w"], dtype="float")
    features = features_as_grid(
        "features", features, (dims["h"], dims["w"]), dims, channels="P", grid_source="cams_with_bg", dtype="float"
    )
    if dims["C"] < 1:
        raise ShapeError(f"cams_with_bg: expected a background channel, got shape {tuple(cams_with_bg.shape)}")
    dims["K"] = dims["C"] - 1
    if isinstance(dims, Dims):
        dims.sources["K"] = "cams_with_bg (C - 1)"
    check_labels("labels", labels, dims)
    threshold = check_threshold("threshold", threshold)
    bg = threshold if bg_threshold is None else check_threshold("bg_threshold", bg_threshold)
    channels = dims["C"]
    with no_autocast(features.device.type):
        flat = to_compute(features).flatten(2)  # (B,P,N)
        thr = torch.full((channels,), threshold, dtype=torch.float32, device=features.device)
        thr[0] = bg
        mask = (cams_with_bg.flatten(2).float() > thr[None, :, None]) & present(labels, features)[:, :, None]
        count = mask.sum(-1)  # (B,C)
        protos = torch.einsum("bcn,bpn->bcp", mask.to(flat.dtype), flat)
        protos = protos / count.clamp_min(1)[:, :, None].to(flat.dtype)
    return InstancePrototypes(protos, count > 0)


@torch.no_grad()
def context_prototypes(
    memory: Tensor,
    count: Tensor,
    *,
    num_prototypes: int = 50,
    num_iters: int = 20,
    seed: int = 0,
) -> ContextPrototypes:
    """Context prototypes (eq. 5): k-means of each class's banked prototypes (no gradient).

    Slots ``[0, count[c])`` of ``memory[c]`` are the filled ones (a
    ``ClassBank``'s layout). A class with at most
    ``num_prototypes`` entries uses the entries themselves as centres (the rest invalid);
    an empty class gives all-invalid zeros. Euclidean k-means on the raw prototypes
    (their norm matters to the dot similarity), k-means++ seeded by ``seed``; no host sync.

    Args:
        memory: the bank.
        count: filled slots per class.
        num_prototypes: ``M``, centres per class (``>= 1``).
        num_iters: Lloyd steps (``>= 0``).
        seed: k-means++ seed (``CPAL`` uses ``seed + recluster index``).

    Returns:
        ``ContextPrototypes`` ``(context, context_valid)``.

    Shape:
        - memory: ``(C, L, P)``; count: ``(C,)`` int
        - context: ``(C, M, P)`` fp32 (fp64 for fp64 memory); context_valid: ``(C, M)`` bool

    Examples:
        >>> memory = torch.tensor([[[0.0], [0.2], [5.0], [5.2]], [[1.0], [0.0], [0.0], [0.0]]])
        >>> ctx, ok = context_prototypes(memory, torch.tensor([4, 1]), num_prototypes=2, num_iters=5)
        >>> ctx[0].flatten().sort().values.double().round(decimals=4).tolist(), ctx[1].flatten().tolist()
        ([0.1, 5.1], [1.0, 0.0])
        >>> ok.tolist()
        [[True, True], [True, False]]
    """
    dims = check_shape("memory", memory, ["C", "L", "P"], dtype="float")
    check_shape("count", count, ["C"], dims, dtype="int")
    m = check_int("num_prototypes", num_prototypes, low=1)
    filled = torch.arange(dims["L"], device=memory.device)[None, :] < count.to(memory.device)[:, None]
    centres, centre_valid = kmeans(memory, m, point_valid=filled, num_iters=num_iters, seed=seed)
    return ContextPrototypes(centres, centre_valid)
