"""Small helpers shared by the tests of timm-model utilities (imported by the test modules)."""

from __future__ import annotations

from torch import nn


def set_fused(model: nn.Module, fused: bool) -> None:
    """Switch every timm attention module of ``model`` to fused (SDPA) or explicit attention."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
