"""Recipe registry: every module in this folder that defines a :class:`Recipe` subclass with
``@register`` is imported automatically, so adding a method means adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from recipes.base import LoopServices, LossTerm, OptionError, Recipe, option_types, parse_options

__all__ = ["RECIPES", "register", "get_recipe", "Recipe", "LossTerm", "LoopServices", "OptionError",
           "option_types", "parse_options"]

RECIPES: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe available as ``--recipe <cls.name>``.

    The ``Options`` field types are checked here (``TypeError`` for a type ``--opt`` cannot parse).
    """
    option_types(cls.Options)
    if cls.name in RECIPES and RECIPES[cls.name] is not cls:
        raise ValueError(f"recipe name {cls.name!r} is registered twice")
    RECIPES[cls.name] = cls
    return cls


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"--recipe: unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return RECIPES[name]


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"recipes.{_info.name}")
