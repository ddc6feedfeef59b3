"""CPEWS superclass tables and the two hyperparameter presets (paper and released code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from wsss_blocks._validate import ShapeError, check_int, check_mapping

__all__ = [
    "VOC_SUPERCLASSES",
    "COCO_SUPERCLASSES",
    "PRESETS",
    "superclass_index",
]

#: VOC superclasses (0-based foreground indices), as in the official CPEWS code.
VOC_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "person": (14,),
    "animal": (2, 7, 9, 11, 12, 16),
    "vehicle": (0, 1, 3, 5, 6, 13, 18),
    "indoor": (4, 8, 10, 15, 17, 19),
}

#: COCO superclasses under the standard COCO supercategory names; the membership is the
#: official CPEWS code's (whose group names differ).
COCO_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "person": (0,),
    "vehicle": tuple(range(1, 9)),
    "outdoor": tuple(range(9, 14)),
    "animal": tuple(range(14, 24)),
    "accessory": tuple(range(24, 29)),
    "sports": tuple(range(29, 39)),
    "kitchen": tuple(range(39, 46)),
    "food": tuple(range(46, 56)),
    "furniture": tuple(range(56, 62)),
    "electronic": tuple(range(62, 68)),
    "appliance": tuple(range(68, 73)),
    "indoor": tuple(range(73, 80)),
}

#: Per-component keyword arguments of the two CPEWS configurations: ``"paper"`` (the
#: paper's weights and formulas) and ``"official"`` (the released code's). The keys are
#: the keywords of ``CPEWSLoss.from_preset``: ``"loss_weights"`` -> the
#: ``CPEWSLoss`` weights, ``"pdl"`` -> ``PDLLoss``, ``"ssl"`` -> ``SSLLoss``,
#: ``"pool"`` -> ``PrototypePool``. A known difference that no preset changes: a present
#: class with no positive prototypes is left out of SSL here, while the official code
#: flags all of that class's activated tokens (its positive distance is then a large
#: constant) whenever the class has a kept negative.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "loss_weights": {"ism": 0.12, "pdl": 1.5e-4, "ssl": 0.2},
        "pdl": {"distance": "l2", "offset": 0.0, "threshold": None},
        "ssl": {"suppress_singletons": True},
        "pool": {"score": "prob", "threshold": None},
    },
    "official": {
        "loss_weights": {"ism": 0.2, "pdl": 0.12, "ssl": 1.5e-4},
        "pdl": {"distance": "rms", "offset": 0.1, "threshold": 0.1},
        "ssl": {"suppress_singletons": False},
        "pool": {"score": "cam_mean", "threshold": 0.1},
    },
}


def superclass_index(
    superclasses: str | Mapping[str, Sequence[int]] | None,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """The superclass id of every class, ``-1`` everywhere when ``superclasses`` is ``None``.

    Args:
        superclasses: ``"voc"`` (needs ``num_classes == 20``), ``"coco"`` (80), a mapping
            ``name -> class indices`` that partitions ``0..K-1``, or ``None``.
        num_classes: ``K``.
        device: device of the result.

    Returns:
        ``(K,)`` int64: group ``g`` (the mapping's ``g``-th entry) of each class.

    Raises:
        ShapeError: a table that does not fit ``K`` or a mapping that is not a partition.

    Examples:
        >>> superclass_index({"a": (0, 2), "b": (1,)}, 3).tolist()
        [0, 1, 0]
        >>> superclass_index("voc", 20)[14].item(), superclass_index(None, 2).tolist()
        (0, [-1, -1])
    """
    k = check_int("num_classes", num_classes, low=1)
    if superclasses is None:
        return torch.full((k,), -1, dtype=torch.long, device=device)
    if isinstance(superclasses, str):
        tables = {"voc": VOC_SUPERCLASSES, "coco": COCO_SUPERCLASSES}
        if superclasses not in tables:
            raise ValueError(f"superclasses: expected one of ['voc', 'coco'], got {superclasses!r}")
        table: Mapping[str, Sequence[int]] = tables[superclasses]
        need = sum(len(v) for v in table.values())
        if k != need:
            raise ShapeError(
                f"superclasses={superclasses!r} needs num_classes={need}, got {k}"
            )
    else:
        table = check_mapping("superclasses", superclasses)
    out = [-1] * k
    for g, (name, members) in enumerate(table.items()):
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise TypeError(
                f"superclasses[{name!r}]: expected a sequence of class indices, got {type(members).__name__}"
            )
        for c in members:
            c = check_int(f"superclasses[{name!r}]", c)
            if not 0 <= c < k:
                raise ShapeError(f"superclasses[{name!r}]: class {c} is outside 0..{k - 1} (num_classes={k})")
            if out[c] != -1:
                raise ShapeError(f"superclasses: class {c} belongs to more than one group")
            out[c] = g
    missing = [c for c in range(k) if out[c] == -1]
    if missing:
        raise ShapeError(f"superclasses: classes {missing} belong to no group (need a partition)")
    return torch.tensor(out, dtype=torch.long, device=device)
