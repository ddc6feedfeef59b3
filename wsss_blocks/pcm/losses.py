"""ViT-PCM losses and masks: MCE (paper eq. 3), the equivariance loss ET (eq. 5-6), pseudo masks."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import (
    ShapeError,
    check_labels,
    check_option,
    check_range,
    check_shape,
    check_size,
)
from wsss_blocks.pcm.geometry import MosaicRecord, _check_codes, _resample_boxes, dihedral_inverse

__all__ = [
    "Background",
    "mce_loss",
    "MCELoss",
    "masked_renormalize",
    "et_loss",
    "ETLoss",
    "pseudo_mask",
]

Background = Literal["always_one", "from_labels", "ignore"]
_MODES = ("always_one", "from_labels", "ignore")


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _targets(labels: Tensor, channels: int, background: str, dims: MutableMapping[str, int],
             like: Tensor) -> Tensor:
    """``(B, C)`` targets: ``[1, labels]`` (``always_one`` / ``ignore``) or ``labels`` (``from_labels``)."""
    check_option("background", background, _MODES)
    if background == "from_labels":
        check_labels("labels", labels, dims, pattern=("B", "C"))
        return labels.to(device=like.device, dtype=like.dtype)
    if channels < 2:
        raise ShapeError(f"labels: background={background!r} needs a background channel, got C={channels}")
    dims.setdefault("K", channels - 1)
    check_labels("labels", labels, dims, pattern=("B", "K"))
    y = labels.to(device=like.device, dtype=like.dtype)
    return torch.cat([torch.ones_like(y[:, :1]), y], dim=1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """Keras ``divide_no_nan``: ``num / den`` where ``den != 0``, else 0 (no NaN gradient)."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def mce_loss(pooled_probs: Tensor, labels: Tensor, background: Background = "always_one", *,
             eps: float = 1e-7) -> Tensor:
    """Multi-label binary cross-entropy on the GMP class probabilities (ViT-PCM MCE, eq. 3).

    Targets ``y``: ``[1, labels]`` (``"always_one"``: every image has background),
    ``labels`` as given with a background column (``"from_labels"``: the official code takes
    it from the GT mask; also how a classifier without background, ``C = K``, is trained), or
    ``ŷ[:, 1:]`` against ``labels`` (``"ignore"``: background left out of MCE only). Keras
    ``BinaryCrossentropy``: ``ŷc = clamp(ŷ, ε, 1-ε)``,
    ``ℓ = -[y·log(ŷc+ε) + (1-y)·log(1-ŷc+ε)]``, mean over images and columns. fp32 (fp64
    stays fp64). A fully wrong ``ŷ`` gives ``-log(2ε)`` (15.4249), finite, zero gradient.

    Args:
        pooled_probs: GMP probabilities ``ŷ`` (:attr:`PCMOutput.pooled`).
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        background: ``"always_one"``, ``"from_labels"`` or ``"ignore"``.
        eps: Keras clip ``ε``.

    Shape:
        - pooled_probs: ``(B, C)``; labels: ``(B, C-1)`` or ``(B, C)``
        - output: scalar

    Example:
        >>> y_hat = torch.tensor([[0.8, 0.9, 0.1]])
        >>> round(mce_loss(y_hat, torch.tensor([[1, 0]])).item(), 6)
        0.144621
    """
    dims = check_shape("pooled_probs", pooled_probs, ["B", "C"], dtype="float")
    check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
    with no_autocast(pooled_probs.device.type):
        p = _wide(pooled_probs)
        y = _targets(labels, dims["C"], background, dims, p)
        if background == "ignore":
            p, y = p[:, 1:], y[:, 1:]
        pc = p.clamp(eps, 1.0 - eps)
        ell = -(y * torch.log(pc + eps) + (1.0 - y) * torch.log(1.0 - pc + eps))
        return ell.mean()


class MCELoss(nn.Module):
    """Module form of :func:`mce_loss`.

    Args:
        background: see :func:`mce_loss`.
        eps: see :func:`mce_loss`.

    Shape:
        - pooled_probs: ``(B, C)``; labels: ``(B, C-1)`` or ``(B, C)``
        - output: scalar

    Example:
        >>> loss = MCELoss(background="ignore")
        >>> round(loss(torch.tensor([[0.8, 0.9, 0.1]]), torch.tensor([[1, 0]])).item(), 6)
        0.10536
    """

    def __init__(self, background: Background = "always_one", *, eps: float = 1e-7) -> None:
        super().__init__()
        self.background = check_option("background", background, _MODES)
        self.eps = float(check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False))

    def extra_repr(self) -> str:
        return f"background={self.background!r}, eps={self.eps}"

    def forward(self, pooled_probs: Tensor, labels: Tensor) -> Tensor:
        """See :func:`mce_loss`."""
        return mce_loss(pooled_probs, labels, self.background, eps=self.eps)


def _mask_max(probs: Tensor, y: Tensor) -> Tensor:
    m = probs * y[:, :, None, None]
    return _safe_div(m, m.amax(dim=(-2, -1), keepdim=True))


def _class_renorm(m: Tensor) -> Tensor:
    return _safe_div(m, m.sum(dim=1, keepdim=True))


def masked_renormalize(probs: Tensor, labels: Tensor, background: Background = "always_one") -> Tensor:
    """Label-mask, max-normalise and class-renormalise patch probabilities (official ``merge_class_labels``).

    ``M = P·y`` (absent classes zeroed; ``y`` as in :func:`mce_loss`, ``"ignore"`` keeps the
    background), ``M̂ = M / max_{h,w} M`` per (image, class), ``T = M̂ / Σ_C M̂`` per patch.
    Both divisions give 0 where the denominator is 0 (Keras ``divide_no_nan``, no ε): an
    absent class or an all-zero map gives a zero channel, a patch with every kept channel 0
    gives an all-zero target.

    Args:
        probs: patch probabilities.
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        background: see :func:`mce_loss`.

    Shape:
        - probs: ``(B, C, h, w)``
        - output: ``(B, C, h, w)`` (fp32, fp64 for fp64)

    Example:
        >>> probs = torch.tensor([[[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]]])   # (1, 3, 1, 2)
        >>> t = masked_renormalize(probs, torch.tensor([[1, 0]]))
        >>> [[round(v, 4) for v in row] for row in t[0, :, 0].T.tolist()]
        [[0.6667, 0.3333, 0.0], [0.2857, 0.7143, 0.0]]
    """
    dims = check_shape("probs", probs, ["B", "C", "h", "w"], dtype="float")
    with no_autocast(probs.device.type):
        p = _wide(probs)
        y = _targets(labels, dims["C"], "always_one" if background == "ignore" else background, dims, p)
        return _class_renorm(_mask_max(p, y))


def _et_target(teacher_probs: Tensor, y: Tensor, record: MosaicRecord, teacher_codes: Tensor | None,
               target_norm: str) -> Tensor:
    p = record.patch_size
    th, tw = record.tile_size
    t = _wide(teacher_probs.detach())
    if teacher_codes is not None:
        t = dihedral_inverse(t, teacher_codes)
    if target_norm == "image":
        t = _mask_max(t, y)
    t = _resample_boxes(t, torch.div(record.boxes, p, rounding_mode="floor"), (th // p, tw // p),
                        record.align_corners, record.codes)
    if target_norm == "tile":
        t = _mask_max(t, y)
    return _class_renorm(t)


def et_loss(student_probs: Tensor, teacher_probs: Tensor, labels: Tensor, record: MosaicRecord,
            teacher_codes: Tensor | None = None, *, background: Background = "always_one",
            target_norm: Literal["tile", "image"] = "tile", eps: float = 1e-7,
            reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Equivariance loss between the mosaic student and the warped teacher (ViT-PCM ET, eq. 5-6).

    Target (no gradient): the teacher's probabilities on the branch-1 images are brought into
    tile coordinates (:func:`teacher_to_tiles`) and label-masked / max-normalised /
    class-renormalised (:func:`masked_renormalize`) per tile (``target_norm="tile"``,
    official) or with the mask and max taken on the whole un-flipped teacher map before the
    crop (``"image"``; the class renormalisation stays last). Student: the unmosaicked
    probabilities ``S``, ``Ŝ = clamp(S / Σ_C S, ε, 1-ε)`` (Keras ``CategoricalCrossentropy``),
    ``L = mean over patches of -Σ_c T_c log Ŝ_c``, zero-target patches included. Gradient
    only through ``student_probs``; fp32 (fp64 stays fp64).

    Args:
        student_probs: ``unmosaic`` of the model's probabilities on the mosaics.
        teacher_probs: teacher probabilities on the branch-1 images (detached here).
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        record: the :class:`MosaicRecord` of the mosaics.
        teacher_codes: branch 1's dihedral codes, ``None`` when it was not transformed.
        background: see :func:`mce_loss` (``"ignore"`` keeps the background in the target).
        target_norm: ``"tile"`` (official) or ``"image"``.
        eps: Keras clip ``ε``.
        reduction: ``"mean"`` (scalar) or ``"none"`` (per patch).

    Shape:
        - student_probs: ``(B, C, th/p, tw/p)`` with ``B`` divisible by 4
        - teacher_probs: ``(B, C, H/p, W/p)``
        - output: scalar, or ``(B, th/p, tw/p)`` for ``reduction="none"``

    Example:
        >>> rec = MosaicRecord(torch.tensor([[0, 0, 1, 2]] * 4), torch.zeros(4, dtype=torch.long),
        ...                    (1, 2), (1, 2), 1, False)
        >>> teacher = torch.tensor([[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]]).expand(4, 3, 1, 2)
        >>> round(et_loss(torch.full((4, 3, 1, 2), 1 / 3), teacher, torch.tensor([[1, 0]] * 4), rec).item(), 6)
        1.098612
    """
    p = record.patch_size
    (hh, ww), (th, tw) = record.image_size, record.tile_size
    dims = check_shape("student_probs", student_probs, ["B", "C", th // p, tw // p], dtype="float")
    if dims["B"] % 4:
        raise ShapeError(f"student_probs: batch must be divisible by 4 (mosaic tiles), got B={dims['B']}")
    check_shape("teacher_probs", teacher_probs, ["B", "C", hh // p, ww // p], dims, dtype="float")
    check_shape("record.boxes", record.boxes, ["B", 4], dims, dtype="int")
    check_shape("record.codes", record.codes, ["B"], dims, dtype="int")
    _check_codes(student_probs, record.codes)
    if teacher_codes is not None:
        check_shape("teacher_codes", teacher_codes, ["B"], dims, dtype="int")
    check_option("target_norm", target_norm, ("tile", "image"))
    check_option("reduction", reduction, ("mean", "none"))
    check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
    with no_autocast(student_probs.device.type):
        s = _wide(student_probs)
        with torch.no_grad():
            mode = "always_one" if background == "ignore" else background
            y = _targets(labels, dims["C"], mode, dims, s)
            target = _et_target(teacher_probs, y, record, teacher_codes, target_norm).to(s.dtype)
        s_hat = (s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)).clamp(eps, 1.0 - eps)
        ell = -(target * torch.log(s_hat)).sum(dim=1)
        return ell.mean() if reduction == "mean" else ell


class ETLoss(nn.Module):
    """Module form of :func:`et_loss`.

    Args:
        background: see :func:`et_loss`.
        target_norm: see :func:`et_loss`.
        eps: see :func:`et_loss`.
        reduction: see :func:`et_loss`.

    Shape:
        - student_probs: ``(B, C, th/p, tw/p)``; teacher_probs: ``(B, C, H/p, W/p)``
        - output: scalar, or ``(B, th/p, tw/p)``

    Example:
        >>> rec = MosaicRecord(torch.tensor([[0, 0, 1, 2]] * 4), torch.zeros(4, dtype=torch.long),
        ...                    (1, 2), (1, 2), 1, False)
        >>> teacher = torch.tensor([[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]]).expand(4, 3, 1, 2)
        >>> student = torch.tensor([[[0.7, 0.2]], [[0.2, 0.7]], [[0.1, 0.1]]]).expand(4, 3, 1, 2)
        >>> round(ETLoss()(student, teacher, torch.tensor([[1, 0]] * 4), rec).item(), 6)
        0.744435
    """

    def __init__(self, *, background: Background = "always_one", target_norm: Literal["tile", "image"] = "tile",
                 eps: float = 1e-7, reduction: Literal["mean", "none"] = "mean") -> None:
        super().__init__()
        self.background = check_option("background", background, _MODES)
        self.target_norm = check_option("target_norm", target_norm, ("tile", "image"))
        self.eps = float(check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False))
        self.reduction = check_option("reduction", reduction, ("mean", "none"))

    def extra_repr(self) -> str:
        return f"background={self.background!r}, target_norm={self.target_norm!r}, reduction={self.reduction!r}"

    def forward(self, student_probs: Tensor, teacher_probs: Tensor, labels: Tensor, record: MosaicRecord,
                teacher_codes: Tensor | None = None) -> Tensor:
        """See :func:`et_loss`."""
        return et_loss(student_probs, teacher_probs, labels, record, teacher_codes,
                       background=self.background, target_norm=self.target_norm, eps=self.eps,
                       reduction=self.reduction)


@torch.no_grad()
def pseudo_mask(probs: Tensor, labels: Tensor | None = None, size: tuple[int, int] | None = None, *,
                align_corners: bool = False) -> Tensor:
    """Baseline pseudo mask (official BPM): arg-max over classes, background = channel 0.

    With labels: ``Q = masked_renormalize(P, labels)``; without: ``Q = P`` (raw, official
    test split). ``Q`` is upsampled bilinearly to ``size`` (official ``align_corners=True``)
    and arg-maxed over classes; ties go to the lower index, so an all-zero patch is
    background. No threshold. Runs under ``torch.no_grad()``.

    Args:
        probs: patch probabilities with the background channel 0.
        labels: ``(B, K)`` image labels, or ``None``.
        size: output ``(H, W)``; ``None`` keeps the grid.
        align_corners: bilinear convention of the upsampling.

    Shape:
        - probs: ``(B, K+1, h, w)``
        - output: ``(B, H, W)`` int64, 0 = background, ``k + 1`` = class ``k``

    Example:
        >>> probs = torch.tensor([[[[0.6, 0.8, 0.5]], [[0.4, 0.1, 0.2]], [[0.0, 0.1, 0.3]]]])
        >>> pseudo_mask(probs, torch.tensor([[1, 1]]))[0].tolist()
        [[1, 0, 2]]
    """
    dims = check_shape("probs", probs, ["B", "C", "h", "w"], dtype="float")
    if dims["C"] < 2:
        raise ShapeError(f"probs: pseudo_mask needs the background channel 0 and a class, got C={dims['C']}")
    q = _wide(probs) if labels is None else masked_renormalize(probs, labels, "always_one")
    if size is not None:
        size = check_size("size", size)
        if size != (dims["h"], dims["w"]):
            q = F.interpolate(q, size=size, mode="bilinear", align_corners=align_corners)
    return q.argmax(dim=1)
