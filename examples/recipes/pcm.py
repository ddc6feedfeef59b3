"""``pcm``: ViT-PCM (:mod:`wsss_blocks.pcm`): GMP patch classifier over K+1 classes, MCE, ET, HV-BiLSTM.

* Head: optional :class:`~wsss_blocks.pcm.HVBiLSTM` then :class:`~wsss_blocks.pcm.PatchClassifier`
  (background channel 0) on the final patch tokens, composed here because the loop owns the
  backbone (:class:`~wsss_blocks.pcm.ViTPCM` is the same head on an owned backbone).
* Step (official ``train_step``): random dihedral codes ``c1``; teacher = backbone + head in
  eval mode without gradient on ``dihedral_transform(x, c1)``; MCE on the same images with
  dropout; ET between the mosaic (``crop_prob`` crops of ``crop`` px, tiles of ``scale``)
  student and the warped teacher; ``l2`` on the classifier. Weights 1.
* Teacher pass (``--opt teacher=auto|shared|separate``): the teacher and the MCE student see
  the same images, so when the backbone computes the same in train and eval mode the
  teacher's backbone pass *is* the student's: ``shared`` runs only the head (eval mode, no
  gradient) on the student's detached tokens, which gives the same losses and gradients as
  ``separate`` (its own no-grad backbone pass) and saves one backbone forward per step.
  ``auto`` (default) shares unless the backbone holds a module whose train mode changes its
  output: a dropout layer with ``p > 0``, a batch norm, or a module with a positive
  ``drop_prob`` / ``prob`` (timm's ``DropPath``, ``PatchDropout``). A backbone with other
  mode-dependent layers needs ``teacher=separate``.
* Evaluation CAM: the loop wants ``(B, K, h, w)`` foreground maps and finds background with a
  threshold, so the patch probabilities ``Q = masked_renormalize(P, labels)`` (background
  channel included) are passed as ``r_k = (Q_k / (Q_k + Q_0)) ** gamma``: ``r_k`` ranks classes
  as ``Q_k`` does and ``r_k > 0.5 ** gamma`` exactly where class ``k`` beats background, so
  with ``gamma = log(cam_threshold) / log(0.5)`` the loop's threshold rule reproduces the PCM
  arg-max (up to the loop's per-class max normalisation and interpolation order).

Not expressible in the loop: the official frozen-backbone warm-up epoch and the optimiser
reset (the loop's AdamW / poly schedule is used), and the independent colour jitter of the
two branches (both branches start from the loop's batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recipes import register
from recipes.base import LossTerm, Recipe, option
from wsss_blocks.pcm import (
    HVBiLSTM,
    PatchClassifier,
    PCMOutput,
    dihedral_transform,
    et_loss,
    masked_renormalize,
    mce_loss,
    mosaic,
    random_dihedral_codes,
    unmosaic,
)
from wsss_blocks.tokens import tokens_to_grid, vit_taps
from wsss_blocks.utils import eval_mode


def _patch_size(backbone: nn.Module) -> int:
    p: Any = getattr(getattr(backbone, "patch_embed", None), "patch_size", 16)
    return int(p if isinstance(p, int) else p[0])


class _PCMHead(nn.Module):
    """[HV-BiLSTM] then the patch classifier on a feature map: ``ViTPCM.head`` for a loop-owned backbone."""

    def __init__(self, in_dim: int, num_classes: int, *, hv_lstm: bool, dropout: float, l2: float) -> None:
        super().__init__()
        self.hv = HVBiLSTM(in_dim, dropout=dropout) if hv_lstm else None
        dim = in_dim if self.hv is None else self.hv.out_dim
        self.classifier = PatchClassifier(dim, num_classes, dropout=dropout, l2=l2)

    def forward(self, features: Tensor) -> PCMOutput:
        """Patch logits, probabilities and GMP probabilities of features ``(B, D, h, w)``."""
        return self.classifier(features if self.hv is None else self.hv(features))


@register
class PCMRecipe(Recipe):
    """ViT-PCM: MCE (+ ET) (+ HV-BiLSTM) on a GMP patch classifier with a background class."""

    name = "pcm"

    @dataclass
    class Options:
        hv_lstm: bool = True
        et: bool = True
        et_start: int = option(1, bounds=">= 1")  # first ET step (official: 1; > 1 = after an MCE warm-up)
        background: Literal["always_one", "ignore"] = "always_one"
        crop_prob: float = option(0.3, bounds="[0, 1]")
        crop: int = option(0, bounds=">= 0")  # pixels; 0: img_size / 3 on the patch grid (official 128 of 384)
        scale: float = option(0.5, bounds="> 0")  # tile / image size
        target_norm: Literal["tile", "image"] = "tile"
        dropout: float = option(0.2, bounds="[0, 1]")
        l2: float = option(0.01, bounds=">= 0")
        cam_gamma: float = option(0.0, bounds=">= 0")  # 0: log(cam_threshold) / log(0.5), see the module docstring
        teacher: Literal["auto", "shared", "separate"] = "auto"  # see the module docstring

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        dim: Any = backbone.embed_dim
        self.pcm = _PCMHead(int(dim), num_classes, hv_lstm=o.hv_lstm, dropout=o.dropout, l2=o.l2)
        self.patch = _patch_size(backbone)
        size = int(getattr(config, "img_size", None) or 384)
        self.crop = int(o.crop) or self.patch * max(1, round(size / 3 / self.patch))
        thr = float(getattr(config, "cam_threshold", None) or 0.5)
        self.cam_gamma = float(o.cam_gamma) or math.log(thr) / math.log(0.5)

    def _shares_teacher(self, backbone: nn.Module) -> bool:
        mode = self.options.teacher
        if mode != "auto":
            return bool(mode == "shared")
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return False
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return False
            rates = (getattr(m, name, None) for name in ("drop_prob", "prob"))
            if any(isinstance(r, (int, float)) and r > 0 for r in rates):
                return False
        return True

    def _probs(self, backbone: nn.Module, images: Tensor) -> Tensor:
        taps = vit_taps(backbone, images, layers=())
        return self.pcm(tokens_to_grid(taps.final, taps.size)).probs

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        o = self.options
        images, labels = batch["image"], batch["labels"]
        b, _, h, w = images.shape
        codes = random_dihedral_codes(batch_size=b, square=h == w, device=images.device)
        x1 = dihedral_transform(images, codes)
        terms: dict[str, LossTerm] = {}
        use_et = bool(o.et) and step >= int(o.et_start)
        shared = use_et and self._shares_teacher(backbone)
        if use_et and not shared:
            with eval_mode(backbone, self), torch.no_grad():
                teacher = self._probs(backbone, x1)
        taps = vit_taps(backbone, x1, layers=())
        grid = tokens_to_grid(taps.final, taps.size)
        if shared:  # same backbone output as a separate eval pass: only the head runs again
            with eval_mode(self), torch.no_grad():
                teacher = self.pcm(grid.detach()).probs
        out = self.pcm(grid)
        terms["mce"] = LossTerm(1.0, mce_loss(out.pooled_probs, labels, background=o.background))
        if use_et:
            tiles, record = mosaic(images, crop_prob=o.crop_prob, crop=self.crop, scale=o.scale,
                                   patch_size=self.patch)
            student = unmosaic(self._probs(backbone, tiles))
            terms["et"] = LossTerm(1.0, et_loss(student, teacher, labels, record, teacher_codes=codes,
                                                background=o.background, target_norm=o.target_norm))
        elif o.et:  # before et_start: logged as 0 so every step has the same terms
            terms["et"] = LossTerm(1.0, out.pooled_probs.sum() * 0.0)
        terms["l2"] = LossTerm(1.0, self.pcm.classifier.l2_penalty())
        return terms

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        q = masked_renormalize(self._probs(backbone, images), labels)
        fg, bg = q[:, 1:], q[:, :1]
        den = fg + bg
        ratio = torch.where(den > 0, fg / den.clamp_min(1e-12), torch.zeros_like(fg))
        return ratio.pow(self.cam_gamma)
