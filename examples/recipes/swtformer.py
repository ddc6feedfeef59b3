"""``swtformer``: SWTformer-V1/V2 on a timm Swin (Ahmadi & Kasaei, MVIP 2024).

* Taps: the four Swin stages as NCHW maps (:func:`wsss_blocks.tokens.stage_taps`, last stage
  after the final norm = ``T_out``).
* Heads: :class:`wsss_blocks.swtformer.SWTformerHead` -- CAM head (V1); V2 adds HFF (our
  wiring, no code was released), abs-cos seeds, prototypes, R-CAM.
* Loss: ``cls`` (multilabel soft margin on the GAP logits) for V1; V2 adds ``gsc`` and
  ``ccl`` with ``gsc_weight`` / ``ccl_weight`` (paper: 1, 1; 0 switches a term off, which
  gives the paper's Table 3 rows CLS, CLS+GSC, CLS+GSC+CCL).
* ``preset=paper|official``: the defaults of ``similarity``, ``gsc_weight`` and ``ccl_weight``
  (:data:`wsss_blocks.swtformer.PRESETS`; ``official`` is SIPE's code: ReLU cosine, no CCL).
  Options left at ``None`` take the preset's value.
* Evaluation CAM (``eval_map``): V1 the CAM head; V2 the foreground channels of the R-CAM
  (the paper's seed map), with seeds from the evaluation labels. ``eval_map=cam`` evaluates
  the V2 CAM head instead. The R-CAM is evaluated at its own grid (stride 16, or 8 with
  ``hff_output_stage=stage2``); the trainer maps any grid that covers the padded input.
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
from recipes.base import LossTerm, Recipe, option
from wsss_blocks.swtformer import SWTformerHead, SWTformerOutput
from wsss_blocks.tokens import stage_info, stage_taps


@register
class SWTformerRecipe(Recipe):
    """SWTformer-V1 (CAM head) or V2 (+ HFF, seeds, R-CAM, GSC, CCL) on a Swin backbone."""

    name = "swtformer"
    backbones = frozenset({"swin"})

    @dataclass
    class Options:
        preset: Literal["paper", "official"] = "paper"  # defaults of similarity and the loss weights
        version: Literal["v1", "v2"] = "v2"
        gsc_weight: float | None = option(None, bounds=">= 0")  # None: the preset's (1)
        ccl_weight: float | None = option(None, bounds=">= 0")  # None: the preset's (paper 1, official 0)
        ccl_variant: Literal["paper", "plain"] = "paper"
        similarity: Literal["abs_cos", "relu_cos", "cos"] | None = None  # None: the preset's
        bg_scale: float = option(0.5, bounds=">= 0")
        hff_output_stage: Literal["stage3", "stage2"] = "stage3"
        hff_detach_inputs: bool = True
        head_kernel_size: int = option(1, bounds=">= 1")
        final_norm: bool = True
        eval_map: Literal["auto", "cam", "rcam"] = "auto"  # auto: rcam for v2, cam for v1

        def validate(self) -> None:
            """``head_kernel_size`` is odd (the CAM stays on the grid); the ``ValueError`` names it."""
            if self.head_kernel_size % 2 == 0:
                raise ValueError(f"head_kernel_size: expected an odd int, got {self.head_kernel_size}")

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        if o.eval_map == "rcam" and o.version == "v1":
            raise ValueError("--opt eval_map=rcam needs version=v2 (V1 has no R-CAM)")
        weights = {"gsc": o.gsc_weight, "ccl": o.ccl_weight}
        overrides: dict[str, Any] = {"loss_weights": {k: v for k, v in weights.items() if v is not None}}
        if o.similarity is not None:
            overrides["similarity"] = o.similarity
        self.heads = SWTformerHead.from_preset(
            tuple(s.channels for s in stage_info(backbone)), num_classes, preset=o.preset, version=o.version,
            head_kernel_size=o.head_kernel_size, hff_output_stage=o.hff_output_stage,
            hff_detach_inputs=o.hff_detach_inputs, bg_scale=o.bg_scale, ccl_variant=o.ccl_variant, **overrides)
        self.eval_rcam = o.version == "v2" and o.eval_map != "cam"

    def _run(self, backbone: nn.Module, images: Tensor, labels: Tensor | None,
             valid: Tensor | None = None) -> SWTformerOutput:
        sh, sw = feature_stride(backbone)
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % sh, (-w) % sw
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            if valid is not None:
                valid = F.pad(valid, (0, pad_w, 0, pad_h), value=False)
        maps = stage_taps(backbone, images, final_norm=self.options.final_norm).features
        return self.heads(maps, labels, valid=valid)

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        out = self._run(backbone, batch["image"], batch["labels"], batch["valid"])
        weights = {"cls": 1.0, **self.heads.loss_weights}
        return {name: LossTerm(weights[name], value) for name, value in (out.terms or {}).items()}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        out = self._run(backbone, images, labels)
        if self.eval_rcam and out.rcams is not None:  # foreground R-CAM at its own (finer) grid
            return out.rcams[:, 1:].float()
        return out.cams.float().relu()
