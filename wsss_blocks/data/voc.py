"""PASCAL VOC 2012 (+ SBD ``train_aug``) for weakly supervised semantic segmentation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import Tensor

from wsss_blocks._validate import check_option
from wsss_blocks.constants import VOC_CLASSES, VOC_PALETTE
from wsss_blocks.data._folder import SegmentationFolder, Transform, check_root, read_mask, read_names

__all__ = ["VOC"]

_SPLITS = ("train", "train_aug", "val")


def _find_voc2012(root: Path) -> Path:
    root = check_root("VOC", root)
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for c in candidates:
        if (c / "JPEGImages").is_dir():
            return c
    raise FileNotFoundError(
        f"VOC root {root}: missing folder 'JPEGImages' (looked in "
        f"{', '.join(str(c) for c in candidates)}); expected the layout "
        "VOCdevkit/VOC2012/{JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation}"
    )


class VOC(SegmentationFolder):
    """PASCAL VOC 2012 segmentation with the SBD ``train_aug`` split (20 classes).

    Layout (``root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself or
    ``VOC2012``)::

        VOCdevkit/VOC2012/JPEGImages/<name>.jpg
        VOCdevkit/VOC2012/SegmentationClass/<name>.png       # palette PNGs (train, val)
        VOCdevkit/VOC2012/SegmentationClassAug/<name>.png    # SBD grey PNGs (train_aug), optional
        VOCdevkit/VOC2012/ImageSets/Segmentation/{train,train_aug,val}.txt

    ``train_aug`` (10,582 images) reads its masks from ``SegmentationClassAug``; ``train`` and
    ``val`` from ``SegmentationClass``; each falls back to the other folder when its own is
    absent. ``mask_dir`` replaces that choice with any folder of ``<name>.png`` label PNGs,
    e.g. pseudo masks written by ``examples/make_pseudo_masks.py``. List files may hold plain
    names or DeepLab-style ``image mask`` path pairs.
    Image-level labels are the mask values other than 0 and 255 (class ``v - 1``), or come
    from ``label_file`` (a ``.npy`` dict name -> 20 multi-hot, as ToCo's
    ``cls_labels_onehot.npy``, or a ``.json`` of class-index lists); with a label file and no
    mask folder, masks are all ``ignore_index``.

    Args:
        root: dataset root (see layout).
        split: ``"train"``, ``"train_aug"`` or ``"val"``.
        transform: ``(image uint8 (3,H,W), mask int64 (H,W)) -> dict(image, mask, valid)``;
            ``EvalTransform`` (normalise only) by default,
            ``TrainTransform`` for training crops.
        label_file: optional image-level label file (see above).
        split_file: optional list file replacing ``ImageSets/Segmentation/<split>.txt``.
        mask_dir: optional folder of ``<name>.png`` masks (palette or grey, values = class
            index + 1, 0 background, 255 ignore) used instead of ``SegmentationClass[Aug]``.

    Attributes:
        num_classes: 20.
        class_names: ``VOC_CLASSES``.
        palette: ``(256, 3)`` uint8 VOC colour map.
        ignore_index: 255.
        names: image names of the split.

    Raises:
        FileNotFoundError: naming the missing folder or list file (or ``mask_dir``, or the
            masks missing from it).
        DataFileError: naming the file: a list that names no image, a label file that does
            not read; when an item is read, an image or mask that does not decode, a mask of
            another size than its image or with values outside ``0..20`` and 255, and, with
            labels from the masks, a mask whose every pixel is 255 (the image has no label).

    Items: ``image`` ``(3, H, W)`` float32, ``labels`` ``(20,)`` float32, ``mask`` ``(H, W)``
    int64 (255 kept), ``valid`` ``(H, W)`` bool, ``index``, ``name``.

    Examples:
        >>> try:
        ...     VOC("/nonexistent/voc")
        ... except FileNotFoundError as err:
        ...     print(err)
        VOC root /nonexistent/voc does not exist
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES
    palette = VOC_PALETTE

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: Literal["train", "train_aug", "val"] = "train_aug",
        *,
        transform: Transform | None = None,
        label_file: str | os.PathLike[str] | None = None,
        split_file: str | os.PathLike[str] | None = None,
        mask_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        check_option("split", split, _SPLITS)
        self.root = _find_voc2012(Path(root))
        self.split = split
        self.image_dir = self.root / "JPEGImages"
        list_path = Path(split_file) if split_file is not None else (
            self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        if not list_path.is_file():
            raise FileNotFoundError(
                f"VOC {split!r}: missing list file {list_path}"
                + (" (train_aug.txt lists the 10,582 SBD-augmented training images)"
                   if split == "train_aug" else "")
            )
        self.names = read_names(list_path)
        prefer = ["SegmentationClassAug", "SegmentationClass"]
        if split != "train_aug":
            prefer.reverse()
        found = [self.root / d for d in prefer if (self.root / d).is_dir()]
        if mask_dir is not None:
            if not Path(mask_dir).is_dir():
                raise FileNotFoundError(f"VOC mask_dir {mask_dir} is not a folder")
            self.mask_dir = Path(mask_dir)
            self._check_files(f" (mask_dir={mask_dir})")
            super().__init__(transform, label_file)
            return
        if found:
            self.mask_dir = found[0]
        elif label_file is not None:
            self.mask_dir = None
        else:
            raise FileNotFoundError(
                f"VOC {split!r}: missing mask folder {self.root / prefer[0]} "
                f"(nor {prefer[1]}); pass label_file= to train without masks"
            )
        fallback = self.mask_dir is not None and self.mask_dir.name != prefer[0]
        self._check_files(f" (mask folder {self.root / prefer[0]} is missing, so read "
                          f"{prefer[1]})" if fallback else "")
        super().__init__(transform, label_file)

    def _load_mask(self, index: int, size: tuple[int, int]) -> Tensor | None:
        if self.mask_dir is None:
            return None
        return read_mask(self.mask_dir / f"{self.names[index]}.png")
