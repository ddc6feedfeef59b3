"""The ViT-PCM multi-label classification loss MCE (paper eq. 3) on the GMP probabilities."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast, to_compute
from wsss_blocks._validate import check_option, check_range, check_shape
from wsss_blocks.pcm._common import BACKGROUNDS, Background, _targets

__all__ = ["mce_loss", "MCELoss"]


def mce_loss(pooled_probs: Tensor, labels: Tensor, *, background: Background = "always_one",
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
        pooled_probs: GMP probabilities ``ŷ`` (``PCMOutput.pooled_probs``).
        labels: ``(B, K)`` image labels (``(B, C)`` for ``"from_labels"``).
        background: ``"always_one"``, ``"from_labels"`` or ``"ignore"``.
        eps: Keras clip ``ε``.

    Shape:
        - pooled_probs: ``(B, C)``; labels: ``(B, C-1)`` or ``(B, C)``
        - output: scalar

    Examples:
        >>> y_hat = torch.tensor([[0.8, 0.9, 0.1]])
        >>> round(mce_loss(y_hat, torch.tensor([[1, 0]])).item(), 6)
        0.144621
        >>> round(mce_loss(y_hat, torch.tensor([[0, 1, 0]]), background="from_labels").item(), 6)
        0.606719
    """
    dims = check_shape("pooled_probs", pooled_probs, ["B", "C"], dtype="float")
    check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
    with no_autocast(pooled_probs.device.type):
        p = to_compute(pooled_probs)
        y = _targets(labels, dims["C"], background, dims, p, "pooled_probs")
        if background == "ignore":
            p, y = p[:, 1:], y[:, 1:]
        pc = p.clamp(eps, 1.0 - eps)
        ell = -(y * torch.log(pc + eps) + (1.0 - y) * torch.log(1.0 - pc + eps))
        if ell.numel() == 0:  # an empty batch: a graph-attached 0, not the NaN of an empty mean
            return ell.sum()
        return ell.mean()


class MCELoss(nn.Module):
    """Module form of ``mce_loss``.

    Args:
        background: see ``mce_loss``.
        eps: see ``mce_loss``.

    Shape:
        - pooled_probs: ``(B, C)``; labels: ``(B, C-1)`` or ``(B, C)``
        - output: scalar

    Examples:
        >>> loss = MCELoss(background="ignore")
        >>> round(loss(torch.tensor([[0.8, 0.9, 0.1]]), torch.tensor([[1, 0]])).item(), 6)
        0.10536
    """

    def __init__(self, *, background: Background = "always_one", eps: float = 1e-7) -> None:
        super().__init__()
        self.background = check_option("background", background, BACKGROUNDS)
        self.eps = float(check_range("eps", eps, 0.0, 0.5, low_inclusive=False, high_inclusive=False))

    def extra_repr(self) -> str:
        return f"background={self.background!r}, eps={self.eps}"

    def forward(self, pooled_probs: Tensor, labels: Tensor) -> Tensor:
        """The MCE loss of GMP probabilities ``(B, C)`` against image labels; see ``mce_loss``."""
        return mce_loss(pooled_probs, labels, background=self.background, eps=self.eps)
