"""``cpal``: a GMP (or GAP) classifier CAM + CPAL's self-supervised loss (:mod:`wsss_blocks.cpal`).

* CAM network: a bias-free linear classifier on the final features (ViT tokens or the Swin
  final stage), pooled by global max (``gmp_feat``, as the baseline) or global average
  (``gap``, the paper's ResNet); multilabel soft-margin loss ``cls``.
* CPAL on the same final feature map: the CAM, ReLU'd and max-normalised per (image, class)
  with its gradient, is ``M``; :class:`~wsss_blocks.cpal.CPAL` adds ``self`` (weight
  ``self_weight``, the paper's lambda_self = 1); after the loss, each training step banks the
  batch's prototypes with ``CPAL.update`` (which also reclusters when the schedule says so).
* Recluster schedule: once per epoch of training images (``recluster_every=0``: the epoch
  length of this run, ``len(train) // (batch_size * world)``) plus the warm-up reclusters at
  steps 1, 2, 4, ... below it, so the loss starts after the first step. The steps before the
  first recluster are a planned warm-up (``loss/self`` is 0), so CPAL's unbuilt warning is off.
* Evaluation CAM: the classifier CAM (the paper describes no PACAM fusion at inference).
* Table 1 of the paper as options: ``weighting=uniform align=false`` (context prototypes
  only), ``weighting=positiveness align=false`` (+positiveness), defaults (+alignment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _backbone import feature_dim, final_feature_map
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe, option
from wsss_blocks.cam import normalize_cam
from wsss_blocks.cpal import CPAL


@register
class CPALRecipe(Recipe):
    """Classifier CAM + CPAL (context prototypes, positiveness, alignment, PACAM, L_self)."""

    name = "cpal"
    backbones = frozenset({"vit", "swin"})

    @dataclass
    class Options:
        pooling: Literal["gmp_feat", "gap"] = "gmp_feat"
        self_weight: float = option(1.0, bounds=">= 0")
        proj_dim: int = option(256, bounds=">= 1")
        threshold: float = option(0.1, bounds="(0, 1)")
        capacity: int = option(1000, bounds=">= 1")
        num_prototypes: int = option(50, bounds=">= 1")
        top_k: int = option(20, bounds=">= 1")
        temperature: float | None = option(None, bounds="> 0")  # None: sqrt(proj_dim)
        similarity: Literal["dot", "cosine", "l2", "l1"] = "dot"
        weighting: Literal["positiveness", "uniform"] = "positiveness"
        align: bool = True
        detach_features: bool = False
        detach_pacam: bool = False
        normalize_pacam: bool = False
        recluster_every: int = option(0, bounds=">= 0")  # 0: one epoch of this run's training images
        warmup_reclusters: bool = True

        def validate(self) -> None:
            """``top_k <= num_prototypes <= capacity``; the ``ValueError`` names the option."""
            if self.num_prototypes > self.capacity:
                raise ValueError(f"num_prototypes: expected at most capacity={self.capacity}, "
                                 f"got {self.num_prototypes}")
            if self.top_k > self.num_prototypes:
                raise ValueError(f"top_k: expected at most num_prototypes={self.num_prototypes}, got {self.top_k}")

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        dim = feature_dim(backbone)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        self.recluster_every = int(o.recluster_every) or self._epoch_length(config)
        self.cpal = CPAL(
            dim, num_classes, proj_dim=o.proj_dim, detach_features=o.detach_features, threshold=o.threshold,
            capacity=o.capacity, num_prototypes=o.num_prototypes, top_k=o.top_k, temperature=o.temperature,
            similarity=o.similarity, weighting=o.weighting, align=o.align, normalize_pacam=o.normalize_pacam,
            detach_pacam=o.detach_pacam, recluster_every=self.recluster_every,
            warmup_reclusters=o.warmup_reclusters, seed=int(getattr(config, "seed", 0) or 0),
            warn_unbuilt=False,  # the steps before the first (warm-up) recluster are planned
        )

    def _epoch_length(self, config: Any) -> int:
        images = self.data_info.get("train_plain")
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        per_step = int(getattr(config, "batch_size", None) or 1) * world
        return max(1, len(images) // per_step) if images is not None else 1000

    def _features_cam(self, backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fmap = final_feature_map(backbone, images)  # (B, D, h, w)
        cam = torch.einsum("bdhw,kd->bkhw", fmap, self.classifier.weight)
        if self.options.pooling == "gmp_feat":
            logits = F.linear(fmap.amax(dim=(-2, -1)), self.classifier.weight)
        else:
            logits = F.linear(fmap.mean(dim=(-2, -1)), self.classifier.weight)
        return fmap, cam, logits

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        labels = batch["labels"]
        fmap, cam, logits = self._features_cam(backbone, batch["image"])
        cls = F.multilabel_soft_margin_loss(logits.float(), labels.float())
        out = self.cpal(fmap, normalize_cam(cam), labels)
        if self.cpal.training:  # once per training step, after the loss: bank, count, recluster when due
            self.cpal.update(out.prototypes, out.prototype_valid)
        return {"cls": LossTerm(1.0, cls), "self": LossTerm(float(self.options.self_weight), out.terms["self"])}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return self._features_cam(backbone, images)[1].float().relu()

    def after_step(self, step: int, services: Any) -> dict[str, float] | None:
        if step % max(1, int(services.config.log_every)) != 0:
            return None
        return {"bank_min_count": float(self.cpal.bank.count[1:].min()),  # sync-ok: logging steps only
                "context_classes": float(self.cpal.context_valid.any(-1).sum()),  # sync-ok: logging
                "reclusters": float(self.cpal.num_reclusters)}  # sync-ok: logging
