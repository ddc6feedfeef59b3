"""SWTformer-V1: the patch-token CAM head on a Swin's last stage (paper eq. 1-3)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import call_promoted
from wsss_blocks._validate import check_bool, check_int, check_option, check_range, check_shape, check_size
from wsss_blocks.cam import add_background, normalize_cam
from wsss_blocks.swtformer._common import valid_on_grid
from wsss_blocks.tokens import features_as_grid

__all__ = ["swin_cam", "SwinCAMOutput", "SwinCAMHead", "cams_with_background"]


def swin_cam(cams: Tensor, *, size: tuple[int, int] | None = None, eps: float = 1e-5) -> Tensor:
    """The normalised CAM of eq. 1, ``C_out = Norm(ReLU(F_out))``, optionally upsampled.

    ``relu(cams) / (amax_hw relu(cams) + eps)`` per (image, class), then bilinear
    (``align_corners=False``) to ``size`` when given. Differentiable everywhere, the max
    included (SIPE's normalisation). Computed in fp32 (fp64 stays fp64).

    Args:
        cams: raw CAMs ``F_out`` from ``SwinCAMHead``.
        size: optional output size ``(H, W)`` (the image's, for the paper's ``M``).
        eps: added to the max.

    Shape:
        - cams: ``(B, K, h, w)``
        - output: ``(B, K, h, w)`` or ``(B, K, *size)``, values in ``[0, 1]``

    Examples:
        >>> f = torch.tensor([[[[-1.0, 2.0], [1.0, 4.0]]]])
        >>> swin_cam(f).flatten().double().round(decimals=4).tolist()
        [0.0, 0.5, 0.25, 1.0]
        >>> swin_cam(f, size=(4, 6)).shape
        torch.Size([1, 1, 4, 6])
    """
    check_range("eps", eps, 0.0, low_inclusive=False)
    cam = normalize_cam(cams, mode="max", eps=eps)
    if size is not None:
        size = check_size("size", size)
        if tuple(cam.shape[-2:]) != size:
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam


class SwinCAMOutput(NamedTuple):
    """What ``SwinCAMHead`` returns.

    Attributes:
        cams: raw CAMs ``F_out`` ``(B, K, h, w)`` (normalise them with ``swin_cam``).
        logits: image logits ``(B, K)``, the spatial mean of ``cams``.
    """

    cams: Tensor
    logits: Tensor


class SwinCAMHead(nn.Module):
    """CAM head on the last-stage patch tokens: ``F_out = Conv(T_out)``, ``s = mean_hw F_out`` (eq. 1-2).

    The paper writes "Conv2D" and cites MCTformer (a 3x3 convolution with bias). The default
    is a bias-free 1x1 convolution (the usual CAM classifier); ``kernel_size=3, bias=True``
    gives MCTformer's choice (padding ``k // 2``, so the grid is kept). Train with
    ``F.multilabel_soft_margin_loss(logits, labels)`` (eq. 2 read as the standard loss).

    Args:
        in_dim: channels of ``T_out`` (Swin-T: 768).
        num_classes: ``K`` foreground classes.
        kernel_size: odd convolution size.
        bias: convolution bias.
        input_fmt: ``"NCHW"`` or ``"NHWC"`` (timm Swin's internal layout).
        device: where the convolution is created.
        dtype: its precision.

    Shape:
        - features: ``(B, in_dim, h, w)`` (or ``(B, h, w, in_dim)`` for NHWC), or tokens
          ``(B, h*w, in_dim)`` with ``size=(h, w)``
        - output: ``SwinCAMOutput`` ``(cams (B, K, h, w), logits (B, K))``

    Examples:
        >>> head = SwinCAMHead(8, 3)
        >>> x = torch.randn(2, 8, 7, 5)
        >>> out = head(x)
        >>> out.cams.shape, out.logits.shape
        (torch.Size([2, 3, 7, 5]), torch.Size([2, 3]))
        >>> from wsss_blocks.tokens import tokens_to_grid
        >>> tokens = x.flatten(2).transpose(1, 2)                 # (2, 35, 8)
        >>> torch.equal(head(tokens, size=(7, 5)).cams, head(tokens_to_grid(tokens, (7, 5))).cams)
        True
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        kernel_size: int = 1,
        bias: bool = False,
        input_fmt: Literal["NCHW", "NHWC"] = "NCHW",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        k = check_int("kernel_size", kernel_size, low=1)
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int (the grid is kept), got {k}")
        self.input_fmt: Literal["NCHW", "NHWC"] = check_option("input_fmt", input_fmt, ("NCHW", "NHWC"))
        self.conv = nn.Conv2d(
            self.in_dim, self.num_classes, k, padding=k // 2, bias=check_bool("bias", bias), device=device,
            dtype=dtype,
        )

    def forward(self, features: Tensor, *, size: tuple[int, int] | None = None) -> SwinCAMOutput:
        """Raw CAMs and image logits of a last-stage feature map, or of its tokens with ``size``.

        Args:
            features: ``T_out``: a map in the head's ``input_fmt``, or tokens.
            size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
                disagrees with it is an error).

        Shape:
            - features: ``(B, in_dim, h, w)`` (``(B, h, w, in_dim)`` with ``input_fmt="NHWC"``),
              or tokens ``(B, h*w, in_dim)`` with ``size=(h, w)``
            - output: ``cams (B, K, h, w)``, ``logits (B, K)``

        Returns:
            ``SwinCAMOutput`` ``(cams, logits)``: the convolution's output and its spatial
            mean. Tokens give exactly the result of their ``tokens_to_grid`` map.

        Raises:
            ShapeError: a wrong shape; tokens without ``size``; a channels-last map given to an
                NCHW head says to pass ``input_fmt="NHWC"``.
        """
        x = features_as_grid(
            "features", features, size, channels=self.in_dim, input_fmt=self.input_fmt,
            hint='pass input_fmt="NHWC"', dtype="float",
        )
        cams = call_promoted(self.conv, x)
        return SwinCAMOutput(cams, cams.mean(dim=(-2, -1)))

    def extra_repr(self) -> str:
        return f"input_fmt={self.input_fmt!r}"


def cams_with_background(
    norm_cams: Tensor, labels: Tensor | None = None, *, valid: Tensor | None = None
) -> Tensor:
    """Label-masked CAMs with the background map of eq. 3 at channel 0, differentiable.

    ``C~_k = CAM_k * y_k * valid``, ``M_0 = (1 - max_k C~_k) * valid``, ``M = [M_0, C~]``
    (``wsss_blocks.cam.add_background``, then the valid mask). ``labels=None`` allows
    every class (test split). Absent classes are zeroed *before* the max (SIPE forms the
    background before masking).

    Args:
        norm_cams: normalised foreground CAMs (``swin_cam``).
        labels: multi-hot image labels, or ``None``.
        valid: padding mask at any resolution; a cell is valid iff at least half of it is
            (``wsss_blocks.cam.valid_to_grid``).

    Shape:
        - norm_cams: ``(B, K, h, w)``; labels: ``(B, K)``; valid: ``(B, H', W')`` bool
        - output: ``(B, K+1, h, w)``

    Examples:
        >>> cam = torch.tensor([[[[0.9, 0.2]], [[0.5, 0.7]]]])
        >>> m = cams_with_background(cam, torch.tensor([[1, 0]]))
        >>> m[0, :, 0].double().round(decimals=2).tolist()
        [[0.1, 0.8], [0.9, 0.2], [0.0, 0.0]]
    """
    dims = check_shape("norm_cams", norm_cams, ["B", "K", "h", "w"], dtype="float")
    if labels is None:
        labels = torch.ones(dims["B"], dims["K"], dtype=norm_cams.dtype, device=norm_cams.device)
    m = add_background(norm_cams, labels)
    keep = valid_on_grid(valid, dims, (dims["h"], dims["w"]))
    if keep is not None:
        m = m * keep[:, None].to(m.dtype)
    return m
