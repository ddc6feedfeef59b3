"""``mct``: MCTformer-V1 style multi-class-token training (:mod:`wsss_blocks.mct`).

The backbone gets one class token per class (:func:`~wsss_blocks.mct.add_class_tokens`, done
before the optimiser is built); the class logits are the mean of each last-block class
token (:func:`~wsss_blocks.mct.class_scores`), trained with the multilabel soft-margin loss.
CAM = class-to-patch attention of the last ``last_k`` blocks, refined by the
patch-to-patch attention when ``refine`` (:func:`~wsss_blocks.mct.attention_cams`).

Defaults depend on what they are tuned for, never on the dataset's name: with ``--pretrained``
weights ``last_k=3, refine=true`` (MCTformer's values for a pretrained DeiT); without
(a random-init backbone) ``last_k`` = all blocks and ``refine=false``, because the
patch-to-patch affinity of an untrained backbone is diffuse and the refinement washes the
CAMs out (measured: 6.5 vs 24.8 % CAM mIoU). ``--opt`` overrides either; forcing
``refine=true`` without pretrained weights prints a warning. ``reduction`` is passed to
:func:`~wsss_blocks.mct.attention_cams` as ``fuse`` (sum or mean over the ``last_k`` blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe, option
from wsss_blocks.mct import add_class_tokens, attention_cams, class_scores, final_tokens
from wsss_blocks.tokens import num_blocks


@register
class MCTRecipe(Recipe):
    """Multi-class-token classifier; attention CAMs."""

    name = "mct"

    @dataclass
    class Options:
        last_k: int | None = option(None, bounds=">= 1")  # None: 3 with --pretrained, all blocks without
        refine: bool | None = None  # None: on with --pretrained, off without
        reduction: Literal["sum", "mean"] = "sum"  # attention_cams(fuse=...)

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
        pretrained = getattr(config, "pretrained", None) is not None
        if options.last_k is None:
            options.last_k = 3 if pretrained else depth
        if options.refine is None:
            options.refine = pretrained
        elif options.refine and not pretrained:
            import warnings

            warnings.warn(f"--recipe {self.name}: refine=true without --pretrained weights: the patch "
                          "affinity of a random-init backbone is diffuse and MCTformer's refinement "
                          "usually destroys its CAMs (drop --opt refine=true)", stacklevel=2)
        self.last_k = min(int(options.last_k), depth)

    def before_forward(self, labels: Tensor | None) -> None:
        """Hook for subclasses (DOEI sets the labels)."""

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        self.before_forward(batch["labels"])
        tokens = final_tokens(backbone, batch["image"], num_class_tokens=self.num_classes)
        logits = class_scores(tokens.class_tokens)
        loss = F.multilabel_soft_margin_loss(logits.float(), batch["labels"].float())
        return {"cls": LossTerm(1.0, loss)}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        self.before_forward(labels)
        return attention_cams(backbone, images, last_k=self.last_k, num_class_tokens=self.num_classes,
                              fuse=self.options.reduction, refine=self.options.refine).float()
