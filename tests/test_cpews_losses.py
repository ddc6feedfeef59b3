"""CPEWS PDL, SSL and the combined loss."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch

from wsss_blocks import ShapeError
from wsss_blocks.cpews import (
    CPEWSHead,
    CPEWSLoss,
    ISMLoss,
    PDLLoss,
    PrototypePool,
    SSLLoss,
    ism_loss,
    pdl_loss,
    ssl_loss,
)
from wsss_blocks.outputs import LossOutput

PATHS = pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
OK2 = torch.ones(1, 2, dtype=torch.bool)
POS = torch.tensor([[[6.0, 0.0], [0.0, 8.0]]])
NEG = torch.tensor([[[0.0, 13.0], [26.0, 0.0]]])


def _origin_region():
    """features/cam whose region embedding is A = (0, 0) for the single class."""
    return torch.zeros(1, 1, 2, requires_grad=True), torch.ones(1, 1, 1, 1)


# ----------------------------------------------------------------------------- PDL
@PATHS
def test_pdl_closed_forms(compact):
    pdl = partial(pdl_loss, compact=compact)
    feats, cam = _origin_region()
    y = torch.ones(1, 1)
    l2 = pdl(feats, cam, y, POS, OK2, NEG, OK2)
    assert l2.item() == pytest.approx(5 / 13 - math.log(1 - math.exp(-1)), abs=1e-6)
    assert l2.item() == pytest.approx(0.843291, abs=1e-6)
    rms = pdl(feats, cam, y, POS, OK2, NEG, OK2, distance="rms", offset=0.1)
    assert rms.item() == pytest.approx(0.962821, abs=1e-6)
    # invalid prototypes are ignored: an invalid positive far away, an invalid nearer negative
    pos3 = torch.cat([POS, torch.full((1, 1, 2), 100.0)], 1)
    neg3 = torch.cat([NEG, torch.zeros(1, 1, 2)], 1)
    ok3 = torch.tensor([[True, True, False]])
    assert pdl(feats, cam, y, pos3, ok3, neg3, ok3).item() == pytest.approx(0.843291, abs=1e-6)


@PATHS
def test_pdl_negative_at_region(compact):
    pdl = partial(pdl_loss, compact=compact)
    feats, cam = _origin_region()
    y = torch.ones(1, 1)
    neg = torch.zeros(1, 2, 2)  # equal to A
    out = pdl(feats, cam, y, POS, OK2, neg, OK2)
    # d- = sqrt(1e-8) = 1e-4, so 1 - R- = 1 - exp(-1e-4 / 13) (above eps = 1e-6)
    assert out.item() == pytest.approx(5 / 13 - math.log(-math.expm1(-1e-4 / 13)), rel=1e-4)
    big_t = pdl(feats, cam, y, POS, OK2, neg, OK2, temperature=1e6)
    assert big_t.item() == pytest.approx(-math.log(1e-6), abs=1e-3)  # the eps floor, 13.8155
    out.backward()
    assert torch.isfinite(feats.grad).all()


def _pdl_oracle(feats, cam, labels, pos, pv, neg, nv, *, temperature=13.0, distance="l2",
                offset=0.0, threshold=None, valid=None, eps=1e-6):
    b, k = labels.shape
    terms = []
    for i in range(b):
        for c in range(k):
            if labels[i, c] == 0 or not pv[c].any() or not nv[c].any():
                continue
            m = cam[i, c].flatten().double().clamp_min(0)
            w = m / (m.max() + 1e-5)
            if threshold is not None:
                w = (w > threshold).double()
            if valid is not None:
                w = w * valid[i].flatten().double()
            if w.sum() <= 0:
                continue
            a = (w[:, None] * feats[i].double()).sum(0) / (w.sum() + 1e-5)

            def dist(u, v):
                if distance == "l2":
                    return torch.sqrt(((u - v) ** 2).sum() + 1e-8)
                return torch.sqrt(((u - v) ** 2).mean() + 1e-4)

            centre = pos[c][pv[c]].double().mean(0)
            dp = dist(a, centre)
            dn = min(dist(a, neg[c, j].double()) for j in range(neg.shape[1]) if nv[c, j])
            xp, xn = dp / temperature + offset, dn / temperature + offset
            terms.append(xp - torch.log(torch.clamp(1 - torch.exp(-xn), min=eps)))
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(terms).mean()


def _random_case(seed, b=2, k=3, n=6, d=4, m=3, grid=(2, 3)):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, n, d, generator=gen)
    cam = torch.randn(b, k, *grid, generator=gen)
    cam[0, 1] = -cam[0, 1].abs()  # empty region
    labels = (torch.rand(b, k, generator=gen) > 0.3).float()
    labels[0, 1] = 1.0
    pos = torch.randn(k, m, d, generator=gen)
    neg = torch.randn(k, m, d, generator=gen)
    pv = torch.rand(k, m, generator=gen) > 0.3
    nv = torch.rand(k, m, generator=gen) > 0.3
    pv[0] = False  # class 0: no positives -> skipped
    nv[1, 0] = True
    valid = torch.rand(b, *grid, generator=gen) > 0.2
    return feats, cam, labels, pos, pv, neg, nv, valid


@pytest.mark.parametrize(
    "kw",
    [{}, {"distance": "rms", "offset": 0.1, "threshold": 0.1}, {"temperature": 2.0},
     {"threshold": 0.5, "offset": 0.3}],
)
@PATHS
def test_pdl_loop_oracle(kw, compact):
    pdl = partial(pdl_loss, compact=compact)
    for seed in range(3):
        feats, cam, labels, pos, pv, neg, nv, valid = _random_case(seed)
        for v in (None, valid):
            out = pdl(feats, cam, labels, pos, pv, neg, nv, valid=v, **kw)
            ref = _pdl_oracle(feats, cam, labels, pos, pv, neg, nv, valid=v, **kw)
            assert out.dtype == torch.float32 and out.shape == ()
            assert out.item() == pytest.approx(ref.item(), abs=1e-5)


@PATHS
@pytest.mark.parametrize("distance", ["l2", "rms"])
def test_pdl_gradcheck(distance, compact):
    pdl = partial(pdl_loss, compact=compact)
    feats, cam, labels, pos, pv, neg, nv, valid = _random_case(4)
    f64 = feats.double().requires_grad_()
    args = (labels, pos.double(), pv, neg.double(), nv)
    assert torch.autograd.gradcheck(
        lambda f: pdl(f, cam.double(), *args, distance=distance, offset=0.1, valid=valid),
        (f64,),
    )


@PATHS
def test_pdl_no_grad_into_classifier_and_no_pairs(compact):
    pdl = partial(pdl_loss, compact=compact)
    torch.manual_seed(0)
    head = CPEWSHead(4, 2)
    tokens = torch.randn(2, 6, 4, requires_grad=True)
    out = head(tokens, tokens, (2, 3))
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pos, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ok = torch.ones(2, 3, dtype=torch.bool)
    loss = pdl(tokens, out.cams_final, labels, pos, ok, neg, ok)
    loss.backward()
    assert head.classifier_final.weight.grad is None
    assert tokens.grad.abs().sum() > 0
    # nothing eligible: graph-attached 0, zero grads, no NaN
    f = torch.randn(2, 6, 4, requires_grad=True)
    for lab, pv, nv in ((torch.zeros(2, 2), ok, ok), (labels, ok & False, ok), (labels, ok, ok & False)):
        z = pdl(f, out.cams_final.detach(), lab, pos, pv, neg, nv)
        assert z.item() == 0.0 and z.requires_grad
        (g,) = torch.autograd.grad(z, f)
        assert torch.equal(g, torch.zeros_like(g))


def test_pdl_bf16_module_and_validation():
    feats, cam, labels, pos, pv, neg, nv, valid = _random_case(5)
    ref = pdl_loss(feats, cam, labels, pos, pv, neg, nv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pdl_loss(feats.bfloat16(), cam.bfloat16(), labels, pos, pv, neg, nv)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), abs=2e-2)
    pool = PrototypePool(4, 3, num_prototypes=3)
    pool.pos.copy_(pos), pool.pos_valid.copy_(pv), pool.neg.copy_(neg), pool.neg_valid.copy_(nv)
    kw = {"distance": "rms", "offset": 0.1, "threshold": 0.1, "temperature": 5.0}
    torch.testing.assert_close(
        PDLLoss(**kw)(feats, cam, labels, pool, valid=valid),
        pdl_loss(feats, cam, labels, pos, pv, neg, nv, valid=valid, **kw),
    )
    with pytest.raises(ShapeError, match="labels"):
        pdl_loss(feats, cam, labels[:, :2], pos, pv, neg, nv)
    with pytest.raises(ShapeError, match="pos"):
        pdl_loss(feats, cam, labels, pos[:2], pv, neg, nv)
    with pytest.raises(ShapeError, match="pos_valid"):
        pdl_loss(feats, cam, labels, pos, pv.float(), neg, nv)
    with pytest.raises(ShapeError, match="neg"):
        pdl_loss(feats, cam, labels, pos, pv, neg[..., :3], nv)
    with pytest.raises(ShapeError, match="neg_valid"):
        pdl_loss(feats, cam, labels, pos, pv, neg, nv[:, :2])
    with pytest.raises(ShapeError, match="features"):
        pdl_loss(feats[:, :5], cam, labels, pos, pv, neg, nv)
    with pytest.raises(ShapeError, match="cams"):
        pdl_loss(feats, cam[:, :, 0], labels, pos, pv, neg, nv)
    with pytest.raises(ShapeError, match="valid"):
        pdl_loss(feats, cam, labels, pos, pv, neg, nv, valid=valid.float())
    with pytest.raises(ValueError, match="distance"):
        pdl_loss(feats, cam, labels, pos, pv, neg, nv, distance="l1")
    with pytest.raises(ValueError, match="temperature"):
        PDLLoss(temperature=0.0)


# ----------------------------------------------------------------------------- SSL
def _ssl_hand():
    feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
    cam = torch.tensor([[[[2.0, 1.0, 0.1]]]], requires_grad=True)
    ok = torch.ones(1, 1, dtype=torch.bool)
    return feats, cam, torch.ones(1, 1), torch.tensor([[[1.0, 0.0]]]), ok, torch.tensor([[[0.0, 1.0]]]), ok


@PATHS
def test_ssl_hand_built(compact):
    ssl = partial(ssl_loss, compact=compact)
    feats, cam, y, pos, pv, neg, nk = _ssl_hand()
    loss = ssl(feats, cam, y, pos, pv, neg, nk)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert cam.grad.flatten().tolist() == [1.0, 0.0, 0.0]
    # without the activation gate token 2 (closer to the negative) joins: (2 + 0.1) / 2
    assert ssl(feats, cam, y, pos, pv, neg, nk, act_threshold=None).item() == pytest.approx(1.05)
    # no kept negative / class absent / no positive -> never suppressed, graph-attached 0
    for args in ((y, pos, pv, neg, nk & False), (y * 0, pos, pv, neg, nk), (y, pos, pv & False, neg, nk)):
        z = ssl(feats, cam, *args)
        assert z.item() == 0.0 and z.requires_grad
    # a tie (equal distances) is not suppressed
    tie = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    assert ssl(tie, cam, y, pos, pv, neg, nk).item() == 0.0


@PATHS
def test_ssl_trains_final_classifier_and_tokens(compact):
    ssl = partial(ssl_loss, compact=compact)
    head = CPEWSHead(2, 1)
    with torch.no_grad():
        head.classifier_final.weight.copy_(torch.tensor([[1.0, 0.5]]))
    tokens = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]], requires_grad=True)
    out = head(tokens, tokens, (1, 3))
    _, _, y, pos, pv, neg, nk = _ssl_hand()
    loss = ssl(tokens, out.cams_final, y, pos, pv, neg, nk)
    assert loss.item() > 0
    loss.backward()
    assert head.classifier_final.weight.grad is not None
    assert head.classifier_final.weight.grad.abs().sum() > 0
    assert tokens.grad.abs().sum() > 0
    assert head.classifier_mid.weight.grad is None


def _ssl_oracle(feats, cam, labels, pos, pv, neg, nk, act_threshold, activation, valid):
    b, k = labels.shape
    vals = []
    for i in range(b):
        for c in range(k):
            if labels[i, c] == 0 or not pv[c].any():
                continue
            m = cam[i, c].flatten().clamp_min(0)
            w = m / (m.max() + 1e-5)
            for n in range(feats.shape[1]):
                if act_threshold is not None and not w[n] > act_threshold:
                    continue
                if valid is not None and not valid[i].flatten()[n]:
                    continue
                f = feats[i, n].double()
                dp = min(float(((f - pos[c, j].double()) ** 2).sum()) for j in range(pos.shape[1]) if pv[c, j])
                dns = [float(((f - neg[c, j].double()) ** 2).sum()) for j in range(neg.shape[1]) if nk[c, j]]
                if dns and min(dns) < dp:
                    x = cam[i, c].flatten()[n]
                    vals.append(x.clamp_min(0) if activation == "relu" else x)
    return torch.stack(vals).mean() if vals else torch.zeros(())


@PATHS
@pytest.mark.parametrize("act_threshold,activation", [(0.1, "relu"), (None, "relu"), (None, "none"), (0.5, "none")])
def test_ssl_loop_oracle(act_threshold, activation, compact):
    ssl = partial(ssl_loss, compact=compact)
    for seed in range(3):
        feats, cam, labels, pos, pv, neg, nk, valid = _random_case(10 + seed, n=12, grid=(3, 4), m=4)
        for v in (None, valid):
            out = ssl(feats, cam, labels, pos, pv, neg, nk, act_threshold=act_threshold,
                      cam_activation=activation, valid=v)
            ref = _ssl_oracle(feats, cam, labels, pos, pv, neg, nk, act_threshold, activation, v)
            assert out.item() == pytest.approx(float(ref), abs=1e-5)


@PATHS
def test_ssl_gradcheck_bf16_module_validation(compact):
    ssl = partial(ssl_loss, compact=compact)
    feats, cam, labels, pos, pv, neg, nk, valid = _random_case(20, n=12, grid=(3, 4), m=4)
    c64 = cam.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c: ssl(feats.double(), c, labels, pos.double(), pv, neg.double(), nk,
                      act_threshold=None, cam_activation="none"),
        (c64,),
    )
    ref = ssl(feats, cam, labels, pos, pv, neg, nk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ssl(feats.bfloat16(), cam.bfloat16(), labels, pos, pv, neg, nk)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), abs=5e-2)
    pool = PrototypePool(4, 3, num_prototypes=4, superclasses={"a": (0, 1), "b": (2,)})
    pool.pos.copy_(pos), pool.pos_valid.copy_(pv), pool.neg.copy_(neg), pool.neg_valid.copy_(nk)
    pool.neg_labels[1, :, 0] = True  # class 1's negatives all come from images with class 0
    for single in (True, False):
        keep = pool.suppression_mask(suppress_singletons=single)
        assert not keep[1].any() and (keep[2].any() == single)
        torch.testing.assert_close(
            SSLLoss(suppress_singletons=single, act_threshold=None, compact=compact)(
                feats, cam, labels, pool),
            ssl(feats, cam, labels, pos, pv, neg, keep, act_threshold=None),
        )
    with pytest.raises(ShapeError, match="neg_keep"):
        ssl(feats, cam, labels, pos, pv, neg, nk.float())
    with pytest.raises(ShapeError, match="pos"):
        ssl(feats, cam, labels, pos[:, :, :2], pv, neg, nk)
    with pytest.raises(ShapeError, match="features"):
        ssl(feats[:, :5], cam, labels, pos, pv, neg, nk)
    with pytest.raises(ShapeError, match="valid"):
        ssl(feats, cam, labels, pos, pv, neg, nk, valid=valid[:1])
    with pytest.raises(ValueError, match="cam_activation"):
        ssl(feats, cam, labels, pos, pv, neg, nk, cam_activation="sigmoid")
    with pytest.raises(ValueError, match="act_threshold"):
        SSLLoss(act_threshold=1.5)


# ----------------------------------------------------------------------------- dense == compact
def _edge_cases():
    """(name, case) pairs: random inputs and the edge cases of the compact path."""
    feats, cam, labels, pos, pv, neg, nv, valid = _random_case(34, b=3, k=5, n=12, grid=(3, 4), m=4)
    labels[:, 2] = 1.0
    cases = [("random", (feats, cam, labels, pos, pv, neg, nv, valid))]
    for b, ks in ((1, slice(None)), (3, slice(2, 3)), (1, slice(2, 3))):  # B=1, K=1, both
        name = f"b{b}_k{len(range(5)[ks])}"
        cases.append((name, (feats[:b], cam[:b, ks], labels[:b, ks], pos[ks], pv[ks], neg[ks],
                             nv[ks], valid[:b])))
    cases.append(("no_present_class", (feats, cam, labels * 0, pos, pv, neg, nv, valid)))
    cases.append(("all_invalid", (feats, cam, labels, pos, pv, neg, nv, valid & False)))
    nv_none = nv.clone()
    nv_none[2:] = False  # classes 2..4 keep no negative
    cases.append(("no_kept_negatives", (feats, cam, labels, pos, pv, neg, nv_none, valid)))
    one = labels * 0
    one[1, 3] = 1.0  # a single present pair; other images have none (S = 1, padded slots)
    cases.append(("one_pair", (feats, cam, one, pos, pv, neg, nv, valid)))
    return cases


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("name,case", EDGE_CASES, ids=[n for n, _ in EDGE_CASES])
def test_dense_equals_compact(name, case):
    feats, cam, labels, pos, pv, neg, nv, valid = case
    results = {}
    for compact in (False, True):
        f = feats.clone().requires_grad_()
        c = (cam * 2.0).detach().requires_grad_()  # more tokens above the activation gate
        for v in (None, valid):
            pdl = pdl_loss(f, c, labels, pos, pv, neg, nv, valid=v, threshold=0.2,
                           compact=compact)
            ssl = ssl_loss(f, c, labels, pos, pv, neg, nv, valid=v, compact=compact)
            ssl_all = ssl_loss(f, c, labels, pos, pv, neg, nv, valid=v, act_threshold=None,
                               cam_activation="none", compact=compact)
            total = pdl + ssl + ssl_all
            gf, gc = torch.autograd.grad(total, (f, c), allow_unused=True)
            results.setdefault(compact, []).append((pdl, ssl, ssl_all, gf, gc))
            assert total.requires_grad and torch.isfinite(total)
    for dense, comp in zip(results[False], results[True], strict=True):
        for a, b in zip(dense, comp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if name in ("no_present_class", "all_invalid"):
        pdl, ssl, ssl_all, gf, gc = results[True][1]
        assert ssl.item() == 0.0 and ssl_all.item() == 0.0
        assert torch.equal(gc, torch.zeros_like(gc))
    else:
        assert any(r[1].item() > 0 for r in results[True])  # SSL is not trivially 0 here


def test_dense_equals_compact_through_head():
    torch.manual_seed(3)
    grads = []
    for compact in (False, True):
        torch.manual_seed(3)
        head = CPEWSHead(8, 6)
        tokens = torch.randn(3, 20, 8, requires_grad=True)
        out = head(tokens, tokens, (4, 5))
        labels = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
        gen = torch.Generator().manual_seed(0)
        pos, neg = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 8, generator=gen)
        ok = torch.ones(6, 3, dtype=torch.bool)
        loss = (pdl_loss(tokens, out.cams_final, labels, pos, ok, neg, ok, compact=compact)
                + ssl_loss(tokens, out.cams_final, labels, pos, ok, neg, ok, act_threshold=None,
                           compact=compact))
        loss.backward()
        grads.append((loss.detach(), tokens.grad, head.classifier_final.weight.grad))
    assert grads[0][2].abs().sum() > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_compact_selection():
    from wsss_blocks.cpews._slots import class_slots as _class_slots

    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    slots = _class_slots(labels, None)  # CPU tensors -> compact
    assert slots.shape == (2, 2)
    assert set(slots[0].tolist()) == {0, 2} and slots[1, 0].item() == 3
    assert _class_slots(labels, False) is None
    assert _class_slots(labels.to("meta"), None) is None  # not CPU -> dense, no host read
    assert _class_slots(labels * 0, True).shape == (2, 0)
    assert "compact=True" in repr(SSLLoss(compact=True)) and "compact=None" in repr(PDLLoss())
    feats, cam, labels, pos, pv, neg, nv, valid = _random_case(40)
    pool = PrototypePool(4, 3, num_prototypes=3)
    pool.pos.copy_(pos), pool.pos_valid.copy_(pv), pool.neg.copy_(neg), pool.neg_valid.copy_(nv)
    for compact in (None, False, True):
        torch.testing.assert_close(
            PDLLoss(compact=compact)(feats, cam, labels, pool),
            pdl_loss(feats, cam, labels, pos, pv, neg, nv, compact=not compact),
        )
        torch.testing.assert_close(
            SSLLoss(compact=compact, act_threshold=None)(feats, cam, labels, pool),
            ssl_loss(feats, cam, labels, pos, pv, neg, pool.suppression_mask(),
                     act_threshold=None, compact=not compact),
        )


# ----------------------------------------------------------------------------- CPEWSLoss
def _loss_inputs(seed=0, b=2, k=3, grid=(2, 3), d=4):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tokens = torch.randn(b, n, d, generator=gen, requires_grad=True)
    head = CPEWSHead(d, k)
    out = head(tokens, tokens, grid)
    token_labels = torch.randint(0, k + 1, (b, *grid), generator=gen)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    return head, tokens, {
        "logits_mid": out.logits_mid, "logits_final": out.logits_final, "features_final": tokens,
        "cams_final": out.cams_final, "masks_mid": token_labels, "labels": labels,
    }


def _built_pool(seed=1, k=3, d=4, **kw):
    gen = torch.Generator().manual_seed(seed)
    pool = PrototypePool(d, k, num_prototypes=2, score="cam_mean", **kw)
    pool.update(torch.randn(8, 6, d, generator=gen), torch.randn(8, k, 2, 3, generator=gen),
                (torch.rand(8, k, generator=gen) > 0.5).float())
    pool.finalize()
    return pool


TERMS = ["cls_mid", "cls_final", "ism", "pdl", "ssl"]


def test_cpews_loss_total_is_weighted_sum():
    pool = _built_pool()
    head, tokens, inp = _loss_inputs()
    crit = CPEWSLoss(pool, loss_weights={"ism": 0.5, "pdl": 2.0, "ssl": 3.0})
    out = crit(**inp)
    assert isinstance(out, LossOutput) and list(out.terms) == TERMS
    assert out.weights == {"cls_mid": 1.0, "cls_final": 1.0, "ism": 0.5, "pdl": 2.0, "ssl": 3.0}
    t = out.terms
    fn = torch.nn.functional.multilabel_soft_margin_loss
    torch.testing.assert_close(t["cls_mid"], fn(inp["logits_mid"], inp["labels"].float()))
    torch.testing.assert_close(t["cls_final"], fn(inp["logits_final"], inp["labels"].float()))
    torch.testing.assert_close(t["ism"], ism_loss(tokens, inp["masks_mid"]))
    torch.testing.assert_close(t["pdl"], pdl_loss(
        tokens, inp["cams_final"], inp["labels"], pool.pos, pool.pos_valid, pool.neg, pool.neg_valid))
    torch.testing.assert_close(t["ssl"], ssl_loss(
        tokens, inp["cams_final"], inp["labels"], pool.pos, pool.pos_valid, pool.neg,
        pool.suppression_mask()))
    want = t["cls_mid"] + t["cls_final"] + 0.5 * t["ism"] + 2.0 * t["pdl"] + 3.0 * t["ssl"]
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.loss, sum(out.weights[k] * v for k, v in t.items()))
    out.loss.backward()
    assert head.classifier_final.weight.grad is not None and tokens.grad is not None
    assert "pool.pos" in crit.state_dict() and "pool.built" in crit.state_dict()


def test_cpews_loss_presets():
    pool = PrototypePool(4, 3)
    paper = CPEWSLoss(pool)
    assert paper.loss_weights == {"ism": 0.12, "pdl": 1.5e-4, "ssl": 0.2}
    assert paper.pdl.distance == "l2" and paper.pdl.offset == 0.0 and paper.pdl.threshold is None
    assert paper.ssl.suppress_singletons is True
    off = CPEWSLoss(pool, preset="official")
    assert off.loss_weights == {"ism": 0.2, "pdl": 0.12, "ssl": 1.5e-4}
    assert (off.pdl.distance, off.pdl.offset, off.pdl.threshold) == ("rms", 0.1, 0.1)
    assert off.ssl.suppress_singletons is False
    custom = CPEWSLoss(pool, preset="official", pdl=PDLLoss(), ism=ISMLoss(abs_cos=False))
    assert custom.pdl.distance == "l2" and custom.ism.abs_cos is False
    with pytest.raises(ValueError, match="preset"):
        CPEWSLoss(pool, preset="fast")
    with pytest.raises(ValueError, match="loss_weights: expected None or a mapping"):
        CPEWSLoss(pool, loss_weights="official")
    with pytest.raises(ValueError, match=r"loss_weights: unknown keys \['cls'\]"):
        CPEWSLoss(pool, loss_weights={"cls": 1.0})
    with pytest.raises(ValueError, match="loss_weights"):
        CPEWSLoss(pool, loss_weights={"ism": 1.0, "pdl": -1.0, "ssl": 0.0})
    with pytest.raises(TypeError, match="pool"):
        CPEWSLoss(None)


def test_cpews_loss_weights_override_only_the_weights():
    pool = _built_pool()
    crit = CPEWSLoss(pool, preset="official", loss_weights={"ssl": 0.5})
    assert crit.loss_weights == {"ism": 0.2, "pdl": 0.12, "ssl": 0.5}
    # the preset's sub-loss settings survive a weight override (they used to be dropped)
    assert (crit.pdl.distance, crit.pdl.offset, crit.pdl.threshold) == ("rms", 0.1, 0.1)
    assert crit.ssl.suppress_singletons is False
    out = crit(**_loss_inputs()[2])
    assert out.weights == {"cls_mid": 1.0, "cls_final": 1.0, "ism": 0.2, "pdl": 0.12, "ssl": 0.5}


def test_cpews_loss_from_preset_builds_pool_and_losses():
    crit = CPEWSLoss.from_preset(4, 3, preset="official", loss_weights={"ism": 0.3},
                                 superclasses={"a": (0, 1), "b": (2,)},
                                 pool={"num_prototypes": 2, "capacity": 16},
                                 pdl={"temperature": 5.0}, warn_unbuilt=False)
    assert crit.loss_weights == {"ism": 0.3, "pdl": 0.12, "ssl": 1.5e-4}
    assert (crit.pool.in_dim, crit.pool.num_classes) == (4, 3)
    assert (crit.pool.num_prototypes, crit.pool.capacity) == (2, 16)
    assert (crit.pool.score, crit.pool.threshold) == ("cam_mean", 0.1)  # official pool
    assert (crit.pdl.temperature, crit.pdl.distance, crit.pdl.offset) == (5.0, "rms", 0.1)
    assert crit.pool.superclass_of.tolist() == [0, 0, 1]
    assert crit.warn_unbuilt is False and crit.pdl.warn_unbuilt is False and crit.ssl.warn_unbuilt is False
    with pytest.raises(TypeError):
        CPEWSLoss.from_preset(4, 3, preset="paper", pool={"no_such_option": 1})


def test_cpews_loss_follows_fp64_inputs():
    pool = _built_pool()
    head, tokens, inp = _loss_inputs()
    inp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    inp64["features_final"] = tokens.detach().double().requires_grad_()
    out = CPEWSLoss(pool)(**inp64)
    for key in ("cls_mid", "cls_final", "ism"):
        assert out.terms[key].dtype == torch.float64, key
    assert out.loss.dtype == torch.float64


def test_cpews_loss_unbuilt_pool_and_zero_weights():
    crit = CPEWSLoss(PrototypePool(4, 3))
    quiet = CPEWSLoss(PrototypePool(4, 3), warn_unbuilt=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            _, _, inp = _loss_inputs()
            out = crit(**inp)
            assert out.terms["pdl"].item() == 0.0 and out.terms["ssl"].item() == 0.0
            assert out.terms["pdl"].requires_grad and out.terms["ssl"].requires_grad
            out.loss.backward()
            quiet(**_loss_inputs()[2])
    assert sum("not built" in str(w.message) for w in rec) == 1
    pool = _built_pool()
    crit0 = CPEWSLoss(pool, loss_weights={"ism": 0.0, "pdl": 0.0, "ssl": 1.0})
    _, _, inp = _loss_inputs()
    out = crit0(**inp)
    assert out.terms["ism"].item() == 0.0 and not out.terms["ism"].requires_grad
    assert out.terms["pdl"].item() == 0.0 and not out.terms["pdl"].requires_grad
    torch.testing.assert_close(out.loss, out.terms["cls_mid"] + out.terms["cls_final"] + out.terms["ssl"])
    with pytest.raises(ShapeError, match="pool"):
        CPEWSLoss(PrototypePool(4, 4))(**inp)
    with pytest.raises(ShapeError, match="logits_mid"):
        crit0(**{**inp, "logits_mid": inp["logits_mid"][:, :2]})
    with pytest.raises(ShapeError, match="labels"):
        crit0(**{**inp, "labels": inp["labels"] * 2})


def test_cpews_loss_one_warning_whichever_sub_loss_reads_the_pool():
    """Sub-losses that warn on their own (user modules, default warn_unbuilt) add no warning."""
    for weights in ({"pdl": 1.0, "ssl": 0.0}, {"pdl": 0.0, "ssl": 1.0}, {}):
        crit = CPEWSLoss(PrototypePool(4, 3), loss_weights=weights, pdl=PDLLoss(), ssl=SSLLoss())
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(3):
                crit(**_loss_inputs()[2])
        assert sum("not built" in str(w.message) for w in rec) == 1, weights
    crit = CPEWSLoss.from_preset(4, 3, preset="paper", loss_weights={"ism": 0.0, "pdl": 0.0, "ssl": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reads the pool: nothing to warn about
        crit(**_loss_inputs()[2])


@pytest.mark.parametrize("cls", [PDLLoss, SSLLoss])
def test_sub_loss_unbuilt_pool_is_a_graph_zero_with_one_warning(cls):
    feats, cam, labels, *_ = _random_case(6)
    f, c = feats.clone().requires_grad_(), cam.clone().requires_grad_()
    loss = cls()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            z = loss(f, c, labels, PrototypePool(4, 3))
            assert z.item() == 0.0 and z.requires_grad and z.dtype == torch.float32
            gf, gc = torch.autograd.grad(z, (f, c))
            assert not gf.any() and not gc.any()
        cls(warn_unbuilt=False)(f, c, labels, PrototypePool(4, 3))
    assert [cls.__name__ in str(w.message) and "not built" in str(w.message) for w in rec] == [True]
    assert "warn_unbuilt=False" in repr(cls(warn_unbuilt=False))


def test_pool_filled_by_hand_or_loaded_counts_as_built():
    feats, cam, labels, pos, pv, neg, nv, _ = _random_case(7)
    pool = PrototypePool(4, 3, num_prototypes=3)
    assert not pool.is_built
    pool.pos.copy_(pos), pool.pos_valid.copy_(pv), pool.neg.copy_(neg), pool.neg_valid.copy_(nv)
    assert pool.is_built  # in-place edits of the buffers are seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(PDLLoss()(feats, cam, labels, pool),
                                   pdl_loss(feats, cam, labels, pos, pv, neg, nv))
    fresh = PrototypePool(4, 3, num_prototypes=3)
    assert not fresh.is_built
    fresh.load_state_dict(pool.state_dict())
    assert fresh.is_built and not bool(fresh.built)  # valid prototypes, never finalized here
    pool.pos_valid.zero_(), pool.neg_valid.zero_()
    assert not pool.is_built


def test_cpews_loss_bf16_autocast():
    pool = _built_pool()
    crit = CPEWSLoss(pool, loss_weights={"ism": 1.0, "pdl": 1.0, "ssl": 1.0})
    head, tokens, inp = _loss_inputs()
    ref = crit(**inp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(tokens, tokens, (2, 3))
        res = crit(**{**inp, "logits_mid": out.logits_mid, "logits_final": out.logits_final,
                      "cams_final": out.cams_final})
    pairs = [("loss", res.loss, ref.loss)] + [(k, res.terms[k], ref.terms[k]) for k in ref.terms]
    for key, got, want in pairs:
        assert torch.isfinite(got) and got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=0.03, abs=0.01), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync():
    dev = torch.device("cuda")
    pool = PrototypePool(4, 3, num_prototypes=2, superclasses={"a": (0, 1), "b": (2,)}, device=dev)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 6, 4, generator=gen).to(dev)
    cams = torch.randn(4, 3, 2, 3, generator=gen).to(dev)
    labels = (torch.rand(4, 3, generator=gen) > 0.5).float().to(dev)
    probs = torch.rand(4, 3, generator=gen).to(dev)
    valid = torch.ones(4, 2, 3, dtype=torch.bool, device=dev)
    head = CPEWSHead(4, 3, device=dev)
    tokens = feats.clone().requires_grad_()
    token_labels = torch.randint(0, 4, (4, 2, 3), generator=gen).to(dev)
    crit = CPEWSLoss(pool)
    torch.cuda.set_sync_debug_mode("error")
    try:
        pool.update(feats, cams, labels, class_probs=probs, valid=valid)
        torch.cuda.set_sync_debug_mode(0)
        pool.finalize()  # one deliberate sync (empty-pool warning check)
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(2):  # is_built is read from the buffers without a sync per step
            out = head(tokens, tokens, (2, 3))
            res = crit(logits_mid=out.logits_mid, logits_final=out.logits_final, features_final=tokens,
                       cams_final=out.cams_final, masks_mid=token_labels, labels=labels, valid=valid)
            res.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(res.loss).item()
