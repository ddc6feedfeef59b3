"""ViT-PCM heads: the GMP patch classifier (paper §3.1-3.2) and the HV-BiLSTM (paper §3.4)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import check_int, check_range, check_shape

__all__ = ["PCMOutput", "patch_class_probs", "PatchClassifier", "HVBiLSTM"]


class PCMOutput(NamedTuple):
    """What the patch classifier returns.

    Attributes:
        logits: per-patch class scores ``A``, ``(B, C, h, w)`` (input dtype).
        probs: per-patch softmax over the ``C`` classes ``P``, ``(B, C, h, w)`` (fp32, fp64 for fp64).
        pooled: global max pooling of ``probs`` over the patches ``ŷ``, ``(B, C)``.
    """

    logits: Tensor
    probs: Tensor
    pooled: Tensor


def patch_class_probs(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch softmax over classes and its global max pooling (ViT-PCM eq. 1-2).

    ``P = softmax_C(A)`` and ``ŷ_c = max_{h,w} P_c``. Computed in fp32 for fp16/bf16 logits
    (fp64 stays fp64). The gradient of ``ŷ`` reaches only each (image, class)'s arg-max patch.

    Args:
        logits: patch logits ``A`` (background at channel 0 when the classifier has one).

    Shape:
        - logits: ``(B, C, h, w)``
        - output: ``((B, C, h, w), (B, C))``

    Example:
        >>> probs, pooled = patch_class_probs(torch.zeros(1, 4, 2, 3))
        >>> probs[0, :, 0, 0].tolist(), pooled.tolist()
        ([0.25, 0.25, 0.25, 0.25], [[0.25, 0.25, 0.25, 0.25]])
    """
    check_shape("logits", logits, ["B", "C", "h", "w"], dtype="float")
    with no_autocast(logits.device.type):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = x.softmax(dim=1)
        return probs, probs.amax(dim=(-2, -1))


class PatchClassifier(nn.Module):
    """Linear patch classifier with per-patch softmax and global max pooling (ViT-PCM §3.2).

    ``X' = Dropout(X)``, ``A = W X'`` (+ ``b``) at every patch, ``P = softmax_C(A)``,
    ``ŷ = max_{h,w} P``. With ``background=True`` there are ``C = K + 1`` outputs, background
    at channel 0 (the official code). The official classifier has no bias, a N(0, 0.05²)
    initialisation and a Keras L2 regulariser ``0.01 · ΣW²`` (:meth:`l2_penalty`).

    Args:
        in_dim: feature channels ``D``.
        num_classes: foreground classes ``K``.
        background: add the background channel 0 (``C = K + 1``), else ``C = K``.
        bias: learn a bias (official: no).
        dropout: dropout on the input features (official: 0.2).
        init_std: std of the normal initialisation of ``W``; ``None`` keeps PyTorch's
            ``nn.Linear`` initialisation.
        l2: coefficient of :meth:`l2_penalty` (official Keras ``L2(0.01)``; the paper says 0.1).
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: ``(B, D, h, w)``
        - output: :class:`PCMOutput` with ``(B, C, h, w)``, ``(B, C, h, w)``, ``(B, C)``

    Example:
        >>> torch.manual_seed(0) and None
        >>> head = PatchClassifier(8, 2)
        >>> out = head(torch.randn(2, 8, 3, 4))
        >>> out.logits.shape, out.probs.shape, out.pooled.shape
        (torch.Size([2, 3, 3, 4]), torch.Size([2, 3, 3, 4]), torch.Size([2, 3]))
    """

    def __init__(self, in_dim: int, num_classes: int, background: bool = True, bias: bool = False, *,
                 dropout: float = 0.2, init_std: float | None = 0.05, l2: float = 0.01,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.background = bool(background)
        self.out_channels = self.num_classes + int(self.background)
        check_range("dropout", dropout, 0.0, 1.0)
        self.l2 = float(check_range("l2", l2, 0.0))
        if init_std is not None:
            check_range("init_std", init_std, 0.0, low_inclusive=False)
        self.init_std = init_std
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(self.in_dim, self.out_channels, bias=bias, device=device, dtype=dtype)
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

    def forward(self, x: Tensor) -> PCMOutput:
        """Patch logits, probabilities and GMP scores of a feature map."""
        check_shape("x", x, ["B", self.in_dim, "h", "w"], dtype="float")
        x = self.dropout(x)
        logits = torch.einsum("bdhw,cd->bchw", x, self.linear.weight.to(x.dtype))
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.to(logits.dtype)[:, None, None]
        probs, pooled = patch_class_probs(logits)
        return PCMOutput(logits, probs, pooled)

    def l2_penalty(self) -> Tensor:
        """``l2 · ΣW²`` (bias excluded), fp32 or the weight's wider dtype.

        Example:
            >>> head = PatchClassifier(2, 1, l2=0.01)
            >>> _ = head.weight.data.fill_(1.0)
            >>> round(head.l2_penalty().item(), 6)    # 0.01 * 4
            0.04
        """
        w = self.linear.weight
        with no_autocast(w.device.type):
            return self.l2 * w.to(torch.promote_types(w.dtype, torch.float32)).pow(2).sum()

    def extra_repr(self) -> str:
        return f"background={self.background}, init_std={self.init_std}, l2={self.l2}"


class HVBiLSTM(nn.Module):
    """Horizontal + vertical BiLSTM patch conditioning (ViT-PCM §3.4, official parallel form).

    ``X' = Dropout_p(X)``. Every row of ``X'`` is a sequence for one BiLSTM and every column a
    sequence for a second, independent BiLSTM; each returns ``[forward ‖ backward]`` (``2H``
    channels) and the output is ``Z = cat[rows, columns]`` (``4H`` channels). Both read the
    same ``X'`` (parallel, not stacked); no residual, no norm. Each direction's input gets its
    own element-wise ``Dropout_q`` (Keras ``LSTM(dropout=q)`` on the fused path).

    Args:
        in_dim: input channels ``D``.
        hidden: LSTM hidden size ``H``; ``None`` gives ``D // 4`` (so ``4H == D``; official
            192 for ViT-B), which requires ``D % 4 == 0``.
        dropout: ``p``, dropout on the input grid (official 0.2).
        lstm_dropout: ``q``, dropout on each LSTM's input; ``None`` uses ``p``.
        keras_init: Keras initialisation: input weights Glorot-uniform, recurrent weights
            orthogonal, biases 0 with the forget-gate bias 1. ``False`` keeps PyTorch's.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: ``(B, D, h, w)``
        - output: ``(B, 4H, h, w)``

    Note:
        The official code draws a separate LSTM input mask per direction of a BiLSTM; here
        one mask is shared by both directions of a BiLSTM (one fused ``nn.LSTM`` call). Rows
        and columns are laid out with einops (``"b d h w -> (b h) w d"`` /
        ``"b d h w -> (b w) h d"``), so the whole batch runs as two LSTM calls.

    Example:
        >>> hv = HVBiLSTM(8).eval()
        >>> hv(torch.randn(2, 8, 3, 5)).shape, hv.out_dim
        (torch.Size([2, 8, 3, 5]), 8)
    """

    def __init__(self, in_dim: int, hidden: int | None = None, dropout: float = 0.2, *,
                 lstm_dropout: float | None = None, keras_init: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        if hidden is None:
            if self.in_dim % 4:
                raise ValueError(f"hidden: None needs in_dim divisible by 4, got in_dim={self.in_dim}")
            hidden = self.in_dim // 4
        self.hidden = check_int("hidden", hidden, low=1)
        self.out_dim = 4 * self.hidden
        check_range("dropout", dropout, 0.0, 1.0)
        q = dropout if lstm_dropout is None else lstm_dropout
        check_range("lstm_dropout", q, 0.0, 1.0)
        self.keras_init = bool(keras_init)
        self.dropout = nn.Dropout(dropout)
        self.row_dropout = nn.Dropout(q)
        self.col_dropout = nn.Dropout(q)
        kw = {"batch_first": True, "bidirectional": True, "device": device, "dtype": dtype}
        self.lstm_h = nn.LSTM(self.in_dim, self.hidden, **kw)
        self.lstm_v = nn.LSTM(self.in_dim, self.hidden, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise both BiLSTMs (Keras scheme when ``keras_init``, else PyTorch's)."""
        h = self.hidden
        for lstm in (self.lstm_h, self.lstm_v):
            lstm.reset_parameters()
            if not self.keras_init:
                continue
            for name, p in lstm.named_parameters():
                with torch.no_grad():
                    if name.startswith("weight_ih"):
                        limit = math.sqrt(6.0 / (self.in_dim + 4 * h))  # Keras kernel (D, 4H)
                        p.uniform_(-limit, limit)
                    elif name.startswith("weight_hh"):
                        nn.init.orthogonal_(p)
                    elif name.startswith("bias_ih"):
                        p.zero_()
                        p[h:2 * h] = 1.0  # gate order i, f, g, o: unit forget bias
                    elif name.startswith("bias_hh"):
                        p.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Row and column BiLSTM features of a feature map, concatenated on channels."""
        dims = check_shape("x", x, ["B", self.in_dim, "h", "w"], dtype="float")
        b = dims["B"]
        x = self.dropout(x)
        rows = self.row_dropout(rearrange(x, "b d h w -> (b h) w d"))
        cols = self.col_dropout(rearrange(x, "b d h w -> (b w) h d"))
        rows = self.lstm_h(rows)[0]
        cols = self.lstm_v(cols)[0]
        rows = rearrange(rows, "(b h) w e -> b e h w", b=b)
        cols = rearrange(cols, "(b w) h e -> b e h w", b=b)
        return torch.cat([rows, cols.to(rows.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden={self.hidden}, keras_init={self.keras_init}"

