"""Shared machinery of the file-based datasets (VOC, COCO): reading, labels, items.

Pillow is imported inside the readers, never at module import. Every problem with a file
(it does not decode, a mask of another size, values outside the classes, a list that names
nothing) raises ``DataFileError``, which names the file and what is wrong with it.
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


class DataFileError(OSError, ValueError):
    """A dataset file that cannot be used; the message names the file and what is wrong.

    Both an ``OSError`` (the file cannot be read) and a ``ValueError`` (its content is not what
    the dataset expects), so code that catches either keeps working. ``path`` and ``reason``
    hold the two parts of the message.

    Examples:
        >>> err = DataFileError("masks/a.png", "every pixel is 255 (ignore)")
        >>> str(err), isinstance(err, OSError), isinstance(err, ValueError)
        ('masks/a.png: every pixel is 255 (ignore)', True, True)
    """

    def __init__(self, path: str | os.PathLike[str], reason: str = "") -> None:
        super().__init__(f"{path}: {reason}" if reason else str(path))
        self.path, self.reason = str(path), reason


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file that is missing, cut off or not an image."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_rgb(path: str | os.PathLike[str]) -> Tensor:
    """Read an image file as a ``(3, H, W)`` uint8 RGB tensor (Pillow).

    Raises:
        DataFileError: the file is missing or does not decode (e.g. a truncated JPEG).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except _decode_errors() as err:
        raise DataFileError(path, f"cannot read the image ({type(err).__name__}: {err})") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: str | os.PathLike[str]) -> Tensor:
    """Read a single-channel (palette ``P`` or grey ``L``) PNG mask as ``(H, W)`` int64.

    Raises:
        DataFileError: the file is missing, does not decode (e.g. a truncated PNG) or is not
            a single-channel label image.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataFileError(
                    path, "expected a palette (P) or grey (L) label PNG whose pixel values are "
                    f"class indices, got mode {im.mode!r}"
                )
            arr = np.asarray(im).astype(np.int64)
    except DataFileError:
        raise
    except _decode_errors() as err:
        raise DataFileError(path, f"cannot read the mask ({type(err).__name__}: {err})") from err
    return torch.from_numpy(arr)


def read_names(path: Path) -> list[str]:
    """Image names from a list file: first token per line, folder and extension stripped.

    Accepts plain ``2007_000032`` lines and DeepLab-style
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` lines.

    Raises:
        DataFileError: the file cannot be read as text, or names no image.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(path, f"cannot read the list ({type(err).__name__}: {err})") from err
    names = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            names.append(Path(line.split()[0]).stem)
    if not names:
        raise DataFileError(path, "the list names no images")
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
    if path.suffix not in (".npy", ".json"):
        raise ValueError(f"label_file: expected a .npy or .json file, got {path}")
    try:
        raw = np.load(path, allow_pickle=True).item() if path.suffix == ".npy" else json.loads(path.read_text())
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as err:
        raise DataFileError(path, f"cannot read the label file ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise DataFileError(path, f"expected a mapping name -> labels, got {type(raw).__name__}")
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
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path (str or os.PathLike), got {type(root).__name__}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{kind} root {root} does not exist")
    return root


class SegmentationFolder(Dataset):
    """Base of file datasets: subclasses set names, paths and the class table.

    Subclasses set ``root``, ``split``, ``names``, ``image_dir`` (``<name>.jpg``),
    ``mask_dir`` (``<name>.png``, ``None`` when there is none), ``num_classes``,
    ``class_names``, ``palette``, and implement ``_load_mask(i)`` (``None``: the mask is
    all ``ignore_index``); ``_mask_source(i)`` names where mask ``i`` comes from.

    Reading an item raises ``DataFileError`` naming the file when the image or mask does
    not decode, the mask has another size than the image or values outside ``0..K`` and
    ``ignore_index``, or, with labels taken from the mask, every mask pixel is
    ``ignore_index`` (the image would have no label at all).
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

    def _mask_source(self, index: int) -> str:
        return str(Path(self.mask_dir or "") / f"{self.names[index]}.png")

    def _check_mask(self, index: int, mask: Tensor, size: tuple[int, int], labels: Tensor | None) -> Tensor:
        """The image labels (``labels`` when a label file gave them, else the mask's) after the
        checks of a read mask; ``DataFileError`` names the mask when one fails."""
        source = self._mask_source(index)
        if tuple(mask.shape) != size:
            raise DataFileError(source, f"the mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                                f"{self._image_path(index)} is {size[0]}x{size[1]}")
        try:
            from_mask = labels_from_mask(mask, self.num_classes, ignore_index=self.ignore_index)
        except ValueError as err:
            raise DataFileError(source, str(err)) from None
        if labels is not None:
            return labels
        if bool((mask == self.ignore_index).all()):
            raise DataFileError(source, f"every pixel is {self.ignore_index} (ignore), so the image has no label; "
                                "fix or remove the file, or give image labels with label_file=")
        return from_mask

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
        labels = None if self.label_table is None else self.label_table[name].clone()
        if mask is None:  # label-only items: a label file and no masks
            assert labels is not None
            mask = torch.full(size, self.ignore_index, dtype=torch.int64)
        else:
            labels = self._check_mask(index, mask, size, labels)
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
