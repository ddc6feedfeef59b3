"""The ViT-PCM HV-BiLSTM: parallel row and column BiLSTMs over the patch grid (paper §3.4)."""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._utils import call_promoted, promoted_dtype
from wsss_blocks._validate import Dims, check_bool, check_int, check_range
from wsss_blocks.tokens import features_as_grid

__all__ = ["HVBiLSTM"]


class HVBiLSTM(nn.Module):
    """Horizontal + vertical BiLSTM patch conditioning (ViT-PCM §3.4, official parallel form).

    ``X' = Dropout_p(X)``. Every row of ``X'`` is a sequence for one BiLSTM and every column a
    sequence for a second, independent BiLSTM; each returns ``[forward ‖ backward]`` (``2H``
    channels) and the output is ``Z = cat[rows, columns]`` (``4H`` channels). Both read the
    same ``X'`` (parallel, not stacked); no residual, no norm. Each direction's input gets its
    own element-wise ``Dropout_q`` (Keras ``LSTM(dropout=q)`` on the fused path).

    Args:
        in_dim: input channels ``D``.
        hidden_dim: LSTM hidden size ``H``; ``None`` gives ``D // 4`` (so ``4H == D``; official
            192 for ViT-B), which requires ``D % 4 == 0``.
        dropout: ``p``, dropout on the input grid (official 0.2).
        lstm_dropout: ``q``, dropout on each LSTM's input; ``None`` uses ``p``.
        keras_init: Keras initialisation: input weights Glorot-uniform, recurrent weights
            orthogonal, biases 0 with the forget-gate bias 1. ``False`` keeps PyTorch's.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
        - output: ``(B, 4H, h, w)``

    Note:
        The official code draws a separate LSTM input mask per direction of a BiLSTM; here
        one mask is shared by both directions of a BiLSTM (one fused ``nn.LSTM`` call). Rows
        and columns are laid out with einops (``"b d h w -> (b h) w d"`` /
        ``"b d h w -> (b w) h d"``), so the whole batch runs as two LSTM calls.

    Examples:
        >>> hv = HVBiLSTM(8).eval()
        >>> hv(torch.randn(2, 8, 3, 5)).shape, hv.out_dim
        (torch.Size([2, 8, 3, 5]), 8)
        >>> hv(torch.randn(2, 15, 8), size=(3, 5)).shape                # ViT patch tokens
        torch.Size([2, 8, 3, 5])
    """

    def __init__(self, in_dim: int, *, hidden_dim: int | None = None, dropout: float = 0.2,
                 lstm_dropout: float | None = None, keras_init: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        if hidden_dim is None:
            if self.in_dim % 4:
                raise ValueError(f"hidden_dim: None needs in_dim divisible by 4, got in_dim={self.in_dim}")
            hidden_dim = self.in_dim // 4
        self.hidden_dim = check_int("hidden_dim", hidden_dim, low=1)
        self.out_dim = 4 * self.hidden_dim
        check_range("dropout", dropout, 0.0, 1.0)
        q = dropout if lstm_dropout is None else lstm_dropout
        check_range("lstm_dropout", q, 0.0, 1.0)
        self.keras_init = check_bool("keras_init", keras_init)
        self.dropout = nn.Dropout(dropout)
        self.row_dropout = nn.Dropout(q)
        self.col_dropout = nn.Dropout(q)
        kw = {"batch_first": True, "bidirectional": True, "device": device, "dtype": dtype}
        self.lstm_h = nn.LSTM(self.in_dim, self.hidden_dim, **kw)
        self.lstm_v = nn.LSTM(self.in_dim, self.hidden_dim, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise both BiLSTMs (Keras scheme when ``keras_init``, else PyTorch's)."""
        h = self.hidden_dim
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

    def forward(self, features: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """Row and column BiLSTM features of a feature map (or tokens with ``size``), concatenated on channels.

        Args:
            features: a feature map, or patch tokens (prefix tokens removed) with ``size``.
            size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
                disagrees with it is an error).

        Shape:
            - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
            - output: ``(B, 4H, h, w)``

        Returns:
            ``Z``; tokens give exactly the result of their ``tokens_to_grid`` map.

        Raises:
            ShapeError: a wrong shape, or tokens without ``size``.
        """
        dims = Dims()
        features = features_as_grid("features", features, size, dims, channels=self.in_dim, dtype="float")
        b = dims["B"]
        if b == 0:  # an empty batch: the empty output, attached to the features' graph
            dtype = promoted_dtype(features, *self.lstm_h.parameters())
            out = features.new_zeros((0, self.out_dim, dims["h"], dims["w"]), dtype=dtype)
            return out + features.to(dtype).sum() * 0.0
        x = self.dropout(features)
        rows = self.row_dropout(rearrange(x, "b d h w -> (b h) w d"))
        cols = self.col_dropout(rearrange(x, "b d h w -> (b w) h d"))
        rows = call_promoted(self.lstm_h, rows)[0]
        cols = call_promoted(self.lstm_v, cols)[0]
        rows = rearrange(rows, "(b h) w e -> b e h w", b=b)
        cols = rearrange(cols, "(b w) h e -> b e h w", b=b)
        return torch.cat([rows, cols.to(rows.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, keras_init={self.keras_init}"
