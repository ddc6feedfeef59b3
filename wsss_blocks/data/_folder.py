"""Shared machinery of the file-based datasets (VOC, COCO): reading, labels, items.

Pillow is imported inside the readers, never at module import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsss_blocks.data.transforms import EvalTransform, labels_from_mask

Transform = Callable[[Tensor, Tensor], Mapping[str, Tensor]]


def read_rgb(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file as a ``(3, H, W)`` uint8 RGB tensor (Pillow)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: str | os.PathLike[str]) -> Tensor:
    """Read a single-channel (palette ``P`` or grey ``L``) PNG mask as ``(H, W)`` int64."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"{path}: expected a palette (P) or grey (L) label PNG whose pixel values are "
                f"class indices, got mode {im.mode!r}"
            )
        arr = np.asarray(im).astype(np.int64)
    return torch.from_numpy(arr)


def read_names(path: Path) -> list[str]:
    """Image names from a list file: first token per line, folder and extension stripped.

    Accepts plain ``2007_000032`` lines and DeepLab-style
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` lines.
    """
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            names.append(Path(line.split()[0]).stem)
    return names


def read_label_file(path: str | os.PathLike[str], num_classes: int) -> dict[str, Tensor]:
    """Image-level labels from a file: name -> ``(K,)`` float32 multi-hot.

    ``.npy``: a pickled dict ``name -> (K,)`` multi-hot array (ToCo's
    ``cls_labels_onehot.npy``). ``.json``: ``{name: [class indices]}`` or
    ``{name: [K multi-hot values]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label_file: {path} does not exist")
    if path.suffix == ".npy":
        raw = np.load(path, allow_pickle=True).item()
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"label_file: expected a .npy or .json file, got {path}")
    out = {}
    for name, value in raw.items():
        v = np.asarray(value)
        if v.shape == (num_classes,) and set(np.unique(v).tolist()) <= {0, 1}:
            lab = v.astype(np.float32)
        else:  # list of class indices
            lab = np.zeros(num_classes, np.float32)
            idx = v.astype(np.int64).ravel()
            if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
                raise ValueError(f"label_file: {name!r} has class indices outside 0..{num_classes - 1}")
            lab[idx] = 1.0
        out[str(name)] = torch.from_numpy(lab)
    return out


def check_root(kind: str, root: str | os.PathLike[str]) -> Path:
    """``root`` as a ``Path``; ``FileNotFoundError`` (``"<kind> root ... does not exist"``) if absent."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{kind} root {root} does not exist")
    return root


class SegmentationFolder(Dataset):
    """Base of file datasets: subclasses set names, paths and the class table.

    Subclasses set ``root``, ``split``, ``names``, ``image_dir`` (``<name>.jpg``),
    ``mask_dir`` (``<name>.png``, ``None`` when there is none), ``num_classes``,
    ``class_names``, ``palette``, and implement ``_load_mask(i)`` (``None``: the mask is
    all ``ignore_index``).
    """

    ignore_index: int = 255
    num_classes: int
    class_names: tuple[str, ...]
    palette: np.ndarray
    names: list[str]
    root: Path
    split: str
    image_dir: Path
    mask_dir: Path | None = None
    _repr_attrs: tuple[str, ...] = ("split",)  # shown in ``repr`` after ``root``

    def __init__(self, transform: Transform | None, label_file: str | os.PathLike[str] | None) -> None:
        self.transform: Transform = EvalTransform() if transform is None else transform
        self.label_table = None if label_file is None else read_label_file(label_file, self.num_classes)
        if self.label_table is not None:
            missing = [n for n in self.names if n not in self.label_table]
            if missing:
                raise ValueError(
                    f"label_file: no labels for {len(missing)} images, e.g. {missing[:3]}"
                )

    def _check_files(self, mask_note: str = "") -> None:
        """Every listed name has an image and, when there is a mask folder, a mask.

        ``mask_note`` is added to the missing-mask message (e.g. which folder was missing).
        """
        kind = f"{type(self).__name__} {self.split!r}"
        check_files(f"{kind} images", self.image_dir, self.names, ".jpg")
        if self.mask_dir is not None:
            check_files(f"{kind} masks{mask_note}", self.mask_dir, self.names, ".png")

    def _image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.names[index]}.jpg"

    def _load_mask(self, index: int, size: tuple[int, int]) -> Tensor | None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        extra = "".join(f", {a}={getattr(self, a)!r}" for a in self._repr_attrs)
        return (f"{type(self).__name__}(root={str(self.root)!r}{extra}, n={len(self)}, "
                f"transform={self.transform!r})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        name = self.names[index]
        image = read_rgb(self._image_path(index))
        size = (int(image.shape[1]), int(image.shape[2]))
        mask = self._load_mask(index, size)
        if mask is None:
            mask = torch.full(size, self.ignore_index, dtype=torch.int64)
        elif tuple(mask.shape) != size:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from image {size}")
        if self.label_table is not None:
            labels = self.label_table[name].clone()
        else:
            labels = labels_from_mask(mask, self.num_classes, ignore_index=self.ignore_index)
        out = self.transform(image, mask)
        return {
            "image": out["image"],
            "labels": labels,
            "mask": out["mask"],
            "valid": out["valid"],
            "index": index,
            "name": name,
        }


def check_files(kind: str, folder: Path, names: Sequence[str], suffix: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing files of a listed split."""
    missing = [n for n in names if not (folder / f"{n}{suffix}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{kind}: {len(missing)} of {len(names)} listed files are missing from {folder}, "
            f"e.g. {[m + suffix for m in missing[:3]]}"
        )
