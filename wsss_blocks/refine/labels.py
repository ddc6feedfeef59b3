"""PAR-refined two-level pseudo labels for a segmentation head (ToCo's ``refine_cams_with_bkg_v2``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import (
    ShapeError,
    check_ignore_index,
    check_labels,
    check_shape,
    check_size,
    check_tensor,
    check_thresholds,
)
from wsss_blocks.cam import valid_to_grid
from wsss_blocks.refine.pixel_adaptive import _TOCO_DILATIONS, par

__all__ = ["combine_levels", "par_label_levels", "par_pseudo_labels"]


def combine_levels(masks_high: Tensor, masks_low: Tensor, *, ignore_index: int = 255) -> Tensor:
    """ToCo's two-level rule: merge the label maps of a conservative and a generous background level.

    ``masks_high`` / ``masks_low`` (``y_high`` / ``y_low`` below) are argmax maps
    (0 = background) made with a background score of ``high`` and ``low`` (``low < high``)::

        y = y_high   where y_high > 0          (confident foreground)
        y = 0        where y_high = y_low = 0  (confident background)
        y = ignore   where y_high = 0 < y_low  (unsure)

    An ``ignore_index`` in ``y_high`` stays ignored; in ``y_low`` (with ``y_high = 0``) too.
    ``ignore_index`` cannot be 0, the background.

    Shape:
        - masks_high, masks_low: ``(*)`` integer, same shape
        - output: same shape and dtype

    Examples:
        >>> combine_levels(torch.tensor([2, 0, 0, 1]), torch.tensor([2, 0, 3, 1])).tolist()
        [2, 0, 255, 1]
    """
    check_tensor("masks_high", masks_high, dtype="int")
    check_tensor("masks_low", masks_low, dtype="int")
    if masks_high.shape != masks_low.shape:
        raise ShapeError(
            f"masks_low: expected the shape of masks_high {tuple(masks_high.shape)}, got {tuple(masks_low.shape)}"
        )
    ignore = check_ignore_index(ignore_index, 1)
    y_high, y_low = masks_high, masks_low
    out = torch.where(y_high > 0, y_high, torch.zeros_like(y_high))
    return torch.where((y_high == 0) & (y_low > 0), torch.full_like(out, ignore), out)


@torch.no_grad()
def par_label_levels(
    images: Tensor,
    norm_cams: Tensor,
    labels: Tensor,
    *,
    low: float = 0.25,
    high: float = 0.7,
    valid: Tensor | None = None,
    size: tuple[int, int] | None = None,
    ignore_index: int = 255,
    dilations: Sequence[int] = _TOCO_DILATIONS,
    num_iters: int = 10,
    kernel_width: float = 0.3,
    pos_weight: float = 0.01,
) -> Tensor:
    """The two PAR-refined label maps of ToCo's pseudo labels, one per background level.

    For each background level ``b`` in (``high``, ``low``): the maps
    ``[b, M_1, ..., M_K]`` (a constant background channel before the normalised CAMs),
    a softmax over the background and the *present* classes (absent classes get
    probability 0), PAR on ``images``, bilinear upsampling to ``size`` and an argmax give
    ``y_b`` (0 = background, ``k + 1`` = class ``k``; ``ignore_index`` outside ``valid``).
    ``par_pseudo_labels`` merges the two with ``combine_levels``.

    All images and both levels run in one batched PAR call, the levels as channels, so the
    affinities are built once (ToCo calls PAR per image and level). Runs under ``torch.no_grad()``.

    Args:
        images: the image at the resolution PAR runs at (ToCo: the crop downsampled by 2).
        norm_cams: normalised foreground CAMs in ``[0, 1]`` (resized to the images' size).
        labels: multi-hot image labels; absent classes are never predicted.
        low: background level of the generous copy (ToCo: 0.25).
        high: background level of the conservative copy (ToCo: 0.7), ``low < high``.
        valid: padding mask at any resolution (True on real pixels); PAR ignores padding
            (see ``par``) and the output is ``ignore_index`` there.
        size: output size (ToCo: the crop size); default the images' size.
        ignore_index: value of padded pixels; not a label value ``0..K``.
        dilations: see ``par``.
        num_iters: see ``par``.
        kernel_width: see ``par``.
        pos_weight: see ``par``.

    Shape:
        - images: ``(B, C, H, W)``; norm_cams: ``(B, K, h, w)``; labels: ``(B, K)``;
          valid: ``(B, H', W')`` bool
        - output: ``(B, 2, *size)`` int64, the ``high`` level first

    Examples:
        >>> images = torch.zeros(1, 3, 8, 8)
        >>> images[..., 4:] = 1.0
        >>> cams = torch.zeros(1, 2, 8, 8)
        >>> cams[0, 1, :, 5:] = 0.5
        >>> levels = par_label_levels(images, cams, torch.tensor([[0, 1]]), dilations=(1, 2))
        >>> levels[0, :, 0].tolist()                    # high level: background; low: the object
        [[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2, 2, 2, 2]]
    """
    dims = check_shape("images", images, ["B", "C", "H", "W"], dtype="float")
    check_shape("norm_cams", norm_cams, ["B", "K", "h", "w"], dims, dtype="float")
    check_labels("labels", labels, dims)
    check_thresholds("low", low, "high", high)
    ignore = check_ignore_index(ignore_index, dims["K"] + 1)
    h, w = images.shape[-2:]
    out_size = (h, w) if size is None else check_size("size", size)
    grid_valid = None
    if valid is not None:
        check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
        grid_valid = valid_to_grid(valid, (h, w))
    dtype = compute_dtype(norm_cams)
    with no_autocast(norm_cams.device.type):
        fg = norm_cams.to(dtype)
        if fg.shape[-2:] != (h, w):
            fg = F.interpolate(fg, size=(h, w), mode="bilinear", align_corners=False)
        present = labels.to(torch.bool)[:, :, None, None]  # (B, K, 1, 1)
        fg = fg.masked_fill(~present, float("-inf"))
        bg_levels = torch.tensor([high, low], dtype=dtype, device=norm_cams.device)
        bg = bg_levels[None, :, None, None, None].expand(fg.shape[0], 2, 1, h, w)
        maps = torch.cat([bg, fg[:, None].expand(-1, 2, -1, -1, -1)], dim=2).softmax(dim=2)
        b, k1 = maps.shape[0], maps.shape[2]
        refined = par(  # both levels as channels of one call: the affinities are built once
            images,
            maps.reshape(b, 2 * k1, h, w),
            valid=grid_valid,
            dilations=dilations,
            num_iters=num_iters,
            kernel_width=kernel_width,
            pos_weight=pos_weight,
        )
        if out_size != (h, w):
            refined = F.interpolate(refined, size=out_size, mode="bilinear", align_corners=False)
        y = refined.reshape(b, 2, k1, *out_size).argmax(dim=2)  # (B, 2, *size)
    if valid is not None:
        keep = valid_to_grid(valid, out_size)
        y = torch.where(keep[:, None], y, torch.full_like(y, ignore))
    return y


@torch.no_grad()
def par_pseudo_labels(
    images: Tensor,
    norm_cams: Tensor,
    labels: Tensor,
    *,
    low: float = 0.25,
    high: float = 0.7,
    valid: Tensor | None = None,
    size: tuple[int, int] | None = None,
    ignore_index: int = 255,
    dilations: Sequence[int] = _TOCO_DILATIONS,
    num_iters: int = 10,
    kernel_width: float = 0.3,
    pos_weight: float = 0.01,
) -> Tensor:
    """Segmentation pseudo labels from CAMs refined by ``par``, two background levels (ToCo).

    The two maps of ``par_label_levels`` merged by ToCo's rule (``combine_levels``)::

        y = y_high   where y_high > 0          (confident foreground)
        y = 0        where y_high = y_low = 0  (confident background)
        y = ignore   where y_high = 0 < y_low  (unsure)
        y = ignore   outside ``valid``

    Runs under ``torch.no_grad()``.

    Args:
        images: see ``par_label_levels``.
        norm_cams: see ``par_label_levels``.
        labels: see ``par_label_levels``.
        low: see ``par_label_levels``.
        high: see ``par_label_levels``.
        valid: see ``par_label_levels``.
        size: see ``par_label_levels``.
        ignore_index: value of unsure and padded pixels; not a label value ``0..K``.
        dilations: see ``par``.
        num_iters: see ``par``.
        kernel_width: see ``par``.
        pos_weight: see ``par``.

    Shape:
        - images: ``(B, C, H, W)``; norm_cams: ``(B, K, h, w)``; labels: ``(B, K)``;
          valid: ``(B, H', W')`` bool
        - output: ``(B, *size)`` int64

    Examples:
        >>> images = torch.zeros(1, 3, 8, 8)
        >>> images[..., 4:] = 1.0                       # object on the right half
        >>> cams = torch.zeros(1, 2, 8, 8)
        >>> cams[0, 1, :, 5:] = 1.0                     # CAM misses column 4
        >>> y = par_pseudo_labels(images, cams, torch.tensor([[0, 1]]), dilations=(1, 2))
        >>> y[0, 0].tolist()                            # PAR fills it up to the edge
        [0, 0, 0, 0, 2, 2, 2, 2]
    """
    levels = par_label_levels(
        images, norm_cams, labels, low=low, high=high, valid=valid, size=size,
        ignore_index=ignore_index, dilations=dilations, num_iters=num_iters,
        kernel_width=kernel_width, pos_weight=pos_weight,
    )
    return combine_levels(levels[:, 0], levels[:, 1], ignore_index=ignore_index)
