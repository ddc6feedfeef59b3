"""DOEI: dual optimisation of embedding information (Zhu et al., 2025), for timm ViTs.

DOEI adds no parameters. In every patched ViT block it boosts the top-t and damps the
bottom-t class<->patch (PPDO) and class<->class (CPDO) interactions of the attention
output, with scores taken from the attention mixed with an RGB / embedding affinity (HFA).

**No official code exists** (the authors' repositories hold only a README). Every choice
the paper leaves open is ours and is listed in the README's DOEI section; the defaults of
``st``, ``af``, ``sf`` and ``rgb_sigma`` are our own.

Entry points: ``patch`` (undoable, context manager) and the pure functions
``progressive_count``, ``patch_color_affinity``, ``hybrid_attention``,
``select_top_bottom`` (returns ``TopBottom``), ``doei_delta``, which also serve
as the reference of what a patched block computes.
"""

from wsss_blocks.doei.config import DOEIConfig
from wsss_blocks.doei.functional import (
    TopBottom,
    doei_delta,
    hybrid_attention,
    patch_color_affinity,
    progressive_count,
    select_top_bottom,
)
from wsss_blocks.doei.patching import DOEIHandle, patch, unpatch

__all__ = [
    "DOEIConfig",
    "DOEIHandle",
    "TopBottom",
    "patch",
    "unpatch",
    "progressive_count",
    "patch_color_affinity",
    "hybrid_attention",
    "select_top_bottom",
    "doei_delta",
]
