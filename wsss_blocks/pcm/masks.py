"""ViT-PCM label-masked renormalisation of patch probabilities and the baseline pseudo mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss_blocks._utils import no_autocast, to_compute
from wsss_blocks._validate import ShapeError, check_shape, check_size
from wsss_blocks.pcm._common import Background, _class_renorm, _mask_max, _targets

__all__ = ["masked_renormalize", "pseudo_mask"]


def masked_renormalize(probs: Tensor, labels: Tensor, *, background: Background = "always_one") -> Tensor:
    """Label-mask, max-normalise and class-renormalise patch probabilities (official ``merge_class_labels``).

    ``M = P·y`` (absent classes zeroed; ``y`` as in ``mce_loss``, ``"ignore"`` keeps the
    background), ``M̂ = M / max_{h,w} M`` per (image, class), ``T = M̂ / Σ_C M̂`` per patch.
    Both divisions give 0 where the denominator is 0 (Keras ``divide_no_nan``, no ε): an
    absent class or an all-zero map gives a zero channel, a patch with every kept channel 0
    gives an all-zero target.

    Args:
        probs: patch probabilities, background at channel 0.
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        background: see ``mce_loss``.

    Shape:
        - probs: ``(B, C, h, w)``
        - output: ``(B, C, h, w)`` (fp32, fp64 for fp64)

    Examples:
        >>> probs = torch.tensor([[[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]]])   # (1, 3, 1, 2)
        >>> t = masked_renormalize(probs, torch.tensor([[1, 0]]))
        >>> [[round(v, 4) for v in row] for row in t[0, :, 0].T.tolist()]
        [[0.6667, 0.3333, 0.0], [0.2857, 0.7143, 0.0]]
    """
    dims = check_shape("probs", probs, ["B", "C", "h", "w"], dtype="float")
    with no_autocast(probs.device.type):
        p = to_compute(probs)
        y = _targets(labels, dims["C"], "always_one" if background == "ignore" else background, dims, p)
        return _class_renorm(_mask_max(p, y))


@torch.no_grad()
def pseudo_mask(probs: Tensor, labels: Tensor | None = None, *, size: tuple[int, int] | None = None,
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

    Examples:
        >>> probs = torch.tensor([[[[0.6, 0.8, 0.5]], [[0.4, 0.1, 0.2]], [[0.0, 0.1, 0.3]]]])
        >>> pseudo_mask(probs, torch.tensor([[1, 1]]))[0].tolist()
        [[1, 0, 2]]
        >>> pseudo_mask(probs, torch.tensor([[1, 1]]), size=(2, 6)).shape
        torch.Size([1, 2, 6])
    """
    dims = check_shape("probs", probs, ["B", "C", "h", "w"], dtype="float")
    if dims["C"] < 2:
        raise ShapeError(f"probs: pseudo_mask needs the background channel 0 and a class, got C={dims['C']}")
    q = to_compute(probs) if labels is None else masked_renormalize(probs, labels)
    if size is not None:
        size = check_size("size", size)
        if size != (dims["h"], dims["w"]):
            q = F.interpolate(q, size=size, mode="bilinear", align_corners=align_corners)
    return q.argmax(dim=1)
