"""``mct``: MCTformer-V1 style multi-class-token training (:mod:`wsss_blocks.mct`).

The backbone gets one class token per class (:func:`~wsss_blocks.mct.add_class_tokens`, done
before the optimiser is built); the class logits are the mean of each last-block class
token (:func:`~wsss_blocks.mct.class_scores`), trained with the multilabel soft-margin loss.
CAM = class-to-patch attention of the last ``last_k`` blocks, refined by the
patch-to-patch attention when ``refine`` (:func:`~wsss_blocks.mct.attention_cams`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe
from wsss_blocks.mct import add_class_tokens, attention_cams, class_scores, final_tokens
from wsss_blocks.tokens import num_blocks


@register
class MCTRecipe(Recipe):
    """Multi-class-token classifier; attention CAMs."""

    name = "mct"

    @dataclass
    class Options:
        last_k: int = 3
        refine: bool = True
        reduction: Literal["sum", "mean"] = "sum"

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        if getattr(backbone, "num_prefix_tokens", 0) == 1:
            add_class_tokens(backbone, num_classes)
        elif getattr(backbone, "num_prefix_tokens", 0) != num_classes:
            raise ValueError(
                f"--recipe {self.name}: the backbone must have exactly one class token (or already "
                f"{num_classes}), got num_prefix_tokens={getattr(backbone, 'num_prefix_tokens', None)}")
        depth = num_blocks(backbone)
        if not 1 <= options.last_k:
            raise ValueError(f"--opt last_k: expected >= 1, got {options.last_k}")
        self.last_k = min(int(options.last_k), depth)
        if options.reduction not in ("sum", "mean"):
            raise ValueError(f"--opt reduction: expected sum or mean, got {options.reduction!r}")

    def before_forward(self, labels: Tensor | None) -> None:
        """Hook for subclasses (DOEI sets the labels)."""

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        self.before_forward(batch["labels"])
        cls_tokens, _ = final_tokens(backbone, batch["image"], num_class_tokens=self.num_classes)
        logits = class_scores(cls_tokens)
        loss = F.multilabel_soft_margin_loss(logits.float(), batch["labels"].float())
        return {"cls": LossTerm(1.0, loss)}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        self.before_forward(labels)
        return attention_cams(backbone, images, last_k=self.last_k, num_class_tokens=self.num_classes,
                              reduction=self.options.reduction, refine=self.options.refine).float()
