"""CPAL's self-supervised loss: the L1 distance between the CAM and the prototype-aware CAM (eq. 14)."""

from __future__ import annotations

from torch import Tensor

from wsss_blocks._utils import no_autocast, to_compute
from wsss_blocks._validate import check_bool, check_shape

__all__ = ["self_loss"]


def self_loss(
    cams_with_bg: Tensor,
    pacam: Tensor,
    *,
    active: Tensor | None = None,
    detach_pacam: bool = False,
) -> Tensor:
    """CPAL's self-supervised loss (eq. 14): ``sum active * |M - M~| / (B * C * N)``.

    Inactive channels add 0 but the denominator stays ``B*C*N``, so a channel whose PACAM is
    undefined is not pushed to 0. With no active channel the loss is 0 with a graph attached.
    Gradient flows into both maps unless ``detach_pacam``.

    Args:
        cams_with_bg: the CAM network's maps ``M`` with background.
        pacam: the prototype-aware CAM ``M~``.
        active: ``(B, C)`` bool, which channels take part (``None``: all).
        detach_pacam: stop the gradient through ``M~`` (SIPE-style).

    Shape:
        - cams_with_bg, pacam: ``(B, C, h, w)``; active: ``(B, C)`` bool
        - output: ``()`` fp32 (fp64 for fp64 inputs)

    Examples:
        >>> import torch
        >>> cams = torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]]]])
        >>> self_loss(cams, torch.zeros_like(cams), active=torch.tensor([[True, False]])).item()
        0.25
    """
    dims = check_shape("cams_with_bg", cams_with_bg, ["B", "C", "h", "w"], dtype="float")
    check_shape("pacam", pacam, ["B", "C", "h", "w"], dims, dtype="float")
    if active is not None:
        check_shape("active", active, ["B", "C"], dims, dtype="bool")
    target = pacam.detach() if check_bool("detach_pacam", detach_pacam) else pacam
    with no_autocast(cams_with_bg.device.type):
        diff = (to_compute(cams_with_bg) - to_compute(target)).abs()
        if active is not None:
            diff = diff * active.to(diff.dtype)[:, :, None, None]
        return diff.sum() / diff.numel() if diff.numel() else diff.sum()
