"""ViT-PCM dihedral transforms: per-sample flips and transposes of the equivariance branch (paper §3.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wsss_blocks._validate import ShapeError, check_bool, check_int, check_shape, checks_enabled

__all__ = ["random_dihedral_codes", "dihedral_transform", "dihedral_inverse"]

# code c = lr + 2*ud + 4*tr; the inverse of "flip, flip, transpose" is "transpose, flip, flip",
# which is again a code of the same form: 5 (lr then T) and 6 (ud then T) swap.
_INVERSE = (0, 1, 2, 3, 4, 6, 5, 7)


def random_dihedral_codes(*, batch_size: int, square: bool = True, device: Any = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Uniform random dihedral codes, one per sample.

    The official code draws an LR flip, an UD flip and an H/W transpose independently with
    p = 0.5 each: the same uniform law over the 8 codes ``lr + 2·ud + 4·tr``. With
    ``square=False`` only the 4 flip codes (no transpose) are drawn.

    Args:
        batch_size: number of codes ``B``.
        square: allow the transpose bit (the maps to transform are square).
        device: device of the codes.
        generator: random generator (on ``device``).

    Shape:
        - output: ``(B,)`` int64 in ``[0, 8)`` (``[0, 4)`` when not square)

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> codes = random_dihedral_codes(batch_size=1000, square=False, generator=g)
        >>> codes.dtype, int(codes.min()), int(codes.max())
        (torch.int64, 0, 3)
    """
    n = check_int("batch_size", batch_size, low=0)
    square = check_bool("square", square)
    return torch.randint(0, 8 if square else 4, (n,), device=device, generator=generator)


def _check_codes(maps: Tensor, codes: Tensor, maps_name: str = "maps", codes_name: str = "codes") -> None:
    dims = check_shape(maps_name, maps, ["B", "C", "h", "w"])
    check_shape(codes_name, codes, ["B"], dims, dtype="int")
    if checks_enabled() and codes.device.type == "cpu":
        if bool(((codes < 0) | (codes > 7)).any()):
            raise ShapeError(f"{codes_name}: expected values in [0, 8), got {codes.tolist()}")
    if dims["h"] != dims["w"] and bool((codes >= 4).any()):  # sync-ok: only on non-square maps
        raise ShapeError(
            f"{codes_name}: a transpose code (>= 4) needs a square map, got {maps_name} of shape "
            f"{tuple(maps.shape)}; draw with random_dihedral_codes(square=False)")


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


def _dihedral_gather(maps: Tensor, codes: Tensor) -> Tensor:
    b, c, h, w = maps.shape
    a, bb = _dihedral_source(codes, h, w)
    index = (a * w + bb).reshape(b, 1, h * w).to(maps.device).expand(b, c, h * w)
    return torch.gather(maps.reshape(b, c, h * w), 2, index).reshape(b, c, h, w)


def dihedral_transform(maps: Tensor, codes: Tensor) -> Tensor:
    """Apply a per-sample dihedral transform: LR flip, then UD flip, then H/W transpose.

    Code ``c = lr + 2·ud + 4·tr`` (official order of ``utils.affine_transform``). Codes 5 and 6
    are the 90° rotations (``rot90`` with ``k=1`` and ``k=-1`` over ``(-2, -1)``), 3 is the
    180° rotation and 7 the anti-transpose. One ``gather`` for the whole batch; differentiable.

    Args:
        maps: maps to transform (images, probabilities, features).
        codes: one code in ``[0, 8)`` per sample; codes ``>= 4`` need a square map.

    Shape:
        - maps: ``(B, C, h, w)``; codes: ``(B,)`` int
        - output: ``(B, C, h, w)``

    Raises:
        ShapeError: a transpose code on a non-square map (checked with one host read, only
            when ``h != w``).

    Examples:
        >>> maps = torch.arange(9.0).view(1, 1, 3, 3)
        >>> dihedral_transform(maps, torch.tensor([5]))[0, 0].long().tolist()
        [[2, 5, 8], [1, 4, 7], [0, 3, 6]]
    """
    _check_codes(maps, codes)
    return _dihedral_gather(maps, codes)


def dihedral_inverse(maps: Tensor, codes: Tensor) -> Tensor:
    """Exact inverse of ``dihedral_transform``: transpose, then UD flip, then LR flip.

    Equals ``dihedral_transform`` with the inverse codes ``[0, 1, 2, 3, 4, 6, 5, 7]``.

    Args:
        maps: transformed maps.
        codes: the codes ``dihedral_transform`` was called with.

    Shape:
        - maps: ``(B, C, h, w)``; codes: ``(B,)`` int
        - output: ``(B, C, h, w)``

    Examples:
        >>> maps = torch.randn(8, 2, 4, 4)
        >>> codes = torch.arange(8)
        >>> torch.equal(dihedral_inverse(dihedral_transform(maps, codes), codes), maps)
        True
    """
    _check_codes(maps, codes)
    inverse = torch.tensor(_INVERSE, device=codes.device)[codes.long()]
    return _dihedral_gather(maps, inverse)
