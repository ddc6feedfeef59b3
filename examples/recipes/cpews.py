"""``cpews``: CPEWS = ToCo's two-branch classifier + ISM + prototype pool (PDL, SSL).

* Taps: intermediate block ``mid_layer`` and final tokens (:func:`wsss_blocks.cpews.cpews_taps`);
  :class:`~wsss_blocks.cpews.CPEWSHead` gives both branches' logits and raw CAMs.
* ISM labels: the cheap form of the paper's intermediate-CAM labels -- the detached intermediate CAM,
  ``"max"``-normalised, through :func:`wsss_blocks.cam.token_pseudo_labels` (``--low``/``--high``).
* Pool: built once at step ``pool_step`` (after the warm-up, never from an untrained
  classifier) from ``pool_images`` training images without augmentation, in eval mode, and
  optionally rebuilt every ``pool_refresh`` steps. PDL and SSL are 0 before the build.
* Loss: :class:`~wsss_blocks.cpews.CPEWSLoss` with the ``"paper"`` or ``"official"`` preset;
  superclasses from the dataset (VOC / COCO tables, the synthetic scenes' groups). Its
  ``LossOutput`` terms go to the loop with their weights.
* SSL default (evidence in ``benchmarks/results/ssl_mechanism_cpu.json`` and
  ``reproduce_matrix_cpu.json``): the paper's SSL suppresses every activated token of a present
  class that is nearer a kept negative prototype than a positive one, and keeps the negatives
  that the superclass table calls "other superclass". Where classes that look alike sit in
  different superclasses, those negatives are the look-alike partner's own body, so SSL
  suppresses the class's own object (19 % of its activated object tokens; 0.3 % when the
  table follows appearance) and, divided by ``|Phi|``, pushes with 2-5x the classification
  gradient until no token is left. The recipe therefore defaults to
  ``ssl_source_share=0.5`` (a class present in half of another class's negative sources is
  treated as its superclass, :meth:`~wsss_blocks.cpews.PrototypePool.suppression_mask`) and
  ``ssl_denominator="gate"`` (mean over the activated tokens, not over ``Phi``). The paper's
  form: ``--opt ssl_source_share=none --opt ssl_denominator=phi`` (``ssl_cam_scale=max`` is a
  third option).
* Evaluation CAM: the final classifier on the final tokens.
* Option ranges: every numeric option declares its bounds (:func:`recipes.base.option`), so
  ``--opt pool_fraction=7`` fails at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recipes import register
from recipes.base import LoopServices, LossTerm, Recipe, option
from wsss_blocks.cam import normalize_cam, token_pseudo_labels
from wsss_blocks.cpews import CPEWSHead, CPEWSLoss, PrototypePool, cpews_taps
from wsss_blocks.tokens import resolve_block_index


@register
class CPEWSRecipe(Recipe):
    """ISM + PDL + SSL on ToCo's two-branch classifier (CPEWS)."""

    name = "cpews"

    @dataclass
    class Options:
        preset: Literal["paper", "official"] = "paper"  # loss weights and sub-loss settings
        mid_layer: int = -3  # checked against the model's depth when the recipe is built
        pool_step: int | None = option(None, bounds=">= 1")  # None: round(pool_fraction * iterations)
        pool_fraction: float = option(0.3, bounds="(0, 1]")
        pool_refresh: int = option(0, bounds=">= 0")  # rebuild every N steps after the first build; 0 = once
        pool_images: int = option(1024, bounds=">= 1")
        num_prototypes: int = option(10, bounds=">= 1")
        capacity: int = option(2048, bounds=">= 1")
        ism_weight: float | None = option(None, bounds=">= 0")  # None: the preset's weight
        pdl_weight: float | None = option(None, bounds=">= 0")
        ssl_weight: float | None = option(None, bounds=">= 0")
        ssl_cam_scale: Literal["raw", "max"] = "raw"  # SSL on CAM logits (paper) or max-normalised
        ssl_denominator: Literal["phi", "gate"] = "gate"  # SSL mean over the gate (paper: phi, over Phi)
        ssl_source_share: float | None = option(0.5, bounds="(0, 1]")  # also drop negatives of learned confusions

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        self.mid_index = resolve_block_index(backbone, o.mid_layer)
        data = self.data_info.get("data")
        superclasses: Any = {"voc": "voc", "coco": "coco"}.get(str(data), self.data_info.get("superclasses"))
        dim = int(backbone.embed_dim)
        self.head = CPEWSHead(dim, num_classes)
        weights = {k: w for k in ("ism", "pdl", "ssl") if (w := getattr(o, f"{k}_weight")) is not None}
        # the pool is built after the warm-up on purpose: no "pool not built" warning
        self.loss = CPEWSLoss.from_preset(
            dim, num_classes, preset=o.preset, loss_weights=weights, superclasses=superclasses,
            pool={"num_prototypes": o.num_prototypes, "capacity": o.capacity, "seed": int(config.seed)},
            ssl={"cam_scale": o.ssl_cam_scale, "denominator": o.ssl_denominator,
                 "source_share": o.ssl_source_share},
            warn_unbuilt=False)
        self.pool_step = (o.pool_step if o.pool_step is not None
                          else max(1, round(o.pool_fraction * int(config.iterations))))
        self.low, self.high = float(config.low), float(config.high)  # ISM token labels (--low/--high)

    @property
    def pool(self) -> PrototypePool:
        return self.loss.pool

    def _heads(self, backbone: nn.Module, images: Tensor) -> tuple[Any, Any]:
        taps = cpews_taps(backbone, images, mid_layer=self.mid_index)
        out = self.head(taps.intermediate[self.mid_index], taps.final, taps.size)
        return taps, out

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        labels, valid = batch["labels"], batch["valid"]
        taps, out = self._heads(backbone, batch["image"])
        masks_mid = token_pseudo_labels(
            normalize_cam(out.cams_mid.detach().float()), labels, taps.size,
            low=self.low, high=self.high, valid=valid)
        losses = self.loss(logits_mid=out.logits_mid, logits_final=out.logits_final,
                           features_final=taps.final, cams_final=out.cams_final,
                           masks_mid=masks_mid, labels=labels, valid=valid)
        return {k: LossTerm(losses.weights[k], v) for k, v in losses.terms.items()}

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        return self._heads(backbone, images)[1].cams_final.float().relu()

    def _due(self, step: int) -> bool:
        if step == self.pool_step:
            return True
        r = self.options.pool_refresh
        return r > 0 and step > self.pool_step and (step - self.pool_step) % r == 0

    def after_step(self, step: int, services: LoopServices) -> dict[str, float] | None:
        if not self._due(step):
            return None
        backbone = services.backbone
        modes = (backbone.training, self.training)
        backbone.eval()
        self.eval()

        def model_fn(batch: dict[str, Any]) -> dict[str, Tensor]:
            with services.autocast():
                taps, out = self._heads(backbone, batch["image"])
            return {"features": taps.final.float(), "cams": out.cams_final.float(),
                    "labels": batch["labels"], "class_probs": out.logits_final.float().sigmoid(),
                    "valid": batch["valid"]}

        try:
            self.pool.build(model_fn, services.train_eval_loader(self.options.pool_images))
        finally:
            backbone.train(modes[0])
            self.train(modes[1])
        pos = self.pool.pos_valid.float().sum(1).mean()
        neg = self.pool.neg_valid.float().sum(1).mean()
        services.log(f"[cpews] step {step}: prototype pool built "
                     f"({float(pos):.1f} positive / {float(neg):.1f} negative per class)")  # sync-ok
        return {"pool/positives_per_class": float(pos), "pool/negatives_per_class": float(neg)}  # sync-ok
