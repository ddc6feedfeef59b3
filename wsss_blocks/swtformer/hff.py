"""Hierarchical Feature Fusion (HFF) of the four Swin stages into ``F_hie`` (paper §3-4, our wiring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import autocast_on, call_promoted, promoted_dtype
from wsss_blocks._validate import Dims, ShapeError, check_bool, check_int, check_option, check_range
from wsss_blocks.swtformer._common import to_nchw

__all__ = ["HFF"]


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False)


class HFF(nn.Module):
    """Hierarchical Feature Fusion: four stage maps concatenated in two steps into ``F_hie``.

    The paper (§3-4, Fig. 3) says only: the four stage outputs are "concatenated in two
    stages", upsampling is bilinear and downsampling a convolution. **No code was released;
    this wiring is our interpretation.** With ``S^_i = S_i / (||S_i||_ch + eps)`` (when
    ``normalize``; inputs detached when ``detach_inputs``, as SIPE's side branches):

    * step A: ``F12 = [Conv3x3/s2(S^_1), S^_2]`` (stride 8),
      ``F34 = [S^_3, up(S^_4)]`` (stride 16);
    * step B, ``output_stage="stage3"``: ``F_hie = Conv1x1([Conv3x3/s2(F12), F34])``
      (stride 16); ``output_stage="stage2"``: ``F_hie = Conv1x1([F12, up(F34)])`` (stride 8).

    The 3x3 convolutions (padding 1) keep their channel count (``C1``, ``C1+C2``); the 1x1
    maps ``sum C_i`` to ``out_dim``. All bias-free, no norm or activation; ``up`` is bilinear
    with ``align_corners=False`` to the explicit size. Channel order is always S1|S2|S3|S4.

    Args:
        in_dims: channels of the four stages (Swin-T: 96, 192, 384, 768).
        out_dim: channels of ``F_hie``; default ``in_dims[2]``.
        output_stage: output grid, stage 3 (stride 16) or stage 2 (stride 8).
        normalize: channel-L2 normalise every stage first (SIPE).
        detach_inputs: stop gradients into the backbone (SIPE); then only the HFF convs learn
            from the R-CAM side.
        input_fmt: ``"NCHW"`` or ``"NHWC"`` stage maps.
        eps: added to the channel norm.
        device: where the convolutions are created.
        dtype: their precision.

    Shape:
        - features: 4 maps ``(B, C_i, h_i, w_i)`` (``(B, h_i, w_i, C_i)`` with ``input_fmt="NHWC"``)
          with ``h_{i+1} = ceil(h_i / 2)`` (same for w); maps only, not tokens: each stage has
          its own grid and the block takes none (``wsss_blocks.tokens.tokens_to_grid`` first)
        - output: ``(B, out_dim, h_3, w_3)`` or ``(B, out_dim, h_2, w_2)``

    Examples:
        >>> hff = HFF((4, 8, 16, 32))
        >>> maps = [torch.randn(2, c, s, t) for c, s, t in ((4, 52, 36), (8, 26, 18), (16, 13, 9), (32, 7, 5))]
        >>> hff(maps).shape
        torch.Size([2, 16, 13, 9])
        >>> HFF((4, 8, 16, 32), out_dim=10, output_stage="stage2")(maps).shape
        torch.Size([2, 10, 26, 18])
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        *,
        out_dim: int | None = None,
        output_stage: Literal["stage3", "stage2"] = "stage3",
        normalize: bool = True,
        detach_inputs: bool = True,
        input_fmt: Literal["NCHW", "NHWC"] = "NCHW",
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims = tuple(check_int(f"in_dims[{i}]", c, low=1) for i, c in enumerate(in_dims))
        if len(dims) != 4:
            raise ValueError(f"in_dims: expected 4 stage channel counts, got {len(dims)}: {dims}")
        self.in_dims = dims
        self.out_dim = dims[2] if out_dim is None else check_int("out_dim", out_dim, low=1)
        self.output_stage: Literal["stage3", "stage2"] = check_option(
            "output_stage", output_stage, ("stage3", "stage2")
        )
        self.normalize = check_bool("normalize", normalize)
        self.detach_inputs = check_bool("detach_inputs", detach_inputs)
        self.input_fmt: Literal["NCHW", "NHWC"] = check_option("input_fmt", input_fmt, ("NCHW", "NHWC"))
        self.eps = check_range("eps", eps, 0.0)
        c1, c2 = dims[0], dims[0] + dims[1]
        self.down1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype)
        self.down12: nn.Conv2d | None = None
        if self.output_stage == "stage3":
            self.down12 = nn.Conv2d(c2, c2, 3, stride=2, padding=1, bias=False, device=device, dtype=dtype)
        self.fuse = nn.Conv2d(sum(dims), self.out_dim, 1, bias=False, device=device, dtype=dtype)

    def _check(self, features: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(features, Tensor) or len(features) != 4:
            n = "a tensor" if isinstance(features, Tensor) else f"{len(features)} maps"
            raise ShapeError(f"features: expected a sequence of 4 stage maps, got {n}")
        dims = Dims()
        out = [
            to_nchw(f"features[{i}]", x, c, dims, self.input_fmt, h=f"h{i}", w=f"w{i}")
            for i, (x, c) in enumerate(zip(features, self.in_dims, strict=True))
        ]
        for i in range(3):
            h, w = out[i].shape[-2:]
            want = (-(-h // 2), -(-w // 2))
            if tuple(out[i + 1].shape[-2:]) != want:
                raise ShapeError(
                    f"features[{i + 1}]: expected grid {want} = ceil(features[{i}] grid {(h, w)} / 2) "
                    f"(Swin's padded merging), got {tuple(out[i + 1].shape[-2:])}"
                )
        return out

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Fuse the four stage maps into ``F_hie``.

        Args:
            features: the four stage maps ``S1..S4`` in the block's ``input_fmt`` (e.g.
                ``wsss_blocks.tokens.stage_taps`` ``.features``, NCHW). Maps only: token
                sequences go through ``wsss_blocks.tokens.tokens_to_grid`` first.

        Shape:
            - features: 4 maps ``(B, C_i, h_i, w_i)`` (NHWC: ``(B, h_i, w_i, C_i)``) with
              ``h_{i+1} = ceil(h_i / 2)``
            - output: ``(B, out_dim, h_3, w_3)`` (``"stage3"``) or ``(B, out_dim, h_2, w_2)``
              (``"stage2"``)

        Returns:
            ``F_hie``.

        Raises:
            ShapeError: not four maps, wrong channels or grids; a channels-last map given to
                an NCHW block says to pass ``input_fmt="NHWC"``.
        """
        s = self._check(features)
        if not autocast_on(s[0].device.type):  # mixed dtypes of the stages and the convs: the promoted one
            dtype = promoted_dtype(*s, self.fuse.weight)
            s = [x.to(dtype) for x in s]
        if self.detach_inputs:
            s = [x.detach() for x in s]
        if self.normalize:
            s = [x / (x.norm(dim=1, keepdim=True) + self.eps) for x in s]
        s1, s2, s3, s4 = s
        f12 = torch.cat([call_promoted(self.down1, s1), s2], dim=1)
        f34 = torch.cat([s3, _up(s4, s3)], dim=1)
        if self.down12 is not None:
            return call_promoted(self.fuse, torch.cat([call_promoted(self.down12, f12), f34], dim=1))
        return call_promoted(self.fuse, torch.cat([f12, _up(f34, f12)], dim=1))

    def extra_repr(self) -> str:
        return (
            f"in_dims={self.in_dims}, out_dim={self.out_dim}, output_stage={self.output_stage!r}, "
            f"normalize={self.normalize}, detach_inputs={self.detach_inputs}, input_fmt={self.input_fmt!r}"
        )
