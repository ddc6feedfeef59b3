"""Overlays and image grids for masks, pseudo labels and CAMs (optional extra ``viz``).

Every function returns or writes ``uint8`` RGB arrays. matplotlib is imported inside the
functions that need it (CAM colour maps and PNG writing), never at module import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsss_blocks._validate import check_floats, check_int, check_range
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD, VOC_PALETTE

__all__ = ["colorize_mask", "denormalize", "overlay", "save_grid"]

ArrayLike = Any  # Tensor | np.ndarray


def _np(x: ArrayLike, name: str = "array") -> np.ndarray:
    """A tensor, array or nested list of numbers as a numpy array; a ``TypeError`` naming ``name`` else."""
    if isinstance(x, Tensor):
        x = x.detach().float() if x.is_floating_point() else x.detach()
        return x.cpu().numpy()  # sync-ok: visualisation
    out = np.asarray(x) if x is not None else None
    if out is None or out.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a tensor or an array of numbers, got {type(x).__name__}")
    return out


def _check_color(name: str, value: Sequence[int]) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{name}: expected three ints in [0, 255], got {value!r}")
    return np.asarray([check_int(f"{name}[{i}]", v, low=0, high=255) for i, v in enumerate(value)], np.uint8)


def colorize_mask(
    mask: ArrayLike,
    *,
    palette: ArrayLike | None = None,
    ignore_index: int = 255,
    ignore_color: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Colour a label mask with a palette.

    Args:
        mask: ``(H, W)`` integer mask (tensor or array).
        palette: ``(N, 3)`` uint8 colours, row = mask value; the VOC colour map by default.
        ignore_index: value drawn with ``ignore_color``.
        ignore_color: RGB colour of ``ignore_index`` pixels and of values outside the palette.

    Returns:
        ``(H, W, 3)`` uint8.

    Examples:
        >>> colorize_mask(np.array([[0, 1], [255, 2]]), palette=np.array([[0, 0, 0], [9, 9, 9], [5, 6, 7]])).tolist()
        [[[0, 0, 0], [9, 9, 9]], [[255, 255, 255], [5, 6, 7]]]
    """
    m = _np(mask, "mask").astype(np.int64)
    if m.ndim != 2:
        raise ValueError(f"mask: expected (H, W), got shape {m.shape}")
    ignore_index = check_int("ignore_index", ignore_index)
    color = _check_color("ignore_color", ignore_color)
    pal = np.asarray(VOC_PALETTE if palette is None else _np(palette, "palette"), dtype=np.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"palette: expected (N, 3), got shape {pal.shape}")
    out = np.empty(m.shape + (3,), dtype=np.uint8)
    bad = (m < 0) | (m >= len(pal)) | (m == ignore_index)
    out[...] = pal[np.clip(m, 0, len(pal) - 1)]
    out[bad] = color
    return out


def denormalize(
    image: ArrayLike,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undo ImageNet normalisation: ``(3, H, W)`` float -> ``(H, W, 3)`` uint8.

    Examples:
        >>> denormalize(torch.zeros(3, 1, 1)).tolist()
        [[[124, 116, 104]]]
    """
    x = _np(image, "image").astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got shape {x.shape}")
    m = check_floats("mean", mean, length=3)
    s = check_floats("std", std, length=3, low=0.0, low_inclusive=False)
    x = x * np.asarray(s, np.float32)[:, None, None] + np.asarray(m, np.float32)[:, None, None]
    x = np.nan_to_num(x, nan=0.0)  # a NaN pixel is drawn black
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def _resize_map(x: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if x.shape[-2:] == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    if nearest:
        r = torch.nn.functional.interpolate(t, size=size, mode="nearest")
    else:
        r = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return r[0, 0].numpy()


def overlay(
    image: ArrayLike,
    mask_or_cam: ArrayLike,
    *,
    opacity: float = 0.5,
    palette: ArrayLike | None = None,
    cmap: str = "jet",
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Blend a label mask or a CAM over a normalised image.

    An integer (or bool) ``(h, w)`` map is a label mask, coloured with ``palette``
    (background 0 is not drawn, ignore pixels are white). A float map is a CAM: ``(h, w)``
    or ``(K, h, w)`` (max over ``K``), scaled to [0, 1] by its maximum and coloured with the
    matplotlib colour map ``cmap``. Maps are resized to the image (nearest for masks,
    bilinear for CAMs).

    Args:
        image: ``(3, H, W)`` ImageNet-normalised image.
        mask_or_cam: ``(h, w)`` integer mask, or ``(h, w)`` / ``(K, h, w)`` float CAM.
        opacity: opacity of the overlay.
        palette: mask colours (VOC colour map by default).
        cmap: matplotlib colour map name for CAMs.
        ignore_index: mask value drawn white.
        mean: normalisation mean of the image.
        std: normalisation std of the image.

    Returns:
        ``(H, W, 3)`` uint8.

    Examples:
        >>> img = torch.zeros(3, 4, 4)
        >>> overlay(img, torch.tensor([[0, 1], [1, 0]])).shape
        (4, 4, 3)
        >>> overlay(img, torch.rand(2, 2, 2)).dtype
        dtype('uint8')
    """
    base = denormalize(image, mean=mean, std=std).astype(np.float32)
    size = base.shape[:2]
    opacity = float(check_range("opacity", opacity, 0.0, 1.0))
    ignore_index = check_int("ignore_index", ignore_index)
    m = _np(mask_or_cam, "mask_or_cam")
    if m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer):
        if m.ndim != 2:
            raise ValueError(f"mask_or_cam: expected an (h, w) mask, got shape {m.shape}")
        m = _resize_map(m.astype(np.float32), size, nearest=True).round().astype(np.int64)
        color = colorize_mask(m, palette=palette, ignore_index=ignore_index).astype(np.float32)
        a = np.where(m == 0, 0.0, opacity)[..., None]
    else:
        if m.ndim == 3:
            m = m.max(0)
        if m.ndim != 2:
            raise ValueError(f"mask_or_cam: expected (h, w) or (K, h, w), got shape {m.shape}")
        m = np.maximum(_resize_map(m, size, nearest=False), 0.0)
        m = m / (m.max() + 1e-5)
        import matplotlib

        if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
            raise ValueError(f"cmap: expected a matplotlib colour map name (e.g. 'jet'), got {cmap!r}")
        color = matplotlib.colormaps[cmap](m)[..., :3].astype(np.float32) * 255.0
        a = np.full(size + (1,), opacity, dtype=np.float32)
    return (base * (1.0 - a) + color * a).round().clip(0, 255).astype(np.uint8)


def save_grid(
    path: str | os.PathLike[str],
    images: ArrayLike,
    *,
    masks: ArrayLike | None = None,
    cams: ArrayLike | None = None,
    ncols: int = 4,
    palette: ArrayLike | None = None,
    scale: int | None = None,
    opacity: float = 0.5,
    pad: int = 2,
) -> np.ndarray:
    """Write a PNG grid: for each sample the image, then its mask overlay, then its CAM overlay.

    Args:
        path: output PNG path (parent folders are created).
        images: ``(B, 3, H, W)`` normalised images.
        masks: optional ``(B, H, W)`` integer masks (pseudo labels or ground truth).
        cams: optional ``(B, h, w)`` or ``(B, K, h, w)`` float CAMs.
        ncols: number of samples per row.
        palette: mask colours (VOC colour map by default).
        scale: integer upscaling of every tile (nearest); default so tiles are >= 128 px.
        opacity: overlay opacity.
        pad: white border between tiles, in output pixels.

    Returns:
        The ``(H_grid, W_grid, 3)`` uint8 grid that was written.

    Examples:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp()
        >>> images, masks = torch.zeros(3, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long)
        >>> g = save_grid(pathlib.Path(d) / "g.png", images, masks=masks, ncols=2, scale=1)
        >>> g.shape
        (22, 42, 3)
    """
    imgs = _np(images, "images")
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {imgs.shape}")
    b, _, h, w = imgs.shape
    for name, x in (("masks", masks), ("cams", cams)):
        if x is not None and len(_np(x, name)) != b:
            raise ValueError(f"{name}: expected {b} entries (one per image of images), got {len(x)}")
    ncols = check_int("ncols", ncols, low=1)
    scale = max(1, -(-128 // max(1, min(h, w)))) if scale is None else check_int("scale", scale, low=1)
    opacity = float(check_range("opacity", opacity, 0.0, 1.0))
    pad = check_int("pad", pad, low=0)
    tiles_per = 1 + (masks is not None) + (cams is not None)
    samples = []
    for i in range(b):
        tiles = [denormalize(imgs[i])]
        if masks is not None:
            tiles.append(overlay(imgs[i], _np(masks[i]), opacity=opacity, palette=palette))
        if cams is not None:
            tiles.append(overlay(imgs[i], _np(cams[i]).astype(np.float32), opacity=opacity))
        samples.append([t.repeat(scale, 0).repeat(scale, 1) for t in tiles])
    th, tw = h * scale, w * scale
    ncols = max(1, min(ncols, b))  # an empty batch: an empty (white, at least 1 x 1) grid
    nrows = -(-b // ncols)
    cell_w = tiles_per * (tw + pad)
    grid = np.full((max(1, nrows * (th + pad) + pad), ncols * cell_w + pad, 3), 255, dtype=np.uint8)
    for i, tiles in enumerate(samples):
        r, c = divmod(i, ncols)
        y = pad + r * (th + pad)
        for j, t in enumerate(tiles):
            x = pad + c * cell_w + j * (tw + pad)
            grid[y:y + th, x:x + tw] = t
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    import matplotlib.image

    matplotlib.image.imsave(os.fspath(path), grid)
    return grid
