"""Shared train / eval transforms and the collate function of every wsss_blocks dataset.

A transform is a callable ``(image, mask) -> dict(image, mask, valid)`` taking the raw
image as a ``(3, H, W)`` uint8 (or [0, 1] float) tensor and the mask as an ``(H, W)``
integer tensor, and returning the normalised float image, the int64 mask (``ignore_index``
kept, padding set to it) and the ``valid`` bool map (False on padding). Randomness comes
from torch's generator (pass ``generator=`` or rely on the global one, which
``DataLoader`` seeds per worker).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._validate import (
    ShapeError,
    check_floats,
    check_instance,
    check_int,
    check_range,
    check_shape,
    check_size,
    check_tensor,
)
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "normalize",
    "labels_from_mask",
    "TrainTransform",
    "EvalTransform",
    "collate",
]


def _to_float01(image: Tensor) -> Tensor:
    check_shape("image", image, [3, "H", "W"])
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise ShapeError(f"image: expected uint8 or float, got dtype {image.dtype}")
    return image.float()


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as float tuples: three finite values each, every ``std`` > 0."""
    return (check_floats("mean", mean, length=3),
            check_floats("std", std, length=3, low=0.0, low_inclusive=False))


def normalize(
    image: Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Scale a uint8 (or [0, 1] float) image to float32 and normalise it per channel.

    Args:
        image: ``(3, H, W)`` uint8 in 0..255 or float in [0, 1].
        mean: per-channel mean (three finite values).
        std: per-channel std (three finite values > 0).

    Raises:
        ValueError: naming ``mean`` or ``std`` when they are not three finite values, or a
            ``std`` value is not positive.

    Shape:
        image: ``(3, H, W)`` -> ``(3, H, W)`` float32.

    Examples:
        >>> x = normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
        >>> [round(v, 3) for v in x[:, 0, 0].tolist()]
        [2.249, 2.429, 2.64]
    """
    mean, std = _check_stats(mean, std)
    x = _to_float01(image)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def labels_from_mask(mask: Tensor, num_classes: int, *, ignore_index: int = 255) -> Tensor:
    """Image-level multi-hot labels from a mask: classes ``v - 1`` for values ``v`` in 1..K.

    Background 0 and ``ignore_index`` are skipped.

    Args:
        mask: ``(H, W)`` integer mask.
        num_classes: ``K``.
        ignore_index: value to skip.

    Returns:
        ``(K,)`` float32 multi-hot labels.

    Raises:
        ValueError: when the mask holds a value outside ``0..K`` and ``ignore_index``, or
            ``ignore_index`` is one of ``1..K``.

    Examples:
        >>> labels_from_mask(torch.tensor([[0, 3], [255, 1]]), 4).tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    check_tensor("mask", mask, dtype="int")
    num_classes = check_int("num_classes", num_classes, low=1)
    ignore_index = check_int("ignore_index", ignore_index)
    if 1 <= ignore_index <= num_classes:
        raise ValueError(f"ignore_index: {ignore_index} is a class value (1..{num_classes}); pick another (255)")
    values = torch.unique(mask)
    values = values[(values != 0) & (values != ignore_index)]
    if values.numel() and (int(values.min()) < 1 or int(values.max()) > num_classes):
        raise ValueError(
            f"mask: values must be 0, 1..{num_classes} or {ignore_index}, "
            f"got {sorted(values.tolist())}" + ("" if ignore_index == 255 else f" (ignore_index={ignore_index})")
        )
    labels = torch.zeros(num_classes, dtype=torch.float32)
    labels[values.long() - 1] = 1.0
    return labels


def _resize(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    if tuple(image.shape[-2:]) == size:
        return image, mask
    down = size[0] * size[1] < image.shape[-2] * image.shape[-1]
    img = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                        antialias=down)[0]
    msk = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, msk


class TrainTransform:
    """Training augmentation as in ToCo / SIPE: random rescale, flip, normalise, crop + pad.

    Steps: (1) random rescale, either by a factor drawn uniformly from ``scale_range``
    (ToCo) or, when ``long_side=(lo, hi)`` is given, so that the long side becomes a random
    integer in ``[lo, hi]`` (SIPE); the image is resized bilinearly (antialiased when
    shrinking), the mask with nearest neighbour. (2) horizontal flip with probability
    ``hflip``. (3) ImageNet normalisation. (4) random ``crop_size`` crop: when the image is
    smaller than the crop in a dimension it is placed at a random offset on a canvas filled
    with ``pad_value`` (in normalised units, so 0 = the mean colour) and the mask with
    ``ignore_index``; ``valid`` is True exactly on image pixels.

    Args:
        crop_size: output ``(H, W)`` or an int for a square crop (ToCo: 448).
        scale_range: ``(low, high)`` rescale factor range.
        long_side: ``(low, high)`` long-side range in pixels; overrides ``scale_range``.
        hflip: flip probability.
        mean: normalisation mean.
        std: normalisation std.
        pad_value: padding value of the normalised image.
        ignore_index: mask value of padding.
        generator: optional ``torch.Generator`` for reproducible draws.

    Shape:
        image ``(3, H, W)`` uint8/float, mask ``(H, W)`` int -> image ``(3, h, w)`` float32,
        mask ``(h, w)`` int64, valid ``(h, w)`` bool, with ``(h, w) = crop_size``.

    Examples:
        >>> t = TrainTransform(crop_size=32, scale_range=(0.5, 0.5), generator=torch.Generator().manual_seed(0))
        >>> out = t(torch.zeros(3, 40, 20, dtype=torch.uint8), torch.ones(40, 20, dtype=torch.long))
        >>> out["image"].shape, out["mask"].shape, int(out["valid"].sum())
        (torch.Size([3, 32, 32]), torch.Size([32, 32]), 200)
        >>> bool((out["mask"][~out["valid"]] == 255).all())
        True
    """

    def __init__(
        self,
        *,
        crop_size: int | Sequence[int] = 448,
        scale_range: Sequence[float] = (0.5, 2.0),
        long_side: Sequence[int] | None = None,
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pad_value: float = 0.0,
        ignore_index: int = 255,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        self.crop_size = check_size("crop_size", crop_size)
        scales = check_floats("scale_range", scale_range, length=2)
        lo, hi = scales
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < low <= high, got {tuple(scale_range)}")
        self.scale_range = (lo, hi)
        if long_side is not None:
            ls = tuple(check_int(f"long_side[{i}]", v) for i, v in enumerate(long_side))
            if len(ls) != 2 or not 0 < ls[0] <= ls[1]:
                raise ValueError(f"long_side: expected 0 < low <= high, got {long_side!r}")
            long_side = ls
        self.long_side = long_side
        self.hflip = float(check_range("hflip", hflip, 0.0, 1.0))
        self.mean, self.std = _check_stats(mean, std)
        self.pad_value = float(check_range("pad_value", pad_value))
        self.ignore_index = check_int("ignore_index", ignore_index)
        if generator is not None:
            check_instance("generator", generator, torch.Generator)
        self.generator = generator

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:  # uniform in [0, high]
        return int(torch.randint(0, high + 1, (), generator=self.generator))

    def __call__(self, image: Tensor, mask: Tensor) -> dict[str, Tensor]:
        dims = check_shape("image", image, [3, "H", "W"])
        check_shape("mask", mask, ["H", "W"], dims, dtype="int")
        img = _to_float01(image)
        h, w = img.shape[-2:]
        if self.long_side is not None:
            s = (self._randint(self.long_side[1] - self.long_side[0]) + self.long_side[0]) / max(h, w)
        else:
            s = self._uniform(*self.scale_range)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        img, msk = _resize(img, mask.long(), size)
        if float(torch.rand((), generator=self.generator)) < self.hflip:
            img, msk = img.flip(-1), msk.flip(-1)
        img = normalize(img, mean=self.mean, std=self.std)

        ch, cw = self.crop_size
        h, w = size
        # place the image on a canvas of at least the crop size, then crop a window
        ph, pw = max(ch, h), max(cw, w)
        oy, ox = self._randint(ph - h), self._randint(pw - w)
        cy, cx = self._randint(ph - ch), self._randint(pw - cw)
        out_img = img.new_full((3, ch, cw), self.pad_value)
        out_msk = msk.new_full((ch, cw), self.ignore_index)
        valid = torch.zeros(ch, cw, dtype=torch.bool)
        # intersection of the image box [oy, oy+h) with the window [cy, cy+ch), in canvas coords
        y0, y1 = max(oy, cy), min(oy + h, cy + ch)
        x0, x1 = max(ox, cx), min(ox + w, cx + cw)
        if y1 > y0 and x1 > x0:
            out_img[:, y0 - cy:y1 - cy, x0 - cx:x1 - cx] = img[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            out_msk[y0 - cy:y1 - cy, x0 - cx:x1 - cx] = msk[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            valid[y0 - cy:y1 - cy, x0 - cx:x1 - cx] = True
        return {"image": out_img, "mask": out_msk, "valid": valid}

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"long_side={self.long_side}, hflip={self.hflip})")


class EvalTransform:
    """Evaluation transform: normalisation only (full image, ``valid`` all True).

    Args:
        mean: normalisation mean.
        std: normalisation std.

    Shape:
        image ``(3, H, W)``, mask ``(H, W)`` -> same sizes; float32 / int64 / bool.

    Examples:
        >>> out = EvalTransform()(torch.zeros(3, 5, 7, dtype=torch.uint8), torch.zeros(5, 7, dtype=torch.uint8))
        >>> out["image"].shape, out["mask"].dtype, bool(out["valid"].all())
        (torch.Size([3, 5, 7]), torch.int64, True)
    """

    def __init__(self, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = _check_stats(mean, std)

    def __call__(self, image: Tensor, mask: Tensor) -> dict[str, Tensor]:
        dims = check_shape("image", image, [3, "H", "W"])
        check_shape("mask", mask, ["H", "W"], dims, dtype="int")
        return {
            "image": normalize(image, mean=self.mean, std=self.std),
            "mask": mask.long(),
            "valid": torch.ones(mask.shape, dtype=torch.bool),
        }

    def __repr__(self) -> str:
        return "EvalTransform()"


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate dataset items into a batch: tensors stacked, numbers to tensors, strings listed.

    Works for every wsss_blocks dataset (``image``, ``labels``, ``mask``, ``valid``,
    ``index``, ``name``, ...). Images of different sizes cannot be stacked: use a cropping
    transform or ``batch_size=1``.

    Args:
        samples: list of item dicts with the same keys.

    Returns:
        dict with the same keys: ``(B, ...)`` tensors, ``(B,)`` int64 for ints, lists for
        other values.

    Raises:
        ValueError: when tensors of one key have different shapes, or keys differ.

    Examples:
        >>> from wsss_blocks.data import SyntheticScenes
        >>> ds = SyntheticScenes(length=4, image_size=16)
        >>> b = collate([ds[0], ds[1]])
        >>> b["image"].shape, b["valid"].shape, b["index"].tolist(), b["name"]
        (torch.Size([2, 3, 16, 16]), torch.Size([2, 16, 16]), [0, 1], ['train_000000', 'train_000001'])
    """
    if len(samples) == 0:
        raise ValueError("collate: got an empty batch")
    keys = list(samples[0].keys())
    out: dict[str, Any] = {}
    for item in samples[1:]:
        if list(item.keys()) != keys:
            raise ValueError(f"collate: items have different keys: {keys} vs {list(item.keys())}")
    for key in keys:
        values = [item[key] for item in samples]
        first = values[0]
        if isinstance(first, Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate: cannot stack {key!r} of different shapes {sorted(shapes)}; "
                    "use a cropping transform (TrainTransform) or batch_size=1"
                )
            out[key] = torch.stack(values)
        elif isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = list(values)
    return out
