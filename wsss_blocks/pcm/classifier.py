"""The ViT-PCM patch classifier: per-patch softmax over K+1 classes and global max pooling (paper §3.1-3.2)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from wsss_blocks._utils import autocast_on, no_autocast, promote, to_compute
from wsss_blocks._validate import check_bool, check_int, check_range, check_shape
from wsss_blocks.tokens import features_as_grid

__all__ = ["PCMOutput", "PatchProbs", "patch_class_probs", "PatchClassifier"]


class PCMOutput(NamedTuple):
    """What the patch classifier returns.

    Attributes:
        logits: per-patch class scores ``A``, ``(B, C, h, w)`` (input dtype).
        probs: per-patch softmax over the ``C`` classes ``P``, ``(B, C, h, w)`` (fp32, fp64 for fp64).
        pooled_probs: global max pooling of ``probs`` over the patches ``ŷ``, ``(B, C)``.
    """

    logits: Tensor
    probs: Tensor
    pooled_probs: Tensor


class PatchProbs(NamedTuple):
    """What ``patch_class_probs`` returns (unpacks as ``probs, pooled_probs``).

    Attributes:
        probs: per-patch softmax over the classes ``P``, ``(B, C, h, w)``.
        pooled_probs: its global max over the patches ``ŷ``, ``(B, C)``.
    """

    probs: Tensor
    pooled_probs: Tensor


def patch_class_probs(logits: Tensor) -> PatchProbs:
    """Per-patch softmax over classes and its global max pooling (ViT-PCM eq. 1-2).

    ``P = softmax_C(A)`` and ``ŷ_c = max_{h,w} P_c``. Computed in fp32 for fp16/bf16 logits
    (fp64 stays fp64). The gradient of ``ŷ`` reaches only each (image, class)'s arg-max patch.

    Args:
        logits: patch logits ``A`` (background at channel 0 when the classifier has one).

    Shape:
        - logits: ``(B, C, h, w)``
        - output: ``PatchProbs`` with ``(B, C, h, w)`` and ``(B, C)``

    Examples:
        >>> out = patch_class_probs(torch.zeros(1, 4, 2, 3))
        >>> out.probs[0, :, 0, 0].tolist(), out.pooled_probs.tolist()
        ([0.25, 0.25, 0.25, 0.25], [[0.25, 0.25, 0.25, 0.25]])
    """
    check_shape("logits", logits, ["B", "C", "h", "w"], dtype="float")
    with no_autocast(logits.device.type):
        probs = to_compute(logits).softmax(dim=1)
        return PatchProbs(probs, probs.amax(dim=(-2, -1)))


class PatchClassifier(nn.Module):
    """Linear patch classifier with per-patch softmax and global max pooling (ViT-PCM §3.2).

    ``X' = Dropout(X)``, ``A = W X'`` (+ ``b``) at every patch, ``P = softmax_C(A)``,
    ``ŷ = max_{h,w} P``. With ``with_background=True`` there are ``C = K + 1`` outputs, background
    at channel 0 (the official code). The official classifier has no bias, a N(0, 0.05²)
    initialisation and a Keras L2 regulariser ``0.01 · ΣW²`` (``l2_penalty``).

    Args:
        in_dim: feature channels ``D``.
        num_classes: foreground classes ``K``.
        with_background: add the background channel 0 (``C = K + 1``), else ``C = K``.
        bias: learn a bias (official: no).
        dropout: dropout on the input features (official: 0.2).
        init_std: std of the normal initialisation of ``W``; ``None`` keeps PyTorch's
            ``nn.Linear`` initialisation.
        l2: coefficient of ``l2_penalty`` (official Keras ``L2(0.01)``; the paper says 0.1).
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
        - output: ``PCMOutput`` with ``(B, C, h, w)``, ``(B, C, h, w)``, ``(B, C)``

    Examples:
        >>> torch.manual_seed(0) and None
        >>> head = PatchClassifier(8, 2)
        >>> out = head(torch.randn(2, 8, 3, 4))
        >>> out.logits.shape, out.probs.shape, out.pooled_probs.shape
        (torch.Size([2, 3, 3, 4]), torch.Size([2, 3, 3, 4]), torch.Size([2, 3]))
        >>> head(torch.randn(2, 12, 8), size=(3, 4)).probs.shape      # ViT patch tokens
        torch.Size([2, 3, 3, 4])
    """

    def __init__(self, in_dim: int, num_classes: int, *, with_background: bool = True, bias: bool = False,
                 dropout: float = 0.2, init_std: float | None = 0.05, l2: float = 0.01,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.with_background = check_bool("with_background", with_background)
        self.out_channels = self.num_classes + int(self.with_background)
        check_range("dropout", dropout, 0.0, 1.0)
        self.l2 = float(check_range("l2", l2, 0.0))
        if init_std is not None:
            check_range("init_std", init_std, 0.0, low_inclusive=False)
        self.init_std = init_std
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(self.in_dim, self.out_channels, bias=check_bool("bias", bias), device=device,
                                dtype=dtype)
        self.reset_parameters()

    @property
    def weight(self) -> Tensor:
        """The classifier weight ``(C, D)``."""
        return self.linear.weight

    def reset_parameters(self) -> None:
        """Re-draw ``W`` (N(0, init_std²), or PyTorch's default when ``init_std`` is None); bias 0."""
        if self.init_std is None:
            self.linear.reset_parameters()
        else:
            nn.init.normal_(self.linear.weight, 0.0, self.init_std)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor, *, size: tuple[int, int] | None = None) -> PCMOutput:
        """Patch logits, probabilities and GMP probabilities of a feature map, or of tokens with ``size``.

        Args:
            features: a feature map, or patch tokens (prefix tokens removed) with ``size``.
            size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
                disagrees with it is an error).

        Shape:
            - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
            - output: ``PCMOutput`` with ``(B, C, h, w)``, ``(B, C, h, w)``, ``(B, C)``

        Returns:
            ``PCMOutput`` ``(logits, probs, pooled_probs)``; tokens give exactly the result of
            their ``tokens_to_grid`` map.

        Raises:
            ShapeError: a wrong shape, or tokens without ``size``.
        """
        features = features_as_grid("features", features, size, channels=self.in_dim, dtype="float")
        x = self.dropout(features)
        weight = self.linear.weight
        if autocast_on(x.device.type):
            weight = weight.to(x.dtype)
        else:  # mixed dtypes of features and weight: the promoted one
            x, weight = promote(x, weight)
        logits = torch.einsum("bdhw,cd->bchw", x, weight)
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.to(logits.dtype)[:, None, None]
        probs, pooled_probs = patch_class_probs(logits)
        return PCMOutput(logits, probs, pooled_probs)

    def l2_penalty(self) -> Tensor:
        """``l2 · ΣW²`` (bias excluded), fp32 or the weight's wider dtype.

        Examples:
            >>> head = PatchClassifier(2, 1, l2=0.01)
            >>> _ = head.weight.data.fill_(1.0)
            >>> round(head.l2_penalty().item(), 6)    # 0.01 * 4
            0.04
        """
        w = self.linear.weight
        with no_autocast(w.device.type):
            return self.l2 * to_compute(w).pow(2).sum()

    def extra_repr(self) -> str:
        return f"with_background={self.with_background}, init_std={self.init_std}, l2={self.l2}"
