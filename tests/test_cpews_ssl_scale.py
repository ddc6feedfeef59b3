"""SSL ``cam_scale`` / ``denominator``: the paper's form and the alternatives."""

from __future__ import annotations

import pytest
import torch

from wsss_blocks.cpews import CPEWSLoss, SSLLoss, ssl_loss

PATHS = pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])


def _hand(scale: float = 1.0):
    feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
    cam = (torch.tensor([[[[2.0, 1.0, 0.1]]]]) * scale).requires_grad_()
    ok = torch.ones(1, 1, dtype=torch.bool)
    return feats, cam, torch.ones(1, 1), torch.tensor([[[1.0, 0.0]]]), ok, torch.tensor([[[0.0, 1.0]]]), ok


@PATHS
def test_max_scale_hand_built(compact):
    feats, cam, y, pos, pv, neg, nk = _hand()
    loss = ssl_loss(feats, cam, y, pos, pv, neg, nk, cam_scale="max", compact=compact)
    assert loss.item() == pytest.approx(2.0 / (2.0 + 1e-5))  # Phi = {token 0}, the peak itself
    loss.backward()
    assert cam.grad.flatten().tolist() == pytest.approx([1.0 / (2.0 + 1e-5), 0.0, 0.0])  # max detached
    # without the gate token 2 joins: (2 + 0.1) / 2 / max
    no_gate = ssl_loss(feats, cam, y, pos, pv, neg, nk, cam_scale="max", act_threshold=None, compact=compact)
    assert no_gate.item() == pytest.approx(2.1 / 2 / (2.0 + 1e-5))


@PATHS
def test_max_scale_is_invariant_to_the_cam_scale_and_raw_is_not(compact):
    vals = {}
    for s in (1.0, 10.0):
        feats, cam, y, pos, pv, neg, nk = _hand(s)
        for mode in ("raw", "max"):
            vals[mode, s] = ssl_loss(feats, cam, y, pos, pv, neg, nk, cam_scale=mode, compact=compact).item()
    assert vals["max", 1.0] == pytest.approx(vals["max", 10.0], rel=1e-4)
    assert vals["raw", 10.0] == pytest.approx(10 * vals["raw", 1.0])


def _oracle(feats, cam, labels, pos, pv, neg, nk, scale="max", denominator="phi"):
    vals, gate = [], 0
    for i in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            if labels[i, c] == 0 or not pv[c].any():
                continue
            m = cam[i, c].flatten().clamp_min(0)
            w = m / (m.max() + 1e-5)
            for n in range(feats.shape[1]):
                if not w[n] > 0.1:
                    continue
                gate += 1
                f = feats[i, n].double()
                dp = min(float(((f - pos[c, j].double()) ** 2).sum()) for j in range(pos.shape[1]) if pv[c, j])
                dns = [float(((f - neg[c, j].double()) ** 2).sum()) for j in range(neg.shape[1]) if nk[c, j]]
                if dns and min(dns) < dp:
                    vals.append(m[n] / (m.max().detach() + 1e-5) if scale == "max" else m[n])
    if not vals:
        return torch.zeros(())
    return torch.stack(vals).sum() / (len(vals) if denominator == "phi" else gate)


@PATHS
@pytest.mark.parametrize("scale,denominator", [("max", "phi"), ("raw", "gate"), ("max", "gate")])
def test_loop_oracle_values_and_gradients(compact, scale, denominator):
    gen = torch.Generator().manual_seed(3)
    b, k, n, d, m = 2, 3, 12, 4, 4
    feats = torch.randn(b, n, d, generator=gen)
    cam0 = torch.randn(b, k, 3, 4, generator=gen) * 3
    labels = (torch.rand(b, k, generator=gen) > 0.3).float()
    labels[:, 0] = 1.0
    pos, neg = torch.randn(k, m, d, generator=gen), torch.randn(k, m, d, generator=gen)
    pv, nk = torch.rand(k, m, generator=gen) > 0.2, torch.rand(k, m, generator=gen) > 0.2
    pv[:, 0] = True
    nk[:, 0] = True
    c1, c2 = cam0.clone().requires_grad_(), cam0.clone().requires_grad_()
    out = ssl_loss(feats, c1, labels, pos, pv, neg, nk, cam_scale=scale, denominator=denominator, compact=compact)
    ref = _oracle(feats, c2, labels, pos, pv, neg, nk, scale, denominator)
    assert ref.item() > 0
    assert out.item() == pytest.approx(ref.item(), abs=1e-6)
    out.backward()
    ref.backward()
    torch.testing.assert_close(c1.grad, c2.grad, atol=1e-6, rtol=1e-5)


@PATHS
def test_gate_denominator_hand_built(compact):
    feats, cam, y, pos, pv, neg, nk = _hand()
    # gate (activated: normalised [1, 0.5, 0.05] > 0.1) = tokens {0, 1}; Phi = {0}
    loss = ssl_loss(feats, cam, y, pos, pv, neg, nk, denominator="gate", compact=compact)
    assert loss.item() == pytest.approx(1.0)  # 2 / 2
    loss.backward()
    assert cam.grad.flatten().tolist() == pytest.approx([0.5, 0.0, 0.0])
    # Phi empty -> 0 with either denominator
    z = ssl_loss(feats, cam, y, pos, pv, neg, nk & False, denominator="gate", compact=compact)
    assert z.item() == 0.0


def test_module_and_preset_plumbing():
    assert (SSLLoss().cam_scale, SSLLoss().denominator) == ("raw", "phi")  # the paper's form
    with pytest.raises(ValueError, match="denominator"):
        SSLLoss(denominator="sum")
    with pytest.raises(ValueError, match="denominator"):
        ssl_loss(*_hand(), denominator="mean")
    assert "cam_scale='max'" in repr(SSLLoss(cam_scale="max"))
    with pytest.raises(ValueError, match="cam_scale"):
        SSLLoss(cam_scale="sigmoid")
    with pytest.raises(ValueError, match="cam_scale"):
        ssl_loss(*_hand(), cam_scale="l2")
    crit = CPEWSLoss.from_preset(4, 3, preset="paper", ssl={"cam_scale": "max"})
    assert crit.ssl.cam_scale == "max"


# ----------------------------------------------------------------------------- learned confusions
def _pool_with_sources():
    from wsss_blocks.cpews import PrototypePool

    pool = PrototypePool(2, 3, num_prototypes=2)  # no superclass table
    pool.neg_valid.fill_(True)
    pool.neg_valid[1, 1] = False
    t = torch.tensor
    pool.neg_labels[0, 0], pool.neg_labels[0, 1] = t([0, 1, 0]).bool(), t([0, 1, 1]).bool()  # both with 1
    pool.neg_labels[1, 0] = t([0, 0, 1]).bool()  # one valid negative, from 2
    pool.neg_labels[2, 0], pool.neg_labels[2, 1] = t([1, 0, 0]).bool(), t([0, 1, 0]).bool()  # 0 and 1: 50 % each
    return pool


def test_source_share_hand_built():
    pool = _pool_with_sources()
    assert pool.suppression_mask().tolist() == [[True, True], [True, False], [True, True]]
    # class 0: 1 is in 100 % of its sources -> both dropped (and with them the one that also had 2);
    # class 1: its only valid negative is from 2 (100 %) -> dropped; class 2: 0 and 1 at 50 % each
    assert pool.suppression_mask(source_share=0.5).tolist() == [[False, False], [False, False], [False, False]]
    assert pool.suppression_mask(source_share=0.6).tolist() == [[False, False], [False, False], [True, True]]
    with pytest.raises(ValueError, match="source_share"):
        pool.suppression_mask(source_share=0.0)


def test_source_share_loop_oracle():
    from wsss_blocks.cpews import PrototypePool

    gen = torch.Generator().manual_seed(5)
    k, m = 5, 6
    pool = PrototypePool(3, k, num_prototypes=m, superclasses={"a": (0, 1), "b": (2, 3, 4)})
    pool.neg_valid.copy_(torch.rand(k, m, generator=gen) > 0.3)
    pool.neg_labels.copy_((torch.rand(k, m, k, generator=gen) > 0.6) & pool.neg_valid[:, :, None])
    pool.neg_labels[torch.arange(k), :, torch.arange(k)] = False  # a negative never contains its class
    for s in (0.2, 0.5, 0.9):
        got = pool.suppression_mask(source_share=s)
        for c in range(k):
            n = int(pool.neg_valid[c].sum())
            conf = {j for j in range(k) if n and sum(bool(pool.neg_labels[c, i, j]) for i in range(m)
                                                     if pool.neg_valid[c, i]) / n >= s}
            sup = {j for j in range(k) if pool.superclass_of[j] == pool.superclass_of[c]}
            for i in range(m):
                src = {j for j in range(k) if pool.neg_labels[c, i, j]}
                want = bool(pool.neg_valid[c, i]) and not (src & (conf | sup))
                assert bool(got[c, i]) == want, (s, c, i)


def test_source_share_plumbing():
    pool = _pool_with_sources()
    pool.pos_valid.fill_(True)
    assert SSLLoss().source_share is None
    assert "source_share=0.5" in repr(SSLLoss(source_share=0.5))
    with pytest.raises(ValueError, match="source_share"):
        SSLLoss(source_share=1.5)
    feats, cam, y = torch.randn(1, 4, 2), torch.randn(1, 3, 2, 2), torch.ones(1, 3)
    # every negative dropped -> nothing suppressed
    assert SSLLoss(source_share=0.5, act_threshold=None)(feats, cam, y, pool).item() == 0.0
