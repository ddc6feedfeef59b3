"""``doei``: the ``mct`` recipe with DOEI patched into every attention block (:mod:`wsss_blocks.doei`).

DOEI adds no parameters; :func:`wsss_blocks.doei.patch` wraps the attention modules (the
state-dict keys are unchanged, so checkpoints load into a fresh patched model). The patch is
active in training and CAM generation. The colour affinity uses the data's normalisation
(ImageNet mean/std), not the timm model's ``pretrained_cfg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from recipes import register
from recipes.base import option
from recipes.mct import MCTRecipe
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_blocks.doei import DOEIConfig, patch


@register
class DOEIRecipe(MCTRecipe):
    """MCT + DOEI (PPDO, CPDO, HFA)."""

    name = "doei"

    @dataclass
    class Options(MCTRecipe.Options):
        st: float = option(0.02, bounds="[0, 1]")  # st_p2c (and st_c2c unless st_c2c is set)
        st_c2c: float | None = option(None, bounds="[0, 1]")
        af: float = option(1.0, bounds=">= 0")  # af_p2c = af_c2c
        sf: float = option(1.0, bounds=">= 0")  # sf_p2c = sf_c2c
        alpha: float = option(0.35, bounds="[0, 1]")
        rgb_sigma: float = option(0.1, bounds="> 0")
        use_ppdo: bool = True
        use_cpdo: bool = True
        use_hfa: bool = True
        restrict_to_labels: bool = False

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, num_classes, config, options, data_info)
        o = options
        self.doei_config = DOEIConfig(
            alpha=o.alpha, rgb_sigma=o.rgb_sigma, st_p2c=o.st, af_p2c=o.af, sf_p2c=o.sf,
            st_c2c=o.st if o.st_c2c is None else o.st_c2c, af_c2c=o.af, sf_c2c=o.sf, use_ppdo=o.use_ppdo,
            use_cpdo=o.use_cpdo, use_hfa=o.use_hfa, restrict_to_labels=o.restrict_to_labels,
            image_mean=tuple(IMAGENET_MEAN), image_std=tuple(IMAGENET_STD))
        self.handle = patch(backbone, num_class_tokens=num_classes, config=self.doei_config)

    def before_forward(self, labels: Tensor | None) -> None:
        if self.options.restrict_to_labels:
            self.handle.set_labels(labels)
