"""COCO 2014 in the WSSS setting: 80 contiguous classes, semantic masks, image labels."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from wsss_blocks._validate import check_bool, check_option
from wsss_blocks.constants import COCO_CATEGORY_TO_INDEX, COCO_CLASSES, COCO_PALETTE
from wsss_blocks.data._folder import (
    DataFileError,
    SegmentationFolder,
    Transform,
    check_root,
    read_mask,
    read_names,
)

__all__ = ["COCO"]


def _first_dir(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


class COCO(SegmentationFolder):
    """COCO 2014 for WSSS: images, semantic masks over 80 contiguous classes, image labels.

    Layout under ``root`` (first match wins)::

        {train2014, images/train2014, JPEGImages/train2014}/<name>.jpg
        {SegmentationClass/train2014, masks/train2014}/<name>.png   # pre-rendered masks
        annotations/instances_train2014.json                         # or: render from JSON

    Masks come from a folder of pre-rendered single-channel PNGs (``source="masks"``), or
    are rendered from ``instances_<split>2014.json`` with pycocotools (``source="json"``,
    extra ``coco``): annotations are painted largest area first, so smaller objects stay on
    top; crowd regions get their class. ``source="auto"`` uses the mask folder when present,
    else the JSON; with neither, a ``label_file`` gives label-only items whose masks are all
    ``ignore_index`` (as ``VOC``; no CAM evaluation then). Class
    index ``k`` is ``COCO_CLASSES[k]``, i.e. annotation
    ``category_id`` ``COCO_CATEGORY_IDS[k]``; masks hold ``k + 1`` (0 background, 255
    ignore). Pre-rendered PNGs that store raw category ids are read with
    ``mask_values="category_id"``. Image labels are the classes present in the mask, or
    come from ``label_file`` (see ``VOC``).

    Names: ``split_file`` when given; otherwise the PNG stems of the mask folder, or the
    JSON's images (only those with at least one annotation when ``skip_empty``), sorted.

    Args:
        root: dataset root (see layout).
        split: ``"train"`` or ``"val"`` (2014).
        transform: see ``VOC`` (normalise only by default).
        source: ``"auto"``, ``"masks"`` or ``"json"``.
        mask_dir: explicit pre-rendered mask folder (implies ``source="masks"``).
        annotation_file: explicit instances JSON (for ``source="json"``).
        mask_values: ``"index"`` (PNG holds ``k + 1``) or ``"category_id"`` (PNG holds COCO
            category ids, mapped with ``COCO_CATEGORY_TO_INDEX``).
        label_file: optional image-level label file.
        split_file: optional list of image names.
        skip_empty: with the JSON, drop images without annotations (the WSSS lists do).

    Attributes:
        num_classes: 80.
        class_names: ``COCO_CLASSES``.
        palette: ``(256, 3)`` uint8 colour map.
        ignore_index: 255.
        names: image names of the split.

    Raises:
        FileNotFoundError: naming the missing folder or file.
        ImportError: JSON source without pycocotools.
        DataFileError: naming the file: no images found, annotations that do not read, and
            the item faults of ``VOC`` (values outside ``0..80``
            and 255).

    Examples:
        >>> try:
        ...     COCO("/nonexistent/coco", split="val")
        ... except FileNotFoundError as err:
        ...     print(err)
        COCO root /nonexistent/coco does not exist
    """

    num_classes = len(COCO_CLASSES)
    class_names = COCO_CLASSES
    palette = COCO_PALETTE
    _repr_attrs = ("split", "source")

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: Literal["train", "val"] = "train",
        *,
        transform: Transform | None = None,
        source: Literal["auto", "masks", "json"] = "auto",
        mask_dir: str | os.PathLike[str] | None = None,
        annotation_file: str | os.PathLike[str] | None = None,
        mask_values: Literal["index", "category_id"] = "index",
        label_file: str | os.PathLike[str] | None = None,
        split_file: str | os.PathLike[str] | None = None,
        skip_empty: bool = True,
    ) -> None:
        check_option("split", split, ("train", "val"))
        check_option("source", source, ("auto", "masks", "json"))
        check_option("mask_values", mask_values, ("index", "category_id"))
        skip_empty = check_bool("skip_empty", skip_empty)
        root = check_root("COCO", root)
        self.root, self.split, self.mask_values = root, split, mask_values
        sub = f"{split}2014"
        img_candidates = [root / sub, root / "images" / sub, root / "JPEGImages" / sub]
        image_dir = _first_dir(img_candidates)
        if image_dir is None:
            raise FileNotFoundError(
                f"COCO root {root}: missing image folder {sub!r} (looked for "
                f"{', '.join(str(c) for c in img_candidates)})"
            )
        self.image_dir = image_dir
        mask_candidates = [Path(mask_dir)] if mask_dir is not None else [
            root / "SegmentationClass" / sub, root / "masks" / sub]
        ann_path = Path(annotation_file) if annotation_file is not None else (
            root / "annotations" / f"instances_{sub}.json")
        found_masks = _first_dir(mask_candidates)
        if mask_dir is not None:
            source = "masks"
        if source == "auto":
            # label-file-only mode (no masks, no JSON) reads like "masks" without a folder
            source = "json" if found_masks is None and ann_path.is_file() else "masks"
            if found_masks is None and not ann_path.is_file() and label_file is None:
                raise FileNotFoundError(
                    f"COCO root {root}: found neither a mask folder "
                    f"({' or '.join(str(c) for c in mask_candidates)}) nor the annotation file "
                    f"{ann_path}"
                )
        self.source = source
        self.mask_dir = None
        self._coco: Any = None
        self._ids: dict[str, int] = {}
        if source == "masks":
            if found_masks is None:
                if label_file is None:
                    raise FileNotFoundError(
                        f"COCO {split!r}: missing mask folder "
                        f"{' or '.join(str(c) for c in mask_candidates)}")
            else:
                self.mask_dir = found_masks
        else:
            self._load_json(ann_path)
        self._ann_path = ann_path
        if split_file is not None:
            if not Path(split_file).is_file():
                raise FileNotFoundError(f"split_file: {split_file} does not exist")
            self.names = read_names(Path(split_file))
        elif self.source == "json":
            coco: Any = self._coco  # set by _load_json
            self.names = sorted(n for n, i in self._ids.items()
                                if not skip_empty or coco.getAnnIds(imgIds=[i]))
        elif self.mask_dir is not None:
            self.names = sorted(p.stem for p in self.mask_dir.glob("*.png"))
        else:
            self.names = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        if not self.names:
            where = {"json": ann_path, "masks": self.mask_dir}.get(self.source) or self.image_dir
            raise DataFileError(where, f"COCO {split!r}: no images found")
        self._check_files()
        if self.source == "json":
            unknown = [n for n in self.names if n not in self._ids]
            if unknown:
                raise ValueError(f"COCO {split!r}: {len(unknown)} names are not in {ann_path}, e.g. {unknown[:3]}")
        self._lut = self._value_lut()
        super().__init__(transform, label_file)

    def _load_json(self, ann_path: Path) -> None:
        if not ann_path.is_file():
            raise FileNotFoundError(f"COCO {self.split!r}: missing annotation file {ann_path}")
        try:
            from pycocotools.coco import COCO as _COCOApi
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "COCO(source='json') renders masks with pycocotools: "
                "pip install 'wsss-blocks[coco]' (or use pre-rendered PNG masks)"
            ) from err
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self._coco = _COCOApi(str(ann_path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataFileError(ann_path, f"cannot read the annotations ({type(err).__name__}: {err})") from err
        self._ids = {Path(im["file_name"]).stem: int(i) for i, im in self._coco.imgs.items()}

    def _value_lut(self) -> np.ndarray:
        """Map raw PNG values to mask values (identity for ``"index"``)."""
        lut = np.arange(256, dtype=np.int64)
        if self.mask_values == "category_id":
            lut[:] = self.ignore_index
            lut[0] = 0
            for cid, k in COCO_CATEGORY_TO_INDEX.items():
                lut[cid] = k + 1
        return lut

    def _render(self, image_id: int, size: tuple[int, int]) -> Tensor:
        anns = self._coco.loadAnns(self._coco.getAnnIds(imgIds=[image_id]))
        mask = np.zeros(size, dtype=np.int64)
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):
            k = COCO_CATEGORY_TO_INDEX.get(int(ann["category_id"]))
            if k is None:
                raise DataFileError(self._ann_path, f"image {image_id}: unknown category_id {ann['category_id']}")
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation
                warnings.simplefilter("ignore", DeprecationWarning)
                m = self._coco.annToMask(ann).astype(bool)
            if m.shape != size:
                raise DataFileError(self._ann_path, f"image {image_id}: annotation size {m.shape} != image {size}")
            mask[m] = k + 1
        return torch.from_numpy(mask)

    def _mask_source(self, index: int) -> str:
        if self.source == "json":
            return f"{self._ann_path} (image {self.names[index]})"
        return super()._mask_source(index)

    def _load_mask(self, index: int, size: tuple[int, int]) -> Tensor | None:
        name = self.names[index]
        if self.source == "json":
            return self._render(self._ids[name], size)
        if self.mask_dir is None:
            return None
        raw = read_mask(self.mask_dir / f"{name}.png")
        if self.mask_values == "index":
            return raw
        return torch.from_numpy(self._lut[np.clip(raw.numpy(), 0, 255)])
