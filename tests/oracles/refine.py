"""Slow reference forms of PAR, shared by tests/test_refine.py and benchmarks/bench_refine.py.

* :func:`par_pixel_loop` -- one image, one pixel at a time, in Python floats: the definition.
* :func:`par_per_image` -- the form of ToCo's ``PAR`` module run in a Python loop over images:
  per image, the full ``(C|K, J, H, W)`` neighbour stack is built for every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RING = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _offsets(dilations):
    return [(dy * d, dx * d) for d in dilations for dy, dx in RING]


def _softmax(values, keep):
    """Softmax over the kept entries of a Python list; 0 for dropped ones (all 0 if none)."""
    kept = [v for v, k in zip(values, keep, strict=True) if k]
    if not kept:
        return [0.0] * len(values)
    top = max(kept)
    ex = [math.exp(v - top) if k else 0.0 for v, k in zip(values, keep, strict=True)]
    s = sum(ex)
    return [e / s for e in ex]


def par_pixel_loop(
    image, cam, valid=None, *, dilations=(1, 2, 4, 8, 12, 24), num_iters=10, kernel_width=0.3, pos_weight=0.01, eps=1e-8
):
    """PAR of one image ``(C, H, W)`` on maps ``(K, H, W)`` (same size), pixel by pixel."""
    img = image.double().tolist()
    c_n, h, w = image.shape
    k_n = cam.shape[0]
    ok = [[True] * w for _ in range(h)] if valid is None else valid.tolist()
    offs = _offsets(dilations)
    dist = [math.hypot(dy, dx) for dy, dx in offs]
    mu = sum(dist) / len(dist)
    sd = math.sqrt(sum((d - mu) ** 2 for d in dist) / (len(dist) - 1))
    pi = [-((d / (sd + eps) / kernel_width) ** 2) for d in dist]

    def at(y, x):  # replicate padding
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    aff = {}
    for y in range(h):
        for x in range(w):
            nbs = [at(y + dy, x + dx) for dy, dx in offs]
            keep = [ok[a][b] for a, b in nbs]
            n_valid = sum(keep)
            kappa = [0.0] * len(offs)
            for c in range(c_n):
                vals = [img[c][a][b] for a, b in nbs]
                kv = [v for v, kk in zip(vals, keep, strict=True) if kk]
                m = sum(kv) / max(n_valid, 1)
                var = sum((v - m) ** 2 for v in kv) / max(n_valid - 1, 1)
                s = math.sqrt(var) + eps
                for j, v in enumerate(vals):
                    kappa[j] -= (abs(img[c][y][x] - v) / s / kernel_width) ** 2 / c_n
            a1 = _softmax(kappa, keep)
            a2 = _softmax(pi, keep)
            aff[y, x] = (nbs, [p + pos_weight * q for p, q in zip(a1, a2, strict=True)], n_valid > 0)
    m = cam.double().tolist()
    for _ in range(num_iters):
        new = [[[0.0] * w for _ in range(h)] for _ in range(k_n)]
        for y in range(h):
            for x in range(w):
                nbs, a, has = aff[y, x]
                for k in range(k_n):
                    if ok[y][x] and has:
                        new[k][y][x] = sum(aj * m[k][p][q] for aj, (p, q) in zip(a, nbs, strict=True))
                    else:
                        new[k][y][x] = m[k][y][x]
        m = new
    return torch.tensor(m, dtype=torch.float64)


def _neighbours(x, dilations):
    """``(N, C, H, W)`` -> ``(N, C, J, H, W)``: replicate-pad by each dilation, gather 8 cells."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        p = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in RING:
            out.append(p[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def par_per_image(
    images, cams, *, dilations=(1, 2, 4, 8, 12, 24), num_iters=10, kernel_width=0.3, pos_weight=0.01, eps=1e-8
):
    """ToCo's form, one image at a time (no ``valid``): materialised neighbour stacks."""
    outs = []
    dist = torch.tensor(
        [math.hypot(dy, dx) for dy, dx in _offsets(dilations)], dtype=images.dtype, device=images.device
    )
    for i in range(images.shape[0]):
        img = images[i : i + 1]
        m = F.interpolate(cams[i : i + 1], size=img.shape[-2:], mode="bilinear", align_corners=True)
        nb = _neighbours(img, dilations)  # (1, C, J, H, W)
        diff = (nb - img[:, :, None]).abs()
        std = nb.std(dim=2, keepdim=True)
        kappa = (-((diff / (std + eps) / kernel_width) ** 2)).mean(dim=1)  # (1, J, H, W)
        pos = -((dist / (dist.std() + eps) / kernel_width) ** 2)
        aff = kappa.softmax(dim=1) + pos_weight * pos.softmax(dim=0)[None, :, None, None]
        for _ in range(num_iters):
            m = (_neighbours(m, dilations) * aff[:, None]).sum(dim=2)
        outs.append(m)
    return torch.cat(outs)


def par_pseudo_labels_per_image(images, cams, labels, *, low=0.25, high=0.7, size=None, ignore_index=255, **kw):
    """ToCo's ``refine_cams_with_bkg_v2`` form: per image, keep bg + present classes, PAR each level."""
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    outs = []
    for i in range(images.shape[0]):
        ids = [k for k in range(labels.shape[1]) if labels[i, k]]
        fg = F.interpolate(cams[i : i + 1], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, ids]
        ys = []
        for level in (high, low):
            maps = torch.cat([torch.full_like(fg[:, :1], level), fg], dim=1).softmax(dim=1)
            ref = par_per_image(images[i : i + 1], maps, **kw)
            ref = F.interpolate(ref, size=size, mode="bilinear", align_corners=False)
            index = ref.argmax(dim=1)[0]
            lut = torch.tensor([0] + [k + 1 for k in ids])
            ys.append(lut[index])
        y_high, y_low = ys
        out = y_high.clone()
        out[(y_high == 0) & (y_low > 0)] = ignore_index
        outs.append(out)
    return torch.stack(outs)
