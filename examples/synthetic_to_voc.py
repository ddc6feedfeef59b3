#!/usr/bin/env python
"""Write synthetic scenes as a VOC 2012 tree (JPEG images, palette PNG masks, 255 boundary bands).

    python examples/synthetic_to_voc.py OUT --train 2000 --val 128 --scene num_classes=8 \
        --scene superclass_layout=crossed --img-size 96

A dataset the project was *not* tuned on, read through ``--data voc`` exactly as a user's own
VOC-format data would be: the images go through JPEG, the masks get VOC's 255 "don't care"
band on every boundary between two labels, and the ``K`` synthetic classes are mapped onto
VOC class indices (:data:`CROSSED_VOC_MAP` by default: the two members of each body pair land in
different VOC superclasses, animal and vehicle). The VOC trainer then uses the VOC superclass
table, 20 classes (the unused ones never appear) and VOC's schedule unless flags override it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

__all__ = ["export_voc", "boundary_band", "CROSSED_VOC_MAP"]

#: synthetic class -> VOC foreground index (0-based): pair (2i, 2i+1) = (animal, vehicle), so
#: classes that share a body are in different VOC superclasses (bird/aeroplane, cat/bicycle,
#: cow/boat, dog/bus)
CROSSED_VOC_MAP: tuple[int, ...] = (2, 0, 7, 1, 9, 3, 11, 5)


def boundary_band(mask: np.ndarray, width: int = 1, ignore_index: int = 255) -> np.ndarray:
    """``mask`` with every pixel within ``width`` (Chebyshev) of a different label set to ``ignore_index``.

    Example:
        >>> m = np.array([[0, 0, 1, 1]] * 2)
        >>> boundary_band(m).tolist()
        [[0, 255, 255, 1], [0, 255, 255, 1]]
    """
    h, w = mask.shape
    pad = np.pad(mask, width, mode="edge")
    edge = np.zeros((h, w), dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            edge |= pad[width + dy:width + dy + h, width + dx:width + dx + w] != mask
    return np.where(edge, ignore_index, mask)


def _write_split(root: Path, ds: Any, prefix: str, class_map: np.ndarray, band: int) -> list[str]:
    from PIL import Image

    from wsss_blocks.constants import VOC_PALETTE

    mean = np.asarray(ds_mean(ds), np.float32)[:, None, None]
    std = np.asarray(ds_std(ds), np.float32)[:, None, None]
    lut = np.concatenate([[0], class_map + 1]).astype(np.int64)
    pal = VOC_PALETTE.reshape(-1).tolist()
    names = []
    for i in range(len(ds)):
        item = ds[i]
        rgb = ((item["image"].numpy() * std + mean).clip(0, 1) * 255).round().astype(np.uint8)
        name = f"{prefix}_{i:06d}"
        Image.fromarray(rgb.transpose(1, 2, 0)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        mask = boundary_band(lut[item["mask"].numpy()], band).astype(np.uint8)
        im = Image.fromarray(mask, mode="P")
        im.putpalette(pal)
        im.save(root / "SegmentationClass" / f"{name}.png")
        names.append(name)
    return names


def ds_mean(ds: Any) -> Sequence[float]:
    from wsss_blocks.constants import IMAGENET_MEAN

    return getattr(ds, "mean", IMAGENET_MEAN)


def ds_std(ds: Any) -> Sequence[float]:
    from wsss_blocks.constants import IMAGENET_STD

    return getattr(ds, "std", IMAGENET_STD)


def export_voc(out: str | os.PathLike[str], *, train: int, val: int, img_size: int = 96, seed: int = 0,
               scene: Mapping[str, Any] | None = None, class_map: Sequence[int] | None = None,
               band: int = 1) -> Path:
    """Write ``train`` training and ``val`` validation scenes as ``OUT/VOCdevkit/VOC2012``.

    ``train_aug.txt`` and ``train.txt`` list the training images, ``val.txt`` the validation
    ones; masks are palette PNGs with VOC indices (``class_map[c] + 1`` for synthetic class
    ``c``, default :data:`CROSSED_VOC_MAP`) and a ``band``-pixel 255 boundary.

    Returns:
        the ``VOC2012`` folder.
    """
    from wsss_blocks.data import SyntheticScenes

    scene = dict(scene or {})
    scene.pop("val_length", None)
    k = int(scene.get("num_classes", 6))
    cmap = np.asarray(CROSSED_VOC_MAP[:k] if class_map is None else class_map, dtype=np.int64)
    if len(cmap) != k or len(set(cmap.tolist())) != k or cmap.min() < 0 or cmap.max() > 19:
        raise ValueError(f"class_map: expected {k} distinct VOC indices in 0..19, got {cmap.tolist()}")
    root = Path(out) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tr = SyntheticScenes(split="train", length=train, image_size=img_size, seed=seed, **scene)
    va = SyntheticScenes(split="val", length=val, image_size=img_size, seed=seed, **scene)
    lists = {"train": _write_split(root, tr, "train", cmap, band), "val": _write_split(root, va, "val", cmap, band)}
    for split, names in (("train_aug", lists["train"]), ("train", lists["train"]), ("val", lists["val"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def main(argv: list[str] | None = None) -> Path:
    from _config import parse_scene_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=128)
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--band", type=int, default=1)
    p.add_argument("--scene", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    root = export_voc(a.out, train=a.train, val=a.val, img_size=a.img_size, seed=a.seed,
                      scene=parse_scene_options(a.scene), band=a.band)
    print(root)
    return root


if __name__ == "__main__":
    main()
