"""SyntheticScenes: a tiny, download-free WSSS benchmark with ground-truth masks.

See ``SyntheticScenes`` for the scene grammar. Generation uses numpy only and is
deterministic in ``(seed, split, index)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsss_blocks._validate import check_floats, check_int, check_option, check_range, check_size
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SyntheticScenes"]

_SPLITS = {"train": 0, "val": 1}
_DEFAULT_LENGTH = {"train": 2000, "val": 500}

# Object shapes, each the unit set {metric(u, v) <= 1} in the object's own frame, where
# +u points to the object's "front" (the discriminative part sits there).
_SHAPES = ("ellipse", "rectangle", "diamond", "triangle")


def _shape_metric(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if kind == 0:
        return u * u + v * v
    au, av = np.abs(u), np.abs(v)
    if kind == 1:
        return np.maximum(au, av)
    if kind == 2:
        return au + av
    return np.maximum(-u, 2.0 * av + u)  # triangle, tip at u = +1


def _shape_tables(part_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per shape: area of the unit shape and the front cut ``tau`` (part = ``u > tau``)."""
    g = np.linspace(-1.0, 1.0, 401)
    u, v = np.meshgrid(g, g, indexing="xy")
    areas, taus = [], []
    for kind in range(len(_SHAPES)):
        inside = _shape_metric(kind, u, v) <= 1.0
        areas.append(inside.mean() * 4.0)
        taus.append(np.quantile(u[inside], 1.0 - part_fraction))
    return np.asarray(areas), np.asarray(taus)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 1], shape ``(3,)``."""
    k = (np.array([5.0, 3.0, 1.0]) + (h % 1.0) * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


class SyntheticScenes(Dataset):
    """Procedural WSSS scenes that reproduce incomplete and false (co-occurrence) activation.

    Each item is a random scene of 1..``max_objects`` objects on a background, generated on
    the fly from ``np.random.default_rng((seed, split_id, index))`` -- the same
    ``(seed, split, index)`` always gives the same scene, and ``"train"`` / ``"val"`` are
    different streams. It is small enough for a CPU to train a tiny ViT on in minutes, and it
    is built so that a plain classifier's CAM shows the two failure modes the WSSS papers
    fight:

    * **Incomplete activation.** Class ``c`` belongs to group ``g = c // group_size``. An
      object of class ``c`` is a *body* whose appearance (diagonal two-tone stripes in the
      group's colour and orientation) is identical for every class of the group, plus a
      small *discriminative part*: the front ``part_fraction`` of the object (by area),
      painted a flat, saturated colour unique to the class. Only the part tells partner
      classes apart, so a classifier relies on it and its CAM covers the part and little of
      the body. ``superclasses`` lists the groups (``superclass_layout="body"``), or, with
      ``"crossed"``, puts the ``m``-th member of every body group into superclass ``m``, so
      classes that share a body are always in *different* superclasses (as when a
      dataset's semantic superclasses do not follow appearance, e.g. a VOC animal and a VOC
      vehicle that look alike). Only the reported table changes, never a pixel.
    * **False activation by co-occurrence.** Class ``c`` has a *context* background texture
      (a checker, dot or grid pattern in a class colour). When ``c`` is in the image its
      context fills a background band with probability ``co_occurrence`` (default 0.8);
      when ``c`` is absent its context still appears with probability ``context_alone``
      (default 0.1). With probability ``part_hidden`` (default 0.4) an object shows no part
      (all body, like an animal seen from behind): only its context then separates it from
      its partner classes, so a classifier learns to read contexts and its CAM leaks onto
      them. Contexts are never part of the mask.

    Measured baseline (tiny ViT, patch 8, depth 4, dim 96, GMP-over-CAM classifier, 8
    epochs on the 2,000 default training scenes, CPU): max-normalised CAM averages 0.58 on
    parts vs 0.20 on bodies, and 0.22 on the own class's context vs 0.006 on neutral
    background; CAM mIoU 0.31 at background threshold 0.3.

    Scene grammar. The background is split into wavy horizontal or vertical bands, one per
    chosen context, plus a neutral grey band (always when no context was chosen, else with
    probability 0.25). Objects are ellipses, rectangles, diamonds or isosceles triangles with
    random centre (15-85 % of each side), size (semi-major axis 16-30 % of the shorter
    side), aspect (0.55-0.9) and rotation; later objects occlude earlier ones. An object
    whose visible area is below ``min_visible`` of its full area, or (unless its part is
    hidden) whose visible part is below ``min_visible`` of the full part, is removed before
    anything is labelled. Pixels come from one layer map, and the mask from the
    same map: labels and mask always agree (a class is labelled iff it has mask pixels).
    Zero-mean Gaussian noise of std ``noise`` (in [0, 1] pixel units, quantised to 256
    levels for speed) is added to every pixel and channel.

    Args:
        num_classes: ``K``, number of foreground classes.
        image_size: ``int`` or ``(H, W)``; any size, non-square allowed (>= 16 pixels).
        length: number of items; default 2000 for ``"train"``, 500 for ``"val"``.
        split: ``"train"`` or ``"val"`` (independent random streams).
        seed: non-negative seed of the whole dataset.
        max_objects: maximum number of objects drawn per image (the count is uniform in
            ``1..max_objects`` before occlusion removal).
        co_occurrence: probability that a present class brings its context.
        context_alone: probability that an absent class's context appears anyway.
        part_fraction: area fraction of an object taken by its discriminative part.
        part_hidden: probability that an object shows no part (all body): it keeps its
            label and mask, and only its context (if drawn) tells it from its partners.
        noise: std of the additive Gaussian pixel noise, in [0, 1] units.
        group_size: number of classes sharing one body appearance (a superclass); the last
            group is smaller when ``group_size`` does not divide ``K``. 1 disables sharing.
        min_visible: visible fraction in ``(0, 1]`` an object (and its part) needs to be
            kept (0 would keep fully hidden objects labelled).
        superclass_layout: ``"body"`` (superclass = body group, the default) or
            ``"crossed"`` (superclass = member index within the body group, so partner
            classes sit in different superclasses); changes ``superclasses`` only.
        mean: per-channel normalisation mean (ImageNet by default).
        std: per-channel normalisation std (ImageNet by default).

    Attributes:
        num_classes: ``K``.
        ignore_index: 255 (never produced here, kept for a common interface).
        class_names: ``K`` names ``"g{group}{letter}"``, e.g. ``"g0a"``, ``"g0b"``.
        superclasses: ``{"group{g}": (class indices)}``, the classes sharing a body (same
            format as the VOC/COCO superclass tables); with ``superclass_layout="crossed"``
            ``{"member{letter}": (class indices)}``, one member of each body group.
        palette: ``(K + 1, 3)`` uint8, row 0 black (background), row ``c + 1`` the part
            colour of class ``c``.
        image_size: ``(H, W)``.

    Items are dicts with keys ``image`` ``(3, H, W)`` float32 (normalised), ``labels``
    ``(K,)`` float32 multi-hot, ``mask`` ``(H, W)`` int64 (0 = background, ``c + 1`` =
    class ``c``), ``valid`` ``(H, W)`` bool (all True), ``index`` int and ``name`` str.
    ``scene`` also returns the part map and the context layout for analyses (e.g. how
    much of a CAM falls on parts, bodies and contexts).

    Examples:
        >>> ds = SyntheticScenes(split="train", length=8, image_size=(32, 48), seed=0)
        >>> item = ds[3]
        >>> item["image"].shape, item["labels"].shape, item["mask"].dtype
        (torch.Size([3, 32, 48]), torch.Size([6]), torch.int64)
        >>> present = set(item["mask"].unique().tolist()) - {0}
        >>> present == {c + 1 for c in item["labels"].nonzero().flatten().tolist()}
        True
        >>> bool(torch.equal(ds[3]["image"], item["image"]))
        True
        >>> ds.superclasses
        {'group0': (0, 1), 'group1': (2, 3), 'group2': (4, 5)}
        >>> SyntheticScenes(num_classes=8, superclass_layout="crossed").superclasses
        {'membera': (0, 2, 4, 6), 'memberb': (1, 3, 5, 7)}
    """

    ignore_index: int = 255

    def __init__(
        self,
        *,
        num_classes: int = 6,
        image_size: int | Sequence[int] = 64,
        length: int | None = None,
        split: Literal["train", "val"] = "train",
        seed: int = 0,
        max_objects: int = 3,
        co_occurrence: float = 0.8,
        context_alone: float = 0.1,
        part_fraction: float = 0.25,
        part_hidden: float = 0.4,
        noise: float = 0.05,
        group_size: int = 2,
        min_visible: float = 0.4,
        superclass_layout: Literal["body", "crossed"] = "body",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        check_option("split", split, tuple(_SPLITS))
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = check_size("image_size", image_size)
        if min(h, w) < 16:
            raise ValueError(f"image_size: expected an int or (H, W) >= 16, got {image_size!r}")
        num_classes = check_int("num_classes", num_classes, low=1)
        max_objects = check_int("max_objects", max_objects, low=1)
        group_size = check_int("group_size", group_size, low=1)
        seed = check_int("seed", seed, low=0)
        if length is None:
            length = _DEFAULT_LENGTH[split]
        length = check_int("length", length, low=0)
        check_range("co_occurrence", co_occurrence, 0.0, 1.0)
        check_range("context_alone", context_alone, 0.0, 1.0)
        check_range("part_fraction", part_fraction, 0.0, 1.0, low_inclusive=False,
                    high_inclusive=False)
        check_range("part_hidden", part_hidden, 0.0, 1.0)
        check_range("noise", noise, 0.0)
        check_range("min_visible", min_visible, 0.0, 1.0, low_inclusive=False)  # > 0: labels == mask
        check_option("superclass_layout", superclass_layout, ("body", "crossed"))
        mean = check_floats("mean", mean, length=3)
        std = check_floats("std", std, length=3, low=0.0, low_inclusive=False)

        self.num_classes = int(num_classes)
        self.image_size = (h, w)
        self.length = int(length)
        self.split = split
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.co_occurrence = float(co_occurrence)
        self.context_alone = float(context_alone)
        self.part_fraction = float(part_fraction)
        self.part_hidden = float(part_hidden)
        self.noise = float(noise)
        self.group_size = int(group_size)
        self.min_visible = float(min_visible)
        self.superclass_layout = superclass_layout

        k = self.num_classes
        self.num_groups = -(-k // self.group_size)
        self.group_of = np.arange(k) // self.group_size
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.class_names: tuple[str, ...] = tuple(
            f"g{g}{letters[c % self.group_size % 26]}" for c, g in enumerate(self.group_of)
        )
        if superclass_layout == "body":
            self.superclasses: dict[str, tuple[int, ...]] = {
                f"group{g}": tuple(int(c) for c in np.flatnonzero(self.group_of == g))
                for g in range(self.num_groups)
            }
        else:  # member m of every body group in superclass m: partners never share one
            member = np.arange(k) % self.group_size
            self.superclasses = {
                f"member{letters[m % 26]}": tuple(int(c) for c in np.flatnonzero(member == m))
                for m in range(min(self.group_size, k))
            }
        self._build_layers(np.asarray(mean, np.float32), np.asarray(std, np.float32))

    # ------------------------------------------------------------------ appearance
    def _build_layers(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Precompute every layer texture once, already normalised: ``(3, L*H*W)``."""
        h, w = self.image_size
        k, n_g = self.num_classes, self.num_groups
        short = min(h, w)
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                             indexing="ij")

        def two_tone(pattern: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
            p = pattern[None].astype(np.float64)
            return c1[:, None, None] * p + c2[:, None, None] * (1.0 - p)

        layers = [np.broadcast_to(np.full((3, 1, 1), 0.5), (3, h, w))]  # 0: neutral grey
        # 1..K: contexts (checker / dots / grid by class, class-specific hue)
        cell = max(2.0, short / 16.0)
        for c in range(k):
            hue = (c + 0.5) / k
            kind = c % 3
            if kind == 0:
                pat = ((yy // cell + xx // cell) % 2) == 0
            elif kind == 1:
                pat = ((yy % (2 * cell) - cell) ** 2 + (xx % (2 * cell) - cell) ** 2) < (0.6 * cell) ** 2
            else:
                pat = ((yy % (2 * cell)) < 0.7 * cell) | ((xx % (2 * cell)) < 0.7 * cell)
            layers.append(two_tone(pat, _hsv(hue, 0.55, 0.75), _hsv(hue, 0.65, 0.3)))
        # K+1..K+G: bodies (oriented stripes, group hue), shared by the classes of a group
        period = max(3.0, short / 16.0)
        for g in range(n_g):
            hue = (g + 0.25) / n_g
            ang = math.pi * (0.25 + g / max(n_g, 1))
            t = (xx * math.cos(ang) + yy * math.sin(ang)) / period
            pat = (t % 1.0) < 0.5
            layers.append(two_tone(pat, _hsv(hue, 0.35, 0.85), _hsv(hue, 0.5, 0.45)))
        # K+G+1..K+G+K: parts, flat saturated class colour
        part_rgb = np.stack([_hsv(c / k, 1.0, 1.0) for c in range(k)])
        for c in range(k):
            layers.append(np.broadcast_to(part_rgb[c][:, None, None], (3, h, w)))
        stack = np.stack(layers).astype(np.float32)  # (L, 3, H, W)
        stack = (stack - mean[None, :, None, None]) / std[None, :, None, None]
        self._layers = np.ascontiguousarray(stack.transpose(1, 0, 2, 3).reshape(3, -1))
        self._context_layer0 = 1
        self._body_layer0 = 1 + k
        self._part_layer0 = 1 + k + n_g
        self._noise_scale = (self.noise / std).astype(np.float32)[:, None]
        q = (torch.arange(256, dtype=torch.float64) + 0.5) / 256.0
        gauss = (2.0 ** 0.5) * torch.special.erfinv(2.0 * q - 1.0)
        self._gauss = (gauss / gauss.pow(2).mean().sqrt()).numpy().astype(np.float32)
        self._pix = np.arange(h * w, dtype=np.int64)
        self._ys = np.arange(h, dtype=np.float64)
        self._xs = np.arange(w, dtype=np.float64)
        self._areas, self._taus = _shape_tables(self.part_fraction)
        self.palette: np.ndarray = np.concatenate(
            [np.zeros((1, 3)), part_rgb * 255.0]).round().astype(np.uint8)

    # ------------------------------------------------------------------ generation
    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, _SPLITS[self.split], index))

    def _objects(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Draw and rasterise objects (in their bounding boxes); no occlusion yet."""
        h, w = self.image_size
        short = min(h, w)
        n = int(rng.integers(1, self.max_objects + 1))
        r = rng.random((n, 8))
        objs = []
        for i in range(n):
            cls = min(int(r[i, 0] * self.num_classes), self.num_classes - 1)
            kind = min(int(r[i, 1] * len(_SHAPES)), len(_SHAPES) - 1)
            cy, cx = (0.15 + 0.7 * r[i, 2]) * h, (0.15 + 0.7 * r[i, 3]) * w
            a = (0.16 + 0.14 * r[i, 4]) * short
            b = a * (0.55 + 0.35 * r[i, 5])
            ang = 2.0 * math.pi * r[i, 6]
            ca, sa = math.cos(ang), math.sin(ang)
            y0, y1 = max(0, int(cy - a)), min(h, int(math.ceil(cy + a)) + 1)
            x0, x1 = max(0, int(cx - a)), min(w, int(math.ceil(cx + a)) + 1)
            dy = (self._ys[y0:y1] - cy)[:, None]
            dx = (self._xs[x0:x1] - cx)[None, :]
            u = dx * (ca / a) + dy * (sa / a)
            v = dy * (ca / b) - dx * (sa / b)
            inside = _shape_metric(kind, u, v) <= 1.0
            hidden = bool(r[i, 7] < self.part_hidden)
            part = inside & (u > self._taus[kind]) if not hidden else np.zeros_like(inside)
            area = self._areas[kind] * a * b
            objs.append(dict(cls=cls, kind=kind, box=(slice(y0, y1), slice(x0, x1)),
                             inside=inside, part=part, area=area, hidden=hidden,
                             part_area=0.0 if hidden else self.part_fraction * area))
        return objs

    def _paint(self, objs: list[dict[str, Any]]) -> np.ndarray:
        """``top`` map: 0 background, ``2i + 1`` part of object i, ``2i + 2`` its body."""
        top = np.zeros(self.image_size, dtype=np.int16)
        for i, o in enumerate(objs):
            sub = top[o["box"]]
            sub[o["inside"]] = 2 * i + 2
            sub[o["part"]] = 2 * i + 1
        return top

    def scene(self, index: int) -> dict[str, Any]:
        """Generate scene ``index`` with its full layout (numpy arrays, not normalised items).

        Args:
            index: item index in ``[-len, len)``.

        Returns:
            dict with ``image`` ``(3, H, W)`` float32 (normalised), ``labels`` ``(K,)``
            float32, ``mask`` ``(H, W)`` int64, ``part`` ``(H, W)`` bool (visible
            discriminative parts), ``context_map`` ``(H, W)`` int64 (0 = neutral
            background or object, ``c + 1`` = context texture of class ``c``),
            ``contexts`` ``(K,)`` bool (contexts shown in the image) and ``objects``
            (list of ``(class, shape name, part hidden)`` of the kept objects, bottom to
            top).

        Examples:
            >>> s = SyntheticScenes(length=4, image_size=32).scene(0)
            >>> sorted(s)[:4], s["part"].dtype
            (['context_map', 'contexts', 'image', 'labels'], dtype('bool'))
        """
        return self._generate(self._check_index(index), details=True)

    def _check_index(self, index: int) -> int:
        index = check_int("index", index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return int(index) % self.length

    def _generate(self, index: int, details: bool) -> dict[str, Any]:
        rng = self._rng(index)
        h, w = self.image_size
        k = self.num_classes
        while True:
            objs = self._objects(rng)
            top = self._paint(objs)
            counts = np.bincount(top.ravel(), minlength=2 * len(objs) + 1)
            keep = [
                o for i, o in enumerate(objs)
                if counts[2 * i + 1] + counts[2 * i + 2] >= self.min_visible * o["area"]
                and counts[2 * i + 1] >= self.min_visible * o["part_area"]
            ]
            if len(keep) < len(objs):  # removing objects only uncovers the others
                objs = keep
                top = self._paint(objs) if objs else top
            if objs:
                break
        n = len(objs)
        cls = np.array([o["cls"] for o in objs], dtype=np.int64)
        labels = np.zeros(k, dtype=np.float32)
        labels[cls] = 1.0

        # contexts: present classes with p = co_occurrence, absent ones with context_alone
        present = labels > 0
        u = rng.random(k)
        contexts = np.where(present, u < self.co_occurrence, u < self.context_alone)
        region_list = [int(r) for r in self._context_layer0 + np.flatnonzero(contexts)]
        if not region_list or rng.random() < 0.25:
            region_list.append(0)
        regions = np.asarray(region_list, dtype=np.int64)[rng.permutation(len(region_list))]
        m = len(regions)
        horizontal = rng.random() < 0.5
        along, across = (self._ys / h, self._xs / w) if horizontal else (self._xs / w, self._ys / h)
        # code map: 1..2n object codes (see _paint), 2n + 1 + b = background band b
        nb = 2 * n + 1
        if m > 1:
            cuts = np.sort(0.1 + 0.8 * rng.random(m - 1))
            wave = rng.random((m - 1, 2))
            bounds = cuts[:, None] + 0.06 * np.sin(
                2.0 * math.pi * ((0.5 + 1.5 * wave[:, :1]) * across[None] + wave[:, 1:]))
            # band index = number of boundaries the pixel lies beyond
            band = np.full((len(along), len(across)), nb, dtype=np.int16)
            for bd in bounds:
                band += along[:, None] > bd[None, :]
            if not horizontal:
                band = band.T
            code = np.where(top > 0, top, band)
        else:
            code = np.where(top > 0, top, np.int16(nb))

        hw = h * w
        layer_lut = np.empty(nb + m, dtype=np.int64)  # layer index * H*W (flat gather)
        layer_lut[0] = 0
        layer_lut[1:nb:2] = self._part_layer0 + cls
        layer_lut[2:nb:2] = self._body_layer0 + self.group_of[cls]
        layer_lut[nb:] = regions
        layer_lut *= hw
        mask_lut = np.zeros(nb + m, dtype=np.int64)
        mask_lut[1:nb:2] = cls + 1
        mask_lut[2:nb:2] = cls + 1
        image = np.take(self._layers, np.take(layer_lut, code).ravel() + self._pix, axis=1)
        if self.noise > 0:
            # quantised Gaussian: 256 unit-std quantiles indexed by random bytes (5x faster
            # than standard_normal)
            z = np.take(self._gauss, np.frombuffer(rng.bytes(3 * hw), dtype=np.uint8))
            image += z.reshape(3, hw) * self._noise_scale
        out: dict[str, Any] = dict(image=image.reshape(3, h, w), labels=labels, mask=np.take(mask_lut, code))
        if details:
            ctx_lut = np.zeros(nb + m, dtype=np.int64)
            ctx_lut[nb:] = np.where(regions > 0, regions - self._context_layer0 + 1, 0)
            out.update(
                part=(code <= 2 * n) & (code % 2 == 1),
                context_map=np.take(ctx_lut, code),
                contexts=contexts,
                objects=[(int(o["cls"]), _SHAPES[o["kind"]], bool(o["hidden"])) for o in objs],
            )
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        s = self._generate(index, details=False)
        h, w = self.image_size
        return {
            "image": torch.from_numpy(s["image"]),
            "labels": torch.from_numpy(s["labels"]),
            "mask": torch.from_numpy(s["mask"]),
            "valid": torch.ones(h, w, dtype=torch.bool),
            "index": index,
            "name": f"{self.split}_{index:06d}",
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(split={self.split!r}, length={self.length}, "
            f"num_classes={self.num_classes}, image_size={self.image_size}, seed={self.seed}, "
            f"max_objects={self.max_objects}, co_occurrence={self.co_occurrence}, "
            f"context_alone={self.context_alone}, part_fraction={self.part_fraction}, "
            f"part_hidden={self.part_hidden}, "
            f"noise={self.noise}, group_size={self.group_size}, "
            f"superclass_layout={self.superclass_layout!r})"
        )

    # convenience for users: stacked tensors of the whole split (small datasets only)
    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Materialise the split: ``(images (N,3,H,W), labels (N,K), masks (N,H,W))``.

        Examples:
            >>> x, y, m = SyntheticScenes(length=3, image_size=16).tensors()
            >>> x.shape, y.shape, m.shape
            (torch.Size([3, 3, 16, 16]), torch.Size([3, 6]), torch.Size([3, 16, 16]))
        """
        items = [self[i] for i in range(self.length)]
        return (torch.stack([t["image"] for t in items]),
                torch.stack([t["labels"] for t in items]),
                torch.stack([t["mask"] for t in items]))
