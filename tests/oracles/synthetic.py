"""Per-pixel reference of the SyntheticScenes object layout, from public attributes only.

Re-derives scene ``index``'s ``mask`` and ``part`` maps the slow, obvious way: the same
documented random stream ``np.random.default_rng((seed, split_id, index))`` and the same
object grammar, then every pixel tested against every object with scalar geometry. Tests
compare it with :meth:`SyntheticScenes.scene`; ``benchmarks/bench_synthetic.py`` times it
against the vectorised generator.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from wsss_blocks.data import SyntheticScenes

SPLIT_ID = {"train": 0, "val": 1}
NUM_SHAPES = 4  # ellipse, rectangle, diamond, triangle


def shape_metric(kind: int, u: float, v: float) -> float:
    """The unit shape is ``{metric <= 1}`` in the object frame (+u = front, where the part sits)."""
    if kind == 0:
        return u * u + v * v
    if kind == 1:
        return max(abs(u), abs(v))
    if kind == 2:
        return abs(u) + abs(v)
    return max(-u, 2.0 * abs(v) + u)  # triangle, tip at u = +1


@functools.lru_cache(maxsize=8)
def shape_tables(part_fraction: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Area of each unit shape and its front cut ``tau`` (the part is ``u > tau``), on a 401^2 grid.

    Tables, not the thing under test: vectorised over the grid (numpy's order of operations, so
    ``tau`` is bit-equal to the generator's).
    """
    g = np.linspace(-1.0, 1.0, 401)
    u, v = np.meshgrid(g, g, indexing="xy")
    metric = np.vectorize(shape_metric, otypes=[np.float64])
    areas, taus = [], []
    for kind in range(NUM_SHAPES):
        inside = metric(kind, u, v) <= 1.0
        areas.append(float(inside.mean() * 4.0))
        taus.append(float(np.quantile(u[inside], 1.0 - part_fraction)))
    return tuple(areas), tuple(taus)


def _draw(
    ds: SyntheticScenes, rng: np.random.Generator, taus: tuple[float, ...], areas: tuple[float, ...]
) -> list[dict]:
    h, w = ds.image_size
    short = min(h, w)
    n = int(rng.integers(1, ds.max_objects + 1))
    r = rng.random((n, 8))
    objs = []
    for i in range(n):
        kind = min(int(r[i, 1] * NUM_SHAPES), NUM_SHAPES - 1)
        a = (0.16 + 0.14 * r[i, 4]) * short
        b = a * (0.55 + 0.35 * r[i, 5])
        cy, cx = (0.15 + 0.7 * r[i, 2]) * h, (0.15 + 0.7 * r[i, 3]) * w
        ang = 2.0 * math.pi * r[i, 6]
        hidden = bool(r[i, 7] < ds.part_hidden)
        area = areas[kind] * a * b
        objs.append(dict(
            cls=min(int(r[i, 0] * ds.num_classes), ds.num_classes - 1), kind=kind, cy=cy, cx=cx, a=a, b=b,
            ca=math.cos(ang), sa=math.sin(ang), tau=taus[kind], hidden=hidden, area=area,
            part_area=0.0 if hidden else ds.part_fraction * area,
            # the generator evaluates each object inside its box [cy - a, cy + a] x [cx - a, cx + a]
            # (in whole pixels): rotated rectangle / triangle corners beyond it are cut
            y0=max(0, int(cy - a)), y1=min(h, math.ceil(cy + a) + 1),
            x0=max(0, int(cx - a)), x1=min(w, math.ceil(cx + a) + 1),
        ))
    return objs


def _paint(ds: SyntheticScenes, objs: list[dict]) -> list[list[int]]:
    """Per pixel: 0 background, ``2i + 1`` part of object ``i``, ``2i + 2`` its body (later on top)."""
    h, w = ds.image_size
    top = [[0] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            for i, o in enumerate(objs):
                if not (o["y0"] <= y < o["y1"] and o["x0"] <= x < o["x1"]):
                    continue
                dy, dx = y - o["cy"], x - o["cx"]
                u = dx * (o["ca"] / o["a"]) + dy * (o["sa"] / o["a"])
                v = dy * (o["ca"] / o["b"]) - dx * (o["sa"] / o["b"])
                if shape_metric(o["kind"], u, v) <= 1.0:
                    top[y][x] = 2 * i + (1 if not o["hidden"] and u > o["tau"] else 2)
    return top


def scene_layout(ds: SyntheticScenes, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, part)`` of ``ds.scene(index)``: int64 ``(H, W)`` class + 1 / 0 and bool visible parts."""
    areas, taus = shape_tables(ds.part_fraction)
    rng = np.random.default_rng((ds.seed, SPLIT_ID[ds.split], index))
    while True:
        objs = _draw(ds, rng, taus, areas)
        top = _paint(ds, objs)
        counts = [0] * (2 * len(objs) + 1)
        for row in top:
            for t in row:
                counts[t] += 1
        keep = [o for i, o in enumerate(objs)
                if counts[2 * i + 1] + counts[2 * i + 2] >= ds.min_visible * o["area"]
                and counts[2 * i + 1] >= ds.min_visible * o["part_area"]]
        if keep and len(keep) < len(objs):  # removing objects only uncovers the others
            objs = keep
            top = _paint(ds, objs)
        if keep:
            break
    mask = np.array([[objs[(t - 1) // 2]["cls"] + 1 if t else 0 for t in row] for row in top], dtype=np.int64)
    part = np.array([[t % 2 == 1 for t in row] for row in top], dtype=bool)
    return mask, part
