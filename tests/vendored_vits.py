"""Tiny random-init stand-ins for the Vision Transformers that official WSSS codebases vendor.

Written from scratch for the ``wsss_blocks`` tests; no code was copied from the repositories.
Each class reproduces the *structure* of one released model: module tree, attribute names,
parameter shapes, forward signatures and return conventions. Defaults are tiny (embed_dim 32,
depth 2, 2 heads, img_size 32, patch 8) so every fixture runs on CPU in milliseconds. Weights
are random; numbers are not meant to match any released checkpoint.

Layouts mirrored (the source snapshots each class was written from):

* ``OldTimmViT``: timm 0.4.12 / 0.5.4 ``VisionTransformer`` (optionally distilled, DeiT style).
* ``Timm06ViT``: timm 0.6.x ``VisionTransformer`` (``num_prefix_tokens``, LayerScale slots).
* ``MCTformerV1Like`` / ``MCTformerV2Like``: xulianuwa/MCTformer ``models.py`` at c5db727.
* ``MCTformerPlusLike``: xulianuwa/MCTformer ``models.py`` at HEAD (0acc27a).
* ``TSCAMViTLike``: vasgaowei/TS-CAM ``lib/models/deit.py`` (class ``TSCAM``).
* ``ToCoViTLike`` / ``ToCoNetworkLike``: rulixiang/ToCo ``model/backbone/vit.py`` and
  ``model/model_seg_neg.py``.
* ``CPEWSViTLike`` / ``CPEWSNetworkLike``: ZUA-CV2023/CPEWS ``model/backbone/vit.py``,
  ``vit_att.py`` and ``model/model_seg_neg_por*.py`` (a ToCo fork).

MCTformer, TS-CAM, ToCo and CPEWS share one vendored timm-0.3-era core: their ``Attention``
returns ``(out, weights)`` with ``weights`` the post-softmax, pre-dropout probabilities
``(B, H, N, N)``, and their ``Block`` returns ``(x, weights)``. Here that core is
``VendoredAttention`` / ``VendoredBlock`` (in every original the classes are named
``Attention`` and ``Block``; the ``ORIGINAL_NAME`` class attribute records that).

Dependencies: torch, plus two of the three timm helpers the originals import from
``timm.models.layers``: ``DropPath`` and ``trunc_normal_`` (from ``timm.layers`` here); the
third, ``to_2tuple``, is a typed local copy. ``PatchEmbed``, ``Mlp``, ``Attention`` and
``Block`` are re-implemented, as the originals vendor their own copies (timm 0.4-0.6 ship them
inside timm; re-implemented here too).

Deviations from the originals, all deliberate:

* MCTformer+'s ranking pooling builds its weights with a hard-coded ``.cuda()``; here they are
  built on the input's device.
* CPEWS's ``PatchEmbed.forward`` moves the input to CUDA (``x.cuda()``); here only with
  ``force_cuda=True`` (default ``False``) so CPU tests run.
* The ToCo/CPEWS network wrappers omit the CTC crop path (``crops=`` / ``forward_proj``) and
  implement the weight-normalised last layer directly (same ``weight_g`` / ``weight_v`` keys
  as ``torch.nn.utils.weight_norm``, without its deprecation warning).
* The hybrid (CNN) patch embedding of the 0.3-era copies is not reproduced.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

__all__ = [
    "VendoredPatchEmbed",
    "VendoredAttention",
    "VendoredBlock",
    "LegacyPatchEmbed",
    "LegacyAttention",
    "LegacyBlock",
    "Timm06Block",
    "OldTimmViT",
    "Timm06ViT",
    "MCTformerV1Like",
    "MCTformerV2Like",
    "MCTformerPlusLike",
    "TSCAMViTLike",
    "ToCoViTLike",
    "CPEWSViTLike",
    "CTCHeadLike",
    "LargeFOVLike",
    "ToCoNetworkLike",
    "CPEWSNetworkLike",
    "LAYOUTS",
    "official_keys",
    "official_state_dict",
    "official_checkpoint",
]

_LN = partial(nn.LayerNorm, eps=1e-6)  # every registered model in these repos uses eps 1e-6


def to_2tuple(value: int | tuple[int, int]) -> tuple[int, int]:
    """``n -> (n, n)``; pairs pass through (timm's ``to_2tuple``, typed)."""
    if isinstance(value, tuple):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


def _init_linear_ln(m: nn.Module) -> None:
    """The vendored ``_init_weights``: trunc-normal(.02) Linear weights, zero bias, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """Two-layer MLP with the vendored names ``fc1``, ``act``, ``fc2``, ``drop`` (one dropout module used twice)."""

    def __init__(
        self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ---------------------------------------------------------------------------------------------
# The vendored timm-0.3-era core shared by MCTformer, TS-CAM, ToCo and CPEWS
# ---------------------------------------------------------------------------------------------


class VendoredPatchEmbed(nn.Module):
    """The vendored ``PatchEmbed``: ``img_size``, ``patch_size`` (2-tuples), ``num_patches``, ``proj``.

    Faithful: no ``grid_size``, no ``flatten``, no ``norm``, no ``dynamic_img_size`` or
    ``strict_img_size`` attributes; ``num_patches`` is computed from ``img_size`` at build
    time and never updated. MCTformer, ToCo and CPEWS accept any input size (the size check
    is commented out); TS-CAM asserts ``H, W == img_size`` (``check_size=True`` here). CPEWS
    calls ``x.cuda()`` first (``force_cuda=True`` here).

    Shape:
        - x: ``(B, 3, H, W)`` -> ``(B, (H//p)*(W//p), D)``
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        check_size: bool = False,
        force_cuda: bool = False,
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        patch_size = to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size[1] // patch_size[1]) * (img_size[0] // patch_size[0])
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self._check_size = check_size
        self._force_cuda = force_cuda

    def forward(self, x: Tensor) -> Tensor:
        """Patchify and project; tokens in row-major ``(h, w)`` order."""
        if self._force_cuda:
            x = x.cuda()
        if self._check_size:
            assert tuple(x.shape[-2:]) == tuple(self.img_size), (
                f"Input image size ({x.shape[-2]}*{x.shape[-1]}) doesn't match model "
                f"({self.img_size[0]}*{self.img_size[1]})."
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class VendoredAttention(nn.Module):
    """The vendored attention (original class name ``Attention``): returns ``(out, weights)``.

    Attributes as in the originals: ``num_heads``, ``scale`` (``qk_scale or head_dim**-0.5``),
    ``qkv`` (one fused ``Linear(D, 3D)``, bias = ``qkv_bias``), ``attn_drop``, ``proj``
    (``Linear(D, D)`` with bias), ``proj_drop``. No ``fused_attn``, ``head_dim``, ``attn_dim``,
    ``q_norm``, ``k_norm``, ``norm`` or ``gate``. Extra unused constructor keywords are stored
    as attributes: MCTformer passes ``num_classes``, ToCo / TS-CAM / CPEWS pass ``vis``.

    ``forward(x)`` takes no mask. The scores are ``(q @ k^T) * scale`` (scale applied after
    the product, unlike timm 1.x which scales ``q`` first), softmax over keys; ``weights`` is
    that softmax output *before* ``attn_drop``; the output uses the dropped copy. ``qkv``'s
    output is split as ``(3, heads, head_dim)`` on the last axis, the same as timm.

    Shape:
        - x: ``(B, N, D)`` -> ``((B, N, D), (B, H, N, N))``
    """

    ORIGINAL_NAME = "Attention"

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        **extra: Any,
    ) -> None:
        super().__init__()
        for key, value in extra.items():
            setattr(self, key, value)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Self-attention; returns the output and the pre-dropout attention probabilities."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out)), probs


class VendoredBlock(nn.Module):
    """The vendored pre-norm block (original class name ``Block``): returns ``(x, weights)``.

    Children in order: ``norm1``, ``attn`` (:class:`VendoredAttention`), ``drop_path``
    (``nn.Identity`` when the rate is 0, else timm ``DropPath``; one module used for both
    branches), ``norm2``, ``mlp`` (``fc1``/``act``/``fc2``/``drop``). No LayerScale, no
    ``ls1``/``ls2``/``drop_path1``/``drop_path2``. ``forward(x)`` takes no mask.

    Shape:
        - x: ``(B, N, D)`` -> ``((B, N, D), (B, H, N, N))``
    """

    ORIGINAL_NAME = "Block"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        **extra: Any,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = VendoredAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, **extra
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One residual attention + MLP step; also returns the attention probabilities."""
        out, weights = self.attn(self.norm1(x))
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class _VendoredViT(nn.Module):
    """The vendored ``VisionTransformer`` base that the WSSS models subclass.

    Module tree: ``patch_embed`` (:class:`VendoredPatchEmbed`), ``cls_token`` ``(1, 1, D)``,
    ``pos_embed`` ``(1, P + 1, D)``, ``pos_drop``, ``blocks`` (``nn.ModuleList`` of
    :class:`VendoredBlock`), ``norm``, ``head`` (``Linear(D, num_classes)``). Attributes
    ``num_classes``, ``embed_dim``, ``num_features``. No ``num_prefix_tokens``,
    ``num_reg_tokens``, ``no_embed_class``, ``dynamic_img_size``, ``global_pool``,
    ``forward_intermediates`` or ``forward_head``.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 4,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _LN,
        *,
        check_size: bool = False,
        force_cuda: bool = False,
        block_extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = VendoredPatchEmbed(
            img_size, patch_size, in_chans, embed_dim, check_size=check_size, force_cuda=force_cuda
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            [
                VendoredBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    qk_scale,
                    drop_rate,
                    attn_drop_rate,
                    rates[i],
                    norm_layer=norm_layer,
                    **(block_extra or {}),
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_ln)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the originals exclude from weight decay."""
        return {"pos_embed", "cls_token"}

    def _run_blocks(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """All blocks; returns the last output, every block output and every attention tensor."""
        outs, weights = [], []
        for blk in self.blocks:
            x, w = blk(x)
            outs.append(x)
            weights.append(w)
        return x, outs, weights


def _conv_head(model: _VendoredViT, num_classes: int) -> nn.Conv2d:
    """The 3x3 patch-CAM head of MCTformer-V2/+ and TS-CAM (``Conv2d(D, C, 3, padding=1)``, bias)."""
    head = nn.Conv2d(model.embed_dim, num_classes, kernel_size=3, stride=1, padding=1)
    head.apply(_init_linear_ln)  # as in the originals: a no-op for Conv2d (PyTorch default init kept)
    return head


def _tokens_to_map(patches: Tensor, h_in: int, w_in: int, patch: int) -> Tensor:
    """MCTformer/TS-CAM reshape: non-square input uses ``(H//p, W//p)``, square input ``sqrt(P)``."""
    n, p, c = patches.shape
    if h_in != w_in:
        grid = (h_in // patch, w_in // patch)
    else:
        side = int(p**0.5)
        grid = (side, side)
    return patches.reshape(n, grid[0], grid[1], c).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# MCTformer
# ---------------------------------------------------------------------------------------------


class MCTformerV1Like(_VendoredViT):
    """MCTformer-V1 layout (``MCTformerV1`` in xulianuwa/MCTformer ``models.py`` at c5db727).

    Faithful: ``cls_token`` ``(1, C, D)`` and ``pos_embed`` ``(1, C + P, D)`` (one position
    vector per class token, patches after), ``C = num_classes``; ``head`` stays the base
    ``Linear(D, C)`` and is never used by ``forward`` (``last_opt='fc'`` swaps in a grouped
    ``Conv1d(C, C, kernel_size=D, groups=C)``, also unused); ``norm`` exists but is never
    applied. ``num_patches`` and ``mask_type`` (None) are model attributes. Blocks receive
    ``num_classes`` as an (unused) attention attribute.

    ``interpolate_pos_encoding(x, w, h)`` (``w, h`` are really the input height and width):
    returns ``pos_embed`` unchanged when the token count matches and the input is square;
    otherwise keeps the ``C`` class positions and bicubically resizes the square patch grid
    with ``scale_factor=((H//p + 0.1)/sqrt(P), (W//p + 0.1)/sqrt(P))`` (DINO's +0.1), no
    ``align_corners``/antialias, then asserts the size.

    ``forward_features(x, n=12)`` -> ``(class_tokens (B, C, D), weights)``: the last block's
    class tokens without ``norm``; ``weights`` holds the attention of the last ``n`` blocks.
    ``forward(x, n_layers=12, return_att=False)`` -> logits ``(B, C)`` (class tokens averaged
    over ``D``), in train and eval mode alike. With ``return_att=True`` ->
    ``(logits, mtatt, patch_attn)``: ``mtatt`` is the head-mean class-to-patch attention
    summed over the last ``n_layers`` blocks, **flat** ``(B, C, P)`` (V1 does not reshape it);
    ``patch_attn`` is the head-mean patch-to-patch attention of every block, ``(L, B, P, P)``.
    """

    def __init__(self, *, num_classes: int = 4, last_opt: str = "average", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, block_extra={"num_classes": num_classes}, **kwargs)
        self.mask_type = None
        self.num_patches = self.patch_embed.num_patches
        self.last_opt = last_opt
        if last_opt == "fc":
            self.head = nn.Conv1d(num_classes, num_classes, kernel_size=self.embed_dim, groups=num_classes)
            self.head.apply(_init_linear_ln)
        c, d = num_classes, self.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, c, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + c, d))
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position embeddings for the token sequence ``x`` of an ``w x h`` (really ``H x W``) input."""
        c = self.num_classes
        n_now = x.shape[1] - c
        n_ref = self.pos_embed.shape[1] - c
        if n_now == n_ref and w == h:
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :c], self.pos_embed[:, c:]
        dim = x.shape[-1]
        p = self.patch_embed.patch_size[0]
        rows, cols = w // p + 0.1, h // p + 0.1
        side = math.sqrt(n_ref)
        grid = F.interpolate(
            grid.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
            scale_factor=(rows / side, cols / side),
            mode="bicubic",
        )
        assert int(rows) == grid.shape[-2] and int(cols) == grid.shape[-1]
        return torch.cat((cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def _embed(self, x: Tensor) -> Tensor:
        b, _, h_in, w_in = x.shape
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        return self.pos_drop(t + self.interpolate_pos_encoding(t, h_in, w_in))

    def forward_features(self, x: Tensor, n: int = 12) -> tuple[Tensor, list[Tensor]]:
        """Class tokens of the last block (no norm) and the attention of the last ``n`` blocks."""
        x, _, weights = self._run_blocks(self._embed(x))
        depth = len(self.blocks)
        kept = [w for i, w in enumerate(weights) if depth - i <= n]
        return x[:, : self.num_classes], kept

    def forward(self, x: Tensor, n_layers: int = 12, return_att: bool = False) -> Any:
        """Class logits, or ``(logits, mtatt (B, C, P), patch_attn (L, B, P, P))`` with ``return_att``."""
        c = self.num_classes
        cls, weights = self.forward_features(x)
        att = torch.stack(weights).mean(dim=2)  # (L, B, N, N), head mean
        mtatt = att[-n_layers:].sum(0)[:, :c, c:]
        patch_attn = att[:, :, c:, c:]
        logits = cls.mean(-1)
        if return_att:
            return logits, mtatt, patch_attn
        return logits


class MCTformerV2Like(MCTformerV1Like):
    """MCTformer-V2 layout (``MCTformerV2`` in xulianuwa/MCTformer ``models.py`` at c5db727).

    As :class:`MCTformerV1Like` (same ``cls_token``, ``pos_embed``, interpolation, unused
    ``norm``) plus the patch-CAM head: ``head`` is ``Conv2d(D, C, 3, padding=1)`` with bias
    (replacing the Linear, same key names ``head.weight`` ``(C, D, 3, 3)``, ``head.bias``),
    and a parameter-free ``avgpool`` (``AdaptiveAvgPool2d(1)``).

    ``forward_features(x, n=12)`` -> ``(class_tokens (B, C, D), patch_tokens (B, P, D),
    weights)``: last block, no norm; ``weights`` always holds *every* block (``n`` unused).
    ``forward(x, return_att=False, n_layers=12, attention_type='fused')`` ->
    ``(cls_logits, patch_logits)``, both ``(B, C)``: class tokens averaged over ``D``, and the
    global average of the conv-head map. With ``return_att=True`` ->
    ``(cls_logits, cams (B, C, h, w), patch_attn (L, B, P, P))`` where ``cams`` is, by
    ``attention_type``: ``'fused'`` = MCT attention (sum of the last ``n_layers`` blocks,
    head mean, reshaped to the grid) times ``relu(patch_cam.detach())``; ``'patchcam'`` =
    ``relu(patch_cam)``; anything else = MCT attention.
    """

    def __init__(self, *, num_classes: int = 4, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        del self.last_opt  # V2 has no last_opt
        self.head = _conv_head(self, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: Tensor, n: int = 12) -> tuple[Tensor, Tensor, list[Tensor]]:  # type: ignore[override]
        """Class tokens, patch tokens (last block, no norm) and every block's attention."""
        x, _, weights = self._run_blocks(self._embed(x))
        c = self.num_classes
        return x[:, :c], x[:, c:], weights

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        return_att: bool = False,
        n_layers: int = 12,
        attention_type: str = "fused",
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``(cls_logits, patch_logits)``, or ``(cls_logits, cams, patch_attn)`` with ``return_att``."""
        h_in, w_in = x.shape[2:]
        c = self.num_classes
        cls, patches, weights = self.forward_features(x)
        patch_cam = self.head(_tokens_to_map(patches, h_in, w_in, self.patch_embed.patch_size[0]))
        patch_logits = self.avgpool(patch_cam).squeeze(3).squeeze(2)
        att = torch.stack(weights).mean(dim=2)
        fmap = F.relu(patch_cam.detach().clone())
        b, _, gh, gw = fmap.shape
        mtatt = att[-n_layers:].sum(0)[:, :c, c:].reshape(b, c, gh, gw)
        if attention_type == "fused":
            cams = mtatt * fmap
        elif attention_type == "patchcam":
            cams = fmap
        else:
            cams = mtatt
        patch_attn = att[:, :, c:, c:]
        cls_logits = cls.mean(-1)
        if return_att:
            return cls_logits, cams, patch_attn
        return cls_logits, patch_logits


class MCTformerPlusLike(_VendoredViT):
    """MCTformer+ layout (``MCTformerPlus`` in xulianuwa/MCTformer ``models.py`` at HEAD).

    Faithful: ``cls_token`` ``(1, C, D)``; split position embeddings ``pos_embed_cls``
    ``(1, C, D)`` (added to the class tokens before concatenation) and ``pos_embed_pat``
    ``(1, P_in, D)`` with ``P_in = (input_size // p)**2`` (added to the patch tokens); the
    base ``pos_embed`` ``(1, P_img + 1, D)`` built from ``img_size`` is **kept but never used**
    (it is in the state dict; in released checkpoints it holds DeiT's 224 embedding).
    ``self.num_patches = P_in`` while ``patch_embed.num_patches`` stays ``P_img``.
    ``head`` = ``Conv2d(D, C, 3, padding=1)``; no ``avgpool``; ``decay_parameter`` (0.996).
    ``norm`` exists, never applied. (The original's ``input_size`` default is 244; its
    ``main.py`` passes ``--input-size``, 448 by default.)

    Position embeddings: in train mode ``pos_embed_pat`` is added as is (input must be
    ``input_size``); in eval mode ``interpolate_pos_encoding(patch_tokens, w, h)`` is called
    with the patch tokens only, so its ``x.shape[1] - C == num_patches`` shortcut never
    fires and it always resizes: bicubic, ``scale_factor=((H//p)/sqrt(P_in), (W//p)/sqrt(P_in))``,
    no +0.1 (an identity resize at ``input_size``), then an assert.

    ``forward_features(x, n=12)`` -> ``(class_tokens, patch_tokens, weights, class_embeddings)``
    (last block, no norm; every block's attention; every block's class tokens).
    ``forward(x, return_att=False, n_layers=12, attention_type='fused')`` -> a **list**
    ``[cls_logits (B, C), stacked class tokens (L, B, C, D), patch_logits (B, C)]``; the patch
    logits are global weighted ranking pooling of the conv-head map (scores sorted
    descending, weights ``decay**k``, normalised by their sum). With ``return_att=True`` ->
    ``((cls_logits + patch_logits) / 2, cams (B, C, h, w), patch_attn (L, B, P, P))``; MCT
    attention is the **mean** over the last ``n_layers`` blocks; ``'fused'`` cams are
    ``sqrt(mtatt * relu(patch_cam.detach()))``, ``'patchcam'``, ``'mct'``; any other value
    raises ``TypeError`` (the original raises a string).
    """

    def __init__(
        self, *, num_classes: int = 4, input_size: int = 64, decay_parameter: float = 0.996, **kwargs: Any
    ) -> None:
        super().__init__(num_classes=num_classes, block_extra={"num_classes": num_classes}, **kwargs)
        self.mask_type = None
        self.head = _conv_head(self, num_classes)
        size, patch = to_2tuple(input_size), self.patch_embed.patch_size
        self.num_patches = (size[1] // patch[1]) * (size[0] // patch[0])
        c, d = num_classes, self.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, c, d))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, c, d))
        self.pos_embed_pat = nn.Parameter(torch.zeros(1, self.num_patches, d))
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed_cls, std=0.02)
        trunc_normal_(self.pos_embed_pat, std=0.02)
        self.decay_parameter = decay_parameter

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Patch position embeddings for the patch tokens ``x`` of an ``w x h`` (really ``H x W``) input."""
        n_now = x.shape[1] - self.num_classes
        n_ref = self.num_patches
        if n_now == n_ref and w == h:
            return self.pos_embed_pat
        dim = x.shape[-1]
        p = self.patch_embed.patch_size[0]
        rows, cols = w // p, h // p
        side = math.sqrt(n_ref)
        grid = F.interpolate(
            self.pos_embed_pat.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
            scale_factor=(rows / side, cols / side),
            mode="bicubic",
        )
        assert int(rows) == grid.shape[-2] and int(cols) == grid.shape[-1]
        return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)

    def forward_features(self, x: Tensor, n: int = 12) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Class tokens, patch tokens, every block's attention and every block's class tokens."""
        b, _, h_in, w_in = x.shape
        t = self.patch_embed(x)
        t = t + (self.pos_embed_pat if self.training else self.interpolate_pos_encoding(t, h_in, w_in))
        cls = self.cls_token.expand(b, -1, -1) + self.pos_embed_cls
        x = self.pos_drop(torch.cat((cls, t), dim=1))
        c = self.num_classes
        x, outs, weights = self._run_blocks(x)
        return x[:, :c], x[:, c:], weights, [o[:, :c] for o in outs]

    def forward(self, x: Tensor, return_att: bool = False, n_layers: int = 12, attention_type: str = "fused") -> Any:
        """The training list, or ``(logits, cams, patch_attn)`` with ``return_att``."""
        h_in, w_in = x.shape[2:]
        c = self.num_classes
        cls, patches, weights, all_cls = self.forward_features(x)
        patch_cam = self.head(_tokens_to_map(patches, h_in, w_in, self.patch_embed.patch_size[0]))
        flat = patch_cam.view(patch_cam.shape[0], c, -1).permute(0, 2, 1)  # (B, P, C)
        ranked, _ = torch.sort(flat, dim=-2, descending=True)
        k = flat.shape[-2]
        wts = torch.logspace(0, k - 1, k, base=self.decay_parameter, device=flat.device, dtype=flat.dtype)
        patch_logits = (ranked * wts[None, :, None]).sum(-2) / wts.sum()
        cls_logits = cls.mean(-1)
        output = [cls_logits, torch.stack(all_cls), patch_logits]
        if not return_att:
            return output
        fmap = F.relu(patch_cam.detach().clone())
        b, _, gh, gw = fmap.shape
        att = torch.stack(weights).mean(dim=2)
        mtatt = att[-n_layers:].mean(0)[:, :c, c:].reshape(b, c, gh, gw)
        patch_attn = att[:, :, c:, c:]
        if attention_type == "fused":
            cams = torch.sqrt(mtatt * fmap)
        elif attention_type == "patchcam":
            cams = fmap
        elif attention_type == "mct":
            cams = mtatt
        else:
            raise TypeError(f"Error! {attention_type} is not defined!")
        return (cls_logits + patch_logits) / 2, cams, patch_attn


# ---------------------------------------------------------------------------------------------
# TS-CAM
# ---------------------------------------------------------------------------------------------


class TSCAMViTLike(_VendoredViT):
    """TS-CAM layout (``TSCAM`` in vasgaowei/TS-CAM ``lib/models/deit.py``).

    Faithful: one class token ``(1, 1, D)``; ``pos_embed`` ``(1, P + 1, D)`` added as is (no
    interpolation; ``patch_embed`` asserts the input equals ``img_size``); ``head`` =
    ``Conv2d(D, num_classes, 3, padding=1)`` with bias; parameter-free ``avgpool``; the final
    ``norm`` **is** applied to all tokens. Blocks receive ``vis=False`` (unused).

    ``forward_features(x)`` -> ``(cls (B, D), patch_tokens (B, P, D), weights)`` (normed;
    every block's attention). ``forward(x, return_cam=False)`` (``return_cam`` unused): in
    train mode -> logits ``(B, K)`` (global average of the conv map); in eval mode ->
    ``(logits, cams (B, K, h, w))`` with ``cams = A ⊙ S``: ``A`` = head-mean class-token
    attention to the patches summed over **all** blocks ``(B, 1, h, w)``, ``S`` = the detached
    conv map (no ReLU). The grid side is ``int(sqrt(P))`` (square only).
    """

    def __init__(self, *, num_classes: int = 4, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, check_size=True, block_extra={"vis": False}, **kwargs)
        self.head = _conv_head(self, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Normed class token, normed patch tokens and every block's attention."""
        b = x.shape[0]
        t = self.patch_embed(x)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        x, _, weights = self._run_blocks(self.pos_drop(t + self.pos_embed))
        x = self.norm(x)
        return x[:, 0], x[:, 1:], weights

    def forward(self, x: Tensor, return_cam: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (train mode) or ``(logits, cams)`` (eval mode)."""
        _, patches, weights = self.forward_features(x)
        n, p, d = patches.shape
        side = int(p**0.5)
        s_map = self.head(patches.reshape(n, side, side, d).permute(0, 3, 1, 2).contiguous())
        logits = self.avgpool(s_map).squeeze(3).squeeze(2)
        if self.training:
            return logits
        att = torch.stack(weights).mean(dim=2)
        fmap = s_map.detach().clone()
        cams = att.sum(0)[:, 0, 1:].reshape(n, side, side).unsqueeze(1) * fmap
        return logits, cams


# ---------------------------------------------------------------------------------------------
# ToCo and CPEWS
# ---------------------------------------------------------------------------------------------


class ToCoViTLike(_VendoredViT):
    """ToCo encoder layout (``VisionTransformer`` in rulixiang/ToCo ``model/backbone/vit.py``).

    Faithful: one class token; ``pos_embed`` ``(1, P + 1, D)`` with ``requires_grad=False``
    (frozen, still a Parameter and in the state dict); model attributes ``patch_size``
    (int), ``_size`` (``img_size // patch_size``, an int: ``img_size`` must be an int) and
    ``aux_layer`` (default -3); ``head`` = ``Linear(D, num_classes)`` (1000 in the released
    backbones, never used by the WSSS network). Blocks receive ``vis=False``.

    ``prepare_tokens(x)``: on every call the ``_size x _size`` patch grid of ``pos_embed`` is
    resized to ``(H//p, W//p)`` with ``F.interpolate(size=..., mode='bicubic',
    align_corners=False)`` (no antialias), the class position kept, class token prepended.
    ``forward_features(x)`` -> ``(cls (B, D), patches (B, P, D), aux_patches (B, P, D))``:
    the class token and patch tokens after ``norm``, and the patch tokens of block output
    ``aux_layer`` (the residual stream, not normed, unless ``aux_layer`` is -1, whose entry
    is replaced by the normed output). ``forward(x)`` is broken in the original (it unpacks
    three values into two) and raises ``ValueError`` here too; the network only calls
    ``forward_features``.
    """

    def __init__(
        self, *, img_size: int = 32, patch_size: int = 8, num_classes: int = 10, aux_layer: int = -3, **kwargs: Any
    ) -> None:
        kwargs.setdefault("block_extra", {"vis": False})
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=num_classes, **kwargs)
        self.pos_embed.requires_grad = False
        self._size = img_size // patch_size
        self.patch_size = patch_size
        self.aux_layer = aux_layer

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Patch tokens + class token + bicubically resized position embeddings."""
        b, _, h_in, w_in = x.shape
        gh, gw = h_in // self.patch_embed.patch_size[0], w_in // self.patch_embed.patch_size[1]
        t = self.patch_embed(x)
        grid = self.pos_embed[:, 1:, :].reshape(1, self._size, self._size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        pos = torch.cat((self.pos_embed[:, :1, :], grid.reshape(1, -1, gh * gw).permute(0, 2, 1)), dim=1)
        t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        return t + pos

    def forward_features(self, x: Tensor) -> tuple[Any, ...]:
        """``(cls, patches, aux_patches)``: final tokens normed, aux block tokens not."""
        x = self.pos_drop(self.prepare_tokens(x))
        x, outs, _ = self._run_blocks(x)
        x = self.norm(x)
        outs[-1] = x
        return x[:, 0], x[:, 1:], outs[self.aux_layer][:, 1:]

    def forward(self, x: Tensor) -> Any:
        """Broken as in the original: raises ``ValueError`` (too many values to unpack)."""
        x, attn_weights = self.forward_features(x)  # noqa: F841 - reproduces the original's error
        return x


class CPEWSViTLike(ToCoViTLike):
    """CPEWS encoder layout (ZUA-CV2023/CPEWS ``model/backbone/vit.py`` / ``vit_att.py``).

    Identical to :class:`ToCoViTLike` (same names, shapes, ``prepare_tokens``), except:
    the released ``PatchEmbed.forward`` moves its input to CUDA (``force_cuda=True``; off by
    default here), and the ``vit_att.py`` variant (``return_attention=True``) makes
    ``forward_features`` return a fourth item, the list of every block's attention
    ``(B, H, N, N)``. (The released ``backbone/__init__.py`` imports ``vit.py``, so the
    ``*_att`` network, which unpacks four values, only runs after editing that import.)
    """

    def __init__(self, *, return_attention: bool = False, force_cuda: bool = False, **kwargs: Any) -> None:
        super().__init__(force_cuda=force_cuda, **kwargs)
        self._return_attention = return_attention

    def forward_features(self, x: Tensor) -> tuple[Any, ...]:
        """``(cls, patches, aux_patches)`` or, with ``return_attention``, ``(..., attention list)``."""
        x = self.pos_drop(self.prepare_tokens(x))
        x, outs, weights = self._run_blocks(x)
        x = self.norm(x)
        outs[-1] = x
        if self._return_attention:
            return x[:, 0], x[:, 1:], outs[self.aux_layer][:, 1:], weights
        return x[:, 0], x[:, 1:], outs[self.aux_layer][:, 1:]


class _WeightNormLinear(nn.Module):
    """Bias-free Linear parameterised as ``weight_v * weight_g / ||weight_v||`` (row norms).

    Same state-dict keys and shapes as ``torch.nn.utils.weight_norm(nn.Linear(i, o, bias=False))``:
    ``weight_g`` ``(o, 1)``, ``weight_v`` ``(o, i)``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out)``."""
        return F.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


class CTCHeadLike(nn.Module):
    """ToCo's DINO-style projection head ``CTCHead`` (names and structure).

    ``mlp`` = ``Sequential(Linear(D, hidden), GELU, Linear(hidden, hidden), GELU,
    Linear(hidden, bottleneck))`` (keys ``mlp.0``, ``mlp.2``, ``mlp.4``), L2-normalise, then
    ``last_layer`` = weight-normalised ``Linear(bottleneck, out, bias=False)`` whose
    ``weight_g`` is filled with 1 and frozen. Official sizes: hidden 2048, bottleneck 256,
    out 1024 (the network passes ``out_dim=1024``).
    """

    def __init__(self, in_dim: int, out_dim: int = 16, hidden_dim: int = 16, bottleneck_dim: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            _init_linear_ln(m)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D) -> (B, out)``."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class LargeFOVLike(nn.Module):
    """ToCo's ``LargeFOV`` decoder: ``conv6`` (3x3, dilation 5, padding 5), ``relu6``, ``conv7`` (same),
    ``relu7``, ``conv8`` (1x1); all convolutions bias-free; official width 512."""

    def __init__(self, in_planes: int, out_planes: int, width: int = 16, dilation: int = 5) -> None:
        super().__init__()
        self.embed_dim = width
        self.dilation = dilation
        self.conv6 = nn.Conv2d(in_planes, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.relu6 = nn.ReLU(inplace=True)
        self.conv7 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.relu7 = nn.ReLU(inplace=True)
        self.conv8 = nn.Conv2d(width, out_planes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D, h, w) -> (B, out, h, w)``."""
        return self.conv8(self.relu7(self.conv7(self.relu6(self.conv6(x)))))


class ToCoNetworkLike(nn.Module):
    """ToCo's ``network`` wrapper (``model/model_seg_neg.py``), without the CTC crop path.

    Children in registration order: ``encoder`` (:class:`ToCoViTLike`), ``proj_head``,
    ``proj_head_t`` (:class:`CTCHeadLike`, the teacher frozen), ``decoder``
    (:class:`LargeFOVLike`, ``num_classes`` outputs), ``classifier`` and ``aux_classifier``
    (``Conv2d(D, num_classes - 1, 1, bias=False)``). ``num_classes`` counts the background.

    ``forward(x, cam_only=False)``: encoder ``forward_features``; tokens reshaped to
    ``(B, D, H//p, W//p)`` with ``encoder.patch_size``; returns
    ``(cls_logits, seg, final_map, aux_logits)`` where the logits are the 1x1 classifier on
    the global **max**-pooled map; with ``cam_only=True`` -> ``(cam_aux, cam)`` (1x1 conv with
    the classifier weights on every token, detached).
    """

    def __init__(
        self,
        encoder: ToCoViTLike | None = None,
        num_classes: int = 5,
        *,
        decoder_width: int = 16,
        head_hidden: int = 16,
        head_bottleneck: int = 8,
        head_out: int = 16,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = encoder if encoder is not None else ToCoViTLike()
        d = self.encoder.embed_dim
        self.proj_head = CTCHeadLike(d, head_out, head_hidden, head_bottleneck)
        self.proj_head_t = CTCHeadLike(d, head_out, head_hidden, head_bottleneck)
        for p, pt in zip(self.proj_head.parameters(), self.proj_head_t.parameters(), strict=True):
            pt.data.copy_(p.data)
            pt.requires_grad = False
        self.pooling = F.adaptive_max_pool2d
        self.decoder = LargeFOVLike(d, num_classes, width=decoder_width)
        self.classifier = nn.Conv2d(d, num_classes - 1, kernel_size=1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_classes - 1, kernel_size=1, bias=False)

    def _maps(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Final and aux token maps ``(B, D, H//p, W//p)`` plus the raw encoder output."""
        out = self.encoder.forward_features(x)
        gh, gw = x.shape[-2] // self.encoder.patch_size, x.shape[-1] // self.encoder.patch_size

        def to_2d(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)

        return to_2d(out[1]), to_2d(out[2]), out

    def _heads(self, fmap: Tensor, aux_map: Tensor, cam_only: bool) -> tuple[Tensor, ...]:
        seg = self.decoder(fmap)
        if cam_only:
            cam = F.conv2d(fmap, self.classifier.weight).detach()
            cam_aux = F.conv2d(aux_map, self.aux_classifier.weight).detach()
            return cam_aux, cam
        k = self.num_classes - 1
        cls_aux = self.aux_classifier(self.pooling(aux_map, (1, 1))).view(-1, k)
        cls_x4 = self.classifier(self.pooling(fmap, (1, 1))).view(-1, k)
        return cls_x4, seg, fmap, cls_aux

    def forward(self, x: Tensor, cam_only: bool = False) -> tuple[Tensor, ...]:
        """``(cls_logits, seg, final_map, aux_logits)`` or ``(cam_aux, cam)`` with ``cam_only``."""
        fmap, aux_map, _ = self._maps(x)
        return self._heads(fmap, aux_map, cam_only)


class CPEWSNetworkLike(ToCoNetworkLike):
    """CPEWS ``network`` wrappers (``model/model_seg_neg_por.py``, ``_por_att.py``, ``_por_ctc.py``).

    As :class:`ToCoNetworkLike` plus ``classifier_bg`` = ``Conv2d(D, 1, 1, bias=False)`` (the
    original hard-codes 768 input channels) and, for ``variant='att'`` / ``'ctc'``,
    ``attn_proj`` = ``Conv2d(H, 1, 1, bias=True)`` (hard-coded 12 input channels: the heads of
    block 0's patch-to-patch attention). ``forward_feat(x)`` -> ``(cat(cam, cam_bg) (B, C, h, w),
    tokens (B, D, h, w), logits (B, C-1))``: ``cam`` uses the **aux** classifier weights on the
    final (normed) tokens, ``cam_bg`` is ``classifier_bg`` on them, logits are the aux
    classifier on the max-pooled map. ``variant='att'``: ``forward(x)`` (no ``cam_only``)
    also returns ``attn_pred = sigmoid(attn_proj(A0 + A0^T))[:, 0]`` ``(B, P, P)``, with
    ``A0`` block 0's attention restricted to the patches; needs ``CPEWSViTLike(return_attention=True)``.
    """

    def __init__(
        self, encoder: CPEWSViTLike | None = None, num_classes: int = 5, *, variant: str = "por", **kwargs: Any
    ) -> None:
        if variant not in ("por", "att", "ctc"):
            raise ValueError(f"variant: expected 'por', 'att' or 'ctc', got {variant!r}")
        if encoder is None:
            encoder = CPEWSViTLike(return_attention=variant == "att")
        super().__init__(encoder, num_classes, **kwargs)
        self.variant = variant
        d = self.encoder.embed_dim
        self.classifier_bg = nn.Conv2d(d, 1, 1, bias=False)
        if variant in ("att", "ctc"):
            heads = int(getattr(self.encoder.blocks[0].attn, "num_heads"))
            self.attn_proj = nn.Conv2d(heads, 1, kernel_size=1, bias=True)

    def forward(self, x: Tensor, cam_only: bool = False) -> tuple[Tensor, ...]:
        """As ToCo; ``variant='att'`` appends ``attn_pred`` when not ``cam_only``."""
        fmap, aux_map, raw = self._maps(x)
        out = self._heads(fmap, aux_map, cam_only)
        if cam_only or self.variant != "att":
            return out
        a0 = raw[3][0][:, :, 1:, 1:]  # block 0's attention, patches only: (B, H, P, P)
        a0 = a0 + a0.permute(0, 1, 3, 2)
        return (*out, torch.sigmoid(self.attn_proj(a0))[:, 0])

    def forward_feat(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(cat(cam, cam_bg), token_map, logits)`` from the final tokens and the aux classifier."""
        fmap, _, _ = self._maps(x)
        cam = F.conv2d(fmap, self.aux_classifier.weight).detach()
        cam_bg = self.classifier_bg(fmap)
        logits = self.aux_classifier(self.pooling(fmap, (1, 1))).view(-1, self.num_classes - 1)
        return torch.cat([cam, cam_bg], dim=1), fmap, logits


# ---------------------------------------------------------------------------------------------
# timm 0.4 / 0.5 and 0.6 layouts
# ---------------------------------------------------------------------------------------------


class LegacyPatchEmbed(nn.Module):
    """timm 0.4-0.6 ``PatchEmbed``: ``img_size``, ``patch_size``, ``grid_size``, ``num_patches``,
    ``flatten``, ``proj``, ``norm`` (Identity); asserts ``H, W == img_size``. No
    ``dynamic_img_size``, ``dynamic_img_pad``, ``strict_img_size``, ``output_fmt``."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, flatten: bool = True
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, P, D)``; the size must equal ``img_size``."""
        assert tuple(x.shape[-2:]) == tuple(self.img_size), (
            f"Input image size ({x.shape[-2]}*{x.shape[-1]}) doesn't match model "
            f"({self.img_size[0]}*{self.img_size[1]})."
        )
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class LegacyAttention(VendoredAttention):
    """timm 0.4-0.6 ``Attention`` (original class name ``Attention``): same attributes as
    :class:`VendoredAttention` minus ``qk_scale`` (``scale = head_dim**-0.5``), but
    ``forward(x)`` returns only the output tensor ``(B, N, D)``; the probabilities are not
    exposed (a forward pre-hook on ``attn_drop`` sees them)."""

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, None, attn_drop, proj_drop)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Self-attention output only."""
        return super().forward(x)[0]


class LegacyBlock(nn.Module):
    """timm 0.4 / 0.5 ``Block``: ``norm1``, ``attn`` (:class:`LegacyAttention`), ``drop_path``,
    ``norm2``, ``mlp``; ``forward(x) -> x``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = _LN,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = LegacyAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        """One residual attention + MLP step."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _LayerScale(nn.Module):
    """timm 0.6 ``LayerScale``: one parameter ``gamma`` ``(D,)``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x * gamma``."""
        return x * self.gamma


class Timm06Block(nn.Module):
    """timm 0.6 ``Block``: ``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``,
    ``ls2``, ``drop_path2`` (``ls*`` are ``nn.Identity`` unless ``init_values``); ``forward(x) -> x``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        init_values: float | None = None,
        norm_layer: Callable[[int], nn.Module] = _LN,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = LegacyAttention(dim, num_heads, qkv_bias)
        self.ls1 = _LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """One residual attention + MLP step with LayerScale slots."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class OldTimmViT(nn.Module):
    """timm 0.4.12 / 0.5.4 ``VisionTransformer`` layout (also what DeiT checkpoints are saved from).

    Faithful: ``patch_embed`` (:class:`LegacyPatchEmbed`, fixed size, has ``grid_size``),
    ``cls_token`` ``(1, 1, D)``, ``dist_token`` ``(1, 1, D)`` or ``None``, ``num_tokens``
    (1 or 2; **no** ``num_prefix_tokens``), ``pos_embed`` ``(1, P + num_tokens, D)`` added
    once (no interpolation), ``pos_drop``, ``blocks`` (``nn.Sequential`` of
    :class:`LegacyBlock`), ``norm``, ``pre_logits`` (Identity, or ``Sequential(fc, act=Tanh)``
    with ``representation_size`` and not distilled), ``head``, ``head_dist`` (None unless
    distilled). Token order: ``[cls, dist, patches]``. No ``forward_intermediates``,
    ``forward_head``, ``global_pool``, ``fc_norm``, ``dynamic_img_size``.

    ``forward_features(x)`` -> ``pre_logits(norm(x)[:, 0])`` ``(B, D)``, or
    ``(x[:, 0], x[:, 1])`` when distilled. ``forward(x)`` -> ``head`` logits; distilled:
    ``(logits, dist_logits)`` in train mode, their average in eval mode.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        representation_size: int | None = None,
        distilled: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 2 if distilled else 1
        self.patch_embed = LegacyPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                LegacyBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rates[i])
                for i in range(depth)
            ]
        )
        self.norm = _LN(embed_dim)
        if representation_size and not distilled:
            self.num_features = representation_size
            self.pre_logits: nn.Module = nn.Sequential(
                OrderedDict([("fc", nn.Linear(embed_dim, representation_size)), ("act", nn.Tanh())])
            )
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_ln)

    def forward_features(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled class token (``pre_logits``), or ``(cls, dist)`` tokens when distilled."""
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = self.pos_drop(torch.cat((*prefix, x), dim=1) + self.pos_embed)
        x = self.norm(self.blocks(x))
        if self.dist_token is None:
            return self.pre_logits(x[:, 0])
        return x[:, 0], x[:, 1]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; distilled: ``(logits, dist_logits)`` in train mode, their mean in eval mode."""
        feats = self.forward_features(x)
        if self.head_dist is not None:
            assert isinstance(feats, tuple)
            out, out_dist = self.head(feats[0]), self.head_dist(feats[1])
            if self.training:
                return out, out_dist
            return (out + out_dist) / 2
        return self.head(feats)


class Timm06ViT(nn.Module):
    """timm 0.6.x ``VisionTransformer`` layout (no distillation; DeiT-distilled moved to ``deit.py``).

    Faithful: ``global_pool`` (``'token'``), ``num_prefix_tokens`` (1 with ``class_token``),
    ``no_embed_class`` (False), ``patch_embed`` (:class:`LegacyPatchEmbed`, fixed size),
    ``cls_token``, ``pos_embed`` ``(1, P + 1, D)``, ``pos_drop``, ``norm_pre`` (Identity),
    ``blocks`` (``nn.Sequential`` of :class:`Timm06Block`), ``norm``, ``fc_norm`` (Identity
    for token pooling), ``head``. Has ``forward_head``; no ``forward_intermediates``, no
    ``reg_token``/``num_reg_tokens``, no ``dynamic_img_size``; attention without
    ``fused_attn``/``q_norm``/``k_norm``.

    ``forward_features(x)`` -> all tokens after ``norm`` ``(B, N, D)``;
    ``forward_head(x, pre_logits=False)``; ``forward(x)`` -> logits.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 10,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = "token"
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.no_embed_class = False
        self.grad_checkpointing = False
        self.patch_embed = LegacyPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=0.0)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(
            *[Timm06Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values) for _ in range(depth)]
        )
        self.norm = _LN(embed_dim)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear_ln)

    def _pos_embed(self, x: Tensor) -> Tensor:
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm, ``(B, 1 + P, D)``."""
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class-token pooling, ``fc_norm``, ``head``."""
        x = self.fc_norm(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Official state-dict key layouts (written independently of the classes above)
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("timm04", "mctformer_v1", "mctformer_v2", "mctformer_plus", "tscam", "toco_encoder", "toco", "cpews")


def _block_keys(prefix: str, depth: int, d: int, hidden: int, qkv_bias: bool) -> OrderedDict[str, tuple[int, ...]]:
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out[b + "norm1.weight"] = (d,)
        out[b + "norm1.bias"] = (d,)
        out[b + "attn.qkv.weight"] = (3 * d, d)
        if qkv_bias:
            out[b + "attn.qkv.bias"] = (3 * d,)
        out[b + "attn.proj.weight"] = (d, d)
        out[b + "attn.proj.bias"] = (d,)
        out[b + "norm2.weight"] = (d,)
        out[b + "norm2.bias"] = (d,)
        out[b + "mlp.fc1.weight"] = (hidden, d)
        out[b + "mlp.fc1.bias"] = (hidden,)
        out[b + "mlp.fc2.weight"] = (d, hidden)
        out[b + "mlp.fc2.bias"] = (d,)
    return out


def official_keys(
    layout: str,
    *,
    embed_dim: int = 32,
    depth: int = 2,
    num_heads: int = 2,
    mlp_ratio: float = 4.0,
    img_size: int = 32,
    patch_size: int = 8,
    num_classes: int = 4,
    input_size: int = 64,
    qkv_bias: bool = True,
    distilled: bool = False,
    representation_size: int | None = None,
    backbone_classes: int = 10,
    decoder_width: int = 16,
    head_hidden: int = 16,
    head_bottleneck: int = 8,
    head_out: int = 16,
    variant: str = "por",
) -> OrderedDict[str, tuple[int, ...]]:
    """Key -> shape of the state dict each codebase saves, for a model of the given sizes.

    Layouts (``C = num_classes``; ``P = (img_size // patch_size)**2``):

    * ``'timm04'``: timm 0.4/0.5 ``VisionTransformer`` / DeiT release (``num_classes`` heads).
    * ``'mctformer_v1'``: ``cls_token (1,C,D)``, ``pos_embed (1,C+P,D)``, ``head`` Linear ``(C,D)``.
    * ``'mctformer_v2'``: as V1 with ``head.weight (C,D,3,3)``.
    * ``'mctformer_plus'``: ``cls_token (1,C,D)``, stale ``pos_embed (1,P+1,D)``,
      ``pos_embed_cls (1,C,D)``, ``pos_embed_pat (1,(input_size//patch)**2,D)``, conv head.
    * ``'tscam'``: one class token, conv ``head (C,D,3,3)``.
    * ``'toco_encoder'``: the ToCo/CPEWS ViT alone (``head`` Linear ``(backbone_classes, D)``;
      1000 in the releases).
    * ``'toco'``: the ToCo network (``encoder.*``, ``proj_head*``, ``decoder.conv6/7/8``,
      ``classifier``, ``aux_classifier``); ``num_classes`` counts the background.
    * ``'cpews'``: ToCo network + ``classifier_bg``; ``variant`` ``'att'``/``'ctc'`` add
      ``attn_proj`` (``num_heads`` input channels; 12 in the release).

    Keys of parameters only: the vendored models register no buffers. Names are exactly
    the originals'; order is registration order (what ``state_dict()`` yields).
    """
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    p = (img_size // patch_size) ** 2
    pe = {"patch_embed.proj.weight": (d, 3, patch_size, patch_size), "patch_embed.proj.bias": (d,)}
    keys: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    if layout == "timm04":
        t = 2 if distilled else 1
        keys["cls_token"] = (1, 1, d)
        if distilled:
            keys["dist_token"] = (1, 1, d)
        keys["pos_embed"] = (1, p + t, d)
        keys.update(pe)
        keys.update(_block_keys("", depth, d, hidden, qkv_bias))
        keys["norm.weight"], keys["norm.bias"] = (d,), (d,)
        feat = d
        if representation_size and not distilled:
            keys["pre_logits.fc.weight"] = (representation_size, d)
            keys["pre_logits.fc.bias"] = (representation_size,)
            feat = representation_size
        keys["head.weight"], keys["head.bias"] = (num_classes, feat), (num_classes,)
        if distilled:
            keys["head_dist.weight"], keys["head_dist.bias"] = (num_classes, d), (num_classes,)
        return keys
    if layout in ("mctformer_v1", "mctformer_v2", "mctformer_plus", "tscam"):
        c = num_classes
        if layout == "mctformer_plus":
            keys["cls_token"] = (1, c, d)
            keys["pos_embed"] = (1, p + 1, d)
            keys["pos_embed_cls"] = (1, c, d)
            keys["pos_embed_pat"] = (1, (input_size // patch_size) ** 2, d)
        elif layout == "tscam":
            keys["cls_token"] = (1, 1, d)
            keys["pos_embed"] = (1, p + 1, d)
        else:
            keys["cls_token"] = (1, c, d)
            keys["pos_embed"] = (1, c + p, d)
        keys.update(pe)
        keys.update(_block_keys("", depth, d, hidden, qkv_bias))
        keys["norm.weight"], keys["norm.bias"] = (d,), (d,)
        keys["head.weight"] = (c, d) if layout == "mctformer_v1" else (c, d, 3, 3)
        keys["head.bias"] = (c,)
        return keys
    if layout == "toco_encoder":
        keys["cls_token"] = (1, 1, d)
        keys["pos_embed"] = (1, p + 1, d)
        keys.update(pe)
        keys.update(_block_keys("", depth, d, hidden, qkv_bias))
        keys["norm.weight"], keys["norm.bias"] = (d,), (d,)
        keys["head.weight"], keys["head.bias"] = (backbone_classes, d), (backbone_classes,)
        return keys
    if layout in ("toco", "cpews"):
        enc = official_keys(
            "toco_encoder",
            embed_dim=d,
            depth=depth,
            mlp_ratio=mlp_ratio,
            img_size=img_size,
            patch_size=patch_size,
            qkv_bias=qkv_bias,
            backbone_classes=backbone_classes,
        )
        for k, v in enc.items():
            keys["encoder." + k] = v
        for head in ("proj_head", "proj_head_t"):
            keys[f"{head}.mlp.0.weight"], keys[f"{head}.mlp.0.bias"] = (head_hidden, d), (head_hidden,)
            keys[f"{head}.mlp.2.weight"], keys[f"{head}.mlp.2.bias"] = (head_hidden, head_hidden), (head_hidden,)
            keys[f"{head}.mlp.4.weight"] = (head_bottleneck, head_hidden)
            keys[f"{head}.mlp.4.bias"] = (head_bottleneck,)
            keys[f"{head}.last_layer.weight_g"] = (head_out, 1)
            keys[f"{head}.last_layer.weight_v"] = (head_out, head_bottleneck)
        keys["decoder.conv6.weight"] = (decoder_width, d, 3, 3)
        keys["decoder.conv7.weight"] = (decoder_width, decoder_width, 3, 3)
        keys["decoder.conv8.weight"] = (num_classes, decoder_width, 1, 1)
        keys["classifier.weight"] = (num_classes - 1, d, 1, 1)
        keys["aux_classifier.weight"] = (num_classes - 1, d, 1, 1)
        if layout == "cpews":
            keys["classifier_bg.weight"] = (1, d, 1, 1)
            if variant in ("att", "ctc"):
                keys["attn_proj.weight"] = (1, num_heads, 1, 1)
                keys["attn_proj.bias"] = (1,)
        return keys
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def official_state_dict(layout: str, *, seed: int = 0, **sizes: Any) -> OrderedDict[str, Tensor]:
    """Random tensors under :func:`official_keys` (``std`` 0.02; LayerNorm weights near 1).

    Deterministic for a given ``seed``. ``weight_g`` entries are 1 (frozen in ToCo).
    """
    gen = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, shape in official_keys(layout, **sizes).items():
        t = torch.randn(shape, generator=gen) * 0.02
        if key.endswith("weight_g"):
            t = torch.ones(shape)
        elif (".norm" in key or key.startswith("norm")) and key.endswith("weight"):
            t = t + 1.0
        out[key] = t
    return out


def official_checkpoint(layout: str, *, seed: int = 0, **sizes: Any) -> dict[str, Any]:
    """The object each codebase passes to ``torch.save``, around :func:`official_state_dict`.

    * MCTformer (V1/V2/+): ``{'model': sd}`` (HEAD's per-epoch save adds ``'epoch'``); no
      ``module.`` prefix (no DDP).
    * TS-CAM: ``{'epoch', 'state_dict', 'best_map'}`` with ``module.`` keys (DataParallel).
    * ToCo: the DDP state dict itself, every key prefixed ``module.``.
    * CPEWS: the plain state dict (its DDP wrap is commented out).
    * timm04: DeiT's release format ``{'model': sd}``.
    * toco_encoder: the plain state dict.
    """
    sd = official_state_dict(layout, seed=seed, **sizes)
    if layout in ("mctformer_v1", "mctformer_v2", "mctformer_plus", "timm04"):
        return {"model": sd}
    if layout == "tscam":
        return {"epoch": 0, "state_dict": OrderedDict(("module." + k, v) for k, v in sd.items()), "best_map": 0.0}
    if layout == "toco":
        return OrderedDict(("module." + k, v) for k, v in sd.items())
    return sd
