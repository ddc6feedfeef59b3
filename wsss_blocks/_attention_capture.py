"""Attention capture shared by DOEI and MCT (private), on top of ``wsss_blocks.adapters``.

Everything here reads the model's own attention without changing how it is computed:

* ``find_attention_modules`` finds every attention module with the adapter that reads it;
* ``CaptureState`` / ``install_capture`` hook the children an adapter names (``qkv``,
  ``q_norm`` ...) and its probabilities module during the module's own forward, so the fused
  (SDPA) path needs no change;
* ``AttentionTap`` hands each call's ``QueryKey`` to a callback (attention CAMs);
* ``class_row_attention``, ``row_logsumexp`` and ``patch_patch_attention`` build the few
  attention rows a method needs without keeping a ``(B, heads, N, N)`` tensor alive;
* ``default_class_tokens`` validates the class-token count and names the fix when a model
  has none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from wsss_blocks._validate import check_int
from wsss_blocks.adapters import AttentionAdapter, AttentionCall, QueryKey, ViTAdapter, _lookup, vit_adapter

__all__ = [
    "find_attention_modules",
    "call_arguments",
    "refuse_masks",
    "CaptureState",
    "install_capture",
    "AttentionTap",
    "class_row_attention",
    "row_logsumexp",
    "patch_patch_attention",
    "default_class_tokens",
]


def default_class_tokens(
    model: nn.Module, num_class_tokens: int | None, *, adapter: ViTAdapter | None = None, what: str = "this"
) -> int:
    """Validated ``C``: ``num_class_tokens``, or by default the model's class tokens (registers excluded).

    Raises:
        ValueError: the model has no class token (naming the fix), or ``C`` is not an int in
            ``[1, num_prefix_tokens]``.
    """
    adapter = adapter if adapter is not None else vit_adapter(model)
    p0 = adapter.num_prefix_tokens(model)
    c = adapter.num_class_tokens(model) if num_class_tokens is None else check_int("num_class_tokens", num_class_tokens)
    if p0 == 0 or (num_class_tokens is None and c < 1):
        fix = (
            "build it with a class token (timm: class_token=True) and give it one per class with "
            "mct.add_class_tokens(model, num_classes)"
            if hasattr(model, "cls_token") else "it needs a ViT with class tokens (not a Swin or a CNN)"
        )
        raise ValueError(
            f"{what} needs class tokens, but {type(model).__name__} has none (num_prefix_tokens={p0}); {fix}"
        )
    if not 1 <= c <= p0:
        raise ValueError(f"num_class_tokens: expected 1 <= C <= num_prefix_tokens={p0}, got {c}")
    return c


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, AttentionAdapter]]:
    """Every attention module of ``model`` with its path and adapter, in ``model.modules()`` order.

    Raises:
        TypeError: an attention module the library cannot read (the message names the reason
            and ``register_attention_adapter``).
        ValueError: ``model`` has no attention module.
    """
    found: list[tuple[str, nn.Module, AttentionAdapter]] = []
    for name, mod in model.named_modules():
        adapter = _lookup(mod, name)
        if adapter is not None:
            found.append((name, mod, adapter))
    if not found:
        raise ValueError(
            f"no attention module found in {type(model).__name__}; expected a ViT-family model (timm's "
            "Attention, EvaAttention, BEiT's Attention, or a copy with a fused qkv); register an adapter for "
            "another layout with wsss_blocks.adapters.register_attention_adapter"
        )
    return found


_PARAMS: dict[type, list[str]] = {}


def _forward_parameters(cls: type) -> list[str]:
    """Names of ``cls.forward``'s positional parameters after ``self`` (cached per class)."""
    names = _PARAMS.get(cls)
    if names is None:
        import inspect

        try:
            sig = inspect.signature(getattr(cls, "forward"))
            kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            names = [p.name for p in sig.parameters.values() if p.kind in kinds][1:]
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            names = []
        _PARAMS[cls] = names
    return names


def call_arguments(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Split one call ``module(*args, **kwargs)`` into its input tokens and its other arguments by name."""
    extra = dict(kwargs)
    params = _forward_parameters(type(module))
    if args:
        extra.update(zip(params[1:], args[1:], strict=False))
        return args[0], extra
    return extra.pop(params[0] if params else "x", None), extra


def refuse_masks(adapter: AttentionAdapter, call_kwargs: Mapping[str, Any], what: str) -> None:
    """``NotImplementedError`` when the call sets one of the adapter's ``mask_kwargs``."""
    used = [k for k in adapter.mask_kwargs if call_kwargs.get(k) is not None and call_kwargs.get(k) is not False]
    if used:
        raise NotImplementedError(
            f"{what} does not support {' / '.join(adapter.mask_kwargs)} (the call set {', '.join(used)})"
        )


class CaptureState:
    """What the hooks of one attention module saw during the current call (cleared after it)."""

    __slots__ = ("active", "tokens", "call_kwargs", "captured", "probs")

    def __init__(self) -> None:
        self.active = False
        self.tokens: Tensor | None = None
        self.call_kwargs: dict[str, Any] = {}
        self.captured: dict[str, Any] = {}
        self.probs: Tensor | None = None

    def begin(self, tokens: Tensor, call_kwargs: dict[str, Any]) -> None:
        self.active, self.tokens, self.call_kwargs = True, tokens, call_kwargs
        self.captured = {}
        self.probs = None

    def clear(self) -> None:
        self.active = False
        self.tokens = self.probs = None
        self.call_kwargs, self.captured = {}, {}

    def call(self) -> AttentionCall:
        assert self.tokens is not None
        return AttentionCall(self.tokens, self.captured, self.call_kwargs)


def install_capture(
    module: nn.Module, adapter: AttentionAdapter, state: CaptureState, *, probs: bool
) -> list[RemovableHandle]:
    """Hooks on the adapter's ``captures`` children (and its ``probs_module`` with ``probs``).

    They record into ``state`` only while ``state.active``.
    """
    handles: list[RemovableHandle] = []
    try:
        for name in adapter.captures:
            child = getattr(module, name, None)
            if not isinstance(child, nn.Module):
                raise TypeError(
                    f"{adapter!r} reads the child {name!r} of {type(module).__name__}, which has no such module; "
                    "register a matching adapter with wsss_blocks.adapters.register_attention_adapter"
                )

            def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
                if state.active:
                    state.captured[name] = out

            handles.append(child.register_forward_hook(hook))
        probs_child = getattr(module, adapter.probs_module, None) if probs and adapter.probs_module else None
        if isinstance(probs_child, nn.Module):

            def probs_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                if state.active and args:
                    state.probs = args[0]

            handles.append(probs_child.register_forward_pre_hook(probs_hook))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


class AttentionTap:
    """Hooks that hand each call's ``QueryKey`` of chosen attention modules to a callback.

    Args:
        entries: ``(module, adapter)`` pairs, in order.
        callback: ``callback(position, module, query_key)``; ``position`` indexes ``entries``.
        what: the caller's name for error messages (a masked call is refused).
    """

    def __init__(
        self,
        entries: Sequence[tuple[nn.Module, AttentionAdapter]],
        callback: Callable[[int, nn.Module, QueryKey], None],
        *,
        what: str,
    ) -> None:
        self._handles: list[RemovableHandle] = []
        try:
            for pos, (module, adapter) in enumerate(entries):
                state = CaptureState()
                self._handles += install_capture(module, adapter, state, probs=False)

                def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                        state: CaptureState = state, adapter: AttentionAdapter = adapter) -> None:
                    tokens, extra = call_arguments(m, args, kwargs)
                    refuse_masks(adapter, extra, what)
                    state.begin(tokens, extra)

                def post(m: nn.Module, _args: Any, _out: Any, pos: int = pos,
                         state: CaptureState = state, adapter: AttentionAdapter = adapter) -> None:
                    if not state.active:
                        return
                    try:
                        qk = adapter.query_key(m, state.call())
                    finally:
                        state.clear()
                    callback(pos, m, qk)

                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> AttentionTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def class_row_attention(q: Tensor, k: Tensor, num_rows: int, attn_bias: Tensor | None = None) -> Tensor:
    """Softmax attention of the first ``num_rows`` queries over all keys.

    ``q`` must already be scaled; ``attn_bias`` (broadcastable to (B, H, N, N)) is added to the
    scores. Shapes: ``q, k`` (B, H, N, d) -> (B, H, num_rows, N).
    """
    scores = q[:, :, :num_rows] @ k.transpose(-1, -2)
    if attn_bias is not None:
        scores = scores + attn_bias[..., :num_rows, :].to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _RowLogSumExp(torch.autograd.Function):
    """lse_r = logsumexp_j (q_r · k_j), built and differentiated in row chunks."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, chunk_rows: int) -> Tensor:
        out = q.new_empty(q.shape[:-1])
        kt = k.transpose(-1, -2)
        for r0, r1 in _chunks(q.shape[-2], chunk_rows):
            # logsumexp with the (…, R, N) logits updated in place (no temporaries of that size)
            logits = q[..., r0:r1, :] @ kt
            top = logits.amax(dim=-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            out[..., r0:r1] = logits.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1)
        ctx.save_for_backward(q, k, out)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        q, k, lse = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = torch.empty_like(q) if need_q else None
        gk = torch.zeros_like(k) if need_k else None
        kt = k.transpose(-1, -2)
        for r0, r1 in _chunks(q.shape[-2], ctx.chunk_rows):
            qc = q[..., r0:r1, :]
            # d lse_r / d logit_rj = softmax_rj; weight it by the incoming gradient.
            p = (qc @ kt).sub_(lse[..., r0:r1, None]).exp_().mul_(grad[..., r0:r1, None])
            if gq is not None:
                gq[..., r0:r1, :] = p @ k
            if gk is not None:
                gk = gk + p.transpose(-1, -2) @ qc
        return gq, gk, None


def row_logsumexp(q: Tensor, k: Tensor, chunk_rows: int) -> Tensor:
    """``logsumexp(q @ k^T, -1)`` without keeping the (…, R, N) logits for backward.

    Shapes: ``q`` (…, R, d), ``k`` (…, N, d) -> (…, R). The logits are built in chunks of
    ``chunk_rows`` query rows in forward and rebuilt chunk by chunk in backward.
    """
    return _RowLogSumExp.apply(q, k, int(chunk_rows))


@torch.no_grad()
def patch_patch_attention(
    q: Tensor, k: Tensor, num_prefix_tokens: int, chunk_rows: int, attn_bias: Tensor | None = None
) -> Tensor:
    """Head-mean softmax of the patch rows over all keys, restricted to patch columns.

    ``q`` must already be scaled; ``attn_bias`` is added to the scores. No gradient.
    Shapes: ``q, k`` (B, H, N, d) -> (B, n, n), ``n = N - num_prefix_tokens``; rows are not
    renormalised.
    """
    p0 = num_prefix_tokens
    b, _, n_all, _ = q.shape
    n = n_all - p0
    out = q.new_empty(b, n, n)
    kt = k.transpose(-1, -2)
    for r0, r1 in _chunks(n, chunk_rows):
        scores = q[:, :, p0 + r0 : p0 + r1] @ kt
        if attn_bias is not None:
            scores = scores + attn_bias[..., p0 + r0 : p0 + r1, :].to(scores.dtype)
        a = torch.softmax(scores, dim=-1)
        out[:, r0:r1] = a[..., p0:].mean(1)
    return out
