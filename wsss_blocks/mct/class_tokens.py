"""Class tokens of a multi-class-token ViT: add them, read them, their attention CAMs.

``add_class_tokens`` turns a timm ViT into a model with ``C`` leading class tokens in
place (MCTformer: one token per class). ``final_tokens`` and ``class_scores`` give
the MCT class logits (mean of the last block's class tokens over ``D``, no final norm), and
``attention_cams`` the class-to-patch attention maps of the last blocks, optionally
refined by the patch-to-patch attention, following MCTformer's released code.

Every function reads the model through ``wsss_blocks.adapters``: timm ViTs (also EVA and
BEiT attention) and the ViT copies MCTformer, TS-CAM, ToCo and CPEWS ship (blocks returning
``(tokens, attention)``, ``cls_token`` of ``C`` tokens, no ``num_prefix_tokens``) work as
they are; another layout needs a registered adapter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._attention_capture import (
    AttentionTap,
    class_row_attention,
    default_class_tokens,
    find_attention_modules,
    patch_patch_attention,
)
from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import ShapeError, check_bool, check_instance, check_int, check_option, check_shape
from wsss_blocks.adapters import QueryKey, _check_images, vit_adapter
from wsss_blocks.tokens import run_model

__all__ = ["FinalTokens", "add_class_tokens", "final_tokens", "class_scores", "attention_cams"]


class FinalTokens(NamedTuple):
    """The last block's tokens ``final_tokens`` returns (unpacks as ``class_tokens, features``).

    Attributes:
        class_tokens: the ``C`` leading class tokens ``(B, C, D)``.
        features: the patch tokens ``(B, n, D)`` (registers dropped), row-major on the patch grid.

    Examples:
        >>> out = FinalTokens(torch.zeros(2, 3, 8), torch.zeros(2, 16, 8))
        >>> class_tokens, features = out
        >>> class_scores(out.class_tokens).shape
        torch.Size([2, 3])
    """

    class_tokens: Tensor
    features: Tensor


def add_class_tokens(model: nn.Module, num_classes: int) -> nn.Module:
    """Give a ViT ``num_classes`` class tokens, in place (MCTformer initialisation).

    The single ``cls_token`` is repeated ``C`` times, and so is its position-embedding slot
    (unless ``no_embed_class``); every ``num_prefix_tokens`` count the model keeps (the
    model, ``PatchDropout``, EVA's rotary attention; ``num_tokens`` of timm 0.4-0.5 layouts)
    grows by ``C - 1``. State-dict keys are unchanged; only the shapes of ``cls_token``
    ``(1, C, D)`` and ``pos_embed`` change. ``head``, ``global_pool`` and ``norm`` are untouched
    (use ``final_tokens`` + ``class_scores``, not ``model(images)``, for MCT logits).
    Build the optimizer afterwards. For MCT checkpoints convert a fresh model, then load.
    Convert before ``doei.patch``: a DOEI-patched model is refused (its handle counted the
    class tokens at patch time).

    Args:
        model: a ViT with exactly one class token and no distillation token (a timm
            ``VisionTransformer``, an EVA, or a ViT copy with the same attributes).
        num_classes: ``C >= 1``; ``1`` is a no-op.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model has no class token, already has several, has a distillation
            token, a relative position bias sized for one class token (BEiT), or is patched
            by DOEI.

    Examples:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
        ...                       embed_dim=32, num_heads=2)
        >>> m = add_class_tokens(m, 3)
        >>> m.cls_token.shape, m.pos_embed.shape, m.num_prefix_tokens
        (torch.Size([1, 3, 32]), torch.Size([1, 7, 32]), 3)
    """
    check_instance("model", model, nn.Module, "an nn.Module (a ViT with one class token)")
    c = check_int("num_classes", num_classes, low=1)
    if getattr(model, "_doei_handle", None) is not None:
        raise ValueError(
            "model is patched by DOEI, whose handle counted its class tokens at patch time; call "
            "doei.unpatch(model), then add_class_tokens, then doei.patch(model) again"
        )
    if not hasattr(model, "cls_token"):
        raise ValueError(
            f"model: {type(model).__name__} has no class-token parameter (cls_token); multi-class tokens need a "
            "ViT (not a Swin or a CNN)"
        )
    cls = getattr(model, "cls_token", None)
    if cls is None:
        raise ValueError(
            f"model: {type(model).__name__} has no class token (cls_token is None); build it with one "
            "(timm: class_token=True)"
        )
    if cls.shape[1] != 1:
        raise ValueError(f"model already has {cls.shape[1]} class tokens; expected exactly one")
    if getattr(model, "dist_token", None) is not None:
        raise ValueError("models with a distillation token are not supported")
    if any(getattr(m, "relative_position_index", None) is not None for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has a relative position bias (BEiT style) sized for one class token; "
            "add_class_tokens cannot extend it"
        )
    if c == 1:
        return model
    with torch.no_grad():
        model.cls_token = nn.Parameter(cls.detach().repeat(1, c, 1), requires_grad=cls.requires_grad)
        pos = getattr(model, "pos_embed", None)
        if pos is not None and not getattr(model, "no_embed_class", False):
            # the single class-token slot (checked above) comes first; registers and patches follow
            cls_pos, other_pos = pos.split([1, pos.shape[1] - 1], dim=1)
            new = torch.cat([cls_pos.repeat(1, c, 1), other_pos], dim=1)
            model.pos_embed = nn.Parameter(new.detach(), requires_grad=pos.requires_grad)
    for mod in model.modules():
        for attr in ("num_prefix_tokens", "num_tokens"):
            value = mod.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(mod, attr, value + c - 1)
    return model


def final_tokens(
    model: nn.Module,
    images: Tensor,
    *,
    num_class_tokens: int | None = None,
    final_norm: bool = False,
) -> FinalTokens:
    """Last-block class tokens and patch tokens (registers dropped), from one forward pass.

    Runs the model's own ``forward_features`` with a forward hook on the last block (see
    ``wsss_blocks.adapters``), so it also works on the ViT copies MCTformer ships.

    Args:
        model: a ViT (usually after ``add_class_tokens``).
        images: normalised images, of a size the model takes (cast to the model's dtype).
        num_class_tokens: ``C``; default the model's class tokens (registers excluded).
        final_norm: apply the model's final norm (MCTformer never does: default ``False``).

    Returns:
        ``FinalTokens`` ``(class_tokens, features)``.

    Shape:
        - images: ``(B, 3, H, W)``
        - class_tokens: ``(B, C, D)``
        - features: ``(B, n, D)``, ``n`` patches of the model's grid

    Raises:
        ValueError: the model has no class token (the message names the fix), ``C`` out of
            range, or an image size the model cannot take.

    Examples:
        >>> import timm
        >>> m = add_class_tokens(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1,
        ...                                          embed_dim=32, num_heads=2), 4)
        >>> out = final_tokens(m, torch.randn(2, 3, 32, 32))
        >>> out.class_tokens.shape, out.features.shape
        (torch.Size([2, 4, 32]), torch.Size([2, 4, 32]))
    """
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    adapter = vit_adapter(model)
    c = default_class_tokens(model, num_class_tokens, adapter=adapter, what="mct.final_tokens")
    final_norm = check_bool("final_norm", final_norm)
    _check_images(adapter, model, images)
    last = len(adapter.blocks(model)) - 1
    tokens = run_model(model, images, adapter=adapter, block_indices=(last,))[last]
    if final_norm:
        tokens = adapter.final_norm(model)(tokens)
    return FinalTokens(tokens[:, :c], tokens[:, adapter.num_prefix_tokens(model):])


def class_scores(class_tokens: Tensor) -> Tensor:
    """MCT class logits: the mean of each class token over ``D``.

    Shape:
        - class_tokens: ``(B, C, D)``
        - output: ``(B, C)``

    Examples:
        >>> class_scores(torch.tensor([[[1.0, 3.0], [0.0, -2.0]]]))
        tensor([[ 2., -1.]])
    """
    check_shape("class_tokens", class_tokens, ["B", "C", "D"], dtype="float")
    return class_tokens.mean(dim=-1)


@torch.no_grad()
def attention_cams(
    model: nn.Module,
    images: Tensor,
    *,
    last_k: int = 3,
    num_class_tokens: int | None = None,
    fuse: Literal["sum", "mean"] = "sum",
    refine: bool = False,
) -> Tensor:
    """MCT attention maps: head-mean class-to-patch attention of the last ``last_k`` blocks.

    The model's own post-softmax attention is rebuilt from each block's queries and keys,
    read by the block's ``wsss_blocks.adapters.AttentionAdapter`` during the model's own
    forward (fused or not; with DOEI patched it is still the model's attention, never DOEI's
    scores). Maps are summed (``fuse="sum"``, V1/V2) or averaged (``fuse="mean"``, MCTformer+)
    over the blocks. With ``refine`` they are multiplied by ``A_pp``, the head-mean
    patch-to-patch attention summed over all blocks (no row normalisation):
    ``cam_i <- sum_j A_pp[i, j] cam_j``. Raw values (no label masking, upsampling or
    normalisation). Runs under ``torch.no_grad()``.

    One map per class token: on a model with one class token (a plain ViT or DeiT, TS-CAM)
    the result is one class-agnostic map ``(B, 1, h, w)``; give the model one class token per
    class with ``add_class_tokens`` for per-class maps.

    Args:
        model: a ViT with ``C`` leading class tokens (timm, EVA, BEiT, or a ViT copy such as
            MCTformer's).
        images: normalised images, of a size the model takes (cast to the model's dtype).
        last_k: blocks used, in ``[1, L]``.
        num_class_tokens: ``C``; default the model's class tokens (registers excluded).
        fuse: ``"sum"`` or ``"mean"`` of the maps of the ``last_k`` blocks.
        refine: apply the patch-affinity refinement.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``(B, C, h, w)``, the model's patch grid

    Raises:
        ValueError: the model has no class token (the message names the fix), an option out
            of range, or an image size the model cannot take.
        TypeError: an attention module the library cannot read (the message names
            ``wsss_blocks.adapters.register_attention_adapter``).

    Examples:
        >>> import timm
        >>> m = add_class_tokens(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2,
        ...                                          embed_dim=32, num_heads=2), 3)
        >>> attention_cams(m, torch.randn(1, 3, 32, 32), last_k=2).shape
        torch.Size([1, 3, 2, 2])
    """
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    check_option("fuse", fuse, ("sum", "mean"))
    refine = check_bool("refine", refine)
    adapter = vit_adapter(model)
    c = default_class_tokens(model, num_class_tokens, adapter=adapter, what="mct.attention_cams")
    entries = [(m, a) for _, m, a in find_attention_modules(model)]
    big_l = len(entries)
    last_k = check_int("last_k", last_k)
    if not 1 <= last_k <= big_l:
        raise ValueError(f"last_k: expected a value in [1, {big_l}], got {last_k}")
    image_size = _check_images(adapter, model, images)
    h, w = adapter.grid(model, image_size)
    p0 = adapter.num_prefix_tokens(model)
    first_cam = big_l - last_k
    acc: dict[str, Tensor] = {}

    def on_call(pos: int, _attn: nn.Module, qk: QueryKey) -> None:
        with no_autocast(qk.q.device.type):
            s = compute_dtype(qk.q)
            q, k = qk.q.to(s) * float(qk.scale), qk.k.to(s)
            bias = qk.attn_bias
            if pos >= first_cam:
                cam = class_row_attention(q, k, c, bias)[..., p0:].mean(1)  # (B, C, n)
                acc["cam"] = cam if "cam" not in acc else acc["cam"] + cam
            if refine:
                app = patch_patch_attention(q, k, p0, 256, bias)
                acc["app"] = app if "app" not in acc else acc["app"] + app

    offset = 0 if refine else first_cam
    targets = entries if refine else entries[first_cam:]
    run_model(
        model,
        images,
        adapter=adapter,
        hooks=lambda: [AttentionTap(targets, lambda pos, a, qk: on_call(pos + offset, a, qk),
                                    what="mct.attention_cams")],
    )
    cam = acc["cam"]
    if cam.shape[-1] != h * w:
        raise ShapeError(f"images: {tuple(images.shape)} gives {cam.shape[-1]} patch tokens, expected grid {h}x{w}")
    if fuse == "mean":
        cam = cam / last_k
    if refine:
        with no_autocast(cam.device.type):  # fp32 like the unrefined maps, also under autocast
            cam = torch.einsum("bij,bcj->bci", acc["app"], cam)
    return rearrange(cam, "b c (h w) -> b c h w", h=h, w=w)
