"""The ViT-PCM equivariance loss ET (paper eq. 5-6): the mosaic student against the warped teacher."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast, to_compute
from wsss_blocks._validate import ShapeError, check_option, check_range, check_shape
from wsss_blocks.pcm._common import BACKGROUNDS, Background, _class_renorm, _mask_max, _targets
from wsss_blocks.pcm.dihedral import _check_codes, dihedral_inverse
from wsss_blocks.pcm.tiling import MosaicRecord, _check_boxes, _resample_boxes

__all__ = ["et_loss", "ETLoss"]

TargetNorm = Literal["tile", "image"]


def _et_target(teacher_probs: Tensor, y: Tensor, record: MosaicRecord, teacher_codes: Tensor | None,
               target_norm: str) -> Tensor:
    p = record.patch_size
    th, tw = record.tile_size
    t = to_compute(teacher_probs.detach())
    if teacher_codes is not None:
        t = dihedral_inverse(t, teacher_codes)
    if target_norm == "image":
        t = _mask_max(t, y)
    t = _resample_boxes(t, torch.div(record.boxes, p, rounding_mode="floor"), (th // p, tw // p),
                        record.align_corners, record.codes)
    if target_norm == "tile":
        t = _mask_max(t, y)
    return _class_renorm(t)


def et_loss(student_probs: Tensor, teacher_probs: Tensor, labels: Tensor, record: MosaicRecord, *,
            teacher_codes: Tensor | None = None, background: Background = "always_one",
            target_norm: TargetNorm = "tile", eps: float = 1e-7,
            reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Equivariance loss between the mosaic student and the warped teacher (ViT-PCM ET, eq. 5-6).

    Target (no gradient): the teacher's probabilities on the branch-1 images are brought into
    tile coordinates (``teacher_to_tiles``) and label-masked / max-normalised /
    class-renormalised (``masked_renormalize``) per tile (``target_norm="tile"``,
    official) or with the mask and max taken on the whole un-flipped teacher map before the
    crop (``"image"``; the class renormalisation stays last). Student: the unmosaicked
    probabilities ``S``, ``Ŝ = clamp(S / Σ_C S, ε, 1-ε)`` (Keras ``CategoricalCrossentropy``),
    ``L = mean over patches of -Σ_c T_c log Ŝ_c``, zero-target patches included. Gradient
    only through ``student_probs``; fp32 (fp64 stays fp64).

    Args:
        student_probs: ``unmosaic`` of the model's probabilities on the mosaics.
        teacher_probs: teacher probabilities on the branch-1 images (detached here).
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        record: the ``MosaicRecord`` of the mosaics.
        teacher_codes: branch 1's dihedral codes, ``None`` when it was not transformed.
        background: see ``mce_loss`` (``"ignore"`` keeps the background in the target).
        target_norm: ``"tile"`` (official) or ``"image"``.
        eps: Keras clip ``ε``.
        reduction: ``"mean"`` (scalar) or ``"none"`` (per patch).

    Shape:
        - student_probs: ``(B, C, th/p, tw/p)`` with ``B`` divisible by 4
        - teacher_probs: ``(B, C, H/p, W/p)``
        - output: scalar, or ``(B, th/p, tw/p)`` for ``reduction="none"``

    Examples:
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
    _check_boxes(record.boxes, dims, hh, ww, p, "record.boxes")
    check_shape("record.codes", record.codes, ["B"], dims, dtype="int")
    _check_codes(student_probs, record.codes, "student_probs", "record.codes")
    if teacher_codes is not None:
        _check_codes(teacher_probs, teacher_codes, "teacher_probs", "teacher_codes")
    check_option("target_norm", target_norm, ("tile", "image"))
    check_option("reduction", reduction, ("mean", "none"))
    check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
    with no_autocast(student_probs.device.type):
        s = to_compute(student_probs)
        with torch.no_grad():
            mode = "always_one" if background == "ignore" else background
            y = _targets(labels, dims["C"], mode, dims, s, "student_probs")
            target = _et_target(teacher_probs, y, record, teacher_codes, target_norm).to(s.dtype)
        s_hat = (s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)).clamp(eps, 1.0 - eps)
        ell = -(target * torch.log(s_hat)).sum(dim=1)
        if reduction == "mean" and ell.numel() == 0:  # an empty batch: a graph-attached 0
            return ell.sum()
        return ell.mean() if reduction == "mean" else ell


class ETLoss(nn.Module):
    """Module form of ``et_loss``.

    Args:
        background: see ``et_loss``.
        target_norm: see ``et_loss``.
        eps: see ``et_loss``.
        reduction: see ``et_loss``.

    Shape:
        - student_probs: ``(B, C, th/p, tw/p)``; teacher_probs: ``(B, C, H/p, W/p)``
        - output: scalar, or ``(B, th/p, tw/p)``

    Examples:
        >>> rec = MosaicRecord(torch.tensor([[0, 0, 1, 2]] * 4), torch.zeros(4, dtype=torch.long),
        ...                    (1, 2), (1, 2), 1, False)
        >>> teacher = torch.tensor([[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]]).expand(4, 3, 1, 2)
        >>> student = torch.tensor([[[0.7, 0.2]], [[0.2, 0.7]], [[0.1, 0.1]]]).expand(4, 3, 1, 2)
        >>> round(ETLoss()(student, teacher, torch.tensor([[1, 0]] * 4), rec).item(), 6)
        0.744435
    """

    def __init__(self, *, background: Background = "always_one", target_norm: TargetNorm = "tile",
                 eps: float = 1e-7, reduction: Literal["mean", "none"] = "mean") -> None:
        super().__init__()
        self.background = check_option("background", background, BACKGROUNDS)
        self.target_norm = check_option("target_norm", target_norm, ("tile", "image"))
        self.eps = float(check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False))
        self.reduction = check_option("reduction", reduction, ("mean", "none"))

    def extra_repr(self) -> str:
        return f"background={self.background!r}, target_norm={self.target_norm!r}, reduction={self.reduction!r}"

    def forward(self, student_probs: Tensor, teacher_probs: Tensor, labels: Tensor, record: MosaicRecord, *,
                teacher_codes: Tensor | None = None) -> Tensor:
        """The ET loss of the unmosaicked student against the teacher; see ``et_loss``."""
        return et_loss(student_probs, teacher_probs, labels, record, teacher_codes=teacher_codes,
                       background=self.background, target_norm=self.target_norm, eps=self.eps,
                       reduction=self.reduction)

