"""Optimiser and learning-rate schedule of the reference trainer (ToCo's ``PolyWarmupAdamW``).

One concept: AdamW with parameter groups (backbone / backbone norms / new heads at
``head_lr_mult`` times the base rate) and the linear warm-up + poly decay schedule of ToCo,
driven by the global step:

* ``t < warmup``: ``lr = lr0 * (1 - (1 - t / warmup) * (1 - warmup_ratio))`` (starts at
  ``lr0 * warmup_ratio``; ToCo uses ``warmup_ratio = 1e-6``);
* ``warmup <= t < max_steps``: ``lr = lr0 * (1 - t / max_steps) ** power`` -- the poly term
  does not subtract the warm-up, so the rate jumps down slightly at ``t = warmup``, as in
  ToCo;
* ``t >= max_steps``: 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["poly_warmup_factor", "build_optimizer", "build_scheduler", "is_norm_parameter"]


def poly_warmup_factor(
    step: int, *, warmup: int, max_steps: int, warmup_ratio: float = 1e-6, power: float = 0.9
) -> float:
    """Multiplier of the base learning rate at global step ``step`` (0-based).

    Example:
        >>> round(poly_warmup_factor(0, warmup=10, max_steps=100), 9)
        1e-06
        >>> round(poly_warmup_factor(5, warmup=10, max_steps=100), 4)
        0.5
        >>> round(poly_warmup_factor(10, warmup=10, max_steps=100), 4)   # 0.9 ** 0.9
        0.9095
        >>> poly_warmup_factor(100, warmup=10, max_steps=100)
        0.0
    """
    if step < warmup:
        return 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    if step >= max_steps:
        return 0.0
    return (1.0 - step / max_steps) ** power


def is_norm_parameter(name: str, param: nn.Parameter) -> bool:
    """ToCo's grouping rule: norm weights/biases (1-d parameters inside a norm layer)."""
    return param.ndim <= 1 and ("norm" in name.lower() or ".ln" in name.lower())


def _groups(
    backbone: nn.Module, heads: Iterable[tuple[str, nn.Parameter]], lr: float, head_lr_mult: float,
    weight_decay: float,
) -> list[dict]:
    body, norms = [], []
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            (norms if is_norm_parameter(name, p) else body).append(p)
    new = [p for _, p in heads if p.requires_grad]
    groups = [
        {"name": "backbone", "params": body, "lr": lr, "weight_decay": weight_decay},
        {"name": "backbone_norm", "params": norms, "lr": lr, "weight_decay": weight_decay},
        {"name": "heads", "params": new, "lr": lr * head_lr_mult, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    backbone: nn.Module,
    heads: nn.Module,
    *,
    lr: float,
    head_lr_mult: float = 10.0,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over backbone, backbone-norm and head groups (heads at ``head_lr_mult * lr``).

    Every group keeps its own base rate in ``initial_lr``; :func:`build_scheduler` scales it.

    Example:
        >>> opt = build_optimizer(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), nn.Linear(2, 1), lr=1e-3)
        >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        [('backbone', 0.001), ('heads', 0.01)]
    """
    groups = _groups(backbone, heads.named_parameters(), lr, head_lr_mult, weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int,
    max_steps: int,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`poly_warmup_factor`; call ``step()`` after every optimiser step.

    Example:
        >>> opt = build_optimizer(nn.Linear(2, 2), nn.Identity(), lr=1.0)
        >>> sched = build_scheduler(opt, warmup=2, max_steps=10)
        >>> lrs = []
        >>> for _ in range(3):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs
        [0.0, 0.5, 0.818]
    """

    def factor(step: int) -> float:
        return poly_warmup_factor(
            step, warmup=warmup, max_steps=max_steps, warmup_ratio=warmup_ratio, power=power
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
