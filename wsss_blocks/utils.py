"""Model utilities that every method may use: ``eval_mode``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every submodule of ``modules`` in eval mode and restore each one's flag on exit.

    For a teacher pass without dropout (ViT-PCM) or a pool-building pass: mixed train/eval
    flags come back exactly (also after an exception), unlike a blanket ``.train()``.

    Args:
        modules: the modules to switch, with all their submodules.

    Examples:
        >>> m = nn.Sequential(nn.Dropout(), nn.Dropout().eval())
        >>> with eval_mode(m):
        ...     m.training
        False
        >>> [x.training for x in m.modules()]
        [True, True, False]
    """
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}]: expected an nn.Module, got {type(m).__name__}")
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag
