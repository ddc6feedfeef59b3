"""ISM: the intermediate-supervised token contrast (CPEWS eq. 3; ToCo's patch token contrast)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import (
    ShapeError,
    check_bool,
    check_class_values,
    check_int,
    check_range,
    check_shape,
    check_tensor,
)
from wsss_blocks.tokens import features_as_tokens

__all__ = ["ism_loss", "ISMLoss"]


def _ism_inputs(
    features: Tensor,
    masks: Tensor,
    ignore_index: int,
    *,
    names: tuple[str, str] = ("features", "masks"),
    num_values: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Validate; return tokens ``(B, N, D)`` and labels ``(B, N)`` (``names``: the caller's)."""
    fname, mname = names
    check_tensor(fname, features, dtype="float")
    check_tensor(mname, masks, dtype="int")
    check_class_values(mname, masks, num_values, ignore_index=ignore_index)
    if masks.dim() == 3:
        dims = check_shape(mname, masks, ["B", "h", "w"])
        x = features_as_tokens(fname, features, (dims["h"], dims["w"]), dims)
        return x, masks.flatten(1)
    if masks.dim() == 2:
        dims = check_shape(mname, masks, ["B", "N"])
        if features.dim() == 4:  # a map: flatten its own grid, then N must match the labels
            features = features_as_tokens(fname, features, (features.shape[2], features.shape[3]))
        check_shape(fname, features, ["B", "N", "D"], dims)
        return features, masks
    raise ShapeError(f"{mname}: expected (B, h, w) or (B, N), got shape {tuple(masks.shape)}")


def ism_loss(
    features: Tensor,
    masks: Tensor,
    *,
    abs_cos: bool = True,
    count_offset: float = 1.0,
    ignore_index: int = 255,
) -> Tensor:
    """CPEWS ISM loss = ToCo's patch-token contrast (PTC), batched with bool masks.

    With ``f = F / max(||F||, 1e-8)``, ``S = f f^T`` (one ``bmm``), valid tokens
    ``v_i = Y_i != ignore_index`` and the pair masks ``P = v_i & v_j & (i != j)``,
    ``pos = P & (Y_i == Y_j)`` (background-background pairs are positive) and
    ``neg = P & (Y_i != Y_j)``::

        L = 0.5 * (1 - sum_pos s+ / (N+ + c)) + 0.5 * sum_neg s- / (N- + c)

    with pair counts ``N+-`` over the whole batch and ``c = count_offset`` (``c = 0`` uses
    ``max(N+-, 1)``). ``abs_cos=True`` (ToCo parity): ``s+ = s- = |S|``; ``abs_cos=False``
    (the paper's intent, eq. 5 without its typo): ``s+ = S`` and ``s- = relu(S)``.
    Computed in fp32 with autocast off; gradients flow into ``features`` only. With no
    valid pair the value is 0.5 with zero gradient; an empty batch (``B = 0``) gives a
    graph-attached 0.

    Args:
        features: final-layer tokens (ToCo/CPEWS: after the final norm, no projection).
        masks: pseudo label maps on the token grid from the intermediate CAM (CPEWS's
            ``masks_mid``), e.g. ``wsss_blocks.cam.token_pseudo_labels``; 0 =
            background, ``ignore_index`` = ignored (other values are non-negative, checked
            for CPU tensors). Flattened ``(B, N)`` labels work too.
        abs_cos: absolute cosine in both terms (ToCo) or ``S`` / ``relu(S)``.
        count_offset: ``c >= 0`` added to both pair counts (ToCo: 1).
        ignore_index: label value of ignored tokens.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``
        - masks: ``(B, h, w)`` or ``(B, N)`` integer
        - output: scalar, fp32 (fp64 for fp64 features)

    Note:
        Memory: the loss equals ``0.5 + sum_ij W_ij S_ij`` with a weight ``W`` that is
        piecewise constant in ``S`` (the pair coefficients times ``sign(S)`` or ``[S > 0]``,
        the same sub-gradients autograd would use), so it is evaluated as
        ``sum_i f_i . (W f)_i`` and no ``(B, N, N)`` tensor is kept for the backward pass.
        At the peak it holds two float ``(B, N, N)`` buffers (the pair coefficients, and ``S``
        overwritten in place by ``W``) and bool masks, where ToCo builds int64 ``(B, N, N)``
        affinities.

    Examples:
        >>> features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> round(ism_loss(features, torch.tensor([[1, 1, 2]])).item(), 6)   # 0.5 * (1 - 2/3)
        0.166667
    """
    ignore_index = check_int("ignore_index", ignore_index)
    abs_cos = check_bool("abs_cos", abs_cos)
    x, y = _ism_inputs(features, masks, ignore_index)
    c = float(check_range("count_offset", count_offset, 0.0))
    return _ism(x, y, abs_cos, c, ignore_index)


def _ism(x: Tensor, y: Tensor, abs_cos: bool, c: float, ignore_index: int) -> Tensor:
    """``ism_loss`` on validated tokens ``(B, N, D)`` and labels ``(B, N)``."""
    n = x.shape[1]
    dtype = compute_dtype(x)
    if x.shape[0] == 0:  # an empty batch: a graph-attached 0
        return x.to(dtype).sum() * 0.0
    with no_autocast(x.device.type):
        f = F.normalize(x.to(dtype), dim=-1, eps=1e-8)  # (B, N, D), with grad
        fd = f.detach()
        with torch.no_grad():
            # the loss is 0.5 + sum_ij W_ij S_ij with W piecewise constant in S:
            # W = -0.5/(N+ + c) on pos, +0.5/(N- + c) on neg, times sign(S) (|S|) or [S > 0]
            # (relu(S) on negatives); those are exactly the sub-gradients autograd uses.
            valid = y != ignore_index
            off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
            pair = valid[:, :, None] & valid[:, None, :] & off_diag  # (B, N, N) bool
            same = y[:, :, None] == y[:, None, :]
            n_pos = (pair & same).sum().to(dtype)
            n_neg = pair.sum().to(dtype) - n_pos
            if c > 0:
                den_pos, den_neg = n_pos + c, n_neg + c
            else:
                den_pos, den_neg = n_pos.clamp_min(1.0), n_neg.clamp_min(1.0)
            coef = torch.where(same, -0.5 / den_pos, 0.5 / den_neg)
            coef.mul_(pair)
            del pair
            sim = torch.bmm(fd, fd.transpose(1, 2))  # (B, N, N): the one similarity bmm
            if abs_cos:
                weight = sim.sign_().mul_(coef)
            else:
                weight = sim.gt_(0).masked_fill_(same, 1).mul_(coef)  # S on pos, relu on neg
            del coef, same
            pulled = torch.bmm(weight, fd)  # (B, N, D) = sum_j W_ij f_j
        # W is symmetric, so d/df sum_ij W_ij f_i.f_j = 2 W f; the value is sum_i f_i.(W f)_i
        inner = (fd * pulled).sum()
        return 0.5 + 2.0 * (f * pulled).sum() - inner


class ISMLoss(nn.Module):
    """Module form of ``ism_loss`` (stores the keyword arguments).

    Args:
        abs_cos: see ``ism_loss``.
        count_offset: see ``ism_loss``.
        ignore_index: see ``ism_loss``.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; masks: ``(B, h, w)`` or ``(B, N)``
        - output: scalar

    Examples:
        >>> loss = ISMLoss(abs_cos=False)
        >>> features = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
        >>> round(loss(features, torch.tensor([[1, 1, 2]])).item(), 6)   # 0.5 * (1 + 2/3)
        0.833333
    """

    def __init__(
        self, *, abs_cos: bool = True, count_offset: float = 1.0, ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.abs_cos = check_bool("abs_cos", abs_cos)
        self.count_offset = float(check_range("count_offset", count_offset, 0.0))
        self.ignore_index = check_int("ignore_index", ignore_index)

    def extra_repr(self) -> str:
        return (
            f"abs_cos={self.abs_cos}, count_offset={self.count_offset}, "
            f"ignore_index={self.ignore_index}"
        )

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        """The ISM loss of ``features`` against the label maps ``masks`` (see ``ism_loss``)."""
        return ism_loss(
            features,
            masks,
            abs_cos=self.abs_cos,
            count_offset=self.count_offset,
            ignore_index=self.ignore_index,
        )
