"""Shared attention capture for timm ViTs (private; used by ``doei.py`` and ``mct.py``).

Everything here reads the model's own attention without changing how timm computes it:

* ``find_attention_modules`` finds exactly the supported timm ``Attention`` modules;
* ``qk_from_qkv`` turns a captured ``attn.qkv`` output into per-head ``q`` and ``k``
  (with the module's ``q_norm`` / ``k_norm``), so the fused (SDPA) path needs no change;
* ``class_row_attention``, ``row_logsumexp`` and ``patch_patch_attention`` build
  the few attention rows a method needs without keeping a ``(B, heads, N, N)`` tensor alive;
* ``QKVTap`` hooks ``attn.qkv`` of chosen modules and hands their output to a callback;
* ``default_class_tokens`` validates the shared class-token count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._validate import check_int

__all__ = [
    "supported_attention_classes",
    "find_attention_modules",
    "qk_from_qkv",
    "class_row_attention",
    "row_logsumexp",
    "patch_patch_attention",
    "QKVTap",
    "default_class_tokens",
]


def default_class_tokens(model: nn.Module, num_class_tokens: int | None) -> int:
    """Validated ``C``: ``num_class_tokens``, or by default ``num_prefix_tokens - num_reg_tokens``.

    Raises:
        ValueError: ``C`` is not an int in ``[1, num_prefix_tokens]``.
    """
    p0 = int(getattr(model, "num_prefix_tokens", 0))
    if num_class_tokens is None:
        c = p0 - int(getattr(model, "num_reg_tokens", 0) or 0)
    else:
        c = check_int("num_class_tokens", num_class_tokens)
    if not 1 <= c <= p0:
        raise ValueError(f"num_class_tokens: expected 1 <= C <= num_prefix_tokens={p0}, got {c}")
    return c


def supported_attention_classes() -> tuple[type, ...]:
    """The attention classes we patch: ``timm.layers.Attention`` (+ the old ViT alias)."""
    from timm.layers import Attention

    classes: list[type] = [Attention]
    try:
        from timm.models import vision_transformer as _vit

        old = getattr(_vit, "Attention", None)
        if isinstance(old, type) and old is not Attention:
            classes.append(old)
    except ImportError:  # pragma: no cover - very old timm
        pass
    return tuple(classes)


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Supported attention modules of ``model`` in ``model.modules()`` order.

    Raises:
        TypeError: a module whose class name ends in ``Attention`` is not exactly a
            supported class (subclasses, ``DiffAttention``, ``EvaAttention`` ...).
        ValueError: no supported attention module was found.
    """
    supported = supported_attention_classes()
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        cls = type(mod)
        if cls in supported:
            found.append((name, mod))
        elif cls.__name__.endswith("Attention"):
            raise TypeError(
                f"unsupported attention class {cls.__module__}.{cls.__qualname__} at "
                f"module path {name!r}; only timm.layers.Attention is supported"
            )
    if not found:
        raise ValueError(
            f"no timm.layers.Attention module found in {type(model).__name__}; "
            "expected a timm VisionTransformer-style model"
        )
    return found


def qk_from_qkv(attn: nn.Module, qkv: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head ``q``, ``k`` (B, H, N, d) from an ``attn.qkv`` output (B, N, 3·H·d).

    Applies the module's ``q_norm`` / ``k_norm`` exactly as timm does; ``q`` is not scaled.
    """
    heads = int(getattr(attn, "num_heads"))
    q, k, _ = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads).unbind(0)
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k


def class_row_attention(q: Tensor, k: Tensor, num_rows: int) -> Tensor:
    """Softmax attention of the first ``num_rows`` queries over all keys.

    ``q`` must already be scaled. Shapes: ``q, k`` (B, H, N, d) -> (B, H, num_rows, N).
    """
    return torch.softmax(q[:, :, :num_rows] @ k.transpose(-1, -2), dim=-1)


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
def patch_patch_attention(q: Tensor, k: Tensor, num_prefix_tokens: int, chunk_rows: int) -> Tensor:
    """Head-mean softmax of the patch rows over all keys, restricted to patch columns.

    ``q`` must already be scaled. No gradient. Shapes: ``q, k`` (B, H, N, d) -> (B, n, n),
    ``n = N - num_prefix_tokens``; rows are not renormalised.
    """
    p0 = num_prefix_tokens
    b, _, n_all, _ = q.shape
    n = n_all - p0
    out = q.new_empty(b, n, n)
    kt = k.transpose(-1, -2)
    for r0, r1 in _chunks(n, chunk_rows):
        a = torch.softmax(q[:, :, p0 + r0 : p0 + r1] @ kt, dim=-1)
        out[:, r0:r1] = a[..., p0:].mean(1)
    return out


class QKVTap:
    """Forward hooks on ``attn.qkv`` that pass each output to a callback.

    Args:
        modules: the attention modules to tap, in order.
        callback: ``callback(position, attn_module, qkv_output)``; ``position`` is the index
            into ``modules``.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        callback: Callable[[int, nn.Module, Tensor], None],
    ) -> None:
        self._handles = []
        for pos, attn in enumerate(modules):

            def hook(_m: nn.Module, _args: Any, out: Tensor, pos: int = pos, attn: nn.Module = attn) -> None:
                callback(pos, attn, out)

            qkv: nn.Module = getattr(attn, "qkv")
            self._handles.append(qkv.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> QKVTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
