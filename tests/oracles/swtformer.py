"""Slow references for SWTformer: SIPE's official broadcast forms and per-image loops.

Used by ``tests/test_swtformer*.py`` and ``benchmarks/bench_swtformer.py``. Written from the
description of SIPE's code (``get_seed``, ``get_prototype``, ``reactivate``), not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sipe_seeds_broadcast(
    features: Tensor,
    cams_with_bg: Tensor,
    labels: Tensor | None = None,
    *,
    similarity: str = "abs_cos",
    bg_scale: float = 0.5,
    eps: float = 1e-5,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SIPE ``get_seed``: the ``(B, K+1, HW, HW)`` broadcast ``S[:, None] * M[:, :, None]``."""
    b, k1, h, w = cams_with_bg.shape
    f = features.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    a = f.transpose(1, 2) @ f
    s = {"abs_cos": a.abs(), "relu_cos": a.relu(), "cos": a}[similarity]
    m = cams_with_bg.flatten(2)
    inter = (s[:, None] * m[:, :, None, :]).sum(-1)  # (B, K+1, HW, HW) materialised
    union = s.sum(-1)[:, None] + m.sum(-1)[..., None] - inter
    iou = inter / union.clamp_min(eps)
    iou = torch.cat([iou[:, :1] * bg_scale, iou[:, 1:]], dim=1)
    seeds = F.one_hot(iou.argmax(1), k1).transpose(1, 2).bool()
    if labels is not None:
        allowed = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).bool()
        seeds = seeds & allowed[:, :, None]
    seeds = seeds.view(b, k1, h, w)
    if valid is not None:
        seeds = seeds & valid[:, None]
    return seeds, iou.view(b, k1, h, w)


def sipe_prototypes_global(features: Tensor, seeds: Tensor) -> Tensor:
    """SIPE ``get_prototype``: global mean of the seed-masked features, ``(B, K+1, D, HW)`` broadcast."""
    r = F.interpolate(seeds.float(), size=features.shape[-2:], mode="nearest")
    masked = r[:, :, None] * features[:, None]  # (B, K+1, D, hf, wf)
    return masked.mean(dim=(-2, -1))


def sipe_rcam_broadcast(features: Tensor, prototypes: Tensor, eps: float = 1e-5) -> Tensor:
    """SIPE ``reactivate``: ``relu(cosine_similarity(F, p))`` broadcast, then max-normalised."""
    cos = F.cosine_similarity(features[:, None], prototypes[..., None, None], dim=2)
    r = cos.relu()
    return r / (r.amax(dim=(-2, -1), keepdim=True) + eps)


def loop_seeds(features, cams_with_bg, labels, *, similarity="abs_cos", bg_scale=0.5, eps=1e-5):
    """Per-image, per-class, per-token loop of the soft-IoU seed rule."""
    b, k1, h, w = cams_with_bg.shape
    out = torch.zeros(b, k1, h * w, dtype=torch.bool)
    for i in range(b):
        f = features[i].flatten(1).T.double()
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        for t in range(h * w):
            best, arg = None, 0
            for c in range(k1):
                row = f @ f[t]
                s = {"abs_cos": row.abs(), "relu_cos": row.relu(), "cos": row}[similarity]
                m = cams_with_bg[i, c].flatten().double()
                inter = float((s * m).sum())
                union = float(s.sum() + m.sum() - inter)
                iou = inter / max(union, eps) * (bg_scale if c == 0 else 1.0)
                if best is None or iou > best:
                    best, arg = iou, c
            allowed = arg == 0 or labels is None or bool(labels[i, arg - 1])
            out[i, arg, t] = allowed
    return out.view(b, k1, h, w)


def loop_rcam(features, seeds, eps=1e-5):
    """Per-image, per-class masked-mean prototype and cosine map."""
    b, k1 = seeds.shape[:2]
    out = torch.zeros(b, k1, *features.shape[-2:], dtype=torch.float64)
    r = F.interpolate(seeds.float(), size=features.shape[-2:], mode="nearest").bool()
    for i in range(b):
        f = features[i].double()
        for c in range(k1):
            mask = r[i, c]
            if not mask.any():
                continue
            p = f[:, mask].mean(dim=1)
            cos = (p[:, None, None] * f).sum(0) / (f.norm(dim=0).clamp_min(1e-8) * p.norm().clamp_min(1e-8))
            cos = cos.relu()
            out[i, c] = cos / (cos.max() + eps)
    return out


def loop_ccl(m, r, labels, variant="paper", valid=None, eps=1e-8):
    """Per-image loop over background + present classes of eq. 6."""
    total, count = 0.0, 0
    for i in range(m.shape[0]):
        vi = torch.ones(m.shape[-2:], dtype=torch.bool) if valid is None else valid[i]
        if not vi.any():
            continue
        terms = []
        for c in range(m.shape[1]):
            if c > 0 and not labels[i, c - 1]:
                continue
            a, b = m[i, c][vi].double(), r[i, c][vi].double()
            s = float((a / a.norm().clamp_min(eps) * (b / b.norm().clamp_min(eps))).sum())
            terms.append(0.5 * ((2 / 3 * s) ** 2 + (1 - s) ** 2) if variant == "paper" else 1 - s)
        total += sum(terms) / len(terms)
        count += 1
    return total / max(count, 1)


def naive_v2_block(head, hff, maps, labels, *, similarity="abs_cos", bg_scale=0.5):
    """The V2 block (head, HFF, seeds, prototypes, R-CAM, losses) with SIPE's broadcasts."""
    f_out = head.conv(maps[-1])
    scores = f_out.mean((-2, -1))
    cam = f_out.relu()
    cam = cam / (cam.amax((-2, -1), keepdim=True) + 1e-5)
    fg = cam * labels[:, :, None, None]
    m = torch.cat([1 - fg.amax(1, keepdim=True), fg], 1)
    seeds, _ = sipe_seeds_broadcast(maps[-1], m, labels, similarity=similarity, bg_scale=bg_scale)
    features = hff(maps)
    protos = sipe_prototypes_global(features, seeds)
    rcam = sipe_rcam_broadcast(features, protos)
    m_up = F.interpolate(m, size=rcam.shape[-2:], mode="bilinear", align_corners=False)
    gsc = (m_up - rcam).abs().mean()
    mh = F.normalize(m_up.flatten(2), dim=-1, eps=1e-8)
    rh = F.normalize(rcam.flatten(2), dim=-1, eps=1e-8)
    s = (mh * rh).sum(-1)
    a = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)
    ccl = ((a * 0.5 * ((2 / 3 * s) ** 2 + (1 - s) ** 2)).sum(1) / a.sum(1)).mean()
    cls = F.multilabel_soft_margin_loss(scores, labels)
    return cls + gsc + ccl
