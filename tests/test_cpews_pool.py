"""CPEWS region embeddings, the prototype pool and its superclass filter."""

from __future__ import annotations

import warnings

import pytest
import torch
from _runtime_helpers import run_gloo
from torch.utils._python_dispatch import TorchDispatchMode

from wsss_blocks import ShapeError
from wsss_blocks.constants import VOC_CLASSES
from wsss_blocks.cpews import PRESETS, PrototypePool, RegionEmbeddings, pdl_loss, region_embeddings


# ----------------------------------------------------------------------------- region embeddings
def _region_oracle(features, cam, threshold, valid):
    b, k = cam.shape[:2]
    out = torch.zeros(b, k, features.shape[-1], dtype=torch.float64)
    nonempty = torch.zeros(b, k, dtype=torch.bool)
    for i in range(b):
        for c in range(k):
            m = cam[i, c].flatten().double().clamp_min(0)
            w = m / (m.max() + 1e-5)
            if threshold is not None:
                w = (w > threshold).double()
            if valid is not None:
                w = w * valid[i].flatten().double()
            mass = w.sum()
            out[i, c] = (w[:, None] * features[i].double()).sum(0) / (mass + 1e-5)
            nonempty[i, c] = bool(mass > 0)
    return out, nonempty


@pytest.mark.parametrize("threshold", [None, 0.1, 0.5])
def test_region_embeddings_loop_oracle(threshold):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 12, 5, generator=gen)
    cam = torch.randn(2, 3, 3, 4, generator=gen)
    cam[1, 2] = -cam[1, 2].abs()  # an all-negative map -> empty
    valid = torch.rand(2, 3, 4, generator=gen) > 0.3
    for v in (None, valid):
        out = region_embeddings(feats, cam, threshold=threshold, valid=v)
        assert isinstance(out, RegionEmbeddings)
        a, ne = out  # tuple unpacking keeps working
        assert a is out.prototypes and ne is out.prototype_valid
        ra, rne = _region_oracle(feats, cam, threshold, v)
        assert a.dtype == torch.float32 and a.shape == (2, 3, 5) and ne.dtype == torch.bool
        torch.testing.assert_close(a.double(), ra, atol=1e-5, rtol=1e-5)
        assert torch.equal(ne, rne)
        assert not ne[1, 2]
    grid = feats.transpose(1, 2).reshape(2, 5, 3, 4)
    torch.testing.assert_close(region_embeddings(grid, cam).prototypes, region_embeddings(feats, cam).prototypes)


def test_region_embeddings_known_answers_and_grads():
    feats = torch.randn(1, 4, 3, requires_grad=True)
    cam = torch.tensor([[[[-1.0, 2.0], [0.0, -3.0]], [[-1.0, -2.0], [0.0, -3.0]]]],
                       requires_grad=True)
    a, ne = region_embeddings(feats, cam)
    torch.testing.assert_close(a[0, 0], feats[0, 1].detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(a[0, 1], torch.zeros(3)) and ne.tolist() == [[True, False]]
    a.sum().backward()
    assert feats.grad.abs().sum() > 0 and cam.grad is None
    with pytest.raises(ShapeError, match="cams"):
        region_embeddings(feats, cam[0])
    with pytest.raises(ShapeError, match="features"):
        region_embeddings(torch.randn(1, 5, 3), cam.detach())
    with pytest.raises(ValueError, match="threshold"):
        region_embeddings(feats, cam.detach(), threshold=1.0)


# ----------------------------------------------------------------------------- pool helpers
def _single_token_batch(points, labels, probs=None):
    """One token per image, CAM positive for every class: A_bc == the point (up to 1e-5)."""
    b = points.shape[0]
    k = labels.shape[1]
    feats = points[:, None, :]
    cams = torch.ones(b, k, 1, 1)
    out = {"features": feats, "cams": cams, "labels": labels}
    if probs is not None:
        out["class_probs"] = probs
    return out


def test_pool_recovers_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    pts = centres.repeat_interleave(8, 0) + 0.05 * torch.randn(24, 3, generator=gen)
    labels = torch.zeros(24, 2)
    labels[:, 0] = 1
    pool = PrototypePool(3, 2, num_prototypes=3, capacity=64, score="cam_mean")
    for chunk in torch.arange(24).split(5):
        pool.update(**_single_token_batch(pts[chunk], labels[chunk]))
    assert pool.seen.tolist() == [24, 0]
    pool.finalize()
    assert pool.pos_valid.tolist() == [[True] * 3, [False] * 3]
    got = sorted(pool.pos[0].tolist(), key=lambda p: (round(p[0]), round(p[1])))
    want = [pts[8 * i : 8 * i + 8].mean(0).tolist() for i in (0, 2, 1)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-3, rtol=0)
    # every image is a negative candidate for class 1 (absent, non-empty region)
    assert pool.neg_valid[1].all() and not pool.neg_valid[0].any()


def test_pool_capacity_keeps_all_and_reservoir_is_seeded():
    gen = torch.Generator().manual_seed(1)
    pts = torch.randn(30, 4, generator=gen)
    labels = (torch.rand(30, 3, generator=gen) > 0.4).float()
    batches = [_single_token_batch(pts[i : i + 7], labels[i : i + 7]) for i in range(0, 30, 7)]

    big = PrototypePool(4, 3, capacity=64, score="cam_mean")
    for bt in batches:
        big.update(**bt)
    for c in range(3):
        stored = big.store[c][big.store_valid[c]]
        want = pts[labels[:, c] > 0]
        assert stored.shape[0] == want.shape[0] == int(big.seen[c])
        # same set of rows
        d = torch.cdist(stored, want)
        assert (d.min(1).values < 1e-3).all() and (d.min(0).values < 1e-3).all()

    def small(seed):
        p = PrototypePool(4, 3, capacity=5, score="cam_mean", seed=seed)
        for bt in batches:
            p.update(**bt)
        return p

    a, b, c = small(0), small(0), small(1)
    assert torch.equal(a.store, b.store) and torch.equal(a.store_valid, b.store_valid)
    assert a.store_valid.sum(1).tolist() == [min(5, int(n)) for n in a.seen]
    assert not torch.equal(a.store, c.store)
    for cls in range(3):  # a sample of the seen positives
        stored = a.store[cls][a.store_valid[cls]]
        assert (torch.cdist(stored, pts[labels[:, cls] > 0]).min(1).values < 1e-3).all()
    # the kept entries are the top-C random keys (u ~ U(0, 1) per (image, class), seed 0)
    gen0 = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.rand(bt["labels"].shape, generator=gen0) for bt in batches])
    for cls in range(3):
        cand = (labels[:, cls] > 0).nonzero().flatten().tolist()
        top = sorted(cand, key=lambda i: -float(keys[i, cls]))[:5]
        stored = a.store[cls][a.store_valid[cls]]
        assert stored.shape[0] == len(top)
        assert (torch.cdist(pts[top], stored).min(1).values < 1e-3).all()
    # reset re-seeds: a second pass reproduces the first
    a.reset()
    for bt in batches:
        a.update(**bt)
    assert torch.equal(a.store, b.store)


def test_pool_negatives_streamed_equal_one_shot_sort():
    gen = torch.Generator().manual_seed(2)
    n, k, m = 40, 4, 3
    pts = torch.randn(n, 5, generator=gen)
    labels = (torch.rand(n, k, generator=gen) > 0.6).float()
    probs = torch.rand(n, k, generator=gen)
    streamed = PrototypePool(5, k, num_prototypes=m, capacity=8)
    for idx in torch.arange(n).chunk(5):
        streamed.update(**_single_token_batch(pts[idx], labels[idx], probs[idx]))
    one = PrototypePool(5, k, num_prototypes=m, capacity=8)
    one.update(**_single_token_batch(pts, labels, probs))
    streamed.finalize()
    one.finalize()
    for name in ("neg", "neg_valid", "neg_scores", "neg_labels"):
        assert torch.equal(getattr(streamed, name), getattr(one, name)), name
    for c in range(k):  # oracle: sort the absent-class candidates by score
        cand = [i for i in range(n) if labels[i, c] == 0]
        cand.sort(key=lambda i: -float(probs[i, c]))
        top = cand[:m]
        torch.testing.assert_close(one.neg_scores[c, : len(top)], probs[top, c])
        torch.testing.assert_close(one.neg[c, : len(top)], pts[top], atol=1e-4, rtol=0)
        assert torch.equal(one.neg_labels[c, : len(top)], labels[top] > 0)
        assert one.neg_valid[c].tolist() == [j < len(cand) for j in range(m)]


def test_pool_cam_mean_score_with_valid():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 6, 2, generator=gen)
    cams = torch.randn(3, 2, 2, 3, generator=gen).abs() + 0.1
    valid = torch.ones(3, 2, 3, dtype=torch.bool)
    valid[:, 1, 2] = False
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pool = PrototypePool(2, 2, num_prototypes=2, score="cam_mean")
    pool.update(feats, cams, labels, valid=valid)
    pool.finalize()
    want = [float(cams[i, 1].flatten()[:5].mean()) for i in (0, 1)]
    got = sorted(pool.neg_scores[1].tolist(), reverse=True)
    assert got == pytest.approx(sorted(want, reverse=True), abs=1e-6)
    assert pool.neg_scores[0, 0].item() == pytest.approx(float(cams[2, 0].flatten()[:5].mean()))


def test_pool_official_preset_uses_binary_region_mask():
    # official preset: region = mean of tokens whose max-normalised CAM > 0.1 (not CAM-weighted)
    pool = PrototypePool(2, 2, num_prototypes=1, **PRESETS["official"]["pool"])
    assert pool.threshold == 0.1 and pool.score == "cam_mean"
    feats = torch.tensor([[[1.0, 0.0], [0.0, 8.0], [3.0, 2.0], [5.0, 5.0]]])
    cams = torch.zeros(1, 2, 2, 2)
    cams[0, 0] = 1.0
    cams[0, 1] = torch.tensor([[1.0, 0.05], [0.5, 0.0]])  # class 1 absent -> negative candidate
    pool.update(feats, cams, torch.tensor([[1.0, 0.0]]))
    pool.finalize()
    assert pool.neg_valid[1, 0]
    torch.testing.assert_close(pool.neg[1, 0], torch.tensor([2.0, 1.0]))  # (f0 + f2) / 2
    soft = PrototypePool(2, 2, num_prototypes=1, score="cam_mean")
    soft.update(feats, cams, torch.tensor([[1.0, 0.0]]))
    soft.finalize()
    assert not torch.allclose(soft.neg[1, 0], pool.neg[1, 0])  # the CAM-weighted mean differs


def test_pool_state_dict_and_old_prototypes_until_finalize():
    gen = torch.Generator().manual_seed(4)
    pts = torch.randn(12, 3, generator=gen)
    labels = (torch.rand(12, 2, generator=gen) > 0.5).float()
    probs = torch.rand(12, 2, generator=gen)
    pool = PrototypePool(3, 2, num_prototypes=2, capacity=16, superclasses={"a": (0, 1)})
    pool.update(**_single_token_batch(pts[:6], labels[:6], probs[:6]))
    pool.finalize()
    sd = pool.state_dict()
    assert set(sd) == {"pos", "pos_valid", "neg", "neg_valid", "neg_scores", "neg_labels",
                       "neg_filter", "superclass_of", "built"}
    fresh = PrototypePool(3, 2, num_prototypes=2, capacity=16)
    assert not fresh.is_built
    fresh.load_state_dict(sd)
    assert fresh.is_built and bool(fresh.built)
    for key, val in sd.items():
        assert torch.equal(getattr(fresh, key), val), key
    assert fresh.superclass_of.tolist() == [0, 0]
    # losses keep using the old prototypes while a new pass accumulates
    old = {k: v.clone() for k, v in sd.items()}
    feats, cam = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 2, 2, 2, generator=gen)
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0]])

    def loss(p):
        return pdl_loss(feats, cam, y, p.pos, p.pos_valid, p.neg, p.neg_valid)

    before = loss(pool)
    pool.reset()
    pool.update(**_single_token_batch(pts[6:], labels[6:], probs[6:]))
    for key in old:
        assert torch.equal(getattr(pool, key), old[key]), key
    assert torch.equal(loss(pool), before)
    pool.finalize()
    assert not torch.equal(pool.pos, old["pos"])
    assert not pool.store_valid.any()  # finalize resets the stores


def test_pool_finalize_empty_warns_and_never_present_class():
    pool = PrototypePool(2, 3, num_prototypes=2)
    with pytest.warns(UserWarning, match="nothing was accumulated"):
        pool.finalize()
    assert pool.is_built and not pool.pos_valid.any() and not pool.neg_valid.any()
    # class 2 never present, class 1 present once (n_c < M), class 0 never negative
    p = PrototypePool(2, 3, num_prototypes=2, score="cam_mean")
    p.update(**_single_token_batch(torch.randn(2, 2), torch.tensor([[1.0, 1.0, 0], [1.0, 0, 0]])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.finalize()
    assert p.pos_valid.tolist() == [[True, True], [True, False], [False, False]]
    assert p.neg_valid.tolist() == [[False, False], [True, False], [True, True]]
    assert torch.equal(p.neg[0], torch.zeros(2, 2))


def test_pool_build_leaves_model_mode_and_matches_manual():
    net = torch.nn.Linear(3, 3).train()
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(2, 4, 3, generator=gen), (torch.rand(2, 2, generator=gen) > 0.5).float())
            for _ in range(3)]

    def model_fn(batch):
        x, y = batch
        f = net(x)
        cams = f[..., :2].transpose(1, 2).reshape(2, 2, 2, 2)
        return {"features": f, "cams": cams, "labels": y, "class_probs": cams.mean((2, 3)).sigmoid()}

    pool = PrototypePool(3, 2, num_prototypes=2)
    pool.build(model_fn, data)
    assert net.training and pool.is_built
    manual = PrototypePool(3, 2, num_prototypes=2)
    with torch.no_grad():
        for bt in data:
            manual.update(**model_fn(bt))
    manual.finalize()
    for key, val in manual.state_dict().items():
        assert torch.equal(pool.state_dict()[key], val), key
    assert not pool.pos.requires_grad


def test_pool_validation():
    pool = PrototypePool(3, 2)
    feats, cams, y = torch.randn(1, 4, 3), torch.randn(1, 2, 2, 2), torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match="class_probs"):
        pool.update(feats, cams, y)
    with pytest.raises(ShapeError, match="class_probs"):
        pool.update(feats, cams, y, class_probs=torch.rand(1, 3))
    with pytest.raises(ShapeError, match="cams"):
        pool.update(feats, torch.randn(1, 3, 2, 2), y, class_probs=torch.rand(1, 2))
    with pytest.raises(ShapeError, match="labels"):
        pool.update(feats, cams, torch.tensor([[2, 0]]), class_probs=torch.rand(1, 2))
    with pytest.raises(ShapeError, match="features"):
        pool.update(torch.randn(1, 4, 5), cams, y, class_probs=torch.rand(1, 2))
    with pytest.raises(ShapeError, match="features"):
        pool.update(torch.randn(1, 5, 3), cams, y, class_probs=torch.rand(1, 2))
    with pytest.raises(ShapeError, match="valid"):
        pool.update(feats, cams, y, class_probs=torch.rand(1, 2), valid=torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="score"):
        PrototypePool(3, 2, score="max")
    with pytest.raises(ValueError, match="capacity"):
        PrototypePool(3, 2, capacity=0)
    with pytest.raises(ValueError, match="num_prototypes"):
        PrototypePool(3, 2, num_prototypes=0)
    with pytest.raises(ValueError, match="kmeans_iters"):
        PrototypePool(3, 2, kmeans_iters=-1)
    with pytest.raises(ValueError, match="threshold"):
        PrototypePool(3, 2, threshold=1.0)
    with pytest.raises(ShapeError, match="num_classes=20"):
        PrototypePool(3, 2, superclasses="voc")


def test_pool_bf16_autocast_features():
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 4, 3, generator=gen)
    cams = torch.randn(2, 2, 2, 2, generator=gen)
    y = torch.tensor([[1, 0], [0, 1]])
    ref = PrototypePool(3, 2, num_prototypes=1, score="cam_mean")
    ref.update(feats, cams, y)
    pool = PrototypePool(3, 2, num_prototypes=1, score="cam_mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pool.update(feats.bfloat16(), cams.bfloat16(), y)
    assert pool.store.dtype == torch.float32
    torch.testing.assert_close(pool.store, ref.store, atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------- superclass filter
def _voc_pool_with_negatives(neg_sources):
    """VOC pool whose valid negatives of class c come from images with the given labels."""
    pool = PrototypePool(2, 20, num_prototypes=len(next(iter(neg_sources.values()))),
                         superclasses="voc")
    for c, sources in neg_sources.items():
        for m, present in enumerate(sources):
            pool.neg_valid[c, m] = True
            for j in present:
                pool.neg_labels[c, m, j] = True
    return pool


def test_superclass_filter_voc():
    bus, train, dog, person, cat = (VOC_CLASSES.index(n) for n in ("bus", "train", "dog", "person", "cat"))
    pool = _voc_pool_with_negatives({
        bus: [(train,), (dog,), (dog, train)],
        person: [(dog,), (bus,), (cat, train)],
        dog: [(cat,), (bus,), (person,)],
    })
    keep = pool.suppression_mask()
    assert keep[bus].tolist() == [False, True, False]
    assert keep[person].tolist() == [True, True, True]
    assert keep[dog].tolist() == [False, True, True]
    strict = pool.suppression_mask(suppress_singletons=False)
    assert strict[person].tolist() == [False, False, False]
    assert torch.equal(strict[bus], keep[bus]) and torch.equal(strict[dog], keep[dog])
    assert not keep[0].any()  # no valid negatives
    # no table: every valid negative is kept
    flat = PrototypePool(2, 20, num_prototypes=3)
    flat.neg_valid.copy_(pool.neg_valid)
    flat.neg_labels.copy_(pool.neg_labels)
    assert torch.equal(flat.suppression_mask(), pool.neg_valid)
    assert torch.equal(flat.suppression_mask(suppress_singletons=False), pool.neg_valid)


# ----------------------------------------------------------------------------- DDP (gloo, 2 ranks)
def _ddp_data():
    gen = torch.Generator().manual_seed(7)
    sizes = {0: [3, 1, 4], 1: [2, 5, 0]}  # unequal (and an empty) per-rank batches
    data = {}
    for r in (0, 1):
        data[r] = []
        for b in sizes[r]:
            x = torch.randn(b, 4, 6, generator=gen)
            cams = torch.randn(b, 3, 2, 2, generator=gen)
            y = (torch.rand(b, 3, generator=gen) > 0.5).float()
            p = torch.rand(b, 3, generator=gen)
            data[r].append({"features": x, "cams": cams, "labels": y, "class_probs": p})
    return data


def _ddp_rank(rank: int) -> dict:
    pool = PrototypePool(6, 3, num_prototypes=2, capacity=4, superclasses={"a": (0, 1), "b": (2,)})
    for batch in _ddp_data()[rank]:
        pool.update(**batch)
    pool.finalize()
    return pool.state_dict()


@pytest.mark.slow
def test_pool_ddp_two_ranks_equal_single_process_union():
    states = run_gloo(_ddp_rank)
    data = _ddp_data()
    single = PrototypePool(6, 3, num_prototypes=2, capacity=4, superclasses={"a": (0, 1), "b": (2,)})
    for b0, b1 in zip(data[0], data[1], strict=True):  # union, in rank order, step by step
        single.update(**{k: torch.cat([b0[k], b1[k]]) for k in b0})
    single.finalize()
    for key, val in single.state_dict().items():
        assert torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[0][key], val), key
    assert bool(states[0]["built"]) and states[0]["pos_valid"].any()


@pytest.mark.parametrize("cast,state", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                                        (torch.float16, torch.float32)])
def test_pool_after_module_cast(cast, state):
    """Casting the pool (or a model holding it) must not break accumulate (scatter dtypes)."""
    gen = torch.Generator().manual_seed(0)
    feats, cams = torch.randn(4, 6, 3, generator=gen), torch.randn(4, 2, 2, 3, generator=gen)
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1]])
    ref = PrototypePool(3, 2, num_prototypes=2, capacity=8, score="cam_mean")
    ref.update(feats, cams, labels)
    ref.finalize()
    pool = PrototypePool(3, 2, num_prototypes=2, capacity=8, score="cam_mean").to(cast)
    assert pool.pos.dtype == state and pool.neg_scores.dtype == state
    pool.update(feats.to(cast), cams.to(cast), labels)
    pool.finalize()
    assert pool.pos.dtype == state and pool.pos_valid.dtype == torch.bool
    assert torch.equal(pool.pos_valid, ref.pos_valid) and torch.equal(pool.neg_valid, ref.neg_valid)
    tol = 1e-2 if cast != torch.float64 else 1e-5
    torch.testing.assert_close(pool.pos.float(), ref.pos, atol=tol, rtol=tol)


class _RecordOps(TorchDispatchMode):
    """Records every aten op dispatched inside the context (a host read of a tensor is one)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _reads(fn):
    with _RecordOps() as rec:
        value = fn()
    return value, rec.ops


def test_is_built_reads_the_buffers_once_per_change():
    """A step that leaves the pool alone must not touch its buffers (a device sync on GPU)."""
    pool = PrototypePool(3, 2, num_prototypes=2, score="cam_mean")
    assert _reads(lambda: pool.is_built)[1]  # first read: from the buffers
    assert _reads(lambda: pool.is_built) == (False, [])  # cached
    pool.update(**_single_token_batch(torch.randn(4, 3), torch.tensor([[1.0, 0], [0, 1.0]] * 2)))
    assert _reads(lambda: pool.is_built) == (False, [])  # update leaves the prototypes alone
    pool.finalize()
    assert _reads(lambda: pool.is_built) == (True, [])  # finalize knows the answer
    moved = pool.to(torch.float64)
    assert _reads(lambda: moved.is_built) == (True, [])  # casts and moves keep it
    fresh = PrototypePool(3, 2, num_prototypes=2)
    fresh.load_state_dict(pool.state_dict())  # read once at load time
    assert _reads(lambda: fresh.is_built) == (True, [])
    fresh.pos_valid.zero_(), fresh.neg_valid.zero_(), fresh.built.zero_()  # edited by hand
    value, ops = _reads(lambda: fresh.is_built)
    assert value is False and ops  # the edit is seen (version counters), read once
    assert _reads(lambda: fresh.is_built) == (False, [])
