"""``swtformer``: SWTformer-V1/V2 on a timm Swin (Ahmadi & Kasaei, MVIP 2024).

* Taps: the four Swin stages as NCHW maps (:func:`wsss_blocks.tokens.stage_taps`, last stage
  after the final norm = ``T_out``).
* Heads: :class:`wsss_blocks.swtformer.SWTformerHead` -- CAM head (V1); V2 adds HFF (our
  wiring, no code was released), abs-cos seeds, prototypes, R-CAM.
* Loss: ``cls`` (multilabel soft margin on the GAP scores) for V1; V2 adds ``gsc`` and
  ``ccl`` with ``gsc_weight`` / ``ccl_weight`` (paper: 1, 1; 0 switches a term off, which
  gives the paper's Table 3 rows CLS, CLS+GSC, CLS+GSC+CCL).
* Evaluation CAM (``eval_map``): V1 the CAM head; V2 the foreground channels of the R-CAM
  (the paper's seed map), with seeds from the evaluation labels. ``eval_map=cam`` evaluates
  the V2 CAM head instead. The R-CAM is evaluated at its own grid (stride 16, or 8 with
  ``hff_target=stage2``); the trainer maps any grid that covers the padded input.
* Input: padded bottom/right to a multiple of the final stride (as ``_backbone`` does for
  the baseline; ``valid`` is False there), so every stage grid is exactly the padded size
  over its stride.

Tiny CPU configuration (synthetic 64x64 scenes): ``--model swin_tiny_patch4_window7_224
--patch-size 2 --depths 1,1,1,1 --embed-dim 24 --num-heads 1,2,3,6 --window-size 4`` (stage
grids 32, 16, 8, 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from _backbone import feature_stride
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe
from wsss_blocks.swtformer import SWTformerHead
from wsss_blocks.tokens import stage_info, stage_taps


@register
class SWTformerRecipe(Recipe):
    """SWTformer-V1 (CAM head) or V2 (+ HFF, seeds, R-CAM, GSC, CCL) on a Swin backbone."""

    name = "swtformer"
    backbones = frozenset({"swin"})

    @dataclass
    class Options:
        version: Literal["v1", "v2"] = "v2"
        gsc_weight: float = 1.0
        ccl_weight: float = 1.0
        ccl_variant: Literal["paper", "plain"] = "paper"
        affinity: Literal["abs_cos", "relu_cos", "cos"] = "abs_cos"
        bg_scale: float = 0.5
        hff_target: Literal["stage3", "stage2"] = "stage3"
        hff_detach_inputs: bool = True
        head_kernel_size: int = 1
        final_norm: bool = True
        eval_map: Literal["auto", "cam", "rcam"] = "auto"  # auto: rcam for v2, cam for v1

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        if o.eval_map == "rcam" and o.version == "v1":
            raise ValueError("--opt eval_map=rcam needs version=v2 (V1 has no R-CAM)")
        self.heads = SWTformerHead(
            tuple(s.channels for s in stage_info(backbone)), num_classes, version=o.version,
            head_kernel_size=o.head_kernel_size, hff_target=o.hff_target, hff_detach_inputs=o.hff_detach_inputs,
            affinity=o.affinity, bg_scale=o.bg_scale, ccl_variant=o.ccl_variant,
            gsc_weight=o.gsc_weight, ccl_weight=o.ccl_weight)
        self.eval_rcam = o.version == "v2" and o.eval_map != "cam"

    def _run(self, backbone: nn.Module, images: Tensor, labels: Tensor | None,
             valid: Tensor | None = None) -> dict[str, Tensor]:
        sh, sw = feature_stride(backbone)
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % sh, (-w) % sw
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            if valid is not None:
                valid = F.pad(valid, (0, pad_w, 0, pad_h), value=False)
        maps = stage_taps(backbone, images, final_norm=self.options.final_norm).features
        return self.heads(maps, labels, valid)

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        out = self._run(backbone, batch["image"], batch["labels"], batch["valid"])
        terms = {"cls": LossTerm(1.0, out["loss_cls"])}
        if "loss_gsc" in out:
            terms["gsc"] = LossTerm(self.options.gsc_weight, out["loss_gsc"])
            terms["ccl"] = LossTerm(self.options.ccl_weight, out["loss_ccl"])
        return terms

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        out = self._run(backbone, images, labels)
        cam = out["f_out"].float().relu()
        if self.eval_rcam:  # foreground R-CAM at its own (finer) grid
            return out["rcam"][:, 1:].float()
        return cam
