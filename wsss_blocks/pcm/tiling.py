"""ViT-PCM mosaic: 2×2 tiles of rescaled, cropped, flipped images and the teacher's warp (paper §3.3)."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from wsss_blocks._utils import compute_dtype
from wsss_blocks._validate import ShapeError, check_bool, check_int, check_range, check_shape, checks_enabled
from wsss_blocks.pcm.dihedral import _check_codes, _dihedral_source, dihedral_inverse, random_dihedral_codes

__all__ = ["MosaicRecord", "MosaicOutput", "mosaic", "unmosaic", "teacher_to_tiles"]


class MosaicRecord(NamedTuple):
    """How ``mosaic`` built its tiles, to warp the teacher into tile coordinates.

    Attributes:
        boxes: ``(B, 4)`` int64 ``(y0, x0, y1, x1)`` in source-image pixels, end-exclusive,
            on the patch grid.
        codes: ``(B,)`` int64 dihedral code applied to each tile after resizing.
        image_size: source image size ``(H, W)``.
        tile_size: tile size ``(th, tw)`` (the mosaic is ``(2·th, 2·tw)``).
        patch_size: ``p``.
        align_corners: the bilinear convention used for the resize (and for the teacher's).
    """

    boxes: Tensor
    codes: Tensor
    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    patch_size: int
    align_corners: bool


class MosaicOutput(NamedTuple):
    """What ``mosaic`` returns (unpacks as ``images, record``).

    Attributes:
        images: the mosaics ``(B/4, C, 2·th, 2·tw)``.
        record: the ``MosaicRecord`` that warps the teacher into tile coordinates.
    """

    images: Tensor
    record: MosaicRecord


def _resample_boxes(x: Tensor, boxes: Tensor, size: tuple[int, int], align_corners: bool,
                    codes: Tensor | None = None) -> Tensor:
    """``T_code(F.interpolate(x[b, :, y0:y1, x0:x1], size, "bilinear", align_corners))`` for every ``b`` at once.

    One ``grid_sample`` on the pixel coordinates that ``F.interpolate`` would read inside each
    box, clamped to the box (so the result equals crop-then-interpolate, no anti-aliasing);
    a dihedral code only permutes the sampling grid (no extra pass over the output).
    """
    b, _, hh, ww = x.shape
    oh, ow = size
    dt = compute_dtype(x)
    bx = boxes.to(device=x.device, dtype=dt)

    def axis(start: Tensor, length: Tensor, n: int) -> Tensor:
        t = torch.arange(n, device=x.device, dtype=dt)[None]
        length = length[:, None]
        if align_corners:
            src = t * (length - 1) / (n - 1) if n > 1 else torch.zeros_like(t * length)
        else:
            src = ((t + 0.5) * length / n - 0.5).clamp_min(0.0)
        return start[:, None] + torch.minimum(src, length - 1)

    gy = axis(bx[:, 0], bx[:, 2] - bx[:, 0], oh) / max(hh - 1, 1) * 2 - 1  # (B, oh)
    gx = axis(bx[:, 1], bx[:, 3] - bx[:, 1], ow) / max(ww - 1, 1) * 2 - 1  # (B, ow)
    if codes is None:
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    else:
        rows, cols = _dihedral_source(codes.to(x.device), oh, ow)  # (B, oh, ow)
        grid = torch.stack([torch.gather(gx, 1, cols.flatten(1)), torch.gather(gy, 1, rows.flatten(1))], -1)
        grid = grid.view(b, oh, ow, 2)
    out = F.grid_sample(x.to(dt), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(x.dtype)


def _tile_geometry(h: int, w: int, scale: float, crop: int | tuple[int, int], p: int, used: bool
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    check_range("scale", scale, 0.0, low_inclusive=False)
    tile = []
    for n, side in (("th", h), ("tw", w)):
        t = round(side * scale)
        if abs(side * scale - t) > 1e-9 or t < 1 or t % p:
            raise ValueError(f"scale: {n} = scale * {side} = {side * scale} must be a positive multiple of "
                             f"patch_size={p}")
        tile.append(t)
    if isinstance(crop, Sequence) and not isinstance(crop, str):
        if len(crop) != 2:
            raise ValueError(f"crop: expected an int or a pair (ch, cw), got {crop!r}")
        ch = check_int("crop[0]", crop[0], low=1)
        cw = check_int("crop[1]", crop[1], low=1)
    else:
        ch = cw = check_int("crop", crop, low=1)
    if ch % p or cw % p:
        raise ValueError(f"crop: expected multiples of patch_size={p}, got {(ch, cw)}")
    if used and (ch > h or cw > w):
        raise ValueError(f"crop: {(ch, cw)} is larger than the image {(h, w)}")
    return (tile[0], tile[1]), (ch, cw)


def _check_boxes(boxes: Tensor, dims: MutableMapping[str, int], h: int, w: int, p: int, name: str = "boxes") -> None:
    check_shape(name, boxes, ["B", 4], dims, dtype="int")
    if not (checks_enabled() and boxes.device.type == "cpu"):
        return
    bx = boxes.detach()
    y0, x0, y1, x1 = bx.unbind(1)
    bad = (bx % p != 0).any() or (y0 < 0).any() or (x0 < 0).any() or (y1 > h).any() or (x1 > w).any()
    bad = bad or (y1 <= y0).any() or (x1 <= x0).any()
    if bool(bad):  # CPU tensor: no device sync
        raise ValueError(f"{name}: expected (y0, x0, y1, x1) multiples of patch_size={p} with "
                         f"0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}, got {bx.tolist()}")


def mosaic(images: Tensor, *, crop_prob: float = 0.3, crop: int | tuple[int, int] = 128, scale: float = 0.5,
           patch_size: int = 16, dihedral: bool = True, boxes: Tensor | None = None,
           codes: Tensor | None = None, align_corners: bool = False,
           generator: torch.Generator | None = None) -> MosaicOutput:
    """The ViT-PCM equivariance branch input: groups of 4 rescaled images tiled 2×2.

    Per sample: with probability ``crop_prob`` a ``crop`` box whose corner lies on the patch
    grid (starts uniform over the valid positions), else the whole image; the box is resized
    bilinearly to the tile ``(th, tw) = scale·(H, W)`` and transformed by a random dihedral
    code. Images ``4m .. 4m+3`` form mosaic ``m`` as top-left, top-right, bottom-left,
    bottom-right. Official: 128 crops with p = 0.3 (VOC), tiles 192 of 384, flips and
    transpose with p = 0.5 each, ``align_corners=True``.

    Args:
        images: the branch-2 images (any channel count).
        crop_prob: probability of a crop.
        crop: crop size ``c`` or ``(ch, cw)`` in pixels, multiples of ``patch_size``, at most
            the image size (checked only when ``crop_prob > 0`` and no ``boxes`` are given).
        scale: tile size over image size; the tile must be a multiple of ``patch_size``.
        patch_size: ``p``.
        dihedral: draw random tile codes (else code 0).
        boxes: explicit ``(B, 4)`` boxes ``(y0, x0, y1, x1)`` instead of random ones.
        codes: explicit ``(B,)`` tile codes instead of random ones.
        align_corners: bilinear convention of the resize (stored in the record).
        generator: random generator on ``images.device``.

    Shape:
        - images: ``(B, C, H, W)`` with ``B`` divisible by 4
        - output: ``MosaicOutput`` with ``images`` ``(B/4, C, 2·th, 2·tw)`` and the record

    Note:
        The per-sample crop + resize + dihedral code runs as one ``grid_sample`` on the pixel
        grid that ``F.interpolate`` reads inside each box (clamped to the box, permuted by the
        code), which equals the crop-then-interpolate-then-flip loop; the tiling is one
        einops ``rearrange``. No host sync
        with sampled boxes and codes.

    Examples:
        >>> images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32)
        >>> out = mosaic(images, crop_prob=0.0, patch_size=8, dihedral=False)
        >>> out.images.shape, out.images[0, 0, ::16, ::16].tolist(), out.record.tile_size
        (torch.Size([1, 3, 32, 32]), [[0.0, 1.0], [2.0, 3.0]], (16, 16))
    """
    dims = check_shape("images", images, ["B", "C", "H", "W"], dtype="float")
    b, h, w = dims["B"], dims["H"], dims["W"]
    if b % 4:
        raise ShapeError(f"images: batch must be divisible by 4 for the 2x2 mosaic, got B={b}")
    p = check_int("patch_size", patch_size, low=1)
    check_range("crop_prob", crop_prob, 0.0, 1.0)
    dihedral = check_bool("dihedral", dihedral)
    align_corners = check_bool("align_corners", align_corners)
    if h % p or w % p:
        raise ValueError(f"images: size {(h, w)} must be a multiple of patch_size={p}")
    (th, tw), (ch, cw) = _tile_geometry(h, w, scale, crop, p, crop_prob > 0 and boxes is None)
    ch, cw = min(ch, h), min(cw, w)
    dev = images.device
    if boxes is None:
        take = torch.rand(b, device=dev, generator=generator) < crop_prob
        y0 = torch.randint(0, (h - ch) // p + 1, (b,), device=dev, generator=generator) * p
        x0 = torch.randint(0, (w - cw) // p + 1, (b,), device=dev, generator=generator) * p
        zero = torch.zeros_like(y0)
        y0, x0 = torch.where(take, y0, zero), torch.where(take, x0, zero)
        boxes = torch.stack([y0, x0, torch.where(take, y0 + ch, zero + h),
                             torch.where(take, x0 + cw, zero + w)], dim=1)
    else:
        _check_boxes(boxes, dims, h, w, p)
        boxes = boxes.to(device=dev, dtype=torch.int64)
    if codes is None:
        codes = (random_dihedral_codes(batch_size=b, square=th == tw, device=dev, generator=generator) if dihedral
                 else torch.zeros(b, dtype=torch.int64, device=dev))
    else:
        check_shape("codes", codes, [b], dtype="int")
        codes = codes.to(device=dev, dtype=torch.int64)
    _check_codes(images.new_empty(b, 0, th, tw), codes, maps_name="tiles")
    tiles = _resample_boxes(images, boxes, (th, tw), align_corners, codes)
    out = rearrange(tiles, "(m r c) ch h w -> m ch (r h) (c w)", r=2, c=2)
    return MosaicOutput(out, MosaicRecord(boxes, codes, (h, w), (th, tw), p, bool(align_corners)))


def unmosaic(maps: Tensor) -> Tensor:
    """Split 2×2 mosaics back into their 4 tiles (top-left, top-right, bottom-left, bottom-right).

    Mosaic ``m`` gives tiles ``4m .. 4m+3``, the inverse of the tiling of ``mosaic``.

    Args:
        maps: maps on the mosaics (e.g. the model's probabilities on ``MosaicOutput.images``).

    Shape:
        - maps: ``(B/4, C, 2h, 2w)``
        - output: ``(B, C, h, w)``

    Examples:
        >>> m = torch.arange(16.0).view(1, 1, 4, 4)
        >>> unmosaic(m)[:, 0].tolist()[1]
        [[2.0, 3.0], [6.0, 7.0]]
    """
    dims = check_shape("maps", maps, ["M", "C", "H2", "W2"])
    if dims["H2"] % 2 or dims["W2"] % 2:
        raise ShapeError(f"maps: expected an even grid (2h, 2w), got shape {tuple(maps.shape)}")
    return rearrange(maps, "m ch (r h) (c w) -> (m r c) ch h w", r=2, c=2)


@torch.no_grad()
def teacher_to_tiles(teacher_probs: Tensor, record: MosaicRecord, *,
                     teacher_codes: Tensor | None = None) -> Tensor:
    """Warp teacher patch maps into the mosaic tiles' coordinates (official ``compute_cce_loss``).

    ``T1 = dihedral_inverse(T0, teacher_codes)`` (undo branch 1's flips/transpose),
    ``T2`` = the box ``/ p`` of ``T1`` resized bilinearly to ``(th/p, tw/p)`` with
    ``record.align_corners`` (an exact patch window, boxes lie on the patch grid), and
    ``T3 = dihedral_transform(T2, record.codes)``. Runs under ``torch.no_grad()``.

    Args:
        teacher_probs: the teacher's patch probabilities on the branch-1 images.
        record: the ``MosaicRecord`` of the student mosaic.
        teacher_codes: branch 1's dihedral codes (``None``: the teacher saw un-flipped images).

    Shape:
        - teacher_probs: ``(B, C, H/p, W/p)``
        - output: ``(B, C, th/p, tw/p)``

    Examples:
        >>> rec = MosaicRecord(torch.tensor([[0, 0, 4, 4]] * 4), torch.zeros(4, dtype=torch.long),
        ...                    (4, 4), (2, 2), 1, False)
        >>> teacher_to_tiles(torch.ones(4, 3, 4, 4), rec).shape
        torch.Size([4, 3, 2, 2])
    """
    p = record.patch_size
    (hh, ww), (th, tw) = record.image_size, record.tile_size
    dims = check_shape("teacher_probs", teacher_probs, ["B", "C", hh // p, ww // p], dtype="float")
    _check_boxes(record.boxes, dims, hh, ww, p, "record.boxes")
    t = teacher_probs.detach()
    if teacher_codes is not None:
        _check_codes(t, teacher_codes, "teacher_probs", "teacher_codes")
        t = dihedral_inverse(t, teacher_codes)
    _check_codes(t.new_empty(dims["B"], 0, th // p, tw // p), record.codes, maps_name="tiles",
                 codes_name="record.codes")
    return _resample_boxes(t, torch.div(record.boxes, p, rounding_mode="floor"), (th // p, tw // p),
                           record.align_corners, record.codes)
