"""CPAL reference: :func:`wsss_blocks.cpal.cpal_forward` as a slow per-image, per-channel loop.

Shared by ``tests/test_cpal.py`` and ``benchmarks/bench_cpal.py``. Written from the equations,
not from the batched code: explicit pixel lists, explicit neighbour sorting, a softmax over the
valid context prototypes, the renormalisation over the chosen neighbours, and one cosine per
(pixel, neighbour). Gradients reach ``features`` and ``norm_cams`` only through the PACAM and the
loss (the anchors and weights are constants).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-6)


def _similarity(a: Tensor, p: Tensor, similarity: str) -> Tensor:
    if similarity == "dot":
        return (a * p).sum()
    if similarity == "cosine":
        return (_unit(a) * _unit(p)).sum()
    if similarity == "l2":
        return -(a - p).norm()
    return -(a - p).abs().sum()


def cpal_loop(features: Tensor, norm_cams: Tensor, labels: Tensor, context: Tensor, context_valid: Tensor, *,
              threshold: float = 0.1, bg_threshold: float | None = None, top_k: int = 20,
              temperature: float | None = None, similarity: str = "dot", weighting: str = "positiveness",
              align: bool = True, normalize_pacam: bool = False, detach_pacam: bool = False) -> dict[str, Tensor]:
    """The fields of ``cpal_forward``'s output for one batch (but ``terms``), computed image by image,
    channel by channel."""
    b_size, p_size, h, w = features.shape
    k_size = norm_cams.shape[1]
    c_size = k_size + 1
    n_pix = h * w
    temperature = math.sqrt(p_size) if temperature is None else temperature
    bg_threshold = threshold if bg_threshold is None else bg_threshold
    zf = features.flatten(2)
    # eq. 3: background from the label-masked foreground
    fg = norm_cams.flatten(2) * labels.to(norm_cams.dtype)[:, :, None]
    maps = torch.cat([1.0 - fg.max(dim=1, keepdim=True).values, fg], dim=1)  # (B,C,N)
    present = [[c == 0 or bool(labels[b, c - 1]) for c in range(c_size)] for b in range(b_size)]

    protos = torch.zeros(b_size, c_size, p_size, dtype=torch.float64)
    valid = torch.zeros(b_size, c_size, dtype=torch.bool)
    for b in range(b_size):
        for c in range(c_size):
            thr = bg_threshold if c == 0 else threshold
            pix = [j for j in range(n_pix) if present[b][c] and float(maps[b, c, j].detach()) > thr]
            if pix:
                protos[b, c] = zf[b][:, pix].detach().double().mean(dim=1)
                valid[b, c] = True

    ctx_ids = [[i for i in range(context.shape[1]) if bool(context_valid[c, i])] for c in range(c_size)]
    delta = torch.zeros(c_size, p_size, dtype=torch.float64)
    if align:
        for c in range(c_size):
            anchors = [protos[b, c] for b in range(b_size) if valid[b, c]]
            if anchors and ctx_ids[c]:
                ctx_mean = torch.stack([context[c, i].double() for i in ctx_ids[c]]).mean(0)
                delta[c] = ctx_mean - torch.stack(anchors).mean(0)

    active = torch.zeros(b_size, c_size, dtype=torch.bool)
    rows = []
    for b in range(b_size):
        row = []
        for c in range(c_size):
            if not (present[b][c] and valid[b, c] and ctx_ids[c]):
                row.append(torch.zeros(n_pix, dtype=torch.float64))
                continue
            active[b, c] = True
            a = protos[b, c] + delta[c]
            ids = ctx_ids[c]
            cos = {i: float((_unit(a) * _unit(context[c, i].double())).sum()) for i in ids}
            neighbours = sorted(ids, key=lambda i: -cos[i])[:top_k]
            logits = torch.stack([_similarity(a, context[c, i].double(), similarity) / temperature for i in ids])
            soft = dict(zip(ids, torch.softmax(logits, 0), strict=True))
            if weighting == "positiveness":
                total = sum(float(soft[i]) for i in neighbours)
                weight = {i: float(soft[i]) / max(total, 1e-12) for i in neighbours}
            else:
                weight = {i: 1.0 / len(neighbours) for i in neighbours}
            values = []
            for j in range(n_pix):
                zj = zf[b, :, j].double()
                zj = zj / zj.norm().clamp_min(1e-6)
                acc = sum(weight[i] * (zj * _unit(context[c, i].double())).sum() for i in neighbours)
                values.append(torch.relu(acc))
            m = torch.stack(values)
            if normalize_pacam:
                m = m / (m.max() + 1e-5)
            row.append(m)
        rows.append(torch.stack(row))
    pac = torch.stack(rows)  # (B,C,N), graph to features
    target = pac.detach() if detach_pacam else pac
    loss = maps.new_zeros((), dtype=torch.float64)
    for b in range(b_size):
        for c in range(c_size):
            if active[b, c]:
                loss = loss + (maps[b, c].double() - target[b, c]).abs().sum()
    loss = loss / (b_size * c_size * n_pix)
    return {"pacam": pac.view(b_size, c_size, h, w), "loss": loss, "prototypes": protos,
            "prototype_valid": valid, "active": active, "cams_with_bg": maps.view(b_size, c_size, h, w)}
