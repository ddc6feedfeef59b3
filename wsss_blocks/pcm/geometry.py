"""ViT-PCM geometry: dihedral transforms, the 2×2 mosaic and the teacher's warp (paper §3.3)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from wsss_blocks._validate import (
    ShapeError,
    check_int,
    check_range,
    check_shape,
    checks_enabled,
)

__all__ = [
    "random_dihedral_codes",
    "dihedral_transform",
    "dihedral_inverse",
    "MosaicRecord",
    "mosaic",
    "unmosaic",
    "teacher_to_tiles",
]

# code c = lr + 2*ud + 4*tr; the inverse of "flip, flip, transpose" is "transpose, flip, flip",
# which is again a code of the same form: 5 (lr then T) and 6 (ud then T) swap.
_INVERSE = (0, 1, 2, 3, 4, 6, 5, 7)


def random_dihedral_codes(batch: int, *, square: bool = True, device: Any = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Uniform random dihedral codes, one per sample.

    The official code draws an LR flip, an UD flip and an H/W transpose independently with
    p = 0.5 each: the same uniform law over the 8 codes ``lr + 2·ud + 4·tr``. With
    ``square=False`` only the 4 flip codes (no transpose) are drawn.

    Args:
        batch: number of codes.
        square: allow the transpose bit (the maps to transform are square).
        device: device of the codes.
        generator: random generator (on ``device``).

    Shape:
        - output: ``(batch,)`` int64 in ``[0, 8)`` (``[0, 4)`` when not square)

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> codes = random_dihedral_codes(1000, square=False, generator=g)
        >>> codes.dtype, int(codes.min()), int(codes.max())
        (torch.int64, 0, 3)
    """
    n = check_int("batch", batch, low=0)
    return torch.randint(0, 8 if square else 4, (n,), device=device, generator=generator)


def _check_codes(x: Tensor, codes: Tensor) -> None:
    dims = check_shape("x", x, ["B", "C", "h", "w"])
    check_shape("codes", codes, ["B"], dims, dtype="int")
    if checks_enabled() and codes.device.type == "cpu":
        if bool(((codes < 0) | (codes > 7)).any()):
            raise ShapeError(f"codes: expected values in [0, 8), got {codes.tolist()}")
    if dims["h"] != dims["w"] and bool((codes >= 4).any()):  # sync-ok: only on non-square maps
        raise ShapeError(
            f"codes: a transpose code (>= 4) needs a square map, got x of shape {tuple(x.shape)}; "
            "draw with random_dihedral_codes(square=False)")


def _dihedral_source(codes: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Row and column ``(B, h, w)`` of the source pixel that each output pixel of the code reads."""
    dev = codes.device
    i = torch.arange(h, device=dev)[None, :, None]
    j = torch.arange(w, device=dev)[None, None, :]
    code = codes.long()[:, None, None]
    lr, ud, tr = (code & 1).bool(), ((code >> 1) & 1).bool(), ((code >> 2) & 1).bool()
    a = torch.where(tr, j, i)  # position in the flipped map (square when tr is set)
    bb = torch.where(tr, i, j)
    return torch.where(ud, h - 1 - a, a), torch.where(lr, w - 1 - bb, bb)


def _dihedral_gather(x: Tensor, codes: Tensor) -> Tensor:
    b, c, h, w = x.shape
    a, bb = _dihedral_source(codes, h, w)
    index = (a * w + bb).reshape(b, 1, h * w).to(x.device).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, index).reshape(b, c, h, w)


def dihedral_transform(x: Tensor, codes: Tensor) -> Tensor:
    """Apply a per-sample dihedral transform: LR flip, then UD flip, then H/W transpose.

    Code ``c = lr + 2·ud + 4·tr`` (official order of ``utils.affine_transform``). Codes 5 and 6
    are the 90° rotations (``rot90`` with ``k=1`` and ``k=-1`` over ``(-2, -1)``), 3 is the
    180° rotation and 7 the anti-transpose. One ``gather`` for the whole batch; differentiable.

    Args:
        x: maps to transform (images, probabilities, features).
        codes: one code in ``[0, 8)`` per sample; codes ``>= 4`` need a square map.

    Shape:
        - x: ``(B, C, h, w)``; codes: ``(B,)`` int
        - output: ``(B, C, h, w)``

    Raises:
        ShapeError: a transpose code on a non-square map (checked with one host read, only
            when ``h != w``).

    Example:
        >>> x = torch.arange(9.0).view(1, 1, 3, 3)
        >>> dihedral_transform(x, torch.tensor([5]))[0, 0].long().tolist()
        [[2, 5, 8], [1, 4, 7], [0, 3, 6]]
    """
    _check_codes(x, codes)
    return _dihedral_gather(x, codes)


def dihedral_inverse(x: Tensor, codes: Tensor) -> Tensor:
    """Exact inverse of :func:`dihedral_transform`: transpose, then UD flip, then LR flip.

    Equals :func:`dihedral_transform` with the inverse codes ``[0, 1, 2, 3, 4, 6, 5, 7]``.

    Shape:
        - x: ``(B, C, h, w)``; codes: ``(B,)`` int
        - output: ``(B, C, h, w)``

    Example:
        >>> x = torch.randn(8, 2, 4, 4)
        >>> codes = torch.arange(8)
        >>> torch.equal(dihedral_inverse(dihedral_transform(x, codes), codes), x)
        True
    """
    _check_codes(x, codes)
    inverse = torch.tensor(_INVERSE, device=codes.device)[codes.long()]
    return _dihedral_gather(x, inverse)


class MosaicRecord(NamedTuple):
    """How :func:`mosaic` built its tiles, to warp the teacher into tile coordinates.

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


def _resample_boxes(x: Tensor, boxes: Tensor, size: tuple[int, int], align_corners: bool,
                    codes: Tensor | None = None) -> Tensor:
    """``T_code(F.interpolate(x[b, :, y0:y1, x0:x1], size, "bilinear", align_corners))`` for every ``b`` at once.

    One ``grid_sample`` on the pixel coordinates that ``F.interpolate`` would read inside each
    box, clamped to the box (so the result equals crop-then-interpolate, no anti-aliasing);
    a dihedral code only permutes the sampling grid (no extra pass over the output).
    """
    b, _, hh, ww = x.shape
    oh, ow = size
    dt = x.dtype if x.dtype == torch.float64 else torch.float32
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
    cr = (crop, crop) if isinstance(crop, int) else tuple(crop)
    if len(cr) != 2:
        raise ValueError(f"crop: expected an int or a pair (ch, cw), got {crop!r}")
    ch = check_int("crop[0]", cr[0], low=1)
    cw = check_int("crop[1]", cr[1], low=1)
    if ch % p or cw % p:
        raise ValueError(f"crop: expected multiples of patch_size={p}, got {(ch, cw)}")
    if used and (ch > h or cw > w):
        raise ValueError(f"crop: {(ch, cw)} is larger than the image {(h, w)}")
    return (tile[0], tile[1]), (ch, cw)


def _check_boxes(boxes: Tensor, b: int, h: int, w: int, p: int) -> None:
    check_shape("boxes", boxes, [b, 4], dtype="int")
    bx = boxes.detach().cpu()  # sync-ok: explicit boxes are checked only when passed
    y0, x0, y1, x1 = bx.unbind(1)
    bad = (bx % p != 0).any() or (y0 < 0).any() or (x0 < 0).any() or (y1 > h).any() or (x1 > w).any()
    bad = bad or (y1 <= y0).any() or (x1 <= x0).any()
    if bool(bad):
        raise ValueError(f"boxes: expected (y0, x0, y1, x1) multiples of patch_size={p} with "
                         f"0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}, got {bx.tolist()}")


def mosaic(images: Tensor, *, crop_prob: float = 0.3, crop: int | tuple[int, int] = 128, scale: float = 0.5,
           patch_size: int = 16, dihedral: bool = True, boxes: Tensor | None = None,
           codes: Tensor | None = None, align_corners: bool = False,
           generator: torch.Generator | None = None) -> tuple[Tensor, MosaicRecord]:
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
        - output: ``((B/4, C, 2·th, 2·tw), MosaicRecord)``

    Note:
        The per-sample crop + resize + dihedral code runs as one ``grid_sample`` on the pixel
        grid that ``F.interpolate`` reads inside each box (clamped to the box, permuted by the
        code), which equals the crop-then-interpolate-then-flip loop; the tiling is one
        einops ``rearrange``. No host sync
        with sampled boxes and codes.

    Example:
        >>> images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32)
        >>> m, rec = mosaic(images, crop_prob=0.0, patch_size=8, dihedral=False)
        >>> m.shape, m[0, 0, ::16, ::16].tolist()
        (torch.Size([1, 3, 32, 32]), [[0.0, 1.0], [2.0, 3.0]])
    """
    dims = check_shape("images", images, ["B", "C", "H", "W"], dtype="float")
    b, h, w = dims["B"], dims["H"], dims["W"]
    if b % 4:
        raise ShapeError(f"images: batch must be divisible by 4 for the 2x2 mosaic, got B={b}")
    p = check_int("patch_size", patch_size, low=1)
    check_range("crop_prob", crop_prob, 0.0, 1.0)
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
        _check_boxes(boxes, b, h, w, p)
        boxes = boxes.to(device=dev, dtype=torch.int64)
    if codes is None:
        codes = (random_dihedral_codes(b, square=th == tw, device=dev, generator=generator) if dihedral
                 else torch.zeros(b, dtype=torch.int64, device=dev))
    else:
        check_shape("codes", codes, [b], dtype="int")
        codes = codes.to(device=dev, dtype=torch.int64)
    _check_codes(images.new_empty(b, 0, th, tw), codes)
    tiles = _resample_boxes(images, boxes, (th, tw), align_corners, codes)
    out = rearrange(tiles, "(m r c) ch h w -> m ch (r h) (c w)", r=2, c=2)
    return out, MosaicRecord(boxes, codes, (h, w), (th, tw), p, bool(align_corners))


def unmosaic(maps: Tensor) -> Tensor:
    """Split 2×2 mosaics back into their 4 tiles (top-left, top-right, bottom-left, bottom-right).

    Shape:
        - maps: ``(B/4, C, 2h, 2w)``
        - output: ``(B, C, h, w)``

    Example:
        >>> m = torch.arange(16.0).view(1, 1, 4, 4)
        >>> unmosaic(m)[:, 0].tolist()[1]
        [[2.0, 3.0], [6.0, 7.0]]
    """
    dims = check_shape("maps", maps, ["M", "C", "H2", "W2"])
    if dims["H2"] % 2 or dims["W2"] % 2:
        raise ShapeError(f"maps: expected an even grid (2h, 2w), got shape {tuple(maps.shape)}")
    return rearrange(maps, "m ch (r h) (c w) -> (m r c) ch h w", r=2, c=2)


@torch.no_grad()
def teacher_to_tiles(teacher_probs: Tensor, record: MosaicRecord, teacher_codes: Tensor | None = None) -> Tensor:
    """Warp teacher patch maps into the mosaic tiles' coordinates (official ``compute_cce_loss``).

    ``T1 = dihedral_inverse(T0, teacher_codes)`` (undo branch 1's flips/transpose),
    ``T2`` = the box ``/ p`` of ``T1`` resized bilinearly to ``(th/p, tw/p)`` with
    ``record.align_corners`` (an exact patch window, boxes lie on the patch grid), and
    ``T3 = dihedral_transform(T2, record.codes)``. Runs under ``torch.no_grad()``.

    Args:
        teacher_probs: the teacher's patch probabilities on the branch-1 images.
        record: the :class:`MosaicRecord` of the student mosaic.
        teacher_codes: branch 1's dihedral codes (``None``: the teacher saw un-flipped images).

    Shape:
        - teacher_probs: ``(B, C, H/p, W/p)``
        - output: ``(B, C, th/p, tw/p)``

    Example:
        >>> rec = MosaicRecord(torch.tensor([[0, 0, 4, 4]] * 4), torch.zeros(4, dtype=torch.long),
        ...                    (4, 4), (2, 2), 1, False)
        >>> teacher_to_tiles(torch.ones(4, 3, 4, 4), rec).shape
        torch.Size([4, 3, 2, 2])
    """
    p = record.patch_size
    (hh, ww), (th, tw) = record.image_size, record.tile_size
    dims = check_shape("teacher_probs", teacher_probs, ["B", "C", hh // p, ww // p], dtype="float")
    check_shape("record.boxes", record.boxes, [dims["B"], 4], dtype="int")
    t = teacher_probs.detach()
    if teacher_codes is not None:
        check_shape("teacher_codes", teacher_codes, [dims["B"]], dtype="int")
        t = dihedral_inverse(t, teacher_codes)
    _check_codes(t.new_empty(dims["B"], 0, th // p, tw // p), record.codes)
    return _resample_boxes(t, torch.div(record.boxes, p, rounding_mode="floor"), (th // p, tw // p),
                           record.align_corners, record.codes)
