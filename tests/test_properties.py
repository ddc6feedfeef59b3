"""Property tests (hypothesis) for invariants of the core helpers.

Shapes and thresholds come from hypothesis; tensor contents from a torch generator seeded by
hypothesis, so every example is reproducible from the printed falsifying inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsss_blocks._validate import check_int
from wsss_blocks.cam import box_to_valid_mask, pseudo_labels, valid_to_grid
from wsss_blocks.tokens import grid_to_tokens, tokens_to_grid

FAST = settings(max_examples=30, deadline=None, database=None)  # no .hypothesis/ in the checkout
seeds = st.integers(0, 2**31 - 1)
sides = st.integers(1, 7)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- pseudo_labels


@st.composite
def cam_case(draw):
    b, k, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(sides), draw(sides)
    gen = _gen(draw(seeds))
    # values on a coarse grid so that ties with the thresholds occur
    cam = torch.randint(0, 11, (b, k, h, w), generator=gen).float() / 10
    labels = (torch.rand(b, k, generator=gen) > 0.5).long()
    low = draw(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5]))
    high = draw(st.sampled_from([0.5, 0.6, 0.7, 0.9, 1.0]).filter(lambda x: x > low))
    return cam, labels, low, high


@FAST
@given(cam_case())
def test_pseudo_labels_values_and_absent_classes(case):
    cam, labels, low, high = case
    out = pseudo_labels(cam, labels, low=low, high=high)
    k = cam.shape[1]
    assert out.dtype == torch.int64 and out.shape == (cam.shape[0], *cam.shape[2:])
    assert set(out.unique().tolist()) <= set(range(k + 1)) | {255}
    fg = (out > 0) & (out != 255)
    present = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).bool()  # index 0 = background
    assert present.gather(1, out.masked_fill(~fg, 0).flatten(1)).all()  # only present classes appear
    # a foreground cell really is above high for its class; a background cell is <= low for all
    idx = (out.masked_fill(~fg, 1) - 1)[:, None]
    assert (cam.gather(1, idx)[:, 0][fg] > high).all()
    assert ((cam * labels[:, :, None, None]).amax(1)[out == 0] <= low).all()


@FAST
@given(cam_case(), st.sampled_from([0.0, 0.05, 0.2, 0.5]))
def test_raising_high_never_adds_foreground(case, step):
    cam, labels, low, high = case
    a = pseudo_labels(cam, labels, low=low, high=high)
    b = pseudo_labels(cam, labels, low=low, high=high + step)
    fg_a, fg_b = (a > 0) & (a != 255), (b > 0) & (b != 255)
    assert not (fg_b & ~fg_a).any()
    assert torch.equal(b[fg_b], a[fg_b])  # kept foreground keeps its class
    assert torch.equal(a == 0, b == 0)  # background depends on low only


@FAST
@given(cam_case(), seeds)
def test_pseudo_labels_outside_valid_is_ignore(case, seed):
    cam, labels, low, high = case
    valid = torch.rand(cam.shape[0], *cam.shape[2:], generator=_gen(seed)) > 0.3
    out = pseudo_labels(cam, labels, low=low, high=high, valid=valid)
    assert (out[~valid] == 255).all()
    assert torch.equal(out[valid], pseudo_labels(cam, labels, low=low, high=high)[valid])


# ----------------------------------------------------------------------------- tokens <-> grid


@FAST
@given(st.integers(1, 3), st.integers(1, 5), sides, sides, seeds)
def test_tokens_grid_round_trip_and_row_major(b, d, h, w, seed):
    tokens = torch.randn(b, h * w, d, generator=_gen(seed))
    grid = tokens_to_grid(tokens, (h, w))
    assert grid.shape == (b, d, h, w)
    assert torch.equal(grid_to_tokens(grid), tokens)
    i, j = (seed % h), (seed // h) % w
    assert torch.equal(grid[:, :, i, j], tokens[:, i * w + j])
    assert torch.equal(tokens_to_grid(grid_to_tokens(grid), (h, w)), grid)


# ----------------------------------------------------------------------------- valid masks


@st.composite
def boxes(draw):
    hh, ww = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    b = draw(st.integers(1, 3))
    coords = st.integers(-3, 15)
    box = torch.tensor([[draw(coords) for _ in range(4)] for _ in range(b)])
    return box, (hh, ww)


@FAST
@given(boxes())
def test_box_to_valid_mask_is_the_clipped_rectangle(case):
    box, (hh, ww) = case
    mask = box_to_valid_mask(box, (hh, ww))
    assert mask.shape == (box.shape[0], hh, ww) and mask.dtype == torch.bool
    for m, (h0, h1, w0, w1) in zip(mask, box.tolist(), strict=True):
        rows = max(0, min(h1, hh) - max(h0, 0))
        cols = max(0, min(w1, ww) - max(w0, 0))
        assert int(m.sum()) == rows * cols
        if rows * cols:
            assert m[max(h0, 0):min(h1, hh), max(w0, 0):min(w1, ww)].all()


@FAST
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), seeds)
def test_valid_to_grid_majority_of_each_block(b, h, w, fh, fw, seed):
    valid = torch.rand(b, h * fh, w * fw, generator=_gen(seed)) > 0.5
    out = valid_to_grid(valid, (h, w))
    assert out.shape == (b, h, w)
    blocks = valid.view(b, h, fh, w, fw).float().mean((2, 4))
    assert torch.equal(out, blocks >= 0.5)
    assert torch.equal(valid_to_grid(valid, tuple(valid.shape[1:])), valid)  # same size: unchanged


@FAST
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), sides, sides, seeds)
def test_valid_to_grid_is_monotone_and_keeps_constants(b, hh, ww, h, w, seed):
    gen = _gen(seed)
    small = torch.rand(b, hh, ww, generator=gen) > 0.6
    large = small | (torch.rand(b, hh, ww, generator=gen) > 0.6)
    assert not (valid_to_grid(small, (h, w)) & ~valid_to_grid(large, (h, w))).any()
    assert valid_to_grid(torch.ones(b, hh, ww, dtype=torch.bool), (h, w)).all()
    assert not valid_to_grid(torch.zeros(b, hh, ww, dtype=torch.bool), (h, w)).any()


# ----------------------------------------------------------------------------- check_int


@FAST
@given(st.integers(-(2**70), 2**70))
def test_check_int_returns_integers_unchanged(v):
    assert check_int("n", v) == v
    assert check_int("n", v, low=v, high=v) == v
    if abs(v) < 2**62:
        assert check_int("n", np.int64(v)) == v
        assert check_int("n", torch.tensor(v)) == v


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_check_int_never_truncates_floats(v):
    with pytest.raises(ValueError, match="expected an int"):
        check_int("n", v)
    with pytest.raises(ValueError, match="expected an int"):
        check_int("n", np.float64(v))


@FAST
@given(st.integers(-50, 50), st.integers(-50, 50), st.integers(-50, 50))
def test_check_int_bounds(v, low, high):
    inside = low <= v <= high
    if inside:
        assert check_int("n", v, low=low, high=high) == v
    else:
        with pytest.raises(ValueError, match="n: expected an int"):
            check_int("n", v, low=low, high=high)


def test_check_int_rejects_bools():
    for v in (True, False, np.bool_(True)):
        with pytest.raises(ValueError, match="expected an int"):
            check_int("n", v)
