"""Tests for wsss_blocks.viz (colorize_mask, denormalize, overlay, save_grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_blocks.constants import VOC_PALETTE
from wsss_blocks.data import SyntheticScenes, normalize
from wsss_blocks.viz import colorize_mask, denormalize, overlay, save_grid

pytest.importorskip("matplotlib")


def test_colorize_mask_oracle() -> None:
    pal = np.array([[0, 0, 0], [10, 20, 30], [40, 50, 60]], np.uint8)
    m = torch.tensor([[0, 1, 2], [255, 7, -1]])
    out = colorize_mask(m, palette=pal)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for y in range(2):
        for x in range(3):
            v = int(m[y, x])
            ref = pal[v] if 0 <= v < 3 else np.array([255, 255, 255])
            assert out[y, x].tolist() == ref.tolist()
    # default palette is VOC's; 255 drawn with ignore_color
    assert colorize_mask(np.array([[15]])).tolist() == [[VOC_PALETTE[15].tolist()]]
    assert colorize_mask(np.array([[255]]), ignore_color=(1, 2, 3)).tolist() == [[[1, 2, 3]]]


def test_colorize_errors() -> None:
    with pytest.raises(ValueError, match="mask"):
        colorize_mask(np.zeros((2, 2, 2), np.int64))
    with pytest.raises(ValueError, match="palette"):
        colorize_mask(np.zeros((2, 2), np.int64), palette=np.zeros((4, 4), np.uint8))


def test_denormalize_roundtrip() -> None:
    img = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)
    back = denormalize(normalize(img))
    assert back.shape == (6, 5, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - img.permute(1, 2, 0).numpy().astype(int)).max() <= 1
    with pytest.raises(ValueError, match="image"):
        denormalize(torch.zeros(4, 2, 2))


def test_overlay_mask() -> None:
    img = normalize(torch.full((3, 8, 8), 100, dtype=torch.uint8))
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[:2, :2] = 1
    out = overlay(img, mask, opacity=0.5)
    base = denormalize(img)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # background untouched, class pixels blended 50/50 with the palette colour (resized nearest)
    assert np.array_equal(out[4:, 4:], base[4:, 4:])
    ref = np.round(0.5 * base[0, 0].astype(float) + 0.5 * VOC_PALETTE[1]).astype(np.uint8)
    assert np.abs(out[:4, :4].astype(int) - ref.astype(int)).max() <= 1
    # bool masks work too; opacity 1 = pure palette colour
    out1 = overlay(img, mask.bool(), opacity=1.0)
    assert out1[0, 0].tolist() == VOC_PALETTE[1].tolist()


def test_overlay_cam() -> None:
    img = torch.zeros(3, 16, 12)
    cam = torch.zeros(2, 4, 3)
    cam[1, 0, 0] = 5.0
    out = overlay(img, cam, opacity=1.0, cmap="gray")
    assert out.shape == (16, 12, 3)
    # gray colour map: the CAM maximum is the brightest pixel, far from it is black
    assert out[0, 0].sum() > out[-1, -1].sum() and out[-1, -1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="mask_or_cam"):
        overlay(img, torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="mask_or_cam"):
        overlay(img, torch.zeros(2, 3, 4, dtype=torch.long))


def test_save_grid(tmp_path: Path) -> None:
    from PIL import Image

    ds = SyntheticScenes(length=5, image_size=(16, 24))
    items = [ds[i] for i in range(5)]
    images = torch.stack([t["image"] for t in items])
    masks = torch.stack([t["mask"] for t in items])
    cams = torch.rand(5, 6, 2, 3)
    path = tmp_path / "sub" / "grid.png"
    grid = save_grid(path, images, masks=masks, cams=cams, ncols=2, scale=2, palette=ds.palette, pad=1)
    # 2 columns of 3 tiles, 3 rows; tiles 32 x 48
    assert grid.shape == (3 * 33 + 1, 2 * 3 * 49 + 1, 3)
    with Image.open(path) as im:
        assert im.size == (grid.shape[1], grid.shape[0])
        assert np.array_equal(np.asarray(im.convert("RGB")), grid)
    # first tile = the denormalised image, upscaled
    assert np.array_equal(grid[1:33, 1:49], denormalize(images[0]).repeat(2, 0).repeat(2, 1))
    # images only; automatic scale (>= 128 px tiles)
    g2 = save_grid(tmp_path / "b.png", images[:1])
    assert g2.shape[0] >= 128


def test_save_grid_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images"):
        save_grid(tmp_path / "x.png", torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="masks"):
        save_grid(tmp_path / "x.png", torch.zeros(2, 3, 8, 8), masks=torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="ncols"):
        save_grid(tmp_path / "x.png", torch.zeros(2, 3, 8, 8), ncols=0)
