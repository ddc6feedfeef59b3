"""Prototypes built elsewhere in the CPEWS pool: ``PrototypePool.load_prototypes`` and
``prototypes_from_cpews_upload`` (the official code's ``clusters.pth`` layout), and hand-filled
buffers that the losses must read."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from wsss_blocks import ShapeError
from wsss_blocks.cpews import (
    CPEWSLoss,
    PoolPrototypes,
    PrototypePool,
    pdl_loss,
    prototypes_from_cpews_upload,
    ssl_loss,
)

T = torch.tensor


def _loss_inputs(features, cams, labels):
    """Keyword arguments of ``CPEWSLoss.forward`` around given final tokens and CAMs."""
    b, k = labels.shape
    return {
        "logits_mid": torch.zeros(b, k), "logits_final": torch.zeros(b, k), "features_final": features,
        "cams_final": cams, "masks_mid": torch.zeros(b, *cams.shape[-2:], dtype=torch.long), "labels": labels,
    }


def test_hand_filled_buffers_give_nonzero_pdl_and_ssl_through_cpews_loss():
    pool = PrototypePool(2, 2, num_prototypes=1)
    pool.pos[0, 0] = T([1.0, 0.0])
    pool.pos_valid[0, 0] = True
    pool.neg[0, 0] = T([0.0, 1.0])
    pool.neg_valid[0, 0] = True
    assert pool.is_built and not bool(pool.built)  # never finalized: read from the buffers
    feats = T([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]], requires_grad=True)  # token 0 looks like the negative
    cams = T([[[[2.0, 1.0, 0.1]], [[0.0, 0.0, 0.0]]]], requires_grad=True)
    labels = T([[1, 0]])
    crit = CPEWSLoss(pool, loss_weights={"pdl": 1.0, "ssl": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "pool not built" warning
        out = crit(**_loss_inputs(feats, cams, labels))
    assert out.terms["ssl"].item() == pytest.approx(2.0)  # the CAM value at token 0
    assert out.terms["pdl"].item() > 0.0
    out.loss.backward()
    assert feats.grad.abs().sum() > 0 and cams.grad[0, 0, 0, 0] > 0


def _prototypes(seed=0, k=3, d=4):
    gen = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(k, 2, d, generator=gen), torch.randn(k, 3, d, generator=gen)
    pos_valid = T([[True, True], [True, False], [False, False]])
    neg_valid = T([[True, True, False], [True, True, True], [True, False, False]])
    return pos, pos_valid, neg, neg_valid


def test_load_prototypes_pads_moves_and_marks_built():
    pos, pv, neg, nv = _prototypes()
    pos[1, 1] = float("nan")  # an invalid row may hold anything
    labels = torch.zeros(3, 3, 3, dtype=torch.long)
    labels[0, 0, 1] = labels[2, 1, 0] = 1  # the second is on an invalid row
    pool = PrototypePool(4, 3, num_prototypes=4)
    pool.load_prototypes(pos.double(), pv, neg.double(), nv, labels)
    assert pool.is_built and bool(pool.built)
    assert pool.pos.dtype == torch.float32 and pool.pos.shape == (3, 4, 4)
    assert pool.pos_valid.tolist() == [[True, True, False, False], [True, False, False, False], [False] * 4]
    assert pool.neg_valid.tolist() == [[True, True, False, False], [True, True, True, False],
                                       [True, False, False, False]]
    assert torch.equal(pool.pos[pool.pos_valid], pos[pv])
    assert torch.equal(pool.neg[pool.neg_valid], neg[nv])
    assert pool.pos[~pool.pos_valid].abs().sum() == 0 and pool.neg[~pool.neg_valid].abs().sum() == 0
    assert pool.neg_scores[pool.neg_valid].eq(0).all() and pool.neg_scores[~pool.neg_valid].eq(-math.inf).all()
    assert pool.neg_labels.dtype == torch.bool and pool.neg_labels.sum() == 1 and pool.neg_labels[0, 0, 1]
    assert pool.neg_filter.all()
    double = PrototypePool(4, 3, num_prototypes=4).double()
    double.load_prototypes(pos, pv, neg, nv)
    assert double.pos.dtype == torch.float64 and torch.equal(double.pos[double.pos_valid], pos[pv].double())


def test_loaded_prototypes_are_what_the_losses_read():
    pos, pv, neg, nv = _prototypes(1)
    pool = PrototypePool(4, 3, num_prototypes=3)
    pool.load_prototypes(pos, pv, neg, nv)
    gen = torch.Generator().manual_seed(2)
    feats, cams = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 3, 2, 3, generator=gen)
    labels = T([[1, 1, 0], [1, 0, 1]])
    crit = CPEWSLoss(pool, loss_weights={"pdl": 1.0, "ssl": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = crit(**_loss_inputs(feats, cams, labels))
    pad = PoolPrototypes(*(torch.cat([t, torch.zeros(3, 3 - t.shape[1], *t.shape[2:], dtype=t.dtype)], 1)
                           for t in (pos, pv, neg, nv)), None, None)
    torch.testing.assert_close(out.terms["pdl"], pdl_loss(feats, cams, labels, pad.pos, pad.pos_valid, pad.neg,
                                                          pad.neg_valid))
    torch.testing.assert_close(out.terms["ssl"], ssl_loss(feats, cams, labels, pad.pos, pad.pos_valid, pad.neg,
                                                          pad.neg_valid))
    assert out.terms["pdl"] > 0


def test_load_prototypes_filters_for_ssl():
    pos, pv, neg, nv = _prototypes()
    table = {"a": (0, 1), "b": (2,)}
    labels = torch.zeros(3, 3, 3, dtype=torch.bool)
    labels[0, 1, 1] = True  # class 0's second negative comes from an image with class 1 (same superclass)
    pool = PrototypePool(4, 3, num_prototypes=3, superclasses=table)
    pool.load_prototypes(pos, pv, neg, nv, labels)
    assert pool.suppression_mask().tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    keep = T([[True, True, False], [False, True, True], [True, False, False]])
    pool.load_prototypes(pos, pv, neg, nv, labels, keep)  # both filters apply
    assert pool.suppression_mask().tolist() == [[True, False, False], [False, True, True], [True, False, False]]
    assert pool.suppression_mask(suppress_singletons=False)[2].tolist() == [False] * 3
    # saved and restored with the pool; a pool saved without the filter loads with none
    fresh = PrototypePool(4, 3, num_prototypes=3, superclasses=table)
    fresh.load_state_dict(pool.state_dict())
    assert torch.equal(fresh.neg_filter, pool.neg_filter) and fresh.is_built
    old = {key: v for key, v in pool.state_dict().items() if key != "neg_filter"}
    fresh.load_state_dict(old)  # strict: no missing-key error
    assert fresh.neg_filter.all()
    # the pool's own build replaces the imported filter
    pool.update(torch.randn(2, 4, 4), torch.rand(2, 3, 2, 2), T([[1, 0, 0], [0, 1, 0]]),
                class_probs=torch.rand(2, 3))
    pool.finalize()
    assert pool.neg_filter.all()


def test_load_prototypes_validation():
    pos, pv, neg, nv = _prototypes()
    pool = PrototypePool(4, 3, num_prototypes=3)
    with pytest.raises(ShapeError, match="pos"):
        pool.load_prototypes(pos[:2], pv[:2], neg[:2], nv[:2])  # K
    with pytest.raises(ShapeError, match="pos"):
        pool.load_prototypes(pos[..., :3], pv, neg[..., :3], nv)  # D
    with pytest.raises(ShapeError, match="num_prototypes=2; build the pool with num_prototypes>=3"):
        PrototypePool(4, 3, num_prototypes=2).load_prototypes(pos, pv, neg, nv)
    with pytest.raises(ShapeError, match="pos_valid"):
        pool.load_prototypes(pos, pv.float(), neg, nv)
    with pytest.raises(ShapeError, match="neg_valid"):
        pool.load_prototypes(pos, pv, neg, nv[:, :2])
    with pytest.raises(ShapeError, match="neg_labels"):
        pool.load_prototypes(pos, pv, neg, nv, torch.zeros(3, 3, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match="neg_labels"):
        pool.load_prototypes(pos, pv, neg, nv, torch.full((3, 3, 3), 2))
    with pytest.raises(ShapeError, match="neg_keep"):
        pool.load_prototypes(pos, pv, neg, nv, None, torch.ones(3, 2, dtype=torch.bool))
    bad = pos.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="pos: valid prototypes must be finite"):
        pool.load_prototypes(bad, pv, neg, nv)
    assert not pool.is_built  # refused imports leave the pool alone


# ----------------------------------------------------------------------------- the official file


def _upload(gen, d=4):
    """A hand-built object in the official ``clusters.pth`` layout, K = 3 classes."""
    neg0, neg1 = torch.randn(2, d, generator=gen), torch.randn(3, d, generator=gen)
    return {
        "pos": [torch.randn(3, d, generator=gen), torch.Tensor([]), torch.randn(1, d, generator=gen)],
        "neg": [neg0, neg1, torch.Tensor([])],
        "neg_unshared": [neg0[1:2].clone(), neg1[[0, 2]].clone(), torch.Tensor([])],
    }


def test_upload_layout_maps_to_the_pool_layout():
    up = _upload(torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.save(up, buf)  # as the official code writes it, read back
    buf.seek(0)
    loaded = torch.load(buf)
    out = prototypes_from_cpews_upload(loaded)
    assert isinstance(out, PoolPrototypes) and out.neg_labels is None
    assert out.pos.shape == out.neg.shape == (3, 3, 4)
    assert out.pos_valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert out.neg_valid.tolist() == [[True, True, False], [True, True, True], [False] * 3]
    assert out.neg_keep is not None
    assert out.neg_keep.tolist() == [[False, True, False], [True, False, True], [False] * 3]
    assert torch.equal(out.pos[0], up["pos"][0]) and torch.equal(out.pos[2, 0], up["pos"][2][0])
    assert torch.equal(out.neg[1], up["neg"][1]) and out.neg[2].abs().sum() == 0
    # the builder's return value (a tuple), and a fixed slot count
    same = prototypes_from_cpews_upload((up["pos"], up["neg"], up["neg_unshared"]), num_prototypes=10)
    assert same.pos.shape == (3, 10, 4) and torch.equal(same.neg_keep[:, :3], out.neg_keep)
    pool = PrototypePool(4, 3, num_prototypes=10)
    pool.load_prototypes(*same)
    assert pool.is_built and torch.equal(pool.suppression_mask()[:, :3], out.neg_keep)


def test_upload_errors():
    up = _upload(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="missing \\['neg'\\]"):
        prototypes_from_cpews_upload({"pos": up["pos"]})
    with pytest.raises(TypeError, match="clusters"):
        prototypes_from_cpews_upload(torch.zeros(3))
    with pytest.raises(ShapeError, match="neg: 2 classes, 'pos' has 3"):
        prototypes_from_cpews_upload({**up, "neg": up["neg"][:2]})
    with pytest.raises(ShapeError, match="neg\\[1\\]: D=5, expected D=4"):
        prototypes_from_cpews_upload({**up, "neg": [up["neg"][0], torch.zeros(1, 5), torch.Tensor([])]})
    with pytest.raises(ValueError, match="neg_unshared\\[0\\]: row 0 is not among the rows of neg\\[0\\]"):
        prototypes_from_cpews_upload({**up, "neg_unshared": [torch.ones(1, 4), torch.Tensor([]), torch.Tensor([])]})
    with pytest.raises(ShapeError, match="a class has 3 prototypes, num_prototypes=2"):
        prototypes_from_cpews_upload(up, num_prototypes=2)
    with pytest.raises(ShapeError, match="every class is empty"):
        prototypes_from_cpews_upload({"pos": [torch.Tensor([])], "neg": [torch.Tensor([])]})


def _official_rc(x, cams, labels, pos, neg):
    """The official prototype discrimination loss (per image and class, as its script loops)."""
    pos_l, neg_l = [], []
    for b in range(x.shape[0]):
        feat = x[b].flatten(1)  # (D, N)
        norm = (cams[b].relu() / (cams[b].amax((1, 2), keepdim=True) + 1e-4) > 0.1).float().flatten(1)
        for c in range(labels.shape[1]):
            if cams[b, c].max() <= 0 or len(pos[c]) == 0 or len(neg[c]) == 0 or not labels[b, c]:
                continue
            r = (feat * norm[c][None]).sum(1) / (norm[c].sum() + 1e-5)

            def sim(a, p):
                return torch.exp(-(((a - p) ** 2 + 1e-4).mean(1).sqrt() / 13 + 0.1))

            pos_l.append(-torch.log(sim(r[None], pos[c].mean(0, keepdim=True))).squeeze())
            neg_l.append(-torch.log(1 - sim(r[None], neg[c]).max()))
    return torch.stack(pos_l).mean() + torch.stack(neg_l).mean()


def _closest(feat, protos):
    """Per token, the smallest mean squared difference to the prototypes (a large constant without)."""
    if len(protos) == 0:
        return torch.tensor([123456.0])
    return ((feat - protos[..., None]) ** 2).mean(1).min(0)[0]


def _official_pr(x, cams, labels, pos, unshared, *, with_empty_positives):
    """The official suppression rule: mean CAM value over the flagged tokens of present classes."""
    vals = []
    for b in range(x.shape[0]):
        feat = x[b].flatten(1)[None]  # (1, D, N)
        norm = (cams[b].relu() / (cams[b].amax((1, 2), keepdim=True) + 1e-4)).flatten(1)
        for c in range(labels.shape[1]):
            if not labels[b, c] or (len(pos[c]) == 0 and not with_empty_positives):
                continue

            flagged = (norm[c] > 0.1) & (_closest(feat, pos[c]) > _closest(feat, unshared[c]))
            vals.append(cams[b, c].flatten()[flagged])
    vals = torch.cat(vals)
    return vals.mean() if len(vals) else torch.tensor(0.0)


def test_upload_through_the_official_preset_matches_the_official_rules():
    gen = torch.Generator().manual_seed(3)
    d, grid = 4, (2, 3)
    up = _upload(gen, d)
    x = torch.randn(2, d, *grid, generator=gen)
    up["neg"][0][1] = x[0, :, 0, 0]  # a kept negative of class 0 that token 0 of image 0 matches exactly
    up["neg_unshared"][0][0] = x[0, :, 0, 0]
    cams = torch.rand(2, 3, *grid, generator=gen) * 2.0 + 0.05
    cams[0, 0, 0, 0] = 3.0
    labels = T([[1, 1, 0], [1, 1, 1]])
    norm = cams.relu() / cams.amax((2, 3), keepdim=True)
    assert ((norm - 0.1).abs() > 1e-3).all()  # no token sits on the activation threshold
    crit = CPEWSLoss.from_preset(d, 3, preset="official", superclasses={"a": (0, 1), "b": (2,)})
    crit.pool.load_prototypes(*prototypes_from_cpews_upload(up))
    tokens = x.flatten(2).transpose(1, 2)
    pdl = crit.pdl(tokens, cams, labels, crit.pool)
    ssl = crit.ssl(tokens, cams, labels, crit.pool)
    torch.testing.assert_close(pdl, _official_rc(x, cams, labels, up["pos"], up["neg"]), rtol=1e-4, atol=1e-6)
    expect = _official_pr(x, cams, labels, up["pos"], up["neg_unshared"], with_empty_positives=False)
    assert expect > 0
    torch.testing.assert_close(ssl, expect)
    # the documented difference: class 1 (present, no positives, kept negatives) is flagged
    # everywhere it is activated by the official code, left out here
    official = _official_pr(x, cams, labels, up["pos"], up["neg_unshared"], with_empty_positives=True)
    assert not torch.allclose(ssl, official)
    # the whole criterion reads the same pool
    out = crit(**_loss_inputs(tokens, cams, labels))
    assert out.terms["pdl"] == pdl and out.terms["ssl"] == ssl
