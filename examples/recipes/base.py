"""The recipe interface of the reference trainer.

A recipe is one training method: an ``nn.Module`` holding the method's new heads and state
(banks, pools) that turns a batch into named, weighted loss terms. The loop in
``examples/train.py`` never changes when a recipe is added; see ``examples/README.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Recipe", "LossTerm", "LoopServices", "parse_options"]


class LossTerm(NamedTuple):
    """One named loss term: the loop adds ``weight * value`` to the total and logs ``value``."""

    weight: float
    value: Tensor


@dataclass
class LoopServices:
    """What the loop offers a recipe in :meth:`Recipe.after_step`.

    Attributes:
        backbone: the (unwrapped) timm backbone.
        config: the resolved :class:`~_config.TrainConfig`.
        device: the training device.
        train_eval_loader: ``(num_images) -> iterable of batches`` over the first
            ``num_images`` training images without augmentation, sharded over ranks and
            already on ``device`` (e.g. to build a prototype pool).
        autocast: ``() -> context manager`` with the run's mixed-precision setting.
        log: ``(message) -> None``, prints on rank 0.
    """

    backbone: nn.Module
    config: Any
    device: torch.device
    train_eval_loader: Callable[[int], Iterable[dict[str, Any]]]
    autocast: Callable[[], Any]
    log: Callable[[str], None]


class Recipe(nn.Module):
    """Base class of all recipes.

    Subclasses set ``name`` and ``Options`` (a dataclass of recipe options, set with
    ``--opt key=value``) and implement :meth:`forward` and :meth:`cam`. Parameters created
    in ``__init__`` are the "new heads" (``--head-lr-mult`` times the base rate); the
    backbone is passed to every call and is never a submodule of the recipe.

    Args:
        backbone: the timm ViT; ``__init__`` may adapt it in place (e.g. add class tokens,
            patch attention) before the optimiser is built.
        num_classes: ``K`` foreground classes.
        config: the resolved training configuration.
        options: an instance of ``Options``.
        data_info: dataset facts (``num_classes``, ``class_names`` with background first,
            ``superclasses`` partition or ``None``, ``data`` name).
    """

    name: ClassVar[str] = "base"

    @dataclass
    class Options:
        pass

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.config = config
        self.options = options
        self.data_info = dict(data_info or {})

    def forward(self, backbone: nn.Module, batch: dict[str, Any], step: int) -> dict[str, LossTerm]:
        """Loss terms for one training batch.

        Args:
            backbone: the timm ViT (in train mode).
            batch: ``image (B,3,H,W)``, ``labels (B,K)``, ``valid (B,H,W)`` (and ``mask``,
                which recipes must not use: it is the ground truth) on the device.
            step: 1-based index of the optimiser step being computed.
        """
        raise NotImplementedError

    @torch.no_grad()
    def cam(self, backbone: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Raw (un-normalised, non-negative after ReLU) CAMs ``(B, K, h, w)`` for evaluation.

        Called in eval mode, possibly on rescaled/flipped images; ``labels`` are the image
        labels (for methods that condition on them). The loop upsamples, normalises and masks.
        """
        raise NotImplementedError

    def after_step(self, step: int, services: LoopServices) -> dict[str, float] | None:
        """Called on every rank after optimiser step ``step`` (banks, pools). May return log values."""
        return None


def _convert(name: str, text: str, kind: Any) -> Any:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if "bool" in kind_name:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--opt {name}: expected true/false, got {text!r}")
    try:
        if "int" in kind_name and "float" not in kind_name:
            return int(text)
        if "float" in kind_name:
            return None if text.lower() == "none" and "None" in kind_name else float(text)
    except ValueError as err:
        raise ValueError(f"--opt {name}: expected {kind_name}, got {text!r}") from err
    return text


def parse_options(recipe_cls: type[Recipe], raw: dict[str, str]) -> Any:
    """Build ``recipe_cls.Options`` from ``--opt`` strings; unknown keys raise ``ValueError``.

    Example:
        >>> from recipes.baseline import BaselineRecipe
        >>> parse_options(BaselineRecipe, {"pooling": "gmp_cam"}).pooling
        'gmp_cam'
    """
    known = {f.name: f for f in dataclasses.fields(recipe_cls.Options)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(
            f"--opt: unknown option(s) {unknown} for recipe {recipe_cls.name!r}; "
            f"allowed: {sorted(known)}"
        )
    values = {k: _convert(k, v, known[k].type) for k, v in raw.items()}
    return recipe_cls.Options(**values)
