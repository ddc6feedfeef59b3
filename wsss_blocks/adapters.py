"""Adapters: how the library reads a Vision Transformer's layout and its attention.

Everything that reads a ViT's tokens or attention (``tokens.vit_taps``, ``cpews.cpews_taps``,
``doei.patch``, ``mct.final_tokens``, ``mct.attention_cams``, ...) goes through two small
adapters, and this module is the one place to teach the library a new layout:

* an ``AttentionAdapter`` per attention layout says how to get the per-head queries and keys
  of a module during its own forward (``QueryKey``: ``q``, ``k``, ``scale`` and an additive
  score bias), where the post-softmax probabilities can be seen when the module computes them
  explicitly, which child receives the per-head outputs before the projection, and which
  call arguments (masks) the library cannot follow;
* a ``ViTAdapter`` per model layout says where the blocks, the prefix / class tokens, the
  patch embedding and the final norm are, which image sizes the model takes and the patch
  grid they give, how to run the blocks once (to tap tokens with forward hooks) and how to
  get logits from the final tokens.

A forward that returns a tuple (``(out, weights)`` as in the ViT copies WSSS codebases ship)
is read through its first item; DOEI adds its delta to that item and passes the rest through.

**Attention layouts read out of the box**

* ``timm.layers.Attention`` (ViT, DeiT, registers; also ``vision_transformer.Attention``):
  ``FusedQKVAdapter``, fused (SDPA) and explicit paths alike.
* ViT copies with a fused ``qkv`` (the timm 0.3-0.6 layout that MCTformer, TS-CAM, ToCo and
  CPEWS ship, and old timm): ``FusedQKVAdapter``, recognised by structure (below).
* ``timm.models.eva.EvaAttention`` (EVA, EVA-02, ``vit_*_rope_*``): ``EvaAttentionAdapter``;
  fused or separate q/k/v, ``q_bias`` / ``v_bias``, rotary position embeddings.
* ``timm.layers.AttentionRope`` (EVA with ``attn_type='rope'``): ``EvaAttentionAdapter``,
  grouped key/value heads included.
* ``timm.models.beit.Attention`` (BEiT, BEiT v2): ``BeitAttentionAdapter``; the block's
  relative position bias and the model's shared one, ``q_bias`` / ``v_bias``.
* ``timm.models.vision_transformer_relpos.RelPosAttention`` (``vit_relpos_*``):
  ``RelPosAttentionAdapter``; relative position bias, own or shared (a bias MLP with dropout
  only in eval mode or on the explicit path).

A module of a class defined outside timm is read as a ViT copy with ``FusedQKVAdapter``
when its structure is that of the timm 0.3-0.6 attention: a ``qkv`` ``nn.Linear`` whose output
splits into ``(3, num_heads, head_dim)``, integer ``num_heads``, numeric ``scale``, children
``attn_drop`` and ``proj`` (optionally ``proj_drop``, ``q_norm``, ``k_norm``, ``norm``) and no
other children, parameters or buffers. Such a module is taken to compute
``softmax(q·kᵀ·scale)`` over all tokens; register an adapter for its class if it does not.
Subclasses of the classes above are refused until registered (a subclass may change
``forward``).

**Refused, and why**

* ``timm.layers.DiffAttention``: its output mixes two softmax maps per head
  (``softmax₁ − λ·softmax₂``), so there is no one probability map for DOEI's scores or the
  attention CAMs.
* ``timm.models.cait.TalkingHeadAttn``: it mixes the heads before and after the softmax, so
  no per-head softmax over keys builds its output.
* ``timm.models.cait.ClassAttn``: only the class token queries; there are no patch rows
  (patch-to-class interactions, patch affinity).
* ``timm.models.vision_transformer_sam.Attention``: windowed attention on a spatial
  ``(B, H, W, C)`` input, with no class token and no global token sequence.
* ``timm.models.xcit.XCA``: cross-covariance attention attends over channels, not tokens.

Any other class whose name ends in ``Attention`` is refused with a ``TypeError`` that names
``register_attention_adapter``.

**Model layouts.** The default ``ViTAdapter`` reads timm's ViT-family models (ViT, DeiT, EVA,
BEiT, ...: ``num_prefix_tokens``, ``forward_head``) and the copies WSSS codebases vendor
(``patch_embed``, ``cls_token`` of one or ``C`` class tokens, optional ``dist_token`` /
``reg_token``, ``blocks`` as a ``ModuleList`` or ``Sequential``, ``norm``, no
``num_prefix_tokens``): the prefix-token count then comes from ``cls_token.shape[1]`` plus the
distillation and register tokens. Register a ``ViTAdapter`` subclass for a model class whose
layout differs.

Examples:
    A toy attention with separate ``to_q`` / ``to_k`` / ``to_v`` projections, registered once:

    >>> import torch
    >>> from torch import nn
    >>> from wsss_blocks import adapters
    >>> class ToyAttention(nn.Module):
    ...     def __init__(self, dim, num_heads=2):
    ...         super().__init__()
    ...         self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
    ...         self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
    ...         self.proj = nn.Linear(dim, dim)
    ...     def split(self, x):
    ...         return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
    ...     def forward(self, x):
    ...         q, k, v = self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_v(x))
    ...         probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
    ...         return self.proj((probs @ v).transpose(1, 2).flatten(2))
    >>> class ToyAdapter(adapters.AttentionAdapter):
    ...     captures = ("to_q", "to_k")
    ...     def query_key(self, module, call):
    ...         q, k = (module.split(call.captured[n]) for n in self.captures)
    ...         return adapters.QueryKey(q, k, module.scale)
    >>> adapters.register_attention_adapter(ToyAttention, ToyAdapter())
    >>> isinstance(adapters.attention_adapter(ToyAttention(8)), ToyAdapter)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._utils import to_model_dtype
from wsss_blocks._validate import ShapeError, check_instance, check_shape, check_size

__all__ = [
    "QueryKey",
    "AttentionCall",
    "AttentionAdapter",
    "FusedQKVAdapter",
    "EvaAttentionAdapter",
    "BeitAttentionAdapter",
    "RelPosAttentionAdapter",
    "ViTAdapter",
    "register_attention_adapter",
    "register_vit_adapter",
    "attention_adapter",
    "vit_adapter",
]

_REGISTER_ATTENTION = "wsss_blocks.adapters.register_attention_adapter"
_REGISTER_VIT = "wsss_blocks.adapters.register_vit_adapter"


def _check_model(model: Any) -> nn.Module:
    """``model`` as an ``nn.Module``; anything else is a ``TypeError`` naming ``model``."""
    return check_instance("model", model, nn.Module, "an nn.Module (a ViT-family model)")


def _check_query_key_args(module: Any, call: Any) -> None:
    """The arguments of ``AttentionAdapter.query_key``: an attention module and an ``AttentionCall``."""
    check_instance("module", module, nn.Module, "an nn.Module (an attention module)")
    check_instance("call", call, AttentionCall, "an AttentionCall (tokens, captured, call_kwargs)")


class QueryKey(NamedTuple):
    """Per-head queries and keys of one attention call: ``scores = scale · q @ kᵀ + attn_bias``.

    The attention probabilities are ``softmax(scores, -1)`` over all keys.

    Attributes:
        q: the queries after any query norm and rotary embedding, not scaled.
        k: the keys, likewise, with one head per query head (grouped heads repeated).
        scale: the factor of the dot products (usually ``head_dim ** -0.5``).
        attn_bias: an additive score bias broadcastable to ``(B, H, N, N)`` (relative
            positions), or ``None``.

    Shape:
        - q, k: ``(B, H, N, d)``
        - attn_bias: ``(B or 1, H, N, N)``

    Examples:
        >>> import torch
        >>> qk = QueryKey(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0.5)
        >>> qk.attn_bias is None
        True
    """

    q: Tensor
    k: Tensor
    scale: float
    attn_bias: Tensor | None = None


class AttentionCall(NamedTuple):
    """What an ``AttentionAdapter`` sees of one call of an attention module.

    Attributes:
        tokens: the module's input tokens.
        captured: the output of each child named in the adapter's ``captures``, by name
            (a child that did not run is missing).
        call_kwargs: the call's other arguments by parameter name (e.g. ``rope``,
            ``shared_rel_pos_bias``, ``attn_mask``).

    Shape:
        - tokens: ``(B, N, D)``

    Examples:
        >>> import torch
        >>> call = AttentionCall(torch.zeros(1, 5, 8), {}, {"attn_mask": None})
        >>> call.tokens.shape
        torch.Size([1, 5, 8])
    """

    tokens: Tensor
    captured: dict[str, Any]
    call_kwargs: dict[str, Any]


class AttentionAdapter:
    """How the library reads one attention layout; subclass it and override ``query_key``.

    The library never changes how the module computes its attention: it hooks the children
    named in ``captures`` during the module's own forward (fused SDPA or not) and rebuilds the
    rows of the probabilities it needs from ``query_key``. Configure a subclass with class
    attributes:

    * ``captures``: names of child modules whose forward output ``query_key`` reads from
      ``call.captured`` (e.g. ``("qkv",)``). Empty: ``query_key`` works from ``call.tokens``.
    * ``probs_module``: a child whose first input is the post-softmax probabilities
      ``(B, H, N, N)`` when the module computes them explicitly (usually ``"attn_drop"``);
      used instead of rebuilding them. ``None``: always rebuilt from ``query_key``.
    * ``head_output_module``: a child that receives the concatenated per-head outputs
      ``(B, N, H·d)`` before the output projection (timm's ``"norm"``); needed by DOEI's
      ``head_mean=False``. ``None``: none.
    * ``mask_kwargs``: call arguments that mask the scores (``"attn_mask"``, ``"is_causal"``);
      a call that sets one (not ``None`` / ``False``) is refused with ``NotImplementedError``.

    The module must keep ``num_heads`` (an int) as an attribute.

    Examples:
        >>> import torch
        >>> class FromTokens(AttentionAdapter):  # recomputes q and k from the module's input
        ...     def query_key(self, module, call):
        ...         q, k, _ = module.qkv(call.tokens).unflatten(-1, (3, module.num_heads, -1)).unbind(2)
        ...         return QueryKey(q.transpose(1, 2), k.transpose(1, 2), module.scale)
        >>> FromTokens().captures
        ()
    """

    captures: tuple[str, ...] = ()
    probs_module: str | None = None
    head_output_module: str | None = None
    mask_kwargs: tuple[str, ...] = ()

    def query_key(self, module: nn.Module, call: AttentionCall) -> QueryKey:
        """Per-head ``q`` and ``k`` of one call of ``module``.

        Args:
            module: the attention module.
            call: its input, the captured child outputs and the call's arguments.

        Returns:
            ``QueryKey`` ``(q, k, scale, attn_bias)``.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` or ``call`` not an ``AttentionCall``
                (the built-in adapters check both).
            NotImplementedError: this base class (a subclass implements it).

        Shape:
            - call.tokens: ``(B, N, D)``
            - output q, k: ``(B, H, N, d)``

        Examples:
            >>> import torch
            >>> from timm.layers import Attention
            >>> attn = Attention(8, num_heads=2)
            >>> call = AttentionCall(torch.randn(1, 5, 8), {"qkv": attn.qkv(torch.randn(1, 5, 8))}, {})
            >>> FusedQKVAdapter().query_key(attn, call).q.shape
            torch.Size([1, 2, 5, 4])
        """
        _check_query_key_args(module, call)
        raise NotImplementedError(f"{type(self).__name__} does not implement query_key")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _heads(module: nn.Module) -> int:
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool):
        raise TypeError(
            f"{type(module).__name__} has no integer num_heads, which its adapter needs; register an adapter that "
            f"reads this layout with {_REGISTER_ATTENTION}"
        )
    return heads


def _captured(module: nn.Module, call: AttentionCall, name: str) -> Tensor:
    out = call.captured.get(name)
    if out is None:
        raise RuntimeError(
            f"{type(module).__name__}.{name} did not run during the attention call, so its queries and keys "
            f"could not be read; if this class computes its attention differently, register an adapter "
            f"for it with {_REGISTER_ATTENTION}"
        )
    return out


def _split_qk(module: nn.Module, qkv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head q, k (B, H, N, d) from a fused ``(B, N, 3·H·d)`` projection, with q/k norms."""
    q, k, _ = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=_heads(module)).unbind(0)
    q_norm = getattr(module, "q_norm", None)
    k_norm = getattr(module, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k


class FusedQKVAdapter(AttentionAdapter):
    """timm's ``Attention`` and the ViT copies with a fused ``qkv`` Linear.

    Reads the ``qkv`` output during the module's own forward (no second projection; the fused
    SDPA path keeps running), splits it as ``(3, num_heads, head_dim)``, applies the module's
    ``q_norm`` / ``k_norm`` when it has them and uses ``module.scale``. The post-softmax
    probabilities are taken from ``attn_drop``'s input when the module computes them.

    Examples:
        >>> import timm, torch
        >>> from wsss_blocks import adapters
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> isinstance(adapters.attention_adapter(vit.blocks[0].attn), adapters.FusedQKVAdapter)
        True
    """

    captures = ("qkv",)
    probs_module = "attn_drop"
    head_output_module = "norm"
    mask_kwargs = ("attn_mask", "is_causal")

    def query_key(self, module: nn.Module, call: AttentionCall) -> QueryKey:
        """``q``, ``k`` from the captured ``qkv`` output (see ``AttentionAdapter.query_key``).

        Examples:
            >>> import torch
            >>> from timm.layers import Attention
            >>> attn = Attention(8, num_heads=2)
            >>> x = torch.randn(1, 5, 8)
            >>> FusedQKVAdapter().query_key(attn, AttentionCall(x, {"qkv": attn.qkv(x)}, {})).k.shape
            torch.Size([1, 2, 5, 4])
        """
        _check_query_key_args(module, call)
        q, k = _split_qk(module, _captured(module, call, "qkv"))
        return QueryKey(q, k, float(getattr(module, "scale")))


class EvaAttentionAdapter(AttentionAdapter):
    """timm's ``EvaAttention`` and ``AttentionRope``: q/k after their norms, then RoPE.

    ``q_norm`` / ``k_norm`` (modules in both classes, ``Identity`` when off) are hooked, so
    fused or separate projections and ``q_bias`` / ``v_bias`` added inside ``F.linear`` need
    no special case. The call's ``rope`` is applied to the patch tokens (after the module's
    ``num_prefix_tokens``) as the module does, and grouped key heads (``num_kv_groups``) are
    repeated to one per query head.

    Examples:
        >>> from timm.models.eva import Eva
        >>> from wsss_blocks import adapters
        >>> eva = Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
        >>> type(adapters.attention_adapter(eva.blocks[0].attn)).__name__
        'EvaAttentionAdapter'
    """

    captures = ("q_norm", "k_norm")
    probs_module = "attn_drop"
    head_output_module = "norm"
    mask_kwargs = ("attn_mask", "is_causal")

    def query_key(self, module: nn.Module, call: AttentionCall) -> QueryKey:
        """``q``, ``k`` from the hooked norms, RoPE and grouped heads applied.

        Examples:
            >>> import torch
            >>> from timm.models.eva import EvaAttention
            >>> attn = EvaAttention(8, num_heads=2, norm_layer=torch.nn.LayerNorm)
            >>> x = torch.randn(1, 5, 8)
            >>> calls = {}
            >>> hooks = [getattr(attn, n).register_forward_hook(
            ...     lambda m, a, o, n=n: calls.__setitem__(n, o)) for n in ("q_norm", "k_norm")]
            >>> _ = attn(x)
            >>> EvaAttentionAdapter().query_key(attn, AttentionCall(x, calls, {})).q.shape
            torch.Size([1, 2, 5, 4])
        """
        _check_query_key_args(module, call)
        q = _captured(module, call, "q_norm")
        k = _captured(module, call, "k_norm")
        rope = call.call_kwargs.get("rope")
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            npt = int(getattr(module, "num_prefix_tokens", 0) or 0)
            kw = {"half": True} if getattr(module, "rotate_half", False) else {}
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, **kw)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, **kw)], dim=2)
        groups = int(getattr(module, "num_kv_groups", 1) or 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
        return QueryKey(q, k, float(getattr(module, "scale")))


def _relative_position_bias(module: nn.Module) -> Tensor | None:
    """BEiT's per-block relative position bias ``(1, H, N, N)`` from its table and index."""
    table = getattr(module, "relative_position_bias_table", None)
    index = getattr(module, "relative_position_index", None)
    if table is None or index is None:
        return None
    n = index.shape[-1]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)


def _add_bias(bias: Tensor | None, other: Tensor | None) -> Tensor | None:
    if bias is None:
        return other
    return bias if other is None else bias + other


class BeitAttentionAdapter(AttentionAdapter):
    """timm's BEiT ``Attention``: fused ``qkv`` with ``q_bias`` / ``v_bias``, relative position bias.

    With ``q_bias`` the module calls ``F.linear`` on ``qkv.weight`` directly (the ``qkv``
    module never runs), so ``q`` and ``k`` are recomputed from the input with the query and
    key rows of the weight (two thirds of the projection, only on the paths that need them);
    without it the ``qkv`` output is captured. ``attn_bias`` is the block's own relative
    position bias plus the call's ``shared_rel_pos_bias``. There is no per-head output hook
    (DOEI's ``head_mean=False`` is refused).

    Examples:
        >>> import timm
        >>> from wsss_blocks import adapters
        >>> beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
        ...                          embed_dim=32, depth=1, num_heads=2)
        >>> type(adapters.attention_adapter(beit.blocks[0].attn)).__name__
        'BeitAttentionAdapter'
    """

    captures = ("qkv",)
    probs_module = "attn_drop"

    def query_key(self, module: nn.Module, call: AttentionCall) -> QueryKey:
        """``q``, ``k`` (recomputed when the module bypasses ``qkv``) and the position bias.

        Examples:
            >>> import torch
            >>> from timm.models.beit import Attention
            >>> attn = Attention(8, num_heads=2, qkv_bias=True, window_size=(2, 2))
            >>> qk = BeitAttentionAdapter().query_key(attn, AttentionCall(torch.randn(1, 5, 8), {}, {}))
            >>> qk.q.shape, qk.attn_bias.shape
            (torch.Size([1, 2, 5, 4]), torch.Size([1, 2, 5, 5]))
        """
        _check_query_key_args(module, call)
        q_bias = getattr(module, "q_bias", None)
        if q_bias is None:
            qkv = _captured(module, call, "qkv")
            q, k = _split_qk(module, qkv)
        else:
            weight = getattr(module, "qkv").weight
            rows = weight.shape[0] // 3
            k_bias = getattr(module, "k_bias", None)
            bias = torch.cat([q_bias, k_bias if k_bias is not None else torch.zeros_like(q_bias)])
            qk = F.linear(call.tokens, weight[: 2 * rows], bias)
            q, k = rearrange(qk, "b n (two h d) -> two b h n d", two=2, h=_heads(module)).unbind(0)
        bias_ = _add_bias(_relative_position_bias(module), call.call_kwargs.get("shared_rel_pos_bias"))
        return QueryKey(q, k, float(getattr(module, "scale")), bias_)


class RelPosAttentionAdapter(AttentionAdapter):
    """timm's ``RelPosAttention`` (``vit_relpos_*``): fused ``qkv`` plus a relative position bias.

    ``attn_bias`` is the block's ``rel_pos.get_bias()`` when it has one, else the call's
    ``shared_rel_pos``, as in the module's own forward. A relative position MLP with dropout
    samples a new bias on every call: in training its fused path is refused
    (``NotImplementedError``; the explicit path, ``fused_attn=False``, gives the module's own
    probabilities).

    Examples:
        >>> import torch
        >>> from timm.models.vision_transformer_relpos import RelPosAttention
        >>> attn = RelPosAttention(8, num_heads=2)
        >>> x = torch.randn(1, 5, 8)
        >>> qk = RelPosAttentionAdapter().query_key(attn, AttentionCall(x, {"qkv": attn.qkv(x)}, {}))
        >>> qk.q.shape, qk.attn_bias is None
        (torch.Size([1, 2, 5, 4]), True)
    """

    captures = ("qkv",)
    probs_module = "attn_drop"

    def query_key(self, module: nn.Module, call: AttentionCall) -> QueryKey:
        """``q``, ``k`` from the captured ``qkv`` output and the relative position bias.

        Examples:
            >>> import torch
            >>> from timm.models.vision_transformer_relpos import RelPosAttention
            >>> attn = RelPosAttention(8, num_heads=2)
            >>> x = torch.randn(1, 5, 8)
            >>> RelPosAttentionAdapter().query_key(attn, AttentionCall(x, {"qkv": attn.qkv(x)}, {})).scale
            0.5
        """
        _check_query_key_args(module, call)
        q, k = _split_qk(module, _captured(module, call, "qkv"))
        rel_pos = getattr(module, "rel_pos", None)
        if rel_pos is not None and rel_pos.training and any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in rel_pos.modules()
        ):
            raise NotImplementedError(
                "RelPosAttention in training with dropout inside its relative position MLP: the bias is "
                "sampled anew on every call, so the bias of the module's own pass cannot be rebuilt; use its "
                "explicit path (fused_attn=False), eval mode, or a model without that dropout"
            )
        bias = rel_pos.get_bias() if rel_pos is not None else call.call_kwargs.get("shared_rel_pos")
        return QueryKey(q, k, float(getattr(module, "scale")), bias)


# --------------------------------------------------------------------------- model layouts


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


class ViTAdapter:
    """How the library reads a ViT-family model; the default reads timm models and ViT copies.

    Subclass it and override the methods that differ for your layout, then register it with
    ``register_vit_adapter``. The default reads attributes only:

    * ``blocks``: ``model.blocks`` (``nn.Sequential`` or ``nn.ModuleList``);
    * ``num_prefix_tokens``: ``model.num_prefix_tokens`` when the model has it, else the
      leading tokens it owns: ``cls_token.shape[1]`` (one, or ``C`` for MCTformer), plus
      ``dist_token`` and ``reg_token`` when present;
    * ``num_class_tokens``: the prefix tokens without the registers (class and distillation
      tokens);
    * ``patch_embed`` / ``patch_size``: ``model.patch_embed`` and its ``patch_size``;
    * ``check_image_size`` / ``grid``: timm's fixed-size models take only their ``img_size``,
      ``dynamic_img_size=True`` models multiples of the patch size (any size with
      ``dynamic_img_pad``), and a copy whose patch embedding has no ``grid_size`` any size of at
      least one patch (the grid is ``(H // p, W // p)``);
    * ``final_norm``: ``model.norm`` (``Identity`` when absent);
    * ``run``: ``model.forward_features(images)``, the model's own pass with its own position
      embeddings;
    * ``head``: ``model.forward_head(tokens)`` when the model has it, else ``None``.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> a = ViTAdapter()
        >>> a.num_prefix_tokens(vit), a.num_class_tokens(vit), a.grid(vit, (32, 32))
        (2, 2, (2, 2))
    """

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order.

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> len(ViTAdapter().blocks(timm.create_model("vit_tiny_patch16_224", depth=3)))
            3
        """
        _check_model(model)
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise TypeError(
                f"model: {type(model).__name__} has no .blocks; expected a timm VisionTransformer-family model or a "
                f"copy with the same layout (register a ViTAdapter for other layouts with {_REGISTER_VIT})"
            )
        return blocks

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """``P``: the tokens before the patch tokens (class, distillation, registers).

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> ViTAdapter().num_prefix_tokens(timm.create_model("vit_tiny_patch16_224", reg_tokens=4))
            5
        """
        _check_model(model)
        n = getattr(model, "num_prefix_tokens", None)
        if n is not None:
            return int(n)
        count = 0
        for name in ("cls_token", "dist_token", "reg_token"):
            token = getattr(model, name, None)
            if isinstance(token, Tensor):
                count += int(token.shape[1])
        return count

    def num_class_tokens(self, model: nn.Module) -> int:
        """The leading class tokens (distillation included, registers excluded).

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> ViTAdapter().num_class_tokens(timm.create_model("vit_tiny_patch16_224", reg_tokens=4))
            1
        """
        _check_model(model)
        regs = getattr(model, "num_reg_tokens", None)
        if regs is None:
            reg = getattr(model, "reg_token", None)
            regs = int(reg.shape[1]) if isinstance(reg, Tensor) else 0
        return self.num_prefix_tokens(model) - int(regs)

    def patch_embed(self, model: nn.Module) -> nn.Module:
        """The patch embedding (its input is the image batch).

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> type(ViTAdapter().patch_embed(timm.create_model("vit_tiny_patch16_224"))).__name__
            'PatchEmbed'
        """
        _check_model(model)
        embed = getattr(model, "patch_embed", None)
        if not isinstance(embed, nn.Module):
            raise TypeError(
                f"model: {type(model).__name__} has no .patch_embed; expected a timm ViT or a copy with the same "
                f"layout (register a ViTAdapter for other layouts with {_REGISTER_VIT})"
            )
        return embed

    def patch_size(self, model: nn.Module) -> tuple[int, int]:
        """The patch size ``(ph, pw)``.

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> ViTAdapter().patch_size(timm.create_model("vit_tiny_patch16_224"))
            (16, 16)
        """
        return _pair(getattr(self.patch_embed(model), "patch_size"))

    def check_image_size(self, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        """Raise ``ValueError`` when the model cannot take images of ``image_size``; return it.

        Args:
            model: the ViT.
            image_size: ``(H, W)``.

        Raises:
            ValueError: naming ``image_size``, the size and the sizes that work.

        Examples:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
            >>> try:
            ...     ViTAdapter().check_image_size(vit, (48, 32))
            ... except ValueError as err:
            ...     print(err)
            image_size (48, 32): VisionTransformer was built for img_size (32, 32) and accepts only that size; ...
        """
        h, w = check_size("image_size", image_size)
        embed = self.patch_embed(model)
        ph, pw = self.patch_size(model)
        name = type(model).__name__
        dynamic = bool(getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False))
        img_size = getattr(embed, "img_size", None)
        if not dynamic and getattr(embed, "grid_size", None) is not None and img_size is not None:
            fixed = _pair(img_size)
            if (h, w) != fixed:
                hint = " or build it with dynamic_img_size=True" if hasattr(model, "dynamic_img_size") else ""
                raise ValueError(
                    f"image_size ({h}, {w}): {name} was built for img_size {fixed} and accepts only that size; "
                    f"pass {fixed}{hint}"
                )
            return h, w
        if dynamic and getattr(embed, "dynamic_img_pad", False):
            return h, w
        for side, n, p in (("height", h, ph), ("width", w, pw)):
            if dynamic and n % p:
                low, high = (n // p) * p, (n // p + 1) * p
                options = f"{low} or {high}" if low > 0 else f"{high}"
                raise ValueError(
                    f"image_size ({h}, {w}): {side} {n} is not a multiple of the patch size {p} (try {options})"
                )
            if n < p:
                raise ValueError(
                    f"image_size ({h}, {w}): {side} {n} is smaller than the patch size {p} of {name}; "
                    f"pass at least one patch"
                )
        return h, w

    def grid(self, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid ``(h, w)`` an image of ``image_size`` gives (not checked; see ``check_image_size``).

        Args:
            model: the ViT.
            image_size: ``(H, W)``.

        Examples:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
            ...                         dynamic_img_size=True, depth=1)
            >>> ViTAdapter().grid(vit, (48, 80))
            (3, 5)
        """
        size = check_size("image_size", image_size)
        embed: Any = self.patch_embed(model)
        dynamic = getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False)
        if dynamic and hasattr(embed, "dynamic_feat_size"):
            h, w = embed.dynamic_feat_size(size)
        elif getattr(embed, "grid_size", None) is not None:
            h, w = embed.grid_size
        else:
            ph, pw = self.patch_size(model)
            h, w = size[0] // ph, size[1] // pw
        return int(h), int(w)

    def native_image_size(self, model: nn.Module) -> tuple[int, int] | None:
        """The image size the model was built for (``patch_embed.img_size``), or ``None``.

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> ViTAdapter().native_image_size(timm.create_model("vit_tiny_patch16_224", img_size=64))
            (64, 64)
        """
        size = getattr(self.patch_embed(model), "img_size", None)
        return None if size is None else _pair(size)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied to the last block's tokens (``Identity`` when the model has none).

        Args:
            model: the ViT.

        Examples:
            >>> import timm
            >>> type(ViTAdapter().final_norm(timm.create_model("vit_tiny_patch16_224"))).__name__
            'LayerNorm'
        """
        _check_model(model)
        norm = getattr(model, "norm", None)
        return norm if isinstance(norm, nn.Module) else nn.Identity()

    def run(self, model: nn.Module, images: Tensor) -> Any:
        """One pass through every block (the library taps the blocks with forward hooks).

        The default checks ``images`` (a float ``(B, 3, H, W)`` batch of a size
        ``check_image_size`` accepts; errors name ``images``) and casts them to the dtype of the
        model's parameters.

        Args:
            model: the ViT.
            images: the image batch.

        Shape:
            - images: ``(B, 3, H, W)``

        Examples:
            >>> import timm, torch
            >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
            >>> ViTAdapter().run(vit, torch.randn(1, 3, 32, 32)).shape
            torch.Size([1, 5, 192])
        """
        _check_model(model)
        _check_images(self, model, images)
        forward = getattr(model, "forward_features", None)
        if not callable(forward):
            raise TypeError(
                f"model: {type(model).__name__} has no forward_features; register a ViTAdapter whose run() passes "
                f"the images through every block with {_REGISTER_VIT}"
            )
        return forward(to_model_dtype(model, images))

    def head(self, model: nn.Module, tokens: Tensor) -> Tensor | None:
        """Logits from the final-normed full token sequence, or ``None`` when the layout has no head.

        The default checks ``tokens`` (float, ``D`` the model's ``embed_dim`` when it has one)
        and casts them to the dtype of the model's parameters.

        Args:
            model: the ViT.
            tokens: the last block's tokens after ``final_norm``, prefix tokens first.

        Shape:
            - tokens: ``(B, P + N, D)``
            - output: ``(B, K)`` (what the model's classifier gives)

        Examples:
            >>> import timm, torch
            >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
            >>> ViTAdapter().head(vit, torch.randn(2, 197, 192)).shape
            torch.Size([2, 3])
        """
        _check_model(model)
        dims = check_shape("tokens", tokens, ["B", "N", "D"], dtype="float")
        forward_head = getattr(model, "forward_head", None)
        if not callable(forward_head):
            return None
        p = self.num_prefix_tokens(model)
        if dims["N"] < max(p, 1):
            raise ValueError(
                f"tokens: expected the full sequence, prefix tokens first (N >= {max(p, 1)}), got shape "
                f"{tuple(tokens.shape)}"
            )
        width = getattr(model, "embed_dim", None)
        if isinstance(width, int) and not isinstance(width, bool) and dims["D"] != width:
            raise ValueError(f"tokens: expected D={width} (the model's embed_dim), got shape {tuple(tokens.shape)}")
        return forward_head(to_model_dtype(model, tokens))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_images(adapter: ViTAdapter, model: nn.Module, images: Any) -> tuple[int, int]:
    """``images`` as a float ``(B, 3, H, W)`` batch of a size ``model`` takes; return ``(H, W)``."""
    dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    return _check_images_size(adapter, model, (dims["H"], dims["W"]))


def _check_images_size(adapter: ViTAdapter, model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """``adapter.check_image_size`` for the size of an ``images`` argument; its error names ``images``."""
    try:
        return adapter.check_image_size(model, size)
    except ValueError as err:
        msg = str(err)
        if msg.startswith("images"):
            raise
        if msg.startswith("image_size "):  # the size is the images' size here, not an image_size argument
            msg = "image size " + msg[len("image_size "):]
        raise (ShapeError if isinstance(err, ShapeError) else ValueError)(f"images: {msg}") from None


# --------------------------------------------------------------------------- registries

_ATTENTION: dict[type, AttentionAdapter] = {}
_VIT: dict[type, ViTAdapter] = {}
_DEFAULT_VIT = ViTAdapter()
_FUSED_QKV = FusedQKVAdapter()
_BUILTINS_LOADED = False

#: timm classes the library refuses, by "module.qualname", with the reason.
_REFUSED = {
    "timm.layers.diff_attention.DiffAttention": (
        "its output mixes two softmax maps per head (softmax1 - lambda * softmax2): there is no one "
        "probability map for DOEI's scores or the attention CAMs"
    ),
    "timm.models.cait.TalkingHeadAttn": (
        "it mixes the heads before and after the softmax (talking heads), so no per-head softmax over keys "
        "builds its output"
    ),
    "timm.models.cait.ClassAttn": (
        "only the class token queries (class attention): there are no patch rows, so patch-to-class "
        "interactions and the patch affinity are undefined"
    ),
    "timm.models.vision_transformer_sam.Attention": (
        "it attends within windows on a spatial (B, H, W, C) input: there is no class token and no global "
        "token sequence"
    ),
    "timm.models.xcit.XCA": "cross-covariance attention attends over channels, not tokens",
}

_FUSED_QKV_CHILDREN = frozenset({"qkv", "attn_drop", "proj", "proj_drop", "q_norm", "k_norm", "norm"})


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    table = (
        ("timm.layers", "Attention", _FUSED_QKV),
        ("timm.models.vision_transformer", "Attention", _FUSED_QKV),
        ("timm.models.eva", "EvaAttention", EvaAttentionAdapter()),
        ("timm.layers", "AttentionRope", EvaAttentionAdapter()),
        ("timm.models.beit", "Attention", BeitAttentionAdapter()),
        ("timm.models.vision_transformer_relpos", "RelPosAttention", RelPosAttentionAdapter()),
    )
    for module_name, attr, adapter in table:
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:  # pragma: no cover - timm missing or older
            continue
        if isinstance(cls, type):
            _ATTENTION.setdefault(cls, adapter)  # a user's earlier registration wins


def register_attention_adapter(attention_class: type, adapter: AttentionAdapter) -> None:
    """Read modules of exactly ``attention_class`` with ``adapter`` (replaces any earlier one).

    Registration is by exact class: a subclass needs its own registration (it may change
    ``forward``). Registering a class the library refuses by default overrides the refusal.

    Args:
        attention_class: the attention module class.
        adapter: an ``AttentionAdapter`` instance.

    Raises:
        TypeError: ``attention_class`` is not an ``nn.Module`` class, or ``adapter`` is not an
            ``AttentionAdapter``.

    Examples:
        >>> import timm
        >>> from wsss_blocks import adapters
        >>> class MyAttention(timm.layers.Attention):  # same forward as its parent
        ...     pass
        >>> adapters.register_attention_adapter(MyAttention, adapters.FusedQKVAdapter())
        >>> adapters.attention_adapter(MyAttention(8, num_heads=2))
        FusedQKVAdapter()
    """
    if not (isinstance(attention_class, type) and issubclass(attention_class, nn.Module)):
        raise TypeError(f"attention_class: expected an nn.Module subclass, got {attention_class!r}")
    if not isinstance(adapter, AttentionAdapter):
        raise TypeError(f"adapter: expected an AttentionAdapter, got {type(adapter).__name__}")
    _load_builtins()
    _ATTENTION[attention_class] = adapter


def register_vit_adapter(model_class: type, adapter: ViTAdapter) -> None:
    """Read models of ``model_class`` (and its subclasses) with ``adapter``.

    Args:
        model_class: the model class.
        adapter: a ``ViTAdapter`` instance (usually of a subclass that overrides some methods).

    Raises:
        TypeError: ``model_class`` is not an ``nn.Module`` class, or ``adapter`` is not a
            ``ViTAdapter``.

    Examples:
        >>> from torch import nn
        >>> from wsss_blocks import adapters
        >>> class Wrapped(nn.Module):  # a ViT kept under .vit
        ...     def __init__(self, vit):
        ...         super().__init__()
        ...         self.vit = vit
        >>> class WrappedAdapter(adapters.ViTAdapter):
        ...     def blocks(self, model):
        ...         return model.vit.blocks
        >>> adapters.register_vit_adapter(Wrapped, WrappedAdapter())
        >>> type(adapters.vit_adapter(Wrapped(nn.Module()))).__name__
        'WrappedAdapter'
    """
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"model_class: expected an nn.Module subclass, got {model_class!r}")
    if not isinstance(adapter, ViTAdapter):
        raise TypeError(f"adapter: expected a ViTAdapter, got {type(adapter).__name__}")
    _VIT[model_class] = adapter


def vit_adapter(model: nn.Module) -> ViTAdapter:
    """The ``ViTAdapter`` for ``model``: the one registered for its class or a base class, else the default.

    Args:
        model: the ViT.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Examples:
        >>> import timm
        >>> from wsss_blocks import adapters
        >>> adapters.vit_adapter(timm.create_model("vit_tiny_patch16_224", depth=1))
        ViTAdapter()
    """
    _check_model(model)
    for klass in type(model).__mro__:
        adapter = _VIT.get(klass)
        if adapter is not None:
            return adapter
    return _DEFAULT_VIT


def _is_fused_qkv_copy(module: nn.Module) -> bool:
    """The timm 0.3-0.6 attention structure (see the module docstring)."""
    qkv = getattr(module, "qkv", None)
    heads = getattr(module, "num_heads", None)
    scale = getattr(module, "scale", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        return False
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or qkv.out_features % (3 * heads):
        return False
    names = {name for name, _ in module.named_children()}
    if not ({"attn_drop", "proj"} <= names <= _FUSED_QKV_CHILDREN):
        return False
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return not own


def _lookup(module: nn.Module, path: str | None) -> AttentionAdapter | None:
    _load_builtins()
    cls = type(module)
    adapter = _ATTENTION.get(cls)
    if adapter is not None:
        return adapter
    qual = f"{cls.__module__}.{cls.__qualname__}"
    where = f" at module path {path!r}" if path is not None else ""
    register = f"{_REGISTER_ATTENTION}({cls.__name__}, adapter)"
    reason = _REFUSED.get(qual)
    if reason is not None:
        raise TypeError(
            f"unsupported attention class {qual}{where}: {reason}. If your use of it is well defined, "
            f"describe it with an AttentionAdapter and register it: {register}"
        )
    parents = [k for k in _ATTENTION if issubclass(cls, k)]
    if parents:
        parent = parents[0]
        raise TypeError(
            f"unsupported attention class {qual}{where}: a subclass of {parent.__module__}.{parent.__qualname__}, "
            f"whose forward it may change; if it computes the same attention, register it with the parent's "
            f"adapter: {_REGISTER_ATTENTION}({cls.__name__}, {_ATTENTION[parent]!r})"
        )
    if not cls.__module__.startswith("timm.") and _is_fused_qkv_copy(module):
        return _FUSED_QKV
    if cls.__name__.endswith("Attention"):
        raise TypeError(
            f"unsupported attention class {qual}{where}: the library cannot read its queries and keys; "
            f"describe its layout with an AttentionAdapter and register it: {register}"
        )
    return None


def attention_adapter(module: nn.Module) -> AttentionAdapter | None:
    """The ``AttentionAdapter`` the library reads ``module`` with; ``None`` when it is not attention.

    Args:
        module: any module.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or an attention module the library
            refuses or does not know (the message names the reason and
            ``register_attention_adapter``).

    Examples:
        >>> import timm
        >>> from torch import nn
        >>> from wsss_blocks import adapters
        >>> adapters.attention_adapter(nn.Linear(2, 2)) is None
        True
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, attn_layer="diff")
        >>> try:
        ...     adapters.attention_adapter(vit.blocks[0].attn)
        ... except TypeError as err:
        ...     print(str(err).split(":")[0])
        unsupported attention class timm.layers.diff_attention.DiffAttention
    """
    check_instance("module", module, nn.Module, "an nn.Module")
    return _lookup(module, None)
