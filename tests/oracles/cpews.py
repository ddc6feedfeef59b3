"""CPEWS references shared by the tests and ``benchmarks/bench_cpews.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def toco_ptc(features: Tensor, masks: Tensor, ignore_index: int = 255) -> Tensor:
    """ToCo's PTC construction of the ISM loss (``get_masked_ptc_loss`` + ``label_to_aff_mask``).

    An int64 ``(B, N, N)`` 0/1/``ignore_index`` affinity built by repeat-and-compare, a Python
    loop over images for the ignored rows / columns / diagonal, batch-level sums over ``|cos|``
    with +1 in the denominators. ``masks`` are the token label maps flattened to ``(B, N)``.
    Computes in ``features``' dtype (pass fp64 for a tight oracle); the repeat-and-compare keeps
    the official code's memory footprint, which the benchmark measures.
    """
    b, n = masks.shape
    rep = masks[:, None, :].repeat(1, n, 1)  # int64 (B, N, N)
    aff = (rep == rep.transpose(1, 2)).long()
    for i in range(b):
        aff[i, :, masks[i] == ignore_index] = ignore_index
        aff[i, masks[i] == ignore_index, :] = ignore_index
        aff[i].fill_diagonal_(ignore_index)
    f = F.normalize(features, dim=-1, eps=1e-8)
    sim = torch.bmm(f, f.transpose(1, 2)).abs()
    pos = aff == 1
    neg = aff == 0
    return 0.5 * (1 - (pos * sim).sum() / (pos.sum() + 1)) + 0.5 * (neg * sim).sum() / (neg.sum() + 1)
