"""Constants shared by every layer: ImageNet statistics, VOC / COCO class names, palettes.

This core module is the one home of these tables: ``data/``, ``viz`` and the methods import
them from here (the core imports no dataset). Class index ``k`` in a ``(B, K, ...)`` tensor
is name ``CLASSES[k]``; in a mask it is value ``k + 1`` (0 is background, 255 is ignore).

Examples:
    >>> from wsss_blocks.constants import VOC_CLASSES, COCO_CLASSES, COCO_CATEGORY_TO_INDEX
    >>> len(VOC_CLASSES), len(COCO_CLASSES), VOC_CLASSES[14]
    (20, 80, 'person')
    >>> COCO_CATEGORY_TO_INDEX[90], COCO_CLASSES[79]
    (79, 'toothbrush')
"""

from __future__ import annotations

import numpy as np

from wsss_blocks._validate import check_int

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VOC_CLASSES",
    "COCO_CLASSES",
    "COCO_CATEGORY_IDS",
    "COCO_CATEGORY_TO_INDEX",
    "VOC_PALETTE",
    "COCO_PALETTE",
    "pascal_palette",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in [0, 1]; every dataset here normalises with it."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in [0, 1]."""

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 20 PASCAL VOC foreground classes in the standard order (mask value = index + 1)."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""The 80 COCO 2014 "thing" classes in category-id order (contiguous index 0..79)."""

_COCO_UNUSED_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})

COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _COCO_UNUSED_IDS)
"""COCO annotation ``category_id`` of each contiguous class index (80 ids in 1..90)."""

COCO_CATEGORY_TO_INDEX: dict[int, int] = {cid: k for k, cid in enumerate(COCO_CATEGORY_IDS)}
"""COCO ``category_id`` -> contiguous class index 0..79 (mask value = index + 1)."""


def pascal_palette(*, num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: colour ``i`` spreads the bits of ``i`` over R, G, B.

    Bit ``3j`` of the index sets bit ``7 - j`` of red, bit ``3j + 1`` green, bit
    ``3j + 2`` blue. Index 0 is black, 255 (ignore) is ``(224, 224, 192)``.

    Args:
        num_colors: number of entries, ``>= 1``.

    Returns:
        ``(num_colors, 3)`` uint8 array.

    Examples:
        >>> pascal_palette(num_colors=3).tolist()
        [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
        >>> pascal_palette()[255].tolist()
        [224, 224, 192]
    """
    num_colors = check_int("num_colors", num_colors, low=1)
    idx = np.arange(num_colors, dtype=np.int64)
    out = np.zeros((num_colors, 3), dtype=np.int64)
    for j in range(8):  # 8 bit planes
        for ch in range(3):
            bit = (idx >> (3 * j + ch)) & 1
            out[:, ch] |= bit << (7 - j)
    return out.astype(np.uint8)


VOC_PALETTE: np.ndarray = pascal_palette(num_colors=256)
"""``(256, 3)`` uint8 VOC colour map (read-only); row = mask value, 255 = ignore."""
VOC_PALETTE.flags.writeable = False

COCO_PALETTE: np.ndarray = VOC_PALETTE
"""COCO masks use the same colour map (rows 0..80 and 255)."""

assert len(COCO_CLASSES) == len(COCO_CATEGORY_IDS) == 80
assert len(VOC_CLASSES) == 20
