"""Datasets: built-in synthetic WSSS scenes (no download), PASCAL VOC 2012 and COCO 2014.

Every dataset returns dicts with ``image`` ``(3, H, W)`` float32 (ImageNet-normalised),
``labels`` ``(K,)`` float32 multi-hot, ``mask`` ``(H, W)`` int64 (0 = background,
``k + 1`` = class ``k``, 255 = ignore), ``valid`` ``(H, W)`` bool (False on padding),
``index`` and ``name``; ``collate`` batches them. A file that VOC / COCO cannot use
raises ``DataFileError``, which names the file and what is wrong with it. Importing this package does not
import Pillow, pycocotools or matplotlib: VOC / COCO import them when they read files.
Class names, palettes and ImageNet statistics live in ``wsss_blocks.constants``.

Examples:
    >>> from torch.utils.data import DataLoader
    >>> from wsss_blocks.data import SyntheticScenes, collate
    >>> loader = DataLoader(SyntheticScenes(length=4, image_size=32), batch_size=2, collate_fn=collate)
    >>> batch = next(iter(loader))
    >>> batch["image"].shape, batch["labels"].shape, batch["mask"].shape, batch["valid"].dtype
    (torch.Size([2, 3, 32, 32]), torch.Size([2, 6]), torch.Size([2, 32, 32]), torch.bool)
"""

from wsss_blocks.data._folder import DataFileError
from wsss_blocks.data.coco import COCO
from wsss_blocks.data.synthetic import SyntheticScenes
from wsss_blocks.data.transforms import (
    EvalTransform,
    TrainTransform,
    collate,
    labels_from_mask,
    normalize,
)
from wsss_blocks.data.voc import VOC

__all__ = [
    "SyntheticScenes",
    "VOC",
    "COCO",
    "TrainTransform",
    "EvalTransform",
    "collate",
    "normalize",
    "labels_from_mask",
    "DataFileError",
]
