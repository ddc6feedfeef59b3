"""Class activation maps: from features, normalised, with background, to pseudo labels.

The shared CAM vocabulary of every method:

* a CAM is ``(B, K, h, w)``, foreground only; ``*_with_bg`` maps are ``(B, K+1, h, w)``
  with background at channel 0;
* "normalised" means per (image, class) ``relu(cam) / (amax + 1e-5)`` (``mode="max"``) or
  min-max (``mode="minmax"``, ToCo parity);
* pseudo-label maps are ``(B, h, w)`` int64, 0 = background, ``k + 1`` = class ``k``,
  ``ignore_index`` (255) = unsure or padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast, promote
from wsss_blocks._validate import (
    ShapeError,
    check_bool,
    check_callable,
    check_ignore_index,
    check_labels,
    check_option,
    check_range,
    check_shape,
    check_size,
    check_tensor,
    check_thresholds,
)
from wsss_blocks.tokens import features_as_tokens

__all__ = [
    "PooledPrototypes",
    "cam_from_features",
    "normalize_cam",
    "add_background",
    "pseudo_labels",
    "box_to_valid_mask",
    "valid_to_grid",
    "token_pseudo_labels",
    "masked_average_pool",
    "multiscale_cam",
]


def _label_weights(labels: Tensor, like: Tensor) -> Tensor:
    """(B, K) labels of any accepted dtype -> (B, K, 1, 1) weights in ``like``'s dtype."""
    return labels.to(dtype=like.dtype)[:, :, None, None]


def cam_from_features(
    features: Tensor,
    weight: Tensor,
    *,
    size: tuple[int, int] | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Apply a linear / 1x1-conv classifier to every location: ``CAM_k(n) = w_k . x_n (+ b_k)``.

    Gradients flow into ``features`` and ``weight``.

    Args:
        features: a feature map, or tokens together with ``size``.
        weight: classifier weights, ``nn.Linear`` ``(K, D)`` or 1x1 ``nn.Conv2d``
            ``(K, D, 1, 1)`` layout.
        size: the grid ``(h, w)``, required for token input.
        bias: optional ``(K,)`` bias.

    Shape:
        - features: ``(B, D, h, w)`` or ``(B, N, D)``
        - output: ``(B, K, h, w)``

    Examples:
        >>> feats = torch.randn(2, 8, 3, 4)
        >>> cam_from_features(feats, torch.randn(5, 8)).shape
        torch.Size([2, 5, 3, 4])
        >>> tokens = feats.flatten(2).transpose(1, 2)
        >>> torch.allclose(cam_from_features(tokens, torch.ones(1, 8), size=(3, 4)),
        ...                feats.sum(1, keepdim=True), atol=1e-5)
        True
    """
    check_tensor("features", features, dtype="float")
    check_tensor("weight", weight, dtype="float")
    if weight.dim() == 4:
        check_shape("weight", weight, ["K", "D", 1, 1])
        weight = weight.flatten(1)
    dims = check_shape("weight", weight, ["K", "D"])
    if bias is not None:
        check_shape("bias", bias, ["K"], dims, dtype="float")
    if size is None:
        if features.dim() != 4:
            raise ShapeError(
                f"features: token input (B, N, D) needs size=(h, w); got shape {tuple(features.shape)}"
            )
        size = (features.shape[-2], features.shape[-1])
    tokens = features_as_tokens("features", features, size, dims, grid_source="size")
    if bias is None:
        tokens, weight = promote(tokens, weight)
    else:
        tokens, weight, bias = promote(tokens, weight, bias)
    cam = torch.einsum("bnd,kd->bkn", tokens, weight)
    if bias is not None:
        cam = cam + bias[None, :, None]
    return cam.unflatten(2, check_size("size", size))


def normalize_cam(
    cams: Tensor, *, mode: Literal["max", "minmax"] = "max", eps: float = 1e-5
) -> Tensor:
    """Normalise every (image, class) map to ``[0, 1]``.

    * ``"max"``: ``relu(cam) / (max relu(cam) + eps)``; an all-non-positive map becomes 0.
    * ``"minmax"``: ``(cam - min) / (max - min + eps)`` (ToCo's multi-scale CAM); a constant
      map becomes 0.

    Both hold for any ``eps >= 0``, also ``eps=0``. Computed in fp32 (or fp64 for fp64 input);
    differentiable.

    Args:
        cams: raw CAMs.
        mode: ``"max"`` or ``"minmax"``.
        eps: added to the denominator, ``>= 0``.

    Shape:
        - cams: ``(B, K, h, w)``
        - output: same, float32 or float64

    Examples:
        >>> cam = torch.tensor([[[[-1.0, 1.0], [2.0, 4.0]]]])
        >>> normalize_cam(cam, eps=0.0).flatten().tolist()
        [0.0, 0.25, 0.5, 1.0]
        >>> normalize_cam(cam, mode="minmax", eps=0.0).flatten().double().round(decimals=2).tolist()
        [0.0, 0.4, 0.6, 1.0]
    """
    check_shape("cams", cams, ["B", "K", "h", "w"], dtype="float")
    check_option("mode", mode, ("max", "minmax"))
    eps = check_range("eps", eps, 0.0)
    x = cams.to(compute_dtype(cams))
    if mode == "max":
        x = x.relu()
    else:
        x = x - x.amin(dim=(-2, -1), keepdim=True)
    # a map that is 0 everywhere (all non-positive / constant) stays 0, also for eps=0
    denom = (x.amax(dim=(-2, -1), keepdim=True) + eps).clamp_min(torch.finfo(x.dtype).tiny)
    return x / denom


def add_background(norm_cams: Tensor, labels: Tensor) -> Tensor:
    """Mask absent classes and prepend the background map ``1 - max_k M_k``.

    Args:
        norm_cams: normalised foreground CAMs (values in ``[0, 1]``).
        labels: multi-hot image labels; absent classes are zeroed before the max.

    Shape:
        - norm_cams: ``(B, K, h, w)``
        - labels: ``(B, K)``
        - output: ``(B, K+1, h, w)``, background at channel 0

    Examples:
        >>> cam = torch.tensor([[[[0.9, 0.2]], [[0.5, 0.7]]]])   # (1, 2, 1, 2)
        >>> add_background(cam, torch.tensor([[1, 0]]))[0, :, 0].double().round(decimals=2).tolist()
        [[0.1, 0.8], [0.9, 0.2], [0.0, 0.0]]
    """
    dims = check_shape("norm_cams", norm_cams, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    fg = norm_cams * _label_weights(labels, norm_cams)
    bg = 1.0 - fg.amax(dim=1, keepdim=True)
    return torch.cat([bg, fg], dim=1)


def valid_to_grid(valid: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample a padding/validity mask to a grid: a cell is valid iff >= 50 % of it is.

    Uses area pooling (``adaptive_avg_pool2d`` of the float mask); a mask already at
    ``size`` is returned unchanged. No gradient.

    Shape:
        - valid: ``(B, H, W)`` bool
        - output: ``(B, h, w)`` bool

    Examples:
        >>> valid = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> valid[:, :3] = True                      # rows 0-2 of 4 valid
        >>> valid_to_grid(valid, (2, 2))[0].tolist()  # second row of cells is half valid
        [[True, True], [True, True]]
        >>> valid_to_grid(valid[:, :, :1], (2, 1))[0].flatten().tolist()
        [True, True]
    """
    size = check_size("size", size)
    check_shape("valid", valid, ["B", "H", "W"], dtype="bool")
    if tuple(valid.shape[-2:]) == size:
        return valid
    frac = F.adaptive_avg_pool2d(valid[:, None].float(), size)[:, 0]
    return frac >= 0.5


@torch.no_grad()
def pseudo_labels(
    norm_cams: Tensor,
    labels: Tensor,
    *,
    low: float = 0.25,
    high: float = 0.7,
    valid: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Two-threshold pseudo labels (ToCo/CPEWS rule), under ``torch.no_grad()``.

    With ``M = norm_cams * labels``, ``v = max_k M_k`` and ``a = argmax_k M_k + 1``:
    ``v > high`` gives ``a``; ``low < v <= high`` gives ``ignore_index``; ``v <= low``
    gives 0 (background). Cells outside ``valid`` get ``ignore_index``.

    Args:
        norm_cams: normalised CAMs (values in ``[0, 1]``; not range-checked, which would sync).
        labels: multi-hot image labels.
        low: background threshold.
        high: foreground threshold, ``low < high``.
        valid: padding mask at any resolution (resampled by ``valid_to_grid``).
        ignore_index: value of unsure and padded cells; not a label value ``0..K``.

    Shape:
        - norm_cams: ``(B, K, h, w)``; labels: ``(B, K)``; valid: ``(B, H', W')``
        - output: ``(B, h, w)`` int64

    Examples:
        >>> cams = torch.tensor([[[[0.8, 0.7, 0.3, 0.25]], [[0.9, 0.9, 0.9, 0.9]]]])
        >>> pseudo_labels(cams, torch.tensor([[1, 0]])).tolist()
        [[[1, 255, 255, 0]]]
    """
    dims = check_shape("norm_cams", norm_cams, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    check_thresholds("low", low, "high", high)
    ignore_index = check_ignore_index(ignore_index, dims["K"] + 1)
    masked = norm_cams * _label_weights(labels, norm_cams)
    value, index = masked.max(dim=1)
    out = torch.where(value > high, index + 1, torch.full_like(index, ignore_index))
    out = torch.where(value <= low, torch.zeros_like(index), out)
    if valid is not None:
        check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
        keep = valid_to_grid(valid, (dims["h"], dims["w"]))
        out = torch.where(keep, out, torch.full_like(out, ignore_index))
    return out


def box_to_valid_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Turn per-image valid boxes (the non-padded crop region) into pixel masks.

    Args:
        boxes: ``[h0, h1, w0, w1]`` per image, in pixels of the ``size`` image, end-exclusive.
        size: the image size ``(H, W)``.

    Shape:
        - boxes: ``(B, 4)`` integer (or float holding integers)
        - output: ``(B, H, W)`` bool

    Examples:
        >>> box_to_valid_mask(torch.tensor([[0, 2, 1, 3]]), (3, 4)).int().tolist()
        [[[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]]
    """
    h, w = check_size("size", size)
    check_shape("boxes", boxes, ["B", 4])
    rows = torch.arange(h, device=boxes.device)
    cols = torch.arange(w, device=boxes.device)
    in_rows = (rows[None] >= boxes[:, 0:1]) & (rows[None] < boxes[:, 1:2])
    in_cols = (cols[None] >= boxes[:, 2:3]) & (cols[None] < boxes[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


@torch.no_grad()
def token_pseudo_labels(
    norm_cams: Tensor,
    labels: Tensor,
    size: tuple[int, int],
    *,
    low: float = 0.25,
    high: float = 0.7,
    valid: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Pseudo labels on the token grid from a CAM at any resolution (ToCo / CPEWS ISM labels), no grad.

    The CAM is resized bilinearly (``align_corners=False``, no antialias) to ``size`` unless
    it is already there, then ``pseudo_labels`` applies. ``valid`` may be given at any
    resolution (typically the image's, e.g. from ``box_to_valid_mask``): a token is
    valid iff at least half of its area is. Boxes are never sliced at token resolution.

    Args:
        norm_cams: normalised CAMs (values in ``[0, 1]``), e.g. a multi-scale CAM at image size.
        labels: multi-hot image labels.
        size: the token grid ``(h, w)``.
        low: background threshold (CPEWS alpha).
        high: foreground threshold (CPEWS beta).
        valid: padding mask, any resolution.
        ignore_index: value of unsure and padded tokens; not a label value ``0..K``.

    Shape:
        - norm_cams: ``(B, K, H', W')``; labels: ``(B, K)``; valid: ``(B, H'', W'')``
        - output: ``(B, h, w)`` int64

    Examples:
        >>> cam = torch.zeros(1, 2, 32, 32)
        >>> cam[:, 0, :16] = 0.9
        >>> token_pseudo_labels(cam, torch.tensor([[1, 0]]), (2, 2)).tolist()
        [[[1, 1], [0, 0]]]
    """
    size = check_size("size", size)
    check_shape("norm_cams", norm_cams, ["B", "K", "H", "W"], dtype="float")
    if tuple(norm_cams.shape[-2:]) != size:
        norm_cams = F.interpolate(norm_cams, size=size, mode="bilinear", align_corners=False)
    return pseudo_labels(
        norm_cams, labels, low=low, high=high, valid=valid, ignore_index=ignore_index
    )


class PooledPrototypes(NamedTuple):
    """Per-(image, class) pooled features from ``masked_average_pool``.

    Attributes:
        prototypes: ``(B, K, D)`` weighted means of the features.
        prototype_valid: ``(B, K)`` bool, True where the class's weights are not all zero.

    Examples:
        >>> out = masked_average_pool(torch.ones(1, 4, 2), torch.ones(1, 1, 2, 2))
        >>> out.prototypes.shape, out.prototype_valid.tolist()
        (torch.Size([1, 1, 2]), [[True]])
    """

    prototypes: Tensor
    prototype_valid: Tensor


def masked_average_pool(
    features: Tensor,
    weights: Tensor,
    *,
    threshold: float | None = None,
    valid: Tensor | None = None,
    eps: float = 1e-5,
) -> PooledPrototypes:
    """Per-(image, class) weighted mean of features, batched over classes by one ``bmm``.

    ``pooled[b, k] = sum_n w[b, k, n] F[b, n] / (sum_n w[b, k, n] + eps)``. With a
    ``threshold`` the weights become the binary mask ``w > threshold``; ``valid`` zeroes
    the weights outside it. Computed in fp32 (autocast off); gradients flow into
    ``features`` and ``weights`` (detach the weights yourself when they must not train).

    Args:
        features: features on the weights' grid.
        weights: non-negative soft weights, e.g. normalised CAMs.
        threshold: optional binarisation threshold (finite).
        valid: optional validity mask at any resolution (see ``valid_to_grid``).
        eps: added to the denominator, ``>= 0``.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; weights: ``(B, K, h, w)``
        - output: ``PooledPrototypes``: ``prototypes (B, K, D)`` fp32 (fp64 for fp64
          input), ``prototype_valid (B, K)`` bool (some weight is non-zero)

    Examples:
        >>> feats = torch.arange(4.0).view(1, 4, 1)          # tokens with values 0..3
        >>> w = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])   # (1, 1, 2, 2)
        >>> pooled, nonempty = masked_average_pool(feats, w, eps=0.0)
        >>> pooled.flatten().tolist(), nonempty.tolist()
        ([1.5], [[True]])
    """
    dims = check_shape("weights", weights, ["B", "K", "h", "w"], dtype="float")
    if threshold is not None:
        threshold = check_range("threshold", threshold)
    eps = check_range("eps", eps, 0.0)
    size = (dims["h"], dims["w"])
    tokens = features_as_tokens("features", features, size, dims, dtype="float")
    dtype = compute_dtype(tokens, weights)
    with no_autocast(tokens.device.type):
        w = weights.to(dtype)
        if threshold is not None:
            w = (w > threshold).to(dtype)
        if valid is not None:
            check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
            w = w * valid_to_grid(valid, size)[:, None].to(dtype)
        w = w.flatten(2)
        mass = w.sum(dim=-1)
        pooled = torch.bmm(w, tokens.to(dtype)) / (mass[..., None] + eps)
    return PooledPrototypes(pooled, mass > 0)


@torch.no_grad()
def multiscale_cam(
    cam_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    fuse: Literal["sum", "mean", "max"] = "sum",
    size: tuple[int, int] | None = None,
) -> Tensor:
    """Multi-scale (and flip) CAM inference, as in ToCo's ``multi_scale_cam``; no grad.

    For each scale ``s`` the batch is resized bilinearly to ``(int(s*H), int(s*W))`` and,
    with ``flip``, stacked with its horizontal flip into one call of ``cam_fn``. Each
    CAM is resized to ``size``; the flipped half is flipped back and fused with the other
    by element-wise max; then ReLU, and the scales are fused by ``fuse``. Normalise the
    result with ``normalize_cam`` (ToCo: ``mode="minmax"``). The model's train/eval
    mode is the caller's business.

    Args:
        cam_fn: maps an image batch ``(B', 3, h', w')`` to raw CAMs ``(B', K, h'', w'')``.
        images: the image batch.
        scales: image scale factors.
        flip: also run horizontally flipped images.
        fuse: how to combine scales: ``"sum"`` (ToCo), ``"mean"`` or ``"max"``.
        size: output size; the input's ``(H, W)`` when ``None``.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``(B, K, *size)``

    Examples:
        >>> conv = torch.nn.Conv2d(3, 4, 1)
        >>> cam = multiscale_cam(conv, torch.randn(2, 3, 8, 12), scales=(1.0, 0.5))
        >>> cam.shape, bool((cam >= 0).all())
        (torch.Size([2, 4, 8, 12]), True)
    """
    check_callable("cam_fn", cam_fn)
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    check_option("fuse", fuse, ("sum", "mean", "max"))
    flip = check_bool("flip", flip)
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales: expected a non-empty sequence of positive factors, got {scales!r}")
    scales = [check_range(f"scales[{i}]", s, 0.0, low_inclusive=False) for i, s in enumerate(scales)]
    height, width = images.shape[-2:]
    out_size = check_size("size", size) if size is not None else (height, width)
    batch = images.shape[0]
    fused: Tensor | None = None
    for scale in scales:
        scaled_size = (max(1, int(scale * height)), max(1, int(scale * width)))
        x = images
        if scaled_size != (height, width):
            x = F.interpolate(images, size=scaled_size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        cam = cam_fn(x)
        check_shape("cam_fn output", cam, [x.shape[0], "K", "h", "w"], dtype="float")
        cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)
        if flip:
            cam = torch.maximum(cam[:batch], cam[batch:].flip(-1))
        cam = cam.relu()
        if fused is None:
            fused = cam
        elif fuse == "max":
            fused = torch.maximum(fused, cam)
        else:
            fused = fused + cam
    assert fused is not None
    return fused / len(scales) if fuse == "mean" else fused
