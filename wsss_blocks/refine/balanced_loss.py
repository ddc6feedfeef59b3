"""ToCo's balanced background / foreground cross-entropy for training a segmentation head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import ShapeError, check_int, check_shape, checks_enabled

__all__ = ["seg_loss", "SegLoss"]


def seg_loss(logits: Tensor, masks: Tensor, *, ignore_index: int = 255) -> Tensor:
    """Balanced cross-entropy over pseudo labels: half background, half foreground (ToCo).

    With the per-pixel cross-entropy ``ce_p = -log softmax(logits_p)[y_p]`` (``y = masks``), the
    background pixels ``G = {y == 0}`` and the foreground pixels
    ``F = {0 < y != ignore_index}``::

        L = 0.5 * sum_{p in G} ce_p / |G| + 0.5 * sum_{p in F} ce_p / |F|

    as ToCo's ``get_seg_loss`` (two mean cross-entropies, one per set). Unlike ToCo, an
    empty set contributes 0 instead of NaN (reported in ToCo's issue tracker as #3, #8 and
    #15): with every pixel ignored the loss is a graph-attached 0. Logits at another
    resolution than ``masks`` are first upsampled to it (bilinear, ``align_corners=False``),
    as ToCo does with its decoder output. Computed in fp32 with autocast off.

    Args:
        logits: segmentation logits, channel 0 = background, channel ``k + 1`` = class ``k``.
        masks: pseudo-label map, values in ``0..K`` or ``ignore_index``.
        ignore_index: label of ignored pixels (unsure or padding).

    Shape:
        - logits: ``(B, K + 1, h, w)`` float
        - masks: ``(B, H, W)`` integer
        - output: scalar, fp32 (fp64 for fp64 logits)

    Examples:
        >>> logits = torch.zeros(1, 3, 1, 3)                 # uniform: ce = log 3 everywhere
        >>> masks = torch.tensor([[[0, 2, 255]]])
        >>> round(seg_loss(logits, masks).item(), 6) == round(torch.log(torch.tensor(3.0)).item(), 6)
        True
        >>> seg_loss(logits, torch.full((1, 1, 3), 255)).item()   # all ignored: 0, not NaN
        0.0
    """
    dims = check_shape("logits", logits, ["B", "C", "h", "w"], dtype="float")
    check_shape("masks", masks, ["B", "H", "W"], dims, dtype="int")
    ignore = check_int("ignore_index", ignore_index)
    n_cls = logits.shape[1]
    if checks_enabled() and masks.device.type == "cpu":  # CPU tensor: no device sync
        bad = (masks != ignore) & ((masks < 0) | (masks >= n_cls))
        if bool(bad.any()):
            value = masks[bad][0].item()  # sync-ok: CPU tensor, error path
            raise ShapeError(
                f"masks: expected values in [0, {n_cls - 1}] or ignore_index={ignore} "
                f"for logits with C={n_cls} channels, got {value}"
            )
    dtype = compute_dtype(logits)
    with no_autocast(logits.device.type):
        x = logits.to(dtype)
        if x.shape[-2:] != masks.shape[-2:]:
            x = F.interpolate(x, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        keep = masks != ignore
        index = torch.where(keep, masks, torch.zeros_like(masks)).long()
        ce = -x.log_softmax(dim=1).gather(1, index[:, None])[:, 0]  # (B, H, W)
        bg = (masks == 0).to(dtype)
        fg = (keep & (masks != 0)).to(dtype)
        loss_bg = (ce * bg).sum() / bg.sum().clamp_min(1.0)
        loss_fg = (ce * fg).sum() / fg.sum().clamp_min(1.0)
        return 0.5 * loss_bg + 0.5 * loss_fg


class SegLoss(nn.Module):
    """Module form of ``seg_loss``.

    Args:
        ignore_index: see ``seg_loss``.

    Shape:
        - logits: ``(B, K + 1, h, w)``; masks: ``(B, H, W)`` integer
        - output: scalar

    Examples:
        >>> loss = SegLoss()
        >>> loss(torch.zeros(2, 21, 28, 28), torch.zeros(2, 448, 448, dtype=torch.long)).shape
        torch.Size([])
    """

    def __init__(self, *, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = check_int("ignore_index", ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"

    def forward(self, logits: Tensor, masks: Tensor) -> Tensor:
        """See ``seg_loss``."""
        return seg_loss(logits, masks, ignore_index=self.ignore_index)
