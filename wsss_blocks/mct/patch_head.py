"""MCTformer-V2's patch-token CAM (PatchCAM) and its fusion with the MCT attention maps.

MCTformer-V2 puts a convolution on the last block's patch tokens, laid out on their grid:
``PatchCAM = conv(features)``, a ``Conv2d(D, C, 3, padding=1)`` with bias in the released
models, no final norm before it. Its global average is V2's patch logits (MCTformer+ pools
it by weighted ranking instead). At map-generation time the released code fuses it with
the class-to-patch attention maps ``A`` (``mct.attention_cams``) of the class tokens:

* MCTformer-V2: ``A * relu(PatchCAM)`` (``fuse="product"``);
* MCTformer+: ``sqrt(A * relu(PatchCAM))`` (``fuse="geometric"``, the geometric mean).

In both, ``PatchCAM`` enters detached (only ``A`` would carry a gradient), and ``A`` is
the sum (V2) or the mean (MCTformer+) of the last blocks' maps, which ``attention_cams``
selects with its ``fuse`` option.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import autocast_on, compute_dtype, no_autocast, promote
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_instance,
    check_int,
    check_option,
    check_shape,
    check_size,
    check_tensor,
)
from wsss_blocks.tokens import features_as_tokens, tokens_to_grid

__all__ = ["patch_cam", "PatchCAM", "fused_cam", "FusedCAM"]

FUSES = ("product", "geometric")


def patch_cam(
    features: Tensor,
    weight: Tensor,
    size: tuple[int, int] | None = None,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """MCTformer-V2's PatchCAM: a stride-1 convolution of the patch tokens on their grid.

    ``cams[b, c] = sum_d weight[c, d] * features[b, d]`` (correlated over a ``k x k``
    window, zero padding ``k // 2``, so the grid keeps its size) ``+ bias[c]``. Raw scores
    of any sign (the released code applies ReLU only when it fuses or saves the map).
    Mixed floating dtypes of ``features`` and ``weight`` are computed in the promoted one
    (``bias`` follows); under autocast, autocast decides.

    Args:
        features: the last block's patch tokens (MCTformer: no final norm), as tokens with
            ``size``, or as a map.
        weight: the convolution's weight (``(K, D)`` is a ``1 x 1`` kernel).
        size: the token grid ``(h, w)``; required for tokens, checked for a map.
        bias: the convolution's bias, or ``None``.

    Shape:
        - features: ``(B, n, D)`` with ``size=(h, w)``, or ``(B, D, h, w)``
        - weight: ``(K, D, k, k)`` with odd ``k``, or ``(K, D)``; bias: ``(K,)``
        - output: ``(B, K, h, w)``

    Examples:
        >>> feats = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])         # (1, 2 tokens, D=2)
        >>> patch_cam(feats, torch.tensor([[1.0, 1.0]]), (1, 2), bias=torch.tensor([0.5]))
        tensor([[[[1.5000, 2.5000]]]])
    """
    check_tensor("features", features, dtype="float")
    check_tensor("weight", weight, dtype="float")
    dims = Dims()
    if features.dim() == 4:
        check_shape("features", features, ["B", "D", "h", "w"], dims)
        grid = (dims["h"], dims["w"])
        if size is not None and check_size("size", size) != grid:
            raise ShapeError(f"features: a {grid[0]}x{grid[1]} map, but size={tuple(size)}")
        fmap = features
    else:
        if size is None:
            raise ShapeError("size: required when features are tokens (B, n, D); the grid never comes from sqrt(n)")
        fmap = tokens_to_grid(features_as_tokens("features", features, size, dims), size)
    if weight.dim() == 2:
        check_shape("weight", weight, ["K", "D"], dims)
        weight = weight[:, :, None, None]
    check_shape("weight", weight, ["K", "D", "k", "k"], dims)
    k = weight.shape[-1]
    if k % 2 != 1:
        raise ShapeError(f"weight: expected an odd square kernel (k, k), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_shape("bias", bias, ["K"], dims, dtype="float")
    if autocast_on(fmap.device.type):  # autocast decides the precision of the convolution
        return F.conv2d(fmap, weight, bias, stride=1, padding=k // 2)
    fmap, weight = promote(fmap, weight)
    if bias is not None:
        bias = bias.to(fmap.dtype)
    return F.conv2d(fmap, weight, bias, stride=1, padding=k // 2)


class PatchCAM(nn.Conv2d):
    """Module form of ``patch_cam``: MCTformer-V2's PatchCAM head, an ``nn.Conv2d``.

    A ``Conv2d(in_dim, num_classes, kernel_size, padding=kernel_size // 2)`` (state-dict
    keys ``weight`` and ``bias``, the released ``head.*`` without the prefix) whose
    ``forward`` also takes tokens with their grid. ``mct.load_mctformer`` returns one,
    loaded, for V2 and MCTformer+ checkpoints.

    Args:
        in_dim: token dimension ``D``.
        num_classes: ``C`` (one map per class token).
        kernel_size: odd kernel size (MCTformer: 3).
        bias: whether the convolution has a bias (MCTformer: yes).
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - features: ``(B, n, D)`` with ``size=(h, w)``, or ``(B, D, h, w)``
        - output: ``(B, C, h, w)``

    Examples:
        >>> head = PatchCAM(8, 3)
        >>> head(torch.randn(2, 6, 8), (2, 3)).shape
        torch.Size([2, 3, 2, 3])
        >>> sorted(head.state_dict())
        ['bias', 'weight']
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        kernel_size: int = 3,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_dim = check_int("in_dim", in_dim, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        kernel_size = check_int("kernel_size", kernel_size, low=1)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size: expected an odd size, got {kernel_size}")
        bias = check_bool("bias", bias)
        if dtype is not None and not check_instance("dtype", dtype, torch.dtype).is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        super().__init__(
            in_dim, num_classes, kernel_size, stride=1, padding=kernel_size // 2, bias=bias,
            device=device, dtype=dtype,
        )

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """PatchCAM of ``features`` (see ``patch_cam``)."""
        return patch_cam(features, self.weight, size, bias=self.bias)


def fused_cam(
    attn_cams: Tensor,
    patch_cams: Tensor,
    *,
    fuse: Literal["product", "geometric"] = "product",
) -> Tensor:
    """MCTformer's fused CAM: attention maps times the rectified, detached PatchCAM.

    ``fuse="product"`` (MCTformer-V2): ``attn_cams * relu(patch_cams)``;
    ``fuse="geometric"`` (MCTformer+): ``sqrt(attn_cams * relu(patch_cams))``. As in the
    released code, ``patch_cams`` is detached and ``attn_cams`` is used as given: the
    attention maps are non-negative (``mct.attention_cams``, ``refine`` or not), so the
    product is too. Computed in fp32 (fp64 stays fp64), also under autocast; no label
    masking, upsampling or normalisation. With ``"geometric"`` the slope of ``sqrt`` is
    infinite at 0: a map-generation op, not a training loss.

    Args:
        attn_cams: class-to-patch attention maps (``attention_cams`` with ``fuse="sum"``
            for V2, ``fuse="mean"`` for MCTformer+).
        patch_cams: raw PatchCAM on the same grid (``patch_cam`` / ``PatchCAM``).
        fuse: ``"product"`` (V2) or ``"geometric"`` (MCTformer+).

    Shape:
        - attn_cams, patch_cams: ``(B, C, h, w)``
        - output: ``(B, C, h, w)``

    Examples:
        >>> attn = torch.tensor([[[[0.5, 2.0, 1.0]]]])
        >>> cams = torch.tensor([[[[2.0, 8.0, -3.0]]]])
        >>> fused_cam(attn, cams)
        tensor([[[[ 1., 16.,  0.]]]])
        >>> fused_cam(attn, cams, fuse="geometric")
        tensor([[[[1., 4., 0.]]]])
    """
    dims = check_shape("attn_cams", attn_cams, ["B", "C", "h", "w"], dtype="float")
    check_shape("patch_cams", patch_cams, ["B", "C", "h", "w"], dims, dtype="float")
    check_option("fuse", fuse, FUSES)
    dtype = compute_dtype(attn_cams, patch_cams)
    with no_autocast(attn_cams.device.type):
        out = attn_cams.to(dtype) * patch_cams.detach().to(dtype).relu()
        return out.sqrt() if fuse == "geometric" else out


class FusedCAM(nn.Module):
    """Module form of ``fused_cam`` (stores ``fuse``; no parameters).

    Args:
        fuse: ``"product"`` (MCTformer-V2) or ``"geometric"`` (MCTformer+).

    Shape:
        - attn_cams, patch_cams: ``(B, C, h, w)``
        - output: ``(B, C, h, w)``

    Examples:
        >>> FusedCAM(fuse="geometric")(torch.full((1, 2, 2, 2), 4.0), torch.ones(1, 2, 2, 2)).unique()
        tensor([2.])
    """

    def __init__(self, *, fuse: Literal["product", "geometric"] = "product") -> None:
        super().__init__()
        self.fuse = check_option("fuse", fuse, FUSES)

    def extra_repr(self) -> str:
        return f"fuse={self.fuse!r}"

    def forward(self, attn_cams: Tensor, patch_cams: Tensor) -> Tensor:
        """The fused CAM (see ``fused_cam``)."""
        return fused_cam(attn_cams, patch_cams, fuse=self.fuse)
