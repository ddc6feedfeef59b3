"""``patch`` / ``unpatch`` / ``DOEIHandle``: DOEI inside timm's own attention forward."""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._attention_capture import (
    CaptureState,
    call_arguments,
    class_row_attention,
    default_class_tokens,
    find_attention_modules,
    install_capture,
    refuse_masks,
    row_logsumexp,
)
from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import ShapeError, check_instance, check_int, check_labels, check_shape
from wsss_blocks.adapters import AttentionAdapter, _check_images_size, _lookup, vit_adapter
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_blocks.doei.config import DOEIConfig
from wsss_blocks.doei.functional import (
    _assemble,
    _delta_from_scores,
    _emb_affinity_rows,
    patch_color_affinity,
    progressive_count,
)

__all__ = ["DOEIHandle", "patch", "unpatch"]


class _BlockState(CaptureState):
    """Per-module capture state plus the plan of the current call (cleared after every call)."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        super().__init__()
        self.plan: tuple[int, int, bool, bool] | None = None

    def clear(self) -> None:
        super().clear()
        self.plan = None


class DOEIHandle:
    """The handle ``patch`` returns; undo with ``remove`` or a ``with`` block.

    Attributes:
        config: the ``DOEIConfig`` in use; may be reassigned between forwards.
        num_class_tokens: ``C``.
        num_prefix_tokens: ``P0`` at patch time (a later change of the model's class tokens
            is refused at the next forward: unpatch, convert, patch again).
        num_blocks: ``L``, the number of attention modules.
        patched_blocks: the patched block indices (0-based, sorted).

    Gradient checkpointing recomputes blocks with the handle's current images: run
    backward before the next forward.

    Args:
        model: the ViT ``patch`` was given.
        modules: its attention modules, in ``model.modules()`` order (each read through its
            ``wsss_blocks.adapters.AttentionAdapter``).
        num_class_tokens: ``C``, in ``[1, P0]``.
        config: the ``DOEIConfig``.
        layers: the block indices to patch (negative counts from the end; no duplicates).

    Examples:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
        ...                       embed_dim=32, num_heads=2)
        >>> with patch(m) as h:
        ...     out = m(torch.randn(1, 3, 32, 32))
        >>> h.num_blocks, hasattr(m, "_doei_handle")
        (2, False)
    """

    def __init__(
        self,
        model: nn.Module,
        modules: list[nn.Module],
        *,
        num_class_tokens: int,
        config: DOEIConfig,
        layers: list[int],
    ) -> None:
        check_instance("model", model, nn.Module, "an nn.Module (a ViT)")
        if isinstance(modules, nn.Module) or not isinstance(modules, (list, tuple)):
            raise TypeError(f"modules: expected a list of attention modules, got {type(modules).__name__}")
        if not isinstance(config, DOEIConfig):
            raise TypeError(f"config: expected a DOEIConfig, got {type(config).__name__}")
        self._model = model
        self._modules = list(modules)
        self._vit = vit_adapter(model)
        self._adapters: list[AttentionAdapter] = []
        for j, m in enumerate(self._modules):
            check_instance(f"modules[{j}]", m, nn.Module, "an attention module")
            adapter = _lookup(m, None)
            if adapter is None:
                raise TypeError(f"modules: {type(m).__name__} is not an attention module the library can read")
            self._adapters.append(adapter)
        self.num_prefix_tokens = self._vit.num_prefix_tokens(model)
        self.num_class_tokens = check_int("num_class_tokens", num_class_tokens, low=1)
        if self.num_class_tokens > self.num_prefix_tokens:
            raise ValueError(
                f"num_class_tokens: expected 1 <= C <= num_prefix_tokens={self.num_prefix_tokens}, "
                f"got {self.num_class_tokens}"
            )
        self.num_blocks = len(self._modules)
        self.patched_blocks = tuple(_layer_indices(layers, self.num_blocks))
        self._config = config
        self._check_config(config)
        self._images: Tensor | None = None
        self._images_override: Tensor | None = None
        self._labels: Tensor | None = None
        self._affinity_cache: tuple[Any, Tensor] | None = None
        self._hooks: list[Any] = []
        self._saved_forward: dict[int, Any] = {}
        self._removed = False
        embed = getattr(model, "patch_embed", None)
        target = embed if isinstance(embed, nn.Module) else model
        try:
            self._hooks.append(target.register_forward_pre_hook(self._images_hook, with_kwargs=True))
            for i in self.patched_blocks:
                self._wrap(i, self._modules[i], self._adapters[i])
        except BaseException:
            self.remove()
            raise
        setattr(model, "_doei_handle", self)

    # -- public -------------------------------------------------------------------------

    @property
    def config(self) -> DOEIConfig:
        """The active configuration."""
        return self._config

    @config.setter
    def config(self, value: DOEIConfig) -> None:
        if not isinstance(value, DOEIConfig):
            raise TypeError(f"config: expected a DOEIConfig, got {type(value).__name__}")
        self._check_config(value)
        self._config = value

    def set_images(self, images: Tensor | None) -> None:
        """Use ``images`` (B, 3, H, W) for HFA until ``set_images(None)``, instead of the input.

        Args:
            images: normalised images, or ``None`` to go back to the model's input.

        Examples:
            >>> import timm
            >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
            ...                       embed_dim=32, num_heads=2)
            >>> with patch(m) as h:
            ...     h.set_images(torch.zeros(1, 3, 32, 32))
        """
        if images is not None:
            check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        self._images_override = images
        self._affinity_cache = None

    def set_labels(self, labels: Tensor | None) -> None:
        """Image labels (B, C) for ``restrict_to_labels``; kept until replaced.

        Args:
            labels: multi-hot labels, one column per class token, or ``None``.

        Examples:
            >>> import timm
            >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
            ...                       embed_dim=32, num_heads=2)
            >>> with patch(m) as h:
            ...     h.set_labels(torch.ones(1, 1))
        """
        if labels is not None:
            check_labels("labels", labels, {"C": self.num_class_tokens}, pattern=("B", "C"))
        self._labels = labels

    def remove(self) -> None:
        """Restore every patched module and remove all hooks (idempotent).

        Examples:
            >>> import timm
            >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
            ...                       embed_dim=32, num_heads=2)
            >>> h = patch(m); h.remove(); h.remove()
        """
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i, mod in enumerate(self._modules):
            if i not in self._saved_forward:
                continue
            saved = self._saved_forward[i]
            if saved is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = saved
        self._saved_forward = {}
        if getattr(self._model, "_doei_handle", None) is self:
            del self._model._doei_handle
        self._images = self._images_override = self._labels = None
        self._affinity_cache = None
        self._removed = True

    def __enter__(self) -> DOEIHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- internals ----------------------------------------------------------------------

    def _check_config(self, config: DOEIConfig) -> None:
        if config.head_mean:
            return
        for i in self.patched_blocks:
            mod, adapter = self._modules[i], self._adapters[i]
            name = adapter.head_output_module
            if name is None or not isinstance(getattr(mod, name, None), nn.Module):
                raise NotImplementedError(
                    f"head_mean=False needs the per-head outputs before the projection, which "
                    f"{type(mod).__name__} does not expose ({adapter!r} names no head_output_module it has; "
                    f"timm's Attention and EvaAttention have attn.norm)"
                )

    def _images_hook(self, _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        model = self._model
        if self._vit.num_prefix_tokens(model) != self.num_prefix_tokens:
            raise RuntimeError(
                f"the model's prefix tokens changed since doei.patch (P0 {self.num_prefix_tokens} -> "
                f"{self._vit.num_prefix_tokens(model)}, e.g. mct.add_class_tokens after patching); call "
                f"doei.unpatch(model) and doei.patch(model) again"
            )
        images = args[0] if args else kwargs.get("x")
        if _mod is not model and isinstance(images, Tensor) and images.dim() == 4:  # the patch embedding's input
            _check_images_size(self._vit, model, (int(images.shape[-2]), int(images.shape[-1])))
        if self._images_override is not None:
            return
        self._images = images
        self._affinity_cache = None

    def _wrap(self, index: int, attn: nn.Module, adapter: AttentionAdapter) -> None:
        # Hook flow of one patched block, per forward:
        #   1. the instance ``forward`` below runs the module's own forward (``orig``) with
        #      ``state.active`` set, so the hooks the adapter names record what DOEI needs:
        #   2. the ``captures`` hooks keep what ``adapter.query_key`` reads (timm: the ``qkv``
        #      output; fused SDPA path: q, k rebuilt later);
        #   3. the ``probs_module`` pre-hook keeps the post-softmax attention (explicit path only);
        #   4. with ``head_mean=False``, a pre-hook on ``head_output_module`` adds the per-head
        #      delta to the attention output before timm's ``attn.norm`` and projection;
        #   5. with ``head_mean=True`` (default) the delta is added to the (projected)
        #      attention output after ``orig`` returns (the first item when it returns a
        #      tuple, as the ViT copies' ``(out, weights)``; the weights stay the module's
        #      own). ``state.clear()`` drops the captures.
        existing = attn.__dict__.get("forward")
        if getattr(existing, "_doei_wrapper", False):
            raise RuntimeError("this attention module is already patched by DOEI")
        self._saved_forward[index] = existing
        orig = attn.forward  # instance forward if any, else the bound class forward
        state = _BlockState()
        self._hooks.extend(install_capture(attn, adapter, state, probs=True))
        head_name = adapter.head_output_module
        head_out = getattr(attn, head_name, None) if head_name is not None else None
        if isinstance(head_out, nn.Module):

            def head_pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
                if not (state.active and not self._config.head_mean):
                    return None
                heads = int(getattr(attn, "num_heads"))
                per_head = rearrange(args[0], "b n (h d) -> b h n d", h=heads)
                per_head = self._add_delta(attn, adapter, state, per_head, per_head=True)
                return (rearrange(per_head, "b h n d -> b n (h d)"),) + tuple(args[1:])

            self._hooks.append(head_out.register_forward_pre_hook(head_pre_hook))

        def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if module is not attn:
                raise RuntimeError(
                    "this attention module belongs to a copy of a DOEI-patched model (copy.deepcopy "
                    "copies the patch, which still points at the original model); copy the model "
                    "before patching, or call doei.unpatch(copy) and then doei.patch(copy)"
                )
            x, call_kwargs = call_arguments(attn, args, kwargs)
            refuse_masks(adapter, call_kwargs, "DOEI-patched attention")
            plan = self._plan(index, x.shape[1])
            if plan is None:
                return orig(*args, **kwargs)
            state.begin(x, call_kwargs)
            state.plan = plan
            try:
                result = orig(*args, **kwargs)
                if self._config.head_mean:
                    if isinstance(result, tuple):
                        out = self._add_delta(attn, adapter, state, result[0], per_head=False)
                        result = (out, *result[1:])
                    else:
                        result = self._add_delta(attn, adapter, state, result, per_head=False)
            finally:
                state.clear()
            return result

        forward._doei_wrapper = True  # type: ignore[attr-defined]
        # bound to ``attn``: a deep copy rebinds it to the copied module, which the check above catches
        attn.forward = types.MethodType(forward, attn)

    def _plan(self, index: int, n_tokens: int) -> tuple[int, int, bool, bool] | None:
        cfg = self._config
        c = self.num_class_tokens
        n = n_tokens - self.num_prefix_tokens
        big_l = self.num_blocks
        t_p = progressive_count(max(n, 0), block_index=index, num_blocks=big_l, st=cfg.st_p2c) if cfg.use_ppdo else 0
        t_c = progressive_count(c - 1, block_index=index, num_blocks=big_l, st=cfg.st_c2c) if cfg.use_cpdo else 0
        act_p = t_p > 0 and (cfg.af_p2c + cfg.sf_p2c) > 0
        act_c = t_c > 0 and (cfg.af_c2c + cfg.sf_c2c) > 0
        if not (act_p or act_c):
            return None
        return t_p, t_c, act_p, act_c

    def _color_affinity(self, batch: int, n: int) -> Tensor:
        images = self._images_override if self._images_override is not None else self._images
        if images is None:
            raise RuntimeError("DOEI needs the images for HFA: call the model on images or handle.set_images(images)")
        cfg = self._config
        model = self._model
        pcfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.image_mean or tuple(pcfg.get("mean", IMAGENET_MEAN))
        std = cfg.image_std or tuple(pcfg.get("std", IMAGENET_STD))
        drop = getattr(model, "patch_drop", None)
        if drop is not None and drop.training and float(getattr(drop, "prob", 0.0)) > 0:
            raise NotImplementedError(
                "HFA with PatchDropout in training: patch dropout drops patch tokens, so the colour "
                "affinity of the image's patches cannot be aligned with the remaining tokens; set "
                "DOEIConfig(use_hfa=False) or build the model with patch_drop_rate=0"
            )
        # ``_version`` changes with every in-place update, so an override tensor that the
        # caller refills between forwards is never served a stale affinity
        key = (id(images), images._version, cfg.rgb_sigma, mean, std)
        if self._affinity_cache is not None and self._affinity_cache[0] == key:
            return self._affinity_cache[1]
        embed = getattr(model, "patch_embed", None)
        if embed is None:
            raise RuntimeError("HFA needs model.patch_embed for the patch size; set use_hfa=False")
        dims = check_shape("images", images, ["B", 3, "H", "W"], {"B": batch}, dtype="float")
        gh, gw = self._vit.grid(model, (dims["H"], dims["W"]))
        patch_size = self._vit.patch_size(model)
        if gh * gw != n:
            raise ShapeError(
                f"images: shape {tuple(images.shape)} gives a {gh}x{gw} patch grid, "
                f"but the tokens have n={n} patches"
            )
        pad = bool(getattr(embed, "dynamic_img_pad", False))
        r = patch_color_affinity(images, patch_size, rgb_sigma=cfg.rgb_sigma, mean=mean, std=std, pad=pad)
        if r.shape[-1] != n:  # e.g. a fixed-size model given another image size via set_images
            raise ShapeError(
                f"images: shape {tuple(images.shape)} has {r.shape[-1]} patches of size "
                f"{patch_size}, but the tokens have n={n} (model grid {gh}x{gw})"
            )
        self._affinity_cache = (key, r)
        return r

    def _row_mask(self, batch: int, per_head: bool) -> Tensor | None:
        if not self._config.restrict_to_labels:
            return None
        labels = self._labels
        if labels is None:
            raise RuntimeError("restrict_to_labels=True needs labels: call handle.set_labels(labels)")
        check_shape("labels", labels, ["B", "C"], {"B": batch, "C": self.num_class_tokens})
        mask = (labels != 0)[:, :, None]
        return mask[:, None] if per_head else mask

    def _add_delta(
        self, attn: nn.Module, adapter: AttentionAdapter, state: _BlockState, y: Tensor, *, per_head: bool
    ) -> Tensor:
        """Steps 4-8 for one block: ``y`` (B, N, D) or per-head (B, H, N, d) -> y + delta."""
        assert state.plan is not None and state.tokens is not None
        t_p, t_c, act_p, act_c = state.plan
        cfg = self._config
        c, p0 = self.num_class_tokens, self.num_prefix_tokens
        x = state.tokens
        b, n_all = x.shape[0], x.shape[1]
        n = n_all - p0
        s = compute_dtype(x)
        # the adapter's q, k in the ambient autocast state, as the module computes them
        qk = adapter.query_key(attn, state.call()) if state.probs is None else None
        row_mask = self._row_mask(b, per_head)
        hfa = cfg.use_hfa and cfg.alpha > 0
        r = self._color_affinity(b, n) if hfa else None
        with no_autocast(x.device.type):
            a = state.probs
            if qk is not None and qk.attn_bias is not None:
                # an additive score bias (relative positions): the probabilities are built
                # explicitly, (B, H, N, N), as the module's explicit path does
                scores = (qk.q.to(s) * float(qk.scale)) @ qk.k.to(s).transpose(-1, -2)
                a = torch.softmax(scores + qk.attn_bias.to(s), dim=-1)
            if a is not None:
                w_c = a[:, :, :c, :].to(s)
                w_pc = a[:, :, p0:, :c].to(s) if act_p else None
            else:
                assert qk is not None
                # contiguous once: q and k are strided views into qkv, which every matmul
                # below (and each one rebuilt in backward) would otherwise copy again
                q = (qk.q.to(s) * float(qk.scale)).contiguous()
                k = qk.k.to(s).contiguous()
                w_c = class_row_attention(q, k, c)
                w_pc = None
                if act_p:
                    lse = row_logsumexp(q[:, :, p0:], k, cfg.chunk_rows)
                    w_pc = torch.exp(q[:, :, p0:] @ k[:, :, :c].transpose(-1, -2) - lse[..., None])
            if not per_head:
                w_c = w_c.mean(1)
                w_pc = w_pc.mean(1) if w_pc is not None else None
            if r is not None:
                alpha = cfg.alpha
                rows = slice(None) if act_p else slice(0, c)
                g_pre, g_pat, row_sum = _emb_affinity_rows(x.to(s), r, p0, rows)
                g_c = torch.cat([g_pre[:, :c], g_pat[:, :c]], dim=-1) / row_sum[:, :c, None]
                if per_head:
                    g_c = g_c[:, None]
                w_c = (1.0 - alpha) * w_c + alpha * g_c
                if w_pc is not None:
                    g_pc = g_pre[:, p0:, :c] / row_sum[:, p0:, None]
                    w_pc = (1.0 - alpha) * w_pc + alpha * (g_pc[:, None] if per_head else g_pc)
            p_scores = w_c[..., p0:] + w_pc.transpose(-1, -2) if w_pc is not None else None
            s_scores = w_c[..., :c] + w_c[..., :c].transpose(-1, -2) if act_c else None
            d_cls, d_patch = _delta_from_scores(
                p_scores, s_scores, y[..., :c, :].to(s), t_p, t_c,
                (cfg.af_p2c, cfg.sf_p2c, cfg.af_c2c, cfg.sf_c2c), row_mask,
            )
            return _assemble(y, d_cls, d_patch, c, p0)


_DEFAULT_CONFIG = DOEIConfig()  # frozen: one shared default is safe


def patch(
    model: nn.Module,
    *,
    num_class_tokens: int | None = None,
    config: DOEIConfig = _DEFAULT_CONFIG,
    layers: Sequence[int] | None = None,
) -> DOEIHandle:
    """Patch every attention module of a ViT with DOEI (undoable).

    Finds the attention modules through ``wsss_blocks.adapters`` (timm's ``Attention``,
    ``EvaAttention``, ``AttentionRope``, BEiT's and ``RelPosAttention``, and the ViT copies with
    a fused ``qkv`` that MCTformer, TS-CAM, ToCo and CPEWS ship), replaces their instance
    ``forward`` by a wrapper and adds capture hooks; an attention class the library cannot
    read raises ``TypeError`` naming ``register_attention_adapter``, none raises
    ``ValueError``. Never calls ``.eval()`` / ``.to()``; parameters and ``state_dict`` keys
    are unchanged. Works in fused (SDPA) and explicit modes; attention with a relative
    position bias (BEiT, ``RelPosAttention``) builds its ``(B, H, N, N)`` probabilities
    explicitly in the fused mode. A module whose forward returns ``(out, weights)`` (the ViT
    copies) gets the delta on ``out``; ``weights`` stay the module's own probabilities.
    ``head_mean=False`` needs the per-head outputs (timm's ``Attention`` and ``EvaAttention``).

    Patch after ``mct.add_class_tokens``: the handle counts the class tokens now, the
    conversion refuses a patched model, and a forward after the model's prefix tokens
    changed raises ``RuntimeError``. An image size the model cannot take raises
    ``ValueError`` at the forward (naming the sizes that work).

    Do not ``copy.deepcopy`` a patched model: the copy's attention modules would still run
    the original's patch, so calling them raises ``RuntimeError``. Copy the model before
    patching (or ``doei.unpatch(copy)``) and patch the copy separately with ``doei.patch(copy)``.

    Args:
        model: a ViT with ``C >= 1`` leading class tokens (timm, or a copy of its layout).
        num_class_tokens: ``C``; default the model's class tokens (registers excluded; a
            distillation token counts).
        config: the ``DOEIConfig``.
        layers: block indices to patch (negative allowed); ``i`` and ``L`` stay global.
            ``None`` = all.

    Returns:
        A ``DOEIHandle`` (context manager).

    Raises:
        RuntimeError: the model is already patched.
        TypeError: an attention module the library cannot read.
        ValueError: no attention module, no class token (naming the fix), or bad options.

    Examples:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
        ...                       embed_dim=32, num_heads=2)
        >>> h = patch(m, config=DOEIConfig(alpha=0.5))
        >>> m(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1000])
        >>> unpatch(m)
    """
    check_instance("model", model, nn.Module, "an nn.Module (a ViT)")
    if getattr(model, "_doei_handle", None) is not None:
        raise RuntimeError("model is already patched by DOEI; call unpatch(model) first")
    if not isinstance(config, DOEIConfig):
        raise TypeError(f"config: expected a DOEIConfig, got {type(config).__name__}")
    modules = [m for _, m, _ in find_attention_modules(model)]
    big_l = len(modules)
    c = default_class_tokens(model, num_class_tokens, what="doei.patch")
    idx = list(range(big_l)) if layers is None else _layer_indices(layers, big_l)
    return DOEIHandle(model, modules, num_class_tokens=c, config=config, layers=idx)


def _layer_indices(layers: Any, num_modules: int) -> list[int]:
    """Sorted indices into the ``num_modules`` attention modules (negative counts from the end), no duplicates."""
    if isinstance(layers, (str, bytes, Tensor)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers: expected a sequence of block indices, got {type(layers).__name__} {layers!r}")
    idx = []
    for j, index in enumerate(layers):
        i = check_int(f"layers[{j}]", index)
        if not -num_modules <= i < num_modules:
            raise ValueError(f"layers: index {index} is out of range for {num_modules} attention modules")
        idx.append(i % num_modules)
    if len(set(idx)) != len(idx):
        raise ValueError(f"layers: duplicate indices in {list(layers)}")
    return sorted(idx)


def unpatch(model: nn.Module) -> None:
    """Undo ``patch`` on ``model``.

    Raises:
        ValueError: the model is not patched.

    Examples:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1,
        ...                       embed_dim=32, num_heads=2)
        >>> _ = patch(m); unpatch(m)
    """
    check_instance("model", model, nn.Module, "an nn.Module (a ViT patched by doei.patch)")
    handle = getattr(model, "_doei_handle", None)
    if handle is None:
        raise ValueError(f"model: {type(model).__name__} is not patched by DOEI")
    handle.remove()
