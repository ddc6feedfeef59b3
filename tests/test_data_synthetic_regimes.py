"""SyntheticScenes regimes: crossed superclasses, more classes, 96 px, co-occurrence rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_blocks.cpews import superclass_index
from wsss_blocks.data import SyntheticScenes


def test_crossed_layout_changes_only_the_table():
    body = SyntheticScenes(num_classes=8, length=6, image_size=48)
    crossed = SyntheticScenes(num_classes=8, length=6, image_size=48, superclass_layout="crossed")
    assert body.superclasses == {"group0": (0, 1), "group1": (2, 3), "group2": (4, 5), "group3": (6, 7)}
    assert crossed.superclasses == {"membera": (0, 2, 4, 6), "memberb": (1, 3, 5, 7)}
    for i in range(6):  # pixels, labels and masks are bit-identical
        a, b = body[i], crossed[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["labels"], b["labels"])
    # every class is in exactly one superclass, and partners (same body) never share one
    sup = superclass_index(crossed.superclasses, 8)
    assert (crossed.group_of[0::2] == crossed.group_of[1::2]).all()
    assert (sup[0::2] != sup[1::2]).all()


@pytest.mark.parametrize("k,g", [(12, 3), (7, 3), (5, 1)])
def test_crossed_layout_is_a_partition(k, g):
    ds = SyntheticScenes(num_classes=k, group_size=g, length=1, superclass_layout="crossed")
    members = sorted(c for v in ds.superclasses.values() for c in v)
    assert members == list(range(k))
    sup = superclass_index(ds.superclasses, k)
    for grp in range(ds.num_groups):  # no two classes of one body group share a superclass
        cls = np.flatnonzero(ds.group_of == grp)
        assert len(set(sup[cls].tolist())) == len(cls)


def test_default_table_unchanged_and_bad_layout():
    assert SyntheticScenes(length=1).superclasses == {"group0": (0, 1), "group1": (2, 3), "group2": (4, 5)}
    with pytest.raises(ValueError, match="superclass_layout"):
        SyntheticScenes(length=1, superclass_layout="diagonal")


def test_more_classes_96px_and_cooccurrence_rates():
    ds = SyntheticScenes(num_classes=12, group_size=3, image_size=96, length=200, co_occurrence=0.95,
                         context_alone=0.2)
    assert ds[0]["image"].shape == (3, 96, 96) and ds[0]["labels"].shape == (12,)
    present = alone = shown_present = shown_alone = 0
    for i in range(200):
        s = ds.scene(i)
        lab = s["labels"] > 0
        present += lab.sum()
        alone += (~lab).sum()
        shown_present += (s["contexts"] & lab).sum()
        shown_alone += (s["contexts"] & ~lab).sum()
    assert shown_present / present == pytest.approx(0.95, abs=0.04)
    assert shown_alone / alone == pytest.approx(0.2, abs=0.03)
