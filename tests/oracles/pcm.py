"""Slow, obviously-correct per-sample loop forms of the ViT-PCM ops (tests and benchmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dihedral_loop(x: Tensor, codes: Tensor, inverse: bool = False) -> Tensor:
    """Per sample: flip W (lr), flip H (ud), transpose (tr); inverse: transpose, flip H, flip W."""
    out = []
    for b in range(x.shape[0]):
        c = int(codes[b])
        lr, ud, tr = c & 1, (c >> 1) & 1, (c >> 2) & 1
        y = x[b]
        if not inverse:
            if lr:
                y = y.flip(-1)
            if ud:
                y = y.flip(-2)
            if tr:
                y = y.transpose(-2, -1)
        else:
            if tr:
                y = y.transpose(-2, -1)
            if ud:
                y = y.flip(-2)
            if lr:
                y = y.flip(-1)
        out.append(y)
    return torch.stack(out)


def mosaic_loop(images: Tensor, boxes: Tensor, codes: Tensor, tile: tuple[int, int],
                align_corners: bool) -> Tensor:
    """Slice each box, interpolate to the tile, transform, place in a 2x2 mosaic."""
    b, c = images.shape[:2]
    th, tw = tile
    out = images.new_zeros(b // 4, c, 2 * th, 2 * tw)
    for i in range(b):
        y0, x0, y1, x1 = (int(v) for v in boxes[i])
        t = F.interpolate(images[i:i + 1, :, y0:y1, x0:x1], size=(th, tw), mode="bilinear",
                          align_corners=align_corners)
        t = dihedral_loop(t, codes[i:i + 1])[0]
        m, r, q = i // 4, (i % 4) // 2, i % 2
        out[m, :, r * th:(r + 1) * th, q * tw:(q + 1) * tw] = t
    return out


def teacher_to_tiles_loop(teacher: Tensor, boxes: Tensor, codes: Tensor, teacher_codes: Tensor | None,
                          p: int, tile: tuple[int, int], align_corners: bool) -> Tensor:
    """Per sample: undo branch-1 codes, slice the box / p, interpolate, apply the tile code."""
    out = []
    for i in range(teacher.shape[0]):
        t = teacher[i:i + 1]
        if teacher_codes is not None:
            t = dihedral_loop(t, teacher_codes[i:i + 1], inverse=True)
        y0, x0, y1, x1 = (int(v) // p for v in boxes[i])
        t = F.interpolate(t[:, :, y0:y1, x0:x1], size=(tile[0] // p, tile[1] // p), mode="bilinear",
                          align_corners=align_corners)
        out.append(dihedral_loop(t, codes[i:i + 1])[0])
    return torch.stack(out)


def renormalize_loop(probs: Tensor, y: Tensor) -> Tensor:
    """Per image and class: mask, divide by the spatial max (0 if 0); per patch: divide by the sum."""
    out = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        for c in range(probs.shape[1]):
            m = probs[b, c] * y[b, c]
            mx = float(m.max())
            out[b, c] = m / mx if mx > 0 else 0.0
        s = out[b].sum(0)
        out[b] = torch.where(s > 0, out[b] / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return out


def et_loss_loop(student: Tensor, teacher: Tensor, labels: Tensor, boxes: Tensor, codes: Tensor,
                 teacher_codes: Tensor | None, p: int, tile: tuple[int, int], align_corners: bool,
                 eps: float = 1e-7) -> Tensor:
    """ET with ``always_one`` targets, one image and one patch at a time."""
    y = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).to(teacher.dtype)
    target = renormalize_loop(teacher_to_tiles_loop(teacher, boxes, codes, teacher_codes, p, tile,
                                                    align_corners), y)
    total, n = student.new_zeros(()), 0
    for b in range(student.shape[0]):
        for i in range(student.shape[2]):
            for j in range(student.shape[3]):
                s = student[b, :, i, j]
                s = (s / s.sum()).clamp(eps, 1 - eps)
                total = total - (target[b, :, i, j] * s.log()).sum()
                n += 1
    return total / n


def mce_loss_loop(pooled: Tensor, labels: Tensor, eps: float = 1e-7) -> Tensor:
    """``always_one`` MCE, one term at a time (Keras BCE)."""
    total, n = pooled.new_zeros(()), 0
    for b in range(pooled.shape[0]):
        y = [1.0] + [float(v) for v in labels[b]]
        for c in range(pooled.shape[1]):
            q = pooled[b, c].clamp(eps, 1 - eps)
            total = total - (y[c] * torch.log(q + eps) + (1 - y[c]) * torch.log(1 - q + eps))
            n += 1
    return total / n


def hv_bilstm_loop(hv: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode HV-BiLSTM: every row and every column through its BiLSTM one sequence at a time."""
    b, _, h, w = x.shape
    e = 2 * hv.hidden_dim
    rows = x.new_zeros(b, e, h, w)
    cols = x.new_zeros(b, e, h, w)
    for i in range(b):
        for r in range(h):
            rows[i, :, r, :] = hv.lstm_h(x[i, :, r, :].T[None])[0][0].T
        for c in range(w):
            cols[i, :, :, c] = hv.lstm_v(x[i, :, :, c].T[None])[0][0].T
    return torch.cat([rows, cols], 1)
