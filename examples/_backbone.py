"""Backbones of the reference trainer: build a timm ViT or Swin, and read its final feature map.

One concept: the backbone. Two families are supported, told apart by the timm class, never by
guessing from token counts:

* ``vit``: any timm VisionTransformer-family model (``blocks``, ``patch_embed``,
  ``forward_intermediates``); tokens ``(B, N, D)`` on a ``patch_size`` grid.
* ``swin``: timm ``SwinTransformer`` / ``SwinTransformerV2`` (``swin_*``, ``swinv2_*`` names;
  ``swinv2_cr_*`` and ``swin_s3_*`` are other architectures and are refused). Its
  ``forward_features`` returns the normed final stage **NHWC** ``(B, h, w, C)``; it is
  rearranged to NCHW explicitly. The input is padded bottom/right to a multiple of the final
  stride (patch size x 2 per patch merging) so any image size works, like ViT's
  ``dynamic_img_pad``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch.nn.functional as F
from _config import ConfigError, is_swin_name
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks.tokens import grid_to_tokens, vit_taps

__all__ = ["BackboneKind", "backbone_kind", "build_backbone", "feature_dim", "feature_stride",
           "final_feature_map", "final_tokens"]

BackboneKind = Literal["vit", "swin"]


def _swin_classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return (SwinTransformer, SwinTransformerV2)


def backbone_kind(model: nn.Module) -> BackboneKind:
    """``"swin"`` for timm Swin (V1/V2), ``"vit"`` for a timm ViT-family model, else ``TypeError``."""
    if isinstance(model, _swin_classes()):
        return "swin"
    if all(hasattr(model, a) for a in ("blocks", "patch_embed", "forward_intermediates")):
        return "vit"
    raise TypeError(f"{type(model).__name__} is neither a timm ViT-family model nor a timm Swin")


def feature_dim(model: nn.Module) -> int:
    """Channels of the final features (ViT ``embed_dim``; Swin the last stage's width)."""
    return int(getattr(model, "num_features"))


def feature_stride(model: nn.Module) -> tuple[int, int]:
    """Input pixels per final feature cell ``(sh, sw)``; ``(1, 1)`` for a module without a patch
    embedding (test stand-ins)."""
    if isinstance(model, _swin_classes()):
        s = int(getattr(model, "feature_info")[-1]["reduction"])
        return s, s
    p = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def final_feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """The final (normed) feature map ``(B, C, h, w)`` of a ViT or Swin backbone.

    ViT: the final patch tokens on their grid. Swin: ``forward_features`` (NHWC) rearranged to
    NCHW, after padding the input to a multiple of :func:`feature_stride`.
    """
    if backbone_kind(model) == "vit":
        taps = vit_taps(model, images, layers=())
        return rearrange(taps.final, "b (h w) c -> b c h w", h=taps.size[0], w=taps.size[1])
    if getattr(model, "output_fmt", None) != "NHWC":  # timm Swin's documented layout
        fmt = getattr(model, "output_fmt", None)
        raise TypeError(f"{type(model).__name__}: expected output_fmt 'NHWC', got {fmt!r}")
    sh, sw = feature_stride(model)
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % sh, (-w) % sw
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    swin: Any = model
    return rearrange(swin.forward_features(images), "b h w c -> b c h w")


def final_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Final features as tokens ``(B, h*w, C)`` and their grid ``(h, w)`` (ViT or Swin)."""
    fmap = final_feature_map(model, images)
    return grid_to_tokens(fmap), (int(fmap.shape[-2]), int(fmap.shape[-1]))


def build_backbone(cfg: Any) -> nn.Module:
    """A timm ViT or Swin from ``cfg`` (``num_classes=0``); weights only from a local file.

    ViT takes ``--patch-size/--depth/--embed-dim/--num-heads`` (one value); Swin takes
    ``--patch-size/--depths/--embed-dim/--num-heads`` (one per stage) and ``--window-size``.
    """
    import timm

    swin = is_swin_name(cfg.model)  # flag combinations were checked in _config.validate
    kw: dict[str, Any] = {"num_classes": 0, "img_size": cfg.img_size}
    if swin:
        kw["dynamic_img_size"] = cfg.dynamic_size  # masks built per input size; padding in final_feature_map
        for name in ("depths", "num_heads"):
            if getattr(cfg, name) is not None:
                kw[name] = tuple(getattr(cfg, name))
        if cfg.window_size is not None:
            kw["window_size"] = cfg.window_size
    else:
        kw.update(dynamic_img_size=cfg.dynamic_size, dynamic_img_pad=cfg.dynamic_size)  # any size: pad
        if cfg.depth is not None:
            kw["depth"] = cfg.depth
        if cfg.num_heads is not None:
            kw["num_heads"] = cfg.num_heads[0]
    for name in ("patch_size", "embed_dim"):
        if getattr(cfg, name) is not None:
            kw[name] = getattr(cfg, name)
    if cfg.drop_path > 0:
        kw["drop_path_rate"] = cfg.drop_path
    if cfg.pretrained is not None:
        kw.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(cfg.pretrained)})
    try:
        model = timm.create_model(cfg.model, **kw)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"--model: unknown timm model {cfg.model!r}") from err
        raise
    except (TypeError, AssertionError) as err:
        raise ConfigError(f"--model: {cfg.model!r} does not accept these settings: {err}") from err
    try:
        kind = backbone_kind(model)
    except TypeError as err:
        raise ConfigError(f"--model: {cfg.model!r} is not a timm ViT-family or Swin model") from err
    if (kind == "swin") != swin:
        raise ConfigError(f"--model: {cfg.model!r} built a {kind} model, not what its name says")
    return model
