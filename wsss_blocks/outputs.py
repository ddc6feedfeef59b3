"""The return type of every combined loss: ``LossOutput``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from wsss_blocks._validate import check_mapping, check_range, check_shape

__all__ = ["LossOutput", "weighted_total"]


class LossOutput(NamedTuple):
    """A combined loss: the total to backpropagate, its unweighted terms and their weights.

    ``loss == sum(weights[name] * terms[name] for name in terms)``. Log ``terms``; call
    ``backward()`` on ``loss``.

    Attributes:
        loss: the weighted total, a scalar tensor.
        terms: every unweighted term by name (scalars), in a fixed order.
        weights: the weight each term enters ``loss`` with (same keys as ``terms``).

    Examples:
        >>> out = weighted_total({"cls": torch.tensor(2.0), "aux": torch.tensor(4.0)},
        ...                      loss_weights={"cls": 1.0, "aux": 0.5})
        >>> out.loss.item(), sorted(out.terms), out.weights["aux"]
        (4.0, ['aux', 'cls'], 0.5)
    """

    loss: Tensor
    terms: dict[str, Tensor]
    weights: dict[str, float]


def weighted_total(terms: Mapping[str, Tensor], *, loss_weights: Mapping[str, float]) -> LossOutput:
    """Build a ``LossOutput`` from unweighted terms and their weights.

    The total is accumulated in the precision of the first term (every term must be a
    scalar on the same device); a term whose weight is 0 is skipped, so a term that was not
    computed may be a detached zero.

    Args:
        terms: the unweighted scalar terms by name.
        loss_weights: the weight of each term (the same keys).

    Raises:
        ValueError: ``terms`` is empty, ``loss_weights`` misses a term or has extra keys, or a
            weight is not finite.
        TypeError: ``terms`` or ``loss_weights`` is not a mapping, or a term is not a tensor.

    Examples:
        >>> weighted_total({"a": torch.tensor(1.0)}, loss_weights={"a": 3.0}).loss
        tensor(3.)
    """
    check_mapping("terms", terms)
    check_mapping("loss_weights", loss_weights)
    if not terms:
        raise ValueError("terms: expected at least one loss term")
    if set(loss_weights) != set(terms):
        raise ValueError(
            f"loss_weights: expected the keys of terms {sorted(terms)}, got {sorted(loss_weights)}"
        )
    for name, value in terms.items():
        check_shape(f"terms[{name!r}]", value, [], dtype="float")
    weights = {k: float(check_range(f"loss_weights[{k!r}]", loss_weights[k])) for k in terms}
    first = next(iter(terms.values()))
    total = torch.zeros((), dtype=first.dtype, device=first.device)
    for name, value in terms.items():
        w = weights[name]
        if w:
            total = total + w * value.to(first.dtype)
    return LossOutput(total, dict(terms), weights)
