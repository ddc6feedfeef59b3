"""``baseline``: a plain CAM classifier on the final patch tokens (ToCo's classification branch).

Works on a ViT (final patch tokens) and on a Swin (final-stage feature map, see
``examples/_backbone.py``).

Logits are the classifier applied to the global-max-pooled tokens (``gmp_feat``, ToCo) or the
max of each CAM (``gmp_cam``); loss: multilabel soft margin. CAM = classifier on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from _backbone import feature_dim, final_tokens
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe
from wsss_blocks.cam import cam_from_features


@register
class BaselineRecipe(Recipe):
    """GMP classifier CAM trained with the multilabel soft-margin loss."""

    name = "baseline"
    backbones = frozenset({"vit", "swin"})

    @dataclass
    class Options:
        pooling: Literal["gmp_feat", "gmp_cam"] = "gmp_feat"

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        if options.pooling not in ("gmp_feat", "gmp_cam"):
            raise ValueError(f"--opt pooling: expected gmp_feat or gmp_cam, got {options.pooling!r}")
        self.classifier = nn.Linear(feature_dim(backbone), num_classes, bias=False)

    def _logits_cam(self, backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens, grid = final_tokens(backbone, images)
        cam = cam_from_features(tokens, self.classifier.weight, size=grid)
        if self.options.pooling == "gmp_feat":
            logits = F.linear(tokens.amax(dim=1), self.classifier.weight)
        else:
            logits = cam.flatten(2).amax(dim=-1)
        return logits, cam

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        logits, _ = self._logits_cam(backbone, batch["image"])
        cls = F.multilabel_soft_margin_loss(logits.float(), batch["labels"].float())
        return {"cls": LossTerm(1.0, cls)}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return self._logits_cam(backbone, images)[1].float().relu()
