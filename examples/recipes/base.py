"""The recipe interface of the reference trainer.

A recipe is one training method: an ``nn.Module`` holding the method's new heads and state
(banks, pools) that turns a batch into named, weighted loss terms. The loop in
``examples/train.py`` never changes when a recipe is added; see ``examples/README.md``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor, nn

__all__ = ["Recipe", "LossTerm", "LoopServices", "OptionError", "option", "option_types", "parse_option",
           "parse_options", "check_options"]


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
    ``--opt key=value`` and typed by the fields' annotations: ``bool``, ``int``, ``float``,
    ``str``, ``Literal[...]``, ``X | None``, where ``none`` gives ``None``; a numeric option
    declares its valid range with :func:`option`, rules between options go in an optional
    ``Options.validate()``; :func:`check_options` applies all of them) and implement
    :meth:`forward` and :meth:`cam`; ``backbones`` lists the backbone families it supports
    (default ViT only). Parameters created in ``__init__`` are the "new heads"
    (``--head-lr-mult`` times the base rate); the backbone is passed to every call and is
    never a submodule of the recipe.

    Args:
        backbone: the timm ViT (or Swin, for recipes whose ``backbones`` include ``"swin"``);
            ``__init__`` may adapt it in place (e.g. add class tokens,
            patch attention) before the optimiser is built.
        num_classes: ``K`` foreground classes.
        config: the resolved training configuration; read the values the recipe uses here
            (e.g. ``config.low``, ``config.iterations``) into attributes rather than keeping
            the whole object around.
        options: an instance of ``Options``.
        data_info: dataset facts (``num_classes``, ``class_names`` with background first,
            ``superclasses`` partition or ``None``, ``data`` name).
    """

    name: ClassVar[str] = "base"
    #: backbone families the recipe works with (``"vit"``, ``"swin"``); the trainer refuses others
    backbones: ClassVar[frozenset[str]] = frozenset({"vit"})

    @dataclass
    class Options:
        pass

    def __init__(self, backbone: nn.Module, num_classes: int, config: Any, options: Any,
                 data_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_options(options)
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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE_TYPE = type(None)


class OptionError(ValueError):
    """A ``--opt`` value that does not fit the option's type; the message names both."""


def _describe(hint: Any) -> str:
    """How an option type reads in an error message (``int``, ``one of 'point', 'box'``, ...)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in args)
    if origin in (Union, types.UnionType):
        members = [_describe(a) for a in args if a is not _NONE_TYPE]
        return " or ".join(members + (["none"] if _NONE_TYPE in args else []))
    if hint is bool:
        return "true/false"
    return getattr(hint, "__name__", str(hint))


def _check_supported(name: str, hint: Any) -> None:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if all(isinstance(a, (bool, int, float, str)) for a in args):
            return
    elif origin in (Union, types.UnionType):
        for a in args:
            if a is not _NONE_TYPE:
                _check_supported(name, a)
        return
    elif hint in (bool, int, float, str):
        return
    raise TypeError(f"option {name!r}: unsupported type {hint!r} (use bool, int, float, str, "
                    "Literal[...] or X | None)")


def _parse(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint``; ``ValueError`` when it does not fit."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if _NONE_TYPE in args and text.lower() == "none":
            return None
        for member in args:
            if member is _NONE_TYPE:
                continue
            try:
                return _parse(text, member)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is Literal:
        for choice in args:
            try:
                if _parse(text, type(choice)) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError(text)
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    if hint is str:
        return text
    raise TypeError(f"unsupported option type {hint!r}")


def option_types(options_cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of an ``Options`` dataclass.

    ``TypeError`` for a type ``--opt`` cannot parse (supported: ``bool``, ``int``, ``float``,
    ``str``, ``Literal[...]`` of those, and ``X | None`` / ``Optional[X]`` of any of them).

    Example:
        >>> from recipes.baseline import BaselineRecipe
        >>> option_types(BaselineRecipe.Options)["pooling"]
        typing.Literal['gmp_feat', 'gmp_cam']
    """
    hints = get_type_hints(options_cls)
    out = {f.name: hints[f.name] for f in dataclasses.fields(options_cls)}
    for name, hint in out.items():
        _check_supported(name, hint)
    return out


def parse_option(name: str, text: str, hint: Any) -> Any:
    """One ``--opt name=text`` value typed by ``hint``; :class:`OptionError` names the option and
    what it accepts.

    Example:
        >>> from typing import Literal
        >>> parse_option("mode", "box", Literal["point", "box"])
        'box'
        >>> parse_option("weight", "none", float | None) is None
        True
        >>> parse_option("mode", "circle", Literal["point", "box"])
        Traceback (most recent call last):
        ...
        recipes.base.OptionError: --opt mode: expected one of 'point', 'box', got 'circle'
    """
    text = text.strip()
    try:
        return _parse(text, hint)
    except ValueError:
        raise OptionError(f"--opt {name}: expected {_describe(hint)}, got {text!r}") from None


def parse_options(recipe_cls: type[Recipe], raw: dict[str, str]) -> Any:
    """Build ``recipe_cls.Options`` from ``--opt`` strings, typed by the fields' type hints.

    Unknown keys, values that do not fit and values outside their bounds raise
    :class:`OptionError` (a ``ValueError``); see :func:`check_options`.

    Example:
        >>> from recipes.baseline import BaselineRecipe
        >>> parse_options(BaselineRecipe, {"pooling": "gmp_cam"}).pooling
        'gmp_cam'
    """
    hints = option_types(recipe_cls.Options)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise OptionError(
            f"--opt: unknown option(s) {unknown} for recipe {recipe_cls.name!r}; "
            f"allowed: {sorted(hints)}"
        )
    values = {k: parse_option(k, v, hints[k]) for k, v in raw.items()}
    return check_options(recipe_cls.Options(**values))


_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")
_BOUND = re.compile(r"(>=|>|<=|<)\s*(\S+)")


def option(default: Any, *, bounds: str) -> Any:
    """A recipe option whose values must lie in ``bounds``: ``"(0, 1]"``, ``"[0, 1)"``, ``">= 1"``,
    ``"> 0"`` ... (``None`` is always allowed: the unset value of an ``X | None`` option).

    Example:
        >>> @dataclass
        ... class Options:
        ...     fraction: float = option(0.3, bounds="(0, 1]")
        >>> check_options(Options(fraction=7.0))
        Traceback (most recent call last):
        ...
        recipes.base.OptionError: --opt fraction: expected a value in (0, 1], got 7.0
    """
    _bounds_check(bounds)
    return field(default=default, metadata={"bounds": bounds})


def _bounds_check(bounds: str) -> tuple[Any, ...]:
    if m := _INTERVAL.fullmatch(bounds.strip()):
        return ("interval", m[1], float(m[2]), float(m[3]), m[4])
    if m := _BOUND.fullmatch(bounds.strip()):
        return ("bound", m[1], float(m[2]))
    raise TypeError(f"unsupported option bounds {bounds!r} (use '(a, b]', '>= a', ...)")


def _in_bounds(value: float, bounds: str) -> tuple[bool, str]:
    spec = _bounds_check(bounds)
    if spec[0] == "interval":
        _, left, low, high, right = spec
        ok = (value > low or (left == "[" and value == low)) and (value < high or (right == "]" and value == high))
        return ok, f"a value in {bounds.strip()}"
    _, op, bound = spec
    ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    return ok, f"a value {bounds.strip()}"


def check_options(options: Any) -> Any:
    """Check a recipe's ``Options`` instance; :class:`OptionError` names the first bad option.

    Every field must fit its type (``Literal`` choices, ``X | None``, ``bool``/``int``/``float``/
    ``str``: options built in code are checked as strictly as ``--opt`` strings), every float must
    be finite, every value must lie in the bounds its :func:`option` declares, and then
    ``options.validate()`` (rules between options, when the class defines it) runs; its
    ``ValueError`` should start with the option's name. Returns ``options``.

    Example:
        >>> from recipes.baseline import BaselineRecipe
        >>> check_options(BaselineRecipe.Options(pooling="mean"))
        Traceback (most recent call last):
        ...
        recipes.base.OptionError: --opt pooling: expected one of 'gmp_feat', 'gmp_cam', got 'mean'
    """
    hints = option_types(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if not _fits(value, hints[f.name]):
            raise OptionError(f"--opt {f.name}: expected {_describe(hints[f.name])}, got {value!r}")
        bounds = f.metadata.get("bounds")
        if bounds is not None and value is not None:
            ok, what = _in_bounds(value, bounds)  # NaN fits no bounds
            if not ok:
                raise OptionError(f"--opt {f.name}: expected {what}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(f"--opt {f.name}: expected a finite number, got {value}")
    check = getattr(options, "validate", None)
    if callable(check):
        try:
            check()
        except OptionError:
            raise
        except ValueError as err:
            raise OptionError(f"--opt {err}") from None
    return options


def _fits(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is _NONE_TYPE:
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
