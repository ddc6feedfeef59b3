"""Tests for wsss_blocks.data.synthetic.SyntheticScenes and the shared collate."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from oracles.synthetic import scene_layout
from torch.utils.data import DataLoader

from wsss_blocks.data import SyntheticScenes, collate
from wsss_blocks.data.synthetic import _SHAPES, _shape_metric


@pytest.fixture(scope="module")
def ds() -> SyntheticScenes:
    return SyntheticScenes(split="train", length=600, seed=3)


@pytest.fixture(scope="module")
def scenes(ds: SyntheticScenes) -> list[dict]:
    return [ds.scene(i) for i in range(len(ds))]


def test_item_shapes_dtypes(ds: SyntheticScenes) -> None:
    item = ds[0]
    assert set(item) == {"image", "labels", "mask", "valid", "index", "name"}
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (6,) and item["labels"].dtype == torch.float32
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.int64
    assert item["valid"].dtype == torch.bool and bool(item["valid"].all())
    assert item["index"] == 0 and item["name"] == "train_000000"
    assert torch.isfinite(item["image"]).all()
    assert ds.num_classes == 6 and ds.ignore_index == 255 and len(ds) == 600


def test_non_square_and_other_k() -> None:
    d = SyntheticScenes(num_classes=5, image_size=(40, 72), length=30, max_objects=4)
    for i in range(30):
        it = d[i]
        assert it["image"].shape == (3, 40, 72) and it["mask"].shape == (40, 72)
        assert it["labels"].shape == (5,)
        assert int(it["mask"].max()) <= 5
    assert d.superclasses == {"group0": (0, 1), "group1": (2, 3), "group2": (4,)}
    assert len(d.class_names) == 5 and len(set(d.class_names)) == 5
    assert d.palette.shape == (6, 3) and d.palette.dtype == np.uint8


def test_default_lengths() -> None:
    assert len(SyntheticScenes()) == 2000
    assert len(SyntheticScenes(split="val")) == 500


def test_determinism() -> None:
    a = SyntheticScenes(length=20, seed=7)
    b = SyntheticScenes(length=20, seed=7)
    for i in (0, 5, 19):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["labels"], y["labels"])
    # order of access does not matter, negative indices alias
    assert torch.equal(a[-1]["image"], a[19]["image"])
    # different index / split / seed -> different scenes
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticScenes(length=20, seed=8)[0]["image"])
    assert not torch.equal(a[0]["image"], SyntheticScenes(length=20, seed=7, split="val")[0]["image"])
    # length does not change the stream
    assert torch.equal(a[3]["image"], SyntheticScenes(length=500, seed=7)[3]["image"])


def test_labels_match_mask_and_parts_visible(ds: SyntheticScenes, scenes: list[dict]) -> None:
    for s in scenes:
        present = set(np.unique(s["mask"]).tolist()) - {0}
        labelled = {int(c) + 1 for c in np.flatnonzero(s["labels"])}
        assert present == labelled  # every labelled class has pixels and vice versa
        assert labelled, "every scene has at least one object"
        shown = {c + 1 for c, _, hidden in s["objects"] if not hidden}
        for v in shown:  # a kept object with a part shows it
            assert (s["part"] & (s["mask"] == v)).any()
        assert not (s["part"] & (s["mask"] == 0)).any()
        # context textures only on background pixels
        assert (s["mask"][s["context_map"] > 0] == 0).all()
        # a drawn context map implies the context flag
        drawn = set(np.unique(s["context_map"]).tolist()) - {0}
        assert drawn <= {int(c) + 1 for c in np.flatnonzero(s["contexts"])}
        assert 1 <= len(s["objects"]) <= ds.max_objects


def test_occluded_objects_are_not_labelled() -> None:
    # with many large objects, some get removed: the kept objects define the labels
    d = SyntheticScenes(length=200, max_objects=6, min_visible=0.6, seed=1)
    removed = 0
    for i in range(200):
        s = d.scene(i)
        kept = {c for c, _, _ in s["objects"]}
        assert {int(c) for c in np.flatnonzero(s["labels"])} == kept
        for c in kept:  # each kept object class covers a real area
            assert (s["mask"] == c + 1).sum() > 0
        removed += d.max_objects - len(s["objects"])
    assert removed > 0


def test_co_occurrence_statistic(scenes: list[dict]) -> None:
    with_cls, without_cls = [], []
    for s in scenes:
        lab = s["labels"] > 0
        with_cls.extend(s["contexts"][lab].tolist())
        without_cls.extend(s["contexts"][~lab].tolist())
    p_with, p_without = np.mean(with_cls), np.mean(without_cls)
    # binomial std at n ~ 1000 is ~0.013: tolerance 0.04
    assert abs(p_with - 0.8) < 0.04, p_with
    assert abs(p_without - 0.1) < 0.03, p_without


def test_hidden_parts(scenes: list[dict]) -> None:
    objs = [o for s in scenes for o in s["objects"]]
    frac = np.mean([hidden for _, _, hidden in objs])
    assert 0.32 < frac < 0.5  # default 0.4 (removal favours hidden parts slightly)
    for s in scenes:  # a class whose only objects hide their part has no part pixels
        for c in {c for c, _, _ in s["objects"]}:
            if all(h for cc, _, h in s["objects"] if cc == c):
                assert not (s["part"] & (s["mask"] == c + 1)).any()
    d = SyntheticScenes(length=50, part_hidden=1.0)
    assert not any(d.scene(i)["part"].any() for i in range(50))


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_co_occurrence_parameter(p: float) -> None:
    d = SyntheticScenes(length=300, co_occurrence=p, context_alone=0.0, seed=2)
    vals = []
    for i in range(300):
        s = d.scene(i)
        lab = s["labels"] > 0
        vals.extend(s["contexts"][lab].tolist())
        assert not s["contexts"][~lab].any()
    assert abs(np.mean(vals) - p) < 0.06


def test_context_shown_in_pixels(scenes: list[dict]) -> None:
    # the flagged contexts cover a large share of the background
    shares = []
    for s in scenes:
        if s["contexts"].any():
            bg = s["mask"] == 0
            shares.append((s["context_map"][bg] > 0).mean())
    assert np.mean(shares) > 0.6


def test_part_fraction() -> None:
    for pf in (0.15, 0.3):
        d = SyntheticScenes(length=200, max_objects=1, part_fraction=pf, part_hidden=0.0, seed=4)
        fr = []
        for i in range(200):
            s = d.scene(i)
            fr.append(s["part"].sum() / (s["mask"] > 0).sum())
        assert abs(np.mean(fr) - pf) < 0.04, (pf, np.mean(fr))


def test_shared_bodies_distinct_parts() -> None:
    """Partner classes have pixel-identical bodies; parts are flat and class-specific."""
    d = SyntheticScenes(length=150, noise=0.0, seed=5)
    body_cols: dict[int, set] = {c: set() for c in range(6)}
    part_cols: dict[int, set] = {c: set() for c in range(6)}
    for i in range(150):
        s = d.scene(i)
        img = s["image"].reshape(3, -1).T.round(4)
        m, part = s["mask"].ravel(), s["part"].ravel()
        for v in np.unique(m[m > 0]):
            body_cols[v - 1] |= {tuple(p) for p in img[(m == v) & ~part]}
            part_cols[v - 1] |= {tuple(p) for p in img[(m == v) & part]}
    for c in range(6):
        assert len(part_cols[c]) == 1
        assert len(body_cols[c]) == 2  # two-tone stripes
    for g in range(3):
        assert body_cols[2 * g] == body_cols[2 * g + 1]
        assert part_cols[2 * g] != part_cols[2 * g + 1]
    assert body_cols[0] != body_cols[2] != body_cols[4]
    assert len({next(iter(p)) for p in part_cols.values()}) == 6


def test_rasterisation_oracle() -> None:
    """The bounding-box rasteriser equals a per-pixel loop over the full frame."""
    d = SyntheticScenes(image_size=(24, 32), length=1)
    rng = np.random.default_rng(0)
    for _ in range(10):
        objs = d._objects(rng)
        top = d._paint(objs)
        ref = np.zeros((24, 32), dtype=np.int64)
        for i, o in enumerate(objs):
            inside = np.zeros((24, 32), bool)
            part = np.zeros((24, 32), bool)
            inside[o["box"]] = o["inside"]
            part[o["box"]] = o["part"]
            for y in range(24):
                for x in range(32):
                    if inside[y, x]:
                        ref[y, x] = 2 * i + (1 if part[y, x] else 2)
        assert np.array_equal(top, ref)


@pytest.mark.parametrize("split, size, seed", [("train", (24, 32), 0), ("val", (40, 24), 5)])
def test_scene_layout_matches_per_pixel_oracle(split: str, size: tuple[int, int], seed: int) -> None:
    """Public scene() mask and part map equal a per-pixel re-derivation from the documented stream."""
    d = SyntheticScenes(image_size=size, split=split, seed=seed, length=12, max_objects=4)
    removed = 0
    for i in range(len(d)):
        s = d.scene(i)
        mask, part = scene_layout(d, i)
        assert np.array_equal(s["mask"], mask), i
        assert np.array_equal(s["part"], part), i
        removed += len(s["objects"]) < 4
    assert removed > 0  # the comparison covers scenes with fewer than the drawn maximum


def test_shape_metric_known_points() -> None:
    u = np.array([0.0, 0.9, 0.6, -0.9])
    v = np.array([0.0, 0.0, 0.6, 0.0])
    assert (_shape_metric(0, u, v) <= 1).tolist() == [True, True, True, True]
    assert (_shape_metric(2, u, v) <= 1).tolist() == [True, True, False, True]
    assert (_shape_metric(1, u, v) <= 1).tolist() == [True, True, True, True]
    # triangle: tip at u=1, base at u=-1 with half-width 1
    assert (_shape_metric(3, u, v) <= 1).tolist() == [True, True, False, True]
    assert len(_SHAPES) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split"),
        ({"image_size": 8}, "image_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"co_occurrence": 1.5}, "co_occurrence"),
        ({"context_alone": -0.1}, "context_alone"),
        ({"part_fraction": 1.0}, "part_fraction"),
        ({"noise": -1.0}, "noise"),
        ({"part_hidden": 1.5}, "part_hidden"),
        ({"max_objects": 0}, "max_objects"),
        ({"length": -1}, "length"),
        ({"seed": -1}, "seed"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
        ({"min_visible": 0.0}, "min_visible"),
        ({"min_visible": 1.5}, "min_visible"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(**kwargs)


def test_index_errors() -> None:
    d = SyntheticScenes(length=3)
    with pytest.raises(IndexError):
        d[3]
    with pytest.raises(IndexError):
        d[-4]


def test_dataloader_collate() -> None:
    d = SyntheticScenes(length=10, image_size=(32, 48))
    batch = next(iter(DataLoader(d, batch_size=4, collate_fn=collate, shuffle=False)))
    assert batch["image"].shape == (4, 3, 32, 48)
    assert batch["labels"].shape == (4, 6) and batch["mask"].shape == (4, 32, 48)
    assert batch["valid"].shape == (4, 32, 48) and batch["valid"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["name"] == [f"train_{i:06d}" for i in range(4)]
    # oracle: collate == per-key stacking loop
    items = [d[i] for i in range(4)]
    for k in ("image", "labels", "mask", "valid"):
        assert torch.equal(batch[k], torch.stack([it[k] for it in items]))


def test_collate_errors() -> None:
    d = SyntheticScenes(length=2, image_size=16)
    e = SyntheticScenes(length=2, image_size=(16, 20))
    with pytest.raises(ValueError, match="'image'.*batch_size=1"):
        collate([d[0], e[0]])
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="different keys"):
        collate([d[0], {"image": d[1]["image"]}])


def test_tensors_helper() -> None:
    x, y, m = SyntheticScenes(length=5, image_size=16).tensors()
    assert x.shape == (5, 3, 16, 16) and y.shape == (5, 6) and m.shape == (5, 16, 16)


def test_image_statistics_normalised(scenes: list[dict]) -> None:
    x = np.stack([s["image"] for s in scenes[:100]])
    assert abs(float(x.mean())) < 1.0 and 0.3 < float(x.std()) < 2.0


def test_import_is_light() -> None:
    code = (
        "import sys, wsss_blocks, wsss_blocks.data, wsss_blocks.viz;"
        "bad=[m for m in ('PIL','matplotlib','pycocotools') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
