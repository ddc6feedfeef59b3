"""The SWTformer model (V1: Swin + CAM head; V2: + HFF, seeds, prototypes, GSC and CCL)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast, promoted_dtype
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_instance,
    check_int,
    check_labels,
    check_option,
    check_range,
    check_shape,
)
from wsss_blocks.outputs import weighted_total
from wsss_blocks.swtformer._common import to_nchw
from wsss_blocks.swtformer.head import SwinCAMHead, cams_with_background, swin_cam
from wsss_blocks.swtformer.hff import HFF
from wsss_blocks.swtformer.losses import CCLVariant, ccl_loss, gsc_loss
from wsss_blocks.swtformer.presets import Preset, preset_options
from wsss_blocks.swtformer.prototypes import refine_cams
from wsss_blocks.swtformer.seeds import _SIMILARITIES, Similarity, locate_seeds
from wsss_blocks.tokens import stage_info, stage_taps

__all__ = ["SWTformerOutput", "SWTformerHead", "SWTformer"]

#: the weighted terms besides ``cls`` (whose weight is 1)
LOSS_TERMS = ("gsc", "ccl")


class SWTformerOutput(NamedTuple):
    """What ``SWTformerHead`` and ``SWTformer`` return; ``None`` where a field does not apply.

    Attributes:
        logits: image logits ``(B, K)`` (spatial mean of ``cams``).
        cams: raw CAMs ``F_out`` ``(B, K, h4, w4)`` on the last-stage grid.
        norm_cams: ``Norm(ReLU(F_out))`` ``(B, K, h4, w4)`` (eq. 1; not label-masked).
        cams_with_bg: V2: the label-masked CAMs with background ``M`` ``(B, K+1, h4, w4)``
            (eq. 3); V1: ``None``.
        seeds: V2: one-hot seeds ``(B, K+1, h4, w4)`` bool (eq. 4); V1: ``None``.
        features: V2: the HFF output ``F_hie`` ``(B, D_h, hf, wf)``; V1: ``None``.
        rcams: V2: R-CAMs ``(B, K+1, hf, wf)`` (the paper's seed map); V1: ``None``.
        loss: with labels, ``cls + w_gsc gsc + w_ccl ccl`` (V1: ``cls``), 0-d; else ``None``.
        terms: with labels, the unweighted terms by name (``cls``; V2 also ``gsc``, ``ccl``);
            else ``None``.
    """

    logits: Tensor
    cams: Tensor
    norm_cams: Tensor
    cams_with_bg: Tensor | None
    seeds: Tensor | None
    features: Tensor | None
    rcams: Tensor | None
    loss: Tensor | None
    terms: dict[str, Tensor] | None


def _check_loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
    if loss_weights is None:
        loss_weights = {}
    if not isinstance(loss_weights, Mapping):
        raise TypeError(f"loss_weights: expected a mapping or None, got {type(loss_weights).__name__}")
    unknown = sorted(set(loss_weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(
            f"loss_weights: unknown keys {unknown}; allowed: {list(LOSS_TERMS)} (the cls term has weight 1)"
        )
    merged = {"gsc": 1.0, "ccl": 1.0, **loss_weights}
    return {k: float(check_range(f"loss_weights[{k!r}]", merged[k], 0.0)) for k in LOSS_TERMS}


def _keyword_options(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    return tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)


class SWTformerHead(nn.Module):
    """Everything of SWTformer after the backbone: CAM head, and for V2 HFF, seeds, R-CAM and losses.

    ``SWTformer`` is this module on top of a backbone; use it directly when the backbone
    lives elsewhere (a training loop that owns it) and pass the four stage maps, e.g. from
    ``wsss_blocks.tokens.stage_taps`` with ``final_norm=True``. Options as in
    ``SWTformer``, with ``in_dims`` instead of the backbone.

    Args:
        in_dims: channels of the four stages (Swin-T: 96, 192, 384, 768).
        num_classes: ``K``.
        version: ``"v1"`` or ``"v2"``.
        head_kernel_size: the CAM head's convolution size (1; MCTformer: 3).
        head_bias: the CAM head's bias (False; MCTformer: True).
        hff_out_dim: ``HFF`` ``out_dim`` (default ``in_dims[2]``).
        hff_output_stage: ``HFF`` ``output_stage``.
        hff_normalize: ``HFF`` ``normalize``.
        hff_detach_inputs: ``HFF`` ``detach_inputs``.
        similarity: ``locate_seeds`` structure map (paper: ``"abs_cos"``; SIPE:
            ``"relu_cos"``).
        bg_scale: ``locate_seeds`` background IoU factor.
        ccl_variant: ``ccl_loss`` ``variant``.
        loss_weights: weights of ``"gsc"`` and ``"ccl"`` (missing keys: 1; the ``cls`` term
            has weight 1). A weight of 0 leaves its term out of ``loss`` (it is still reported).
        device: where the parameters are created.
        dtype: their precision.

    Shape:
        - features: four NCHW maps ``(B, C_i, h_i, w_i)`` (``h_{i+1} = ceil(h_i / 2)``), the last
          normed; maps only (``stage_taps`` gives NCHW whatever the backbone's layout; a
          channels-last map is an error that says to permute it, tokens go through
          ``wsss_blocks.tokens.tokens_to_grid`` first)
        - output: ``SWTformerOutput``, see ``SWTformer``

    Examples:
        >>> heads = SWTformerHead((8, 16, 32, 64), 3, loss_weights={"ccl": 0.5})
        >>> maps = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4), (64, 2))]
        >>> out = heads(maps, torch.tensor([[1, 0, 1], [0, 1, 0]]))
        >>> out.cams.shape, out.rcams.shape, sorted(out.terms)
        (torch.Size([2, 3, 2, 2]), torch.Size([2, 4, 4, 4]), ['ccl', 'cls', 'gsc'])
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        *,
        version: Literal["v1", "v2"] = "v2",
        head_kernel_size: int = 1,
        head_bias: bool = False,
        hff_out_dim: int | None = None,
        hff_output_stage: Literal["stage3", "stage2"] = "stage3",
        hff_normalize: bool = True,
        hff_detach_inputs: bool = True,
        similarity: Similarity = "abs_cos",
        bg_scale: float = 0.5,
        ccl_variant: CCLVariant = "paper",
        loss_weights: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims = tuple(check_int(f"in_dims[{i}]", c, low=1) for i, c in enumerate(in_dims))
        if len(dims) != 4:
            raise ValueError(f"in_dims: expected 4 stages, got {len(dims)}: {dims}")
        self.in_dims = dims
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.version = check_option("version", version, ("v1", "v2"))
        self.similarity: Similarity = check_option("similarity", similarity, _SIMILARITIES)
        self.bg_scale = check_range("bg_scale", bg_scale, 0.0)
        self.ccl_variant: CCLVariant = check_option("ccl_variant", ccl_variant, ("paper", "plain"))
        self.loss_weights = _check_loss_weights(loss_weights)
        # the options of the parts, checked under the names this constructor takes them by
        head_kernel_size = check_int("head_kernel_size", head_kernel_size, low=1)
        if head_kernel_size % 2 == 0:
            raise ValueError(f"head_kernel_size: expected an odd int (the grid is kept), got {head_kernel_size}")
        head_bias = check_bool("head_bias", head_bias)
        if hff_out_dim is not None:
            hff_out_dim = check_int("hff_out_dim", hff_out_dim, low=1)
        hff_output_stage = check_option("hff_output_stage", hff_output_stage, ("stage3", "stage2"))
        hff_normalize = check_bool("hff_normalize", hff_normalize)
        hff_detach_inputs = check_bool("hff_detach_inputs", hff_detach_inputs)
        self.head = SwinCAMHead(
            dims[-1], self.num_classes, kernel_size=head_kernel_size, bias=head_bias,
            device=device, dtype=dtype,
        )
        self.hff: HFF | None = None
        if self.version == "v2":
            self.hff = HFF(
                dims, out_dim=hff_out_dim, output_stage=hff_output_stage, normalize=hff_normalize,
                detach_inputs=hff_detach_inputs, device=device, dtype=dtype,
            )

    @classmethod
    def from_preset(
        cls, in_dims: Sequence[int], num_classes: int, *, preset: Preset, **overrides: Any
    ) -> SWTformerHead:
        """Build the head with the options of a preset (``PRESETS``), keyword overrides on top.

        Args:
            in_dims: channels of the four stages.
            num_classes: ``K``.
            preset: ``"paper"`` or ``"official"`` (SIPE's code for the parts taken from it).
            **overrides: any keyword option of the constructor; ``loss_weights`` is merged
                with the preset's by key.

        Raises:
            ValueError: an unknown preset or option.

        Examples:
            >>> heads = SWTformerHead.from_preset((8, 16, 32, 64), 3, preset="official", bg_scale=1.0)
            >>> heads.similarity, heads.bg_scale, heads.loss_weights
            ('relu_cos', 1.0, {'gsc': 1.0, 'ccl': 0.0})
        """
        return cls(in_dims, num_classes, **preset_options(preset, overrides, _keyword_options(cls)))

    def forward(
        self, features: Sequence[Tensor], labels: Tensor | None = None, *, valid: Tensor | None = None
    ) -> SWTformerOutput:
        """CAMs, and for V2 seeds, ``F_hie`` and R-CAMs, of four stage maps; the losses with labels.

        Args:
            features: the four stage maps ``S1..S4``, NCHW (as ``stage_taps`` gives them; the
                last one is ``T_out``, after the final norm for the paper's model). Maps
                only: a channels-last map is an error that says to permute it.
            labels: multi-hot image labels; ``None`` (test split): every class allowed, no loss.
            valid: padding mask at any resolution (e.g. the image's).

        Shape:
            - features: four ``(B, C_i, h_i, w_i)`` with ``h_{i+1} = ceil(h_i / 2)``
            - labels: ``(B, K)``; valid: ``(B, H', W')`` bool
            - output: see ``SWTformerOutput``

        Returns:
            ``SWTformerOutput``; ``loss`` and ``terms`` only with labels, the V2 fields
            only for V2.
        """
        if isinstance(features, Tensor) or len(features) != 4:
            raise ShapeError("features: expected a sequence of 4 stage maps")
        dims = Dims()
        t_out = to_nchw("features[3]", features[-1], self.in_dims[-1], dims, "NCHW",
                        hint="permute it to NCHW (tokens.stage_taps gives NCHW maps)")
        if labels is not None:
            check_labels("labels", labels, dims, pattern=("B", self.num_classes))
        if valid is not None:
            check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
        cams, logits = self.head(t_out)
        norm_cams = swin_cam(cams)
        terms: dict[str, Tensor] = {}
        if labels is not None:
            with no_autocast(logits.device.type):
                if dims["B"] == 0:  # an empty batch: a graph-attached 0, not the NaN of an empty mean
                    terms["cls"] = logits.float().sum() * 0.0
                else:
                    terms["cls"] = F.multilabel_soft_margin_loss(logits.float(), labels.float())
        cams_with_bg = seeds = fused = rcams = None
        if self.hff is not None:
            cams_with_bg = cams_with_background(norm_cams, labels, valid=valid)
            seeds = locate_seeds(
                t_out, cams_with_bg, labels, similarity=self.similarity, bg_scale=self.bg_scale, valid=valid
            ).seeds
            fused = self.hff(features)
            rcams = refine_cams(fused, seeds)
            if labels is not None:
                terms["gsc"] = gsc_loss(cams_with_bg, rcams, valid=valid)
                terms["ccl"] = ccl_loss(cams_with_bg, rcams, labels, variant=self.ccl_variant, valid=valid)
        if not terms:
            return SWTformerOutput(logits, cams, norm_cams, cams_with_bg, seeds, fused, rcams, None, None)
        # the total (and every term) in the widest term precision, as ``cls + w * gsc + ...`` promotes
        wide = promoted_dtype(*terms.values())
        terms = {k: t.to(wide) for k, t in terms.items()}
        weights = {"cls": 1.0, **{k: self.loss_weights[k] for k in terms if k != "cls"}}
        total = weighted_total(terms, loss_weights=weights)
        return SWTformerOutput(logits, cams, norm_cams, cams_with_bg, seeds, fused, rcams, total.loss, total.terms)

    def extra_repr(self) -> str:
        return (
            f"in_dims={self.in_dims}, num_classes={self.num_classes}, version={self.version!r}, "
            f"similarity={self.similarity!r}, bg_scale={self.bg_scale}, ccl_variant={self.ccl_variant!r}, "
            f"loss_weights={self.loss_weights}"
        )


class SWTformer(nn.Module):
    """SWTformer-V1/V2 on a user-built timm Swin (paper §3, eq. 1-7).

    * **V1**: ``T_out`` = the last stage after the final norm (``forward_features``);
      ``F_out = Conv(T_out)``, logits = spatial mean, ``L_CLS`` = multilabel soft margin,
      ``CAM = Norm(ReLU(F_out))``.
    * **V2** adds: ``M`` = label-masked CAM with background (eq. 3); seeds from ``T_out``'s
      absolute-cosine structure (eq. 4); ``F_hie`` from ``HFF`` (our wiring, no code
      released); prototypes and R-CAM on ``F_hie`` (SIPE); ``L = L_CLS + w_gsc L_GSC +
      w_ccl L_CCL`` (eq. 7). The seed map of the paper is the R-CAM
      (``rcam_pseudo_mask``).

    The layers after the backbone are ``SWTformerHead`` (``self.heads``; ``self.head`` and
    ``self.hff`` are its CAM head and HFF). The backbone is registered as a submodule (so
    ``parameters()`` and ``state_dict()`` include it) but is never moved, cast or switched to
    eval here. Stage channels come from its ``feature_info``; it must have four stages, each
    half the size of the previous. ``from_preset`` builds the model with the paper's or
    SIPE's settings (``PRESETS``).

    Args:
        backbone: a timm Swin (any timm model whose ``forward_intermediates`` gives four
            maps).
        num_classes: ``K``.
        final_norm: apply the backbone's final norm to ``T_out``.
        version: ``"v1"`` or ``"v2"``.
        head_kernel_size: the CAM head's convolution size (1; MCTformer: 3).
        head_bias: the CAM head's bias (False; MCTformer: True).
        hff_out_dim: ``HFF`` ``out_dim``.
        hff_output_stage: ``HFF`` ``output_stage`` (``"stage3"``: stride 16).
        hff_normalize: ``HFF`` ``normalize``.
        hff_detach_inputs: ``HFF`` ``detach_inputs``.
        similarity: ``locate_seeds`` structure map (paper ``"abs_cos"``).
        bg_scale: ``locate_seeds`` background IoU factor.
        ccl_variant: ``ccl_loss`` variant.
        loss_weights: weights of ``"gsc"`` and ``"ccl"`` (paper: 1, 1; missing keys: 1); the
            ``cls`` term has weight 1.
        device: where the head's parameters are created.
        dtype: their precision.

    Shape:
        - images: ``(B, 3, H, W)``; labels: ``(B, K)``; valid: ``(B, H', W')`` bool (any
          resolution)
        - output: ``SWTformerOutput`` -- ``logits (B, K)``, ``cams`` and ``norm_cams``
          ``(B, K, h4, w4)``; V2 adds ``cams_with_bg`` and ``seeds`` ``(B, K+1, h4, w4)``,
          ``features (B, D_h, hf, wf)``, ``rcams (B, K+1, hf, wf)``; with labels ``loss``
          (0-d) and ``terms`` (``cls``; V2 also ``gsc``, ``ccl``).

    Examples:
        >>> import timm
        >>> swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
        ...                          depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
        ...                          img_size=64)
        >>> model = SWTformer(swin, 3)
        >>> out = model(torch.randn(2, 3, 64, 64), torch.tensor([[1, 0, 1], [0, 1, 0]]))
        >>> out.norm_cams.shape, out.rcams.shape, out.loss.dim(), sorted(out.terms)
        (torch.Size([2, 3, 2, 2]), torch.Size([2, 4, 4, 4]), 0, ['ccl', 'cls', 'gsc'])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        final_norm: bool = True,
        version: Literal["v1", "v2"] = "v2",
        head_kernel_size: int = 1,
        head_bias: bool = False,
        hff_out_dim: int | None = None,
        hff_output_stage: Literal["stage3", "stage2"] = "stage3",
        hff_normalize: bool = True,
        hff_detach_inputs: bool = True,
        similarity: Similarity = "abs_cos",
        bg_scale: float = 0.5,
        ccl_variant: CCLVariant = "paper",
        loss_weights: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.final_norm = check_bool("final_norm", final_norm)
        check_instance("backbone", backbone, nn.Module, "an nn.Module (a timm Swin)")
        try:
            info = stage_info(backbone)
        except TypeError as err:
            raise TypeError(f"backbone: {str(err).removeprefix('model: ')}") from None
        strides = [s.stride for s in info]
        if len(info) != 4 or any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
            raise ValueError(
                f"backbone: expected a hierarchical model with 4 stages whose strides double (a Swin: 4, 8, "
                f"16, 32), {type(backbone).__name__} has {len(info)} stages at strides {strides}"
            )
        self.backbone = backbone
        self.heads = SWTformerHead(
            tuple(s.channels for s in info), num_classes, version=version, head_kernel_size=head_kernel_size,
            head_bias=head_bias, hff_out_dim=hff_out_dim, hff_output_stage=hff_output_stage,
            hff_normalize=hff_normalize, hff_detach_inputs=hff_detach_inputs, similarity=similarity,
            bg_scale=bg_scale, ccl_variant=ccl_variant, loss_weights=loss_weights, device=device, dtype=dtype,
        )

    @classmethod
    def from_preset(
        cls, backbone: nn.Module, num_classes: int, *, preset: Preset, **overrides: Any
    ) -> SWTformer:
        """Build the model with the options of a preset (``PRESETS``), keyword overrides on top.

        ``"paper"``: eq. 4's absolute cosine, CLS + GSC + CCL (the constructor's defaults).
        ``"official"``: SWTformer released no code; SIPE's code for the parts taken from it
        (ReLU cosine, CLS + GSC, CCL weight 0).

        Args:
            backbone: a timm Swin.
            num_classes: ``K``.
            preset: ``"paper"`` or ``"official"``.
            **overrides: any keyword option of the constructor (``final_norm``, ``version``,
                ...); ``loss_weights`` is merged with the preset's by key.

        Raises:
            ValueError: an unknown preset or option.

        Examples:
            >>> import timm
            >>> swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
            ...                          depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
            ...                          img_size=64)
            >>> model = SWTformer.from_preset(swin, 3, preset="official", loss_weights={"ccl": 0.5})
            >>> model.heads.similarity, model.heads.loss_weights
            ('relu_cos', {'gsc': 1.0, 'ccl': 0.5})
        """
        return cls(backbone, num_classes, **preset_options(preset, overrides, _keyword_options(cls)))

    @property
    def head(self) -> SwinCAMHead:
        return self.heads.head

    @property
    def hff(self) -> HFF | None:
        return self.heads.hff

    def forward(self, images: Tensor, labels: Tensor | None = None, *, valid: Tensor | None = None) -> SWTformerOutput:
        """Run the backbone's four stages through ``SWTformerHead``.

        Args:
            images: normalised images of a size the backbone takes.
            labels: multi-hot image labels; ``None`` (test split): every class allowed, no loss.
            valid: padding mask at any resolution (e.g. the image's); every grid of the model
                takes it through ``wsss_blocks.cam.valid_to_grid``.

        Shape:
            - images: ``(B, 3, H, W)``; labels: ``(B, K)``; valid: ``(B, H', W')`` bool
            - output: see ``SWTformerOutput``

        Returns:
            ``SWTformerOutput``; ``loss`` and ``terms`` only with labels, the V2 fields
            only for V2.
        """
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        if labels is not None:
            check_labels("labels", labels, dims, pattern=("B", self.heads.num_classes))
        if valid is not None:
            check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
        maps = stage_taps(self.backbone, images, final_norm=self.final_norm).features
        return self.heads(maps, labels, valid=valid)

    def extra_repr(self) -> str:
        return f"final_norm={self.final_norm}"
