"""The SWTformer model (V1: Swin + CAM head; V2: + HFF, seeds, prototypes, GSC and CCL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import ShapeError, check_int, check_labels, check_option, check_range, check_shape
from wsss_blocks.swtformer.head import SwinCAMHead, cams_with_background, swin_cam
from wsss_blocks.swtformer.hff import HFF
from wsss_blocks.swtformer.losses import CCLVariant, ccl_loss, gsc_loss
from wsss_blocks.swtformer.prototypes import refine_cams
from wsss_blocks.swtformer.seeds import _AFFINITIES, Affinity, locate_seeds
from wsss_blocks.tokens import stage_info, stage_taps

__all__ = ["SWTformerHead", "SWTformer"]


class SWTformerHead(nn.Module):
    """Everything of SWTformer after the backbone: CAM head, and for V2 HFF, seeds, R-CAM and losses.

    :class:`SWTformer` is this module on top of a backbone; use it directly when the backbone
    lives elsewhere (a training loop that owns it) and pass the four stage maps, e.g. from
    :func:`wsss_blocks.tokens.stage_taps` with ``final_norm=True``. Arguments as in
    :class:`SWTformer`, with ``stage_channels`` instead of the backbone.

    Shape:
        - maps: four ``(B, C_i, h_i, w_i)`` (``h_{i+1} = ceil(h_i / 2)``), the last normed
        - output: the dict of :class:`SWTformer`

    Example:
        >>> heads = SWTformerHead((8, 16, 32, 64), 3)
        >>> maps = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4), (64, 2))]
        >>> sorted(heads(maps, torch.tensor([[1, 0, 1], [0, 1, 0]])))[:4]
        ['cam', 'cam_with_bg', 'f_out', 'features']
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        num_classes: int,
        *,
        version: Literal["v1", "v2"] = "v2",
        head_kernel_size: int = 1,
        head_bias: bool = False,
        hff_out_dim: int | None = None,
        hff_target: Literal["stage3", "stage2"] = "stage3",
        hff_normalize: bool = True,
        hff_detach_inputs: bool = True,
        affinity: Affinity = "abs_cos",
        bg_scale: float = 0.5,
        ccl_variant: CCLVariant = "paper",
        gsc_weight: float = 1.0,
        ccl_weight: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = tuple(check_int(f"stage_channels[{i}]", c, low=1) for i, c in enumerate(stage_channels))
        if len(channels) != 4:
            raise ValueError(f"stage_channels: expected 4 stages, got {len(channels)}: {channels}")
        self.stage_channels = channels
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.version = check_option("version", version, ("v1", "v2"))
        self.affinity: Affinity = check_option("affinity", affinity, _AFFINITIES)
        self.bg_scale = check_range("bg_scale", bg_scale, 0.0)
        self.ccl_variant: CCLVariant = check_option("ccl_variant", ccl_variant, ("paper", "plain"))
        self.gsc_weight = check_range("gsc_weight", gsc_weight, 0.0)
        self.ccl_weight = check_range("ccl_weight", ccl_weight, 0.0)
        self.head = SwinCAMHead(
            channels[-1], self.num_classes, kernel_size=head_kernel_size, bias=head_bias,
            device=device, dtype=dtype,
        )
        self.hff: HFF | None = None
        if self.version == "v2":
            self.hff = HFF(
                channels, hff_out_dim, hff_target, normalize=hff_normalize,
                detach_inputs=hff_detach_inputs, device=device, dtype=dtype,
            )

    def forward(
        self, maps: Sequence[Tensor], labels: Tensor | None = None, valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        if isinstance(maps, Tensor) or len(maps) != 4:
            raise ShapeError("maps: expected a sequence of 4 stage maps")
        t_out = maps[-1]
        dims = check_shape("maps[3]", t_out, ["B", self.stage_channels[-1], "h", "w"], dtype="float")
        if labels is not None:
            check_labels("labels", labels, dims, pattern=("B", self.num_classes))
        if valid is not None:
            check_shape("valid", valid, ["B", "H", "W"], dims, dtype="bool")
        f_out, scores = self.head(t_out)
        cam = swin_cam(f_out)
        out: dict[str, Tensor] = {"scores": scores, "f_out": f_out, "cam": cam}
        if labels is not None:
            with no_autocast(scores.device.type):
                out["loss_cls"] = F.multilabel_soft_margin_loss(scores.float(), labels.float())
        if self.hff is not None:
            m = cams_with_background(cam, labels, valid)
            seeds = locate_seeds(t_out, m, labels, affinity=self.affinity, bg_scale=self.bg_scale, valid=valid)
            assert isinstance(seeds, Tensor)
            features = self.hff(maps)
            rcam = refine_cams(features, seeds)
            assert isinstance(rcam, Tensor)
            out.update(cam_with_bg=m, seeds=seeds, features=features, rcam=rcam)
            if labels is not None:
                out["loss_gsc"] = gsc_loss(m, rcam, valid)
                out["loss_ccl"] = ccl_loss(m, rcam, labels, variant=self.ccl_variant, valid=valid)
        if labels is not None:
            loss = out["loss_cls"]
            if self.hff is not None:
                loss = loss + self.gsc_weight * out["loss_gsc"] + self.ccl_weight * out["loss_ccl"]
            out["loss"] = loss
        return out

    def extra_repr(self) -> str:
        return (
            f"stage_channels={self.stage_channels}, num_classes={self.num_classes}, version={self.version!r}, "
            f"affinity={self.affinity!r}, bg_scale={self.bg_scale}, ccl_variant={self.ccl_variant!r}, "
            f"gsc_weight={self.gsc_weight}, ccl_weight={self.ccl_weight}"
        )


class SWTformer(nn.Module):
    """SWTformer-V1/V2 on a user-built timm Swin (paper §3, eq. 1-7).

    * **V1**: ``T_out`` = the last stage after the final norm (``forward_features``);
      ``F_out = Conv(T_out)``, scores = spatial mean, ``L_CLS`` = multilabel soft margin,
      ``CAM = Norm(ReLU(F_out))``.
    * **V2** adds: ``M`` = label-masked CAM with background (eq. 3); seeds from ``T_out``'s
      absolute-cosine structure (eq. 4); ``F_hie`` from :class:`HFF` (our wiring, no code
      released); prototypes and R-CAM on ``F_hie`` (SIPE); ``L = L_CLS + w_gsc L_GSC +
      w_ccl L_CCL`` (eq. 7). The seed map of the paper is the R-CAM
      (:func:`rcam_pseudo_mask`).

    The layers after the backbone are :class:`SWTformerHead` (``self.heads``; ``self.head`` and
    ``self.hff`` are its CAM head and HFF). The backbone is registered as a submodule (so
    ``parameters()`` and ``state_dict()`` include it) but is never moved, cast or switched to
    eval here. Stage channels come from its ``feature_info``; it must have four stages, each
    half the size of the previous.

    Args:
        backbone: a timm Swin (any timm model whose ``forward_intermediates`` gives four
            maps).
        num_classes: ``K``.
        version: ``"v1"`` or ``"v2"``.
        final_norm: apply the backbone's final norm to ``T_out``.
        head_kernel_size / head_bias: the CAM head's convolution (1x1 without bias; MCTformer:
            3 with bias).
        hff_out_dim, hff_target, hff_normalize, hff_detach_inputs: :class:`HFF` options.
        affinity, bg_scale: :func:`locate_seeds` options.
        ccl_variant: :func:`ccl_loss` variant.
        gsc_weight, ccl_weight: loss weights (paper: 1, 1).

    Shape:
        - images: ``(B, 3, H, W)``; labels: ``(B, K)``; valid: ``(B, H, W)`` bool
        - output dict: ``scores (B, K)``, ``f_out`` and ``cam`` ``(B, K, h4, w4)``; V2 adds
          ``cam_with_bg`` and ``seeds`` ``(B, K+1, h4, w4)``, ``features (B, D_h, hf, wf)``,
          ``rcam (B, K+1, hf, wf)``; with labels ``loss_cls`` (+ ``loss_gsc``, ``loss_ccl``)
          and ``loss``, all 0-d.

    Example:
        >>> import timm
        >>> swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
        ...                          depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
        ...                          img_size=64)
        >>> model = SWTformer(swin, 3)
        >>> out = model(torch.randn(2, 3, 64, 64), torch.tensor([[1, 0, 1], [0, 1, 0]]))
        >>> out["cam"].shape, out["rcam"].shape, out["loss"].dim()
        (torch.Size([2, 3, 2, 2]), torch.Size([2, 4, 4, 4]), 0)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        version: Literal["v1", "v2"] = "v2",
        final_norm: bool = True,
        head_kernel_size: int = 1,
        head_bias: bool = False,
        hff_out_dim: int | None = None,
        hff_target: Literal["stage3", "stage2"] = "stage3",
        hff_normalize: bool = True,
        hff_detach_inputs: bool = True,
        affinity: Affinity = "abs_cos",
        bg_scale: float = 0.5,
        ccl_variant: CCLVariant = "paper",
        gsc_weight: float = 1.0,
        ccl_weight: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.final_norm = bool(final_norm)
        info = stage_info(backbone)
        if len(info) != 4:
            raise ValueError(
                f"backbone: expected a 4-stage hierarchical model, {type(backbone).__name__} has {len(info)}"
            )
        self.backbone = backbone
        self.heads = SWTformerHead(
            tuple(s.channels for s in info), num_classes, version=version, head_kernel_size=head_kernel_size,
            head_bias=head_bias, hff_out_dim=hff_out_dim, hff_target=hff_target, hff_normalize=hff_normalize,
            hff_detach_inputs=hff_detach_inputs, affinity=affinity, bg_scale=bg_scale, ccl_variant=ccl_variant,
            gsc_weight=gsc_weight, ccl_weight=ccl_weight, device=device, dtype=dtype,
        )

    @property
    def head(self) -> SwinCAMHead:
        return self.heads.head

    @property
    def hff(self) -> HFF | None:
        return self.heads.hff

    def forward(
        self, images: Tensor, labels: Tensor | None = None, valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        if labels is not None:
            check_labels("labels", labels, dims, pattern=("B", self.heads.num_classes))
        if valid is not None:
            check_shape("valid", valid, ["B", "H", "W"], dims, dtype="bool")
        return self.heads(stage_taps(self.backbone, images, final_norm=self.final_norm).features, labels, valid)

    def extra_repr(self) -> str:
        return f"final_norm={self.final_norm}"
