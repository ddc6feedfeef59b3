"""CPAL: hand-built values, loop oracles, the state protocol, schedule, resume, edge cases, errors."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from _runtime_helpers import no_host_sync, run_gloo
from oracles.cpal import cpal_loop

from wsss_blocks import ShapeError
from wsss_blocks.cpal import (
    CPAL,
    alignment_shift,
    context_prototypes,
    cpal_forward,
    instance_prototypes,
    neighbor_weights,
    pacam,
    positiveness,
    self_loss,
    soft_neighbors,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_case(seed: int = 0, b: int = 3, k: int = 3, p: int = 5, h: int = 3, w: int = 4, m: int = 6):
    """Random inputs with an absent class, an empty mask, a class without context and m_n < T."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, p, h, w, generator=gen, dtype=torch.float64)
    cams = torch.rand(b, k, h, w, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]])[:b, :k]
    cams[1, 1] = 0.05  # present class 2 of image 1: empty mask (everything <= threshold)
    context = torch.randn(k + 1, m, p, generator=gen, dtype=torch.float64)
    context_valid = torch.ones(k + 1, m, dtype=torch.bool)
    context_valid[2] = False  # class index 2 (label column 1): no context
    context_valid[3, 2:] = False  # class index 3: two prototypes only (< T)
    return z, cams, labels, context, context_valid


# ----------------------------------------------------------------------------- 1. background


def test_background_by_hand():
    cams = torch.tensor([[[[0.2, 0.9], [0.0, 0.5]], [[0.7, 0.1], [0.3, 0.3]]]])
    out = cpal_forward(torch.randn(1, 4, 2, 2), cams, torch.tensor([[1, 0]]), torch.zeros(3, 2, 4),
                       torch.zeros(3, 2, dtype=torch.bool), top_k=1)
    m = out.cams_with_bg
    torch.testing.assert_close(m[0, 0], 1.0 - cams[0, 0])
    torch.testing.assert_close(m[0, 1], cams[0, 0])
    assert torch.equal(m[0, 2], torch.zeros(2, 2))


# ----------------------------------------------------------------------------- 2. instance prototypes


def test_instance_prototypes_hand_built():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]).view(1, 2, 2, 2)
    cams = torch.tensor([[0.9, 0.8, 0.05, 0.0], [0.2, 0.05, 0.5, 0.0], [0.9, 0.9, 0.9, 0.9]]).view(1, 3, 2, 2)
    protos, valid = instance_prototypes(z, cams, torch.tensor([[1, 0]]))
    torch.testing.assert_close(protos[0, 0], torch.tensor([1.5, 0.0]))  # pixels 0, 1
    torch.testing.assert_close(protos[0, 1], torch.tensor([2.0, 1.0]))  # pixels 0, 2
    assert torch.equal(protos[0, 2], torch.zeros(2))  # absent class
    assert valid.tolist() == [[True, True, False]]
    # bg_threshold is used for channel 0 only
    protos, valid = instance_prototypes(z, cams, torch.tensor([[1, 0]]), bg_threshold=0.85)
    torch.testing.assert_close(protos[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(protos[0, 1], torch.tensor([2.0, 1.0]))
    # empty mask: present but nothing above the threshold
    protos, valid = instance_prototypes(z, cams * 0.01, torch.tensor([[1, 1]]))
    assert not valid.any() and torch.equal(protos, torch.zeros_like(protos))


def test_instance_prototypes_loop_oracle_and_gradcheck():
    z, cams, labels, *_ = _random_case(1)
    from wsss_blocks.cam import add_background

    maps = add_background(cams, labels)
    protos, valid = instance_prototypes(z, maps, labels, threshold=0.3, bg_threshold=0.6)
    for b in range(z.shape[0]):
        for c in range(maps.shape[1]):
            present = c == 0 or bool(labels[b, c - 1])
            thr = 0.6 if c == 0 else 0.3
            pix = (maps[b, c].flatten() > thr) & present
            if pix.any():
                torch.testing.assert_close(protos[b, c], z[b].flatten(1)[:, pix].mean(1))
            else:
                assert not valid[b, c] and not protos[b, c].any()
    zz = z[:1, :, :2, :2].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: instance_prototypes(t, maps[:1, :, :2, :2], labels[:1])[0], (zz,))


# ----------------------------------------------------------------------------- 3. bank through the module


def test_bank_matches_deque_oracle_and_drops_invalid_rows():
    cpal = CPAL(2, 2, projection=False, capacity=3, num_prototypes=1, top_k=1, warmup_reclusters=False)
    fifo = [deque(maxlen=3) for _ in range(3)]
    seen = [0, 0, 0]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        b = [5, 1, 2, 4, 3, 1][step]
        items = torch.randn(b, 3, 2, generator=gen)
        valid = torch.rand(b, 3, generator=gen) > 0.4
        if step == 0:
            valid[:, 1] = True  # five rows of one class in one update: the last three stay
        cpal.update(items, valid)
        for c in range(3):
            for r in range(b):
                if valid[r, c]:
                    fifo[c].append(items[r, c])
                    seen[c] += 1
        for c in range(3):
            count = min(seen[c], 3)
            assert int(cpal.bank.count[c]) == count and int(cpal.bank.ptr[c]) == seen[c] % 3
            stored = [cpal.bank.memory[c, (seen[c] - count + i) % 3] for i in range(count)]
            for got, want in zip(stored, fifo[c], strict=True):
                assert torch.equal(got, want)
            assert not cpal.bank.memory[c, count:].any() or count == 3  # never written
    assert int(cpal.num_steps) == 6 and int(cpal.num_reclusters) == 0


# ----------------------------------------------------------------------------- 4. context prototypes


def test_context_prototypes_few_entries_and_empty():
    memory = torch.randn(3, 6, 4)
    ctx, ok = context_prototypes(memory, torch.tensor([2, 0, 6]), num_prototypes=4, num_iters=3)
    assert torch.equal(ctx[0, :2], memory[0, :2]) and ok[0].tolist() == [True, True, False, False]
    assert not ok[1].any() and not ctx[1].any()
    assert ok[2].all()
    assert ctx.requires_grad is False


@pytest.mark.parametrize("seed", range(5))
def test_context_prototypes_separated_blobs(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    means = torch.tensor([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    pts = (means[:, None, :] + 0.1 * torch.randn(3, 20, 2, generator=gen)).reshape(60, 2)
    pts = pts[torch.randperm(60, generator=gen)]
    memory = torch.cat([pts, torch.zeros(20, 2)])[None]  # 60 filled slots of 80
    ctx, ok = context_prototypes(memory, torch.tensor([60]), num_prototypes=3, seed=seed)
    assert ok.all()
    for mu in means:
        members = pts[(pts - mu).norm(dim=1) < 5]
        nearest = ctx[0][(ctx[0] - mu).norm(dim=1).argmin()]
        torch.testing.assert_close(nearest, members.mean(0), atol=1e-4, rtol=0)
    again = context_prototypes(memory, torch.tensor([60]), num_prototypes=3, seed=seed)
    assert torch.equal(again[0], ctx)


# ----------------------------------------------------------------------------- 5. alignment


def test_alignment_shift_hand_built():
    anchors = torch.tensor([[[0.0, 2.0]], [[0.0, 4.0]]], requires_grad=True)
    context = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]], requires_grad=True)
    ok_a, ok_c = torch.ones(2, 1, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    delta = alignment_shift(anchors, ok_a, context, ok_c)
    assert delta.tolist() == [[2.0, -3.0]] and delta.requires_grad is False
    shifted = anchors.detach() + delta[None]
    torch.testing.assert_close(shifted.mean(0), context.detach().mean(1))
    one = alignment_shift(anchors, torch.tensor([[True], [False]]), context, ok_c)
    torch.testing.assert_close(anchors.detach()[0] + one, context.detach().mean(1))  # Q_n = 1: the mean
    assert not alignment_shift(anchors, torch.zeros(2, 1, dtype=torch.bool), context, ok_c).any()
    assert not alignment_shift(anchors, ok_a, context, torch.zeros(1, 2, dtype=torch.bool)).any()


# ----------------------------------------------------------------------------- 6. soft neighbours


def test_soft_neighbors_by_angle_and_scale_invariant():
    angles = torch.tensor([0.0, 30.0, 60.0, 180.0]) * math.pi / 180
    norms = torch.tensor([0.3, 7.0, 2.0, 11.0])
    context = (torch.stack([angles.cos(), angles.sin()], 1) * norms[:, None])[None]
    anchors = torch.tensor([[[1.0, 0.0]]])
    ok = torch.ones(1, 4, dtype=torch.bool)
    idx, sel = soft_neighbors(anchors, context, ok, top_k=2)
    assert sorted(idx.flatten().tolist()) == [0, 1] and sel.all()
    scale = torch.tensor([5.0, 0.1, 3.0, 0.5])[None, :, None]
    assert torch.equal(soft_neighbors(anchors, context * scale, ok, top_k=2)[0], idx)
    # an invalid entry is never picked while enough valid ones exist
    ok2 = torch.tensor([[False, True, True, True]])
    idx2, sel2 = soft_neighbors(anchors, context, ok2, top_k=3)
    assert 0 not in idx2.flatten().tolist() and sel2.all()
    idx3, sel3 = soft_neighbors(anchors, context, ok2, top_k=4)
    assert sel3.sum() == 3 and not sel3[0, 0, -1] and idx3[0, 0, -1] == 0


# ----------------------------------------------------------------------------- 7. positiveness / weights


def test_positiveness_hand_checked_scores():
    a = torch.tensor([[[1.0, 0.0]]])
    ctx = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    ok = torch.ones(1, 2, dtype=torch.bool)
    e = math.e
    cases = {
        "dot": [e**2, 1.0],
        "cosine": [e, 1.0],
        "l2": [math.exp(-1.0), math.exp(-math.sqrt(2.0))],
        "l1": [math.exp(-1.0), math.exp(-2.0)],
    }
    for similarity, raw in cases.items():
        got = positiveness(a, ctx, ok, temperature=1.0, similarity=similarity)
        want = torch.tensor(raw) / sum(raw)
        torch.testing.assert_close(got.flatten(), want, msg=similarity)
    # dot with temperature 2 gives [e, 1] / (e + 1)
    torch.testing.assert_close(positiveness(a, ctx, ok, temperature=2.0).flatten(), torch.tensor([e, 1.0]) / (e + 1))
    # default temperature = sqrt(P)
    torch.testing.assert_close(positiveness(a, ctx, ok), positiveness(a, ctx, ok, temperature=math.sqrt(2)))
    # invalid entries get 0; a row without context is all 0; tiny temperature stays finite
    half = positiveness(a, ctx, torch.tensor([[False, True]]), temperature=1.0)
    assert half.flatten().tolist() == [0.0, 1.0]
    assert not positiveness(a, ctx, torch.zeros(1, 2, dtype=torch.bool)).any()
    tiny = positiveness(a * 1e3, ctx, ok, temperature=1e-30)
    assert torch.isfinite(tiny).all() and tiny.flatten().tolist() == [1.0, 0.0]


def test_neighbor_weights_softmax_over_selected_and_uniform():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 4, generator=gen)
    ctx = torch.randn(3, 6, 4, generator=gen)
    ok = torch.rand(3, 6, generator=gen) > 0.3
    ok[:, 0] = True
    w = positiveness(a, ctx, ok, temperature=1.5)
    idx, sel = soft_neighbors(a, ctx, ok, top_k=3)
    dense = neighbor_weights(w, idx, sel)
    uni = neighbor_weights(w, idx, sel, weighting="uniform")
    scores = torch.einsum("bcp,cmp->bcm", a, ctx) / 1.5
    for b in range(2):
        for c in range(3):
            chosen = [int(i) for i, s in zip(idx[b, c], sel[b, c], strict=True) if s]
            want = torch.zeros(6)
            want[chosen] = torch.softmax(scores[b, c, chosen], 0)
            torch.testing.assert_close(dense[b, c], want)
            want_u = torch.zeros(6)
            want_u[chosen] = 1.0 / len(chosen)
            torch.testing.assert_close(uni[b, c], want_u)
    empty = neighbor_weights(w, idx, torch.zeros_like(sel))
    assert not empty.any() and torch.isfinite(empty).all()


# ----------------------------------------------------------------------------- 8. PACAM


def test_pacam_hand_built_relu_and_scale_invariance():
    context = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    z = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # pixel 0 along p1, pixel 1 = -p1
    out = pacam(z, context, torch.tensor([[[0.75, 0.25]]]))
    assert out.flatten().tolist() == [0.75, 0.0]  # negative sum -> 0
    zero = pacam(torch.zeros(1, 2, 1, 1), context, torch.tensor([[[0.75, 0.25]]]))
    assert zero.flatten().tolist() == [0.0]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, generator=gen)
    ctx = torch.randn(3, 4, 4, generator=gen)
    wts = torch.rand(2, 3, 4, generator=gen)
    scale = torch.rand(2, 1, 3, 5, generator=gen) * 10 + 0.1
    torch.testing.assert_close(pacam(z * scale, ctx, wts), pacam(z, ctx, wts))
    norm = pacam(z, ctx, wts, normalize=True)
    assert norm.amax(dim=(-2, -1)).le(1.0).all()


def test_pacam_loop_oracle_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 2, 3, generator=gen, dtype=torch.float64)
    ctx = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    wts = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    out = pacam(z, ctx, wts)
    for b in range(2):
        for c in range(3):
            for j in range(6):
                zj = z[b].flatten(1)[:, j]
                val = sum(wts[b, c, i] * torch.cosine_similarity(zj, ctx[c, i], dim=0) for i in range(5))
                torch.testing.assert_close(out[b, c].flatten()[j], torch.relu(val))
    # away from the ReLU kink: positive weights on prototypes aligned with the features
    ctx_pos = z.flatten(2).mean(-1)[0][None, None].expand(3, 5, 4).contiguous() + 0.01 * ctx
    zz = (z[:1] + 3 * ctx_pos[0, 0].view(1, 4, 1, 1)).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: pacam(t, ctx_pos, wts[:1]), (zz,))


# ----------------------------------------------------------------------------- 9. self loss


def test_self_loss_hand_value_mask_and_detach():
    cams = torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]]]])
    pac = torch.tensor([[[[0.5, 0.5]], [[0.0, 1.0]]]])
    assert self_loss(cams, pac).item() == pytest.approx((0.5 + 0.5 + 0.5 + 0.5) / 4)
    assert self_loss(cams, pac, active=torch.tensor([[False, True]])).item() == pytest.approx(1.0 / 4)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    ctx = torch.randn(2, 2, 3)
    loss = self_loss(torch.rand(1, 2, 2, 2), pacam(z, ctx, torch.full((1, 2, 2), 0.5)), detach_pacam=True)
    assert not loss.requires_grad  # nothing else in the graph: no gradient can reach z
    c64 = torch.rand(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    p64 = torch.rand(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: self_loss(a, b, active=torch.tensor([[True, False]])), (c64, p64))


# ----------------------------------------------------------------------------- 10. forward vs loop oracle


@pytest.mark.parametrize("options", [
    {},
    {"align": False, "weighting": "uniform"},
    {"similarity": "l2", "temperature": 0.7, "bg_threshold": 0.4, "normalize_pacam": True},
    {"similarity": "l1", "top_k": 1},
    {"similarity": "cosine", "detach_pacam": True},
])
def test_cpal_forward_equals_loop_oracle(options):
    z, cams, labels, context, context_valid = _random_case(2)
    opts = {"threshold": 0.3, "top_k": 4, **options}
    z1, c1 = z.clone().requires_grad_(True), cams.clone().requires_grad_(True)
    z2, c2 = z.clone().requires_grad_(True), cams.clone().requires_grad_(True)
    got = cpal_forward(z1, c1, labels, context, context_valid, **opts)
    want = cpal_loop(z2, c2, labels, context, context_valid, **opts)
    for key in ("pacam", "loss", "prototypes", "cams_with_bg"):
        value = getattr(got, key)
        torch.testing.assert_close(value, want[key].to(value.dtype), atol=1e-5, rtol=1e-5, msg=key)
    for key in ("prototype_valid", "active"):
        assert torch.equal(getattr(got, key), want[key]), key
    # the case covers what it claims
    assert not got.active[:, 2].any()  # class without context
    assert got.prototype_valid[0].tolist() == [True, True, False, True]  # absent class 1
    assert not got.prototype_valid[1, 2]  # empty mask
    got.loss.backward()
    want["loss"].backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(c1.grad, c2.grad)


def test_cpal_forward_gradients_treat_weights_as_constants():
    z, cams, labels, context, context_valid = _random_case(4)
    z1, c1 = z.clone().requires_grad_(True), cams.clone().requires_grad_(True)
    out = cpal_forward(z1, c1, labels, context, context_valid, top_k=3)
    out.loss.backward()
    # rerun with W computed separately and passed as a constant
    from wsss_blocks.cam import add_background

    maps = add_background(cams, labels)
    protos, valid = instance_prototypes(z, maps, labels)
    anchors = protos + alignment_shift(protos, valid, context, context_valid)[None]
    idx, sel = soft_neighbors(anchors, context, context_valid, top_k=3)
    weights = neighbor_weights(positiveness(anchors, context, context_valid), idx, sel)
    weights = weights * out.active.to(weights.dtype)[:, :, None]
    z2, c2 = z.clone().requires_grad_(True), cams.clone().requires_grad_(True)
    loss = self_loss(add_background(c2, labels), pacam(z2, context, weights), active=out.active)
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(c1.grad, c2.grad)


# ----------------------------------------------------------------------------- 11. the module


def _batch(seed=0, b=4, d=12, k=3, h=3, w=4):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, h, w, generator=gen)
    cams = torch.rand(b, k, h, w, generator=gen)
    labels = (torch.rand(b, k, generator=gen) > 0.5).long()
    labels[0, 0] = 1
    return feats, cams, labels


def _module(**kw):
    torch.manual_seed(0)
    base = {"proj_dim": 6, "capacity": 10, "num_prototypes": 4, "top_k": 2, "warn_unbuilt": False}
    return CPAL(12, 3, **{**base, **kw})


def _step(cpal, feats, cams, labels):
    """One training step of the module: forward, then bank the prototypes (after the loss)."""
    out = cpal(feats, cams, labels)
    cpal.update(out.prototypes, out.prototype_valid)
    return out


def _state(cpal):
    return {k: v.clone() for k, v in cpal.state_dict().items()}


def test_module_loss_zero_before_first_recluster_and_backward_works():
    cpal = _module(recluster_every=3, warmup_reclusters=False)
    feats, cams, labels = _batch()
    feats.requires_grad_(True)
    cams.requires_grad_(True)
    out = _step(cpal, feats, cams, labels)
    assert out.loss.item() == 0.0 and not out.active.any() and not out.pacam.any()
    assert out.terms == {"self": out.loss}
    out.loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert cpal.bank.count.sum() > 0  # the bank still updates
    assert not cpal.is_built


def test_module_forward_changes_no_state_in_train_or_eval_mode():
    cpal = _module(recluster_every=1)
    _step(cpal, *_batch(0))
    for mode in (True, False):
        cpal.train(mode)
        before = _state(cpal)
        cpal(*_batch(1))
        after = cpal.state_dict()
        for key, value in before.items():
            assert torch.equal(value, after[key]), key
        assert cpal._steps == 1 and cpal._reclusters == 1
    cpal.eval()  # update is explicit, so it works in any mode
    _step(cpal, *_batch(2))
    assert int(cpal.num_steps) == 2


def test_module_warns_once_when_unbuilt_and_warn_unbuilt_silences():
    cpal = _module(recluster_every=2, warn_unbuilt=True)
    with pytest.warns(UserWarning, match="no context prototypes yet"):
        _step(cpal, *_batch(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpal.reset()
        _step(cpal, *_batch(1))  # unbuilt again after the reset: the instance has warned already
        quiet = _module(recluster_every=2, warn_unbuilt=False)
        _step(quiet, *_batch(0))
        built = _module(recluster_every=1, warn_unbuilt=True)
        built.update(*cpal(*_batch(0))[2:4])
        built(*_batch(1))  # built before its first forward: nothing to warn about


def test_module_is_built_follows_the_state():
    cpal = _module(recluster_every=None, warmup_reclusters=False)
    assert not cpal.is_built
    cpal.update(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
    assert not cpal.is_built  # banked, not clustered
    cpal.recluster()
    assert cpal.is_built
    # loaded state counts
    other = _module()
    other.load_state_dict(cpal.state_dict())
    assert other.is_built and other._steps == 1 and other._reclusters == 1
    # state written by hand counts (in place, or a replaced buffer)
    cpal.context_valid.zero_()
    assert not cpal.is_built
    cpal.context_valid[0, 0] = True
    assert cpal.is_built
    cpal.context_valid = torch.zeros_like(cpal.context_valid)
    assert not cpal.is_built
    # reset empties everything, the parameters stay
    head = cpal.head[0].weight.clone()
    other.reset()
    assert not other.is_built and int(other.num_steps) == 0 and int(other.num_reclusters) == 0
    assert not other.bank.count.any() and not other.context.any() and other._steps == 0
    assert torch.equal(cpal.head[0].weight, head)


def test_module_is_built_reads_no_device_on_a_step():
    cpal = _module(recluster_every=100, warmup_reclusters=False)
    _step(cpal, *_batch(0))
    cpal.recluster()
    with no_host_sync():
        assert cpal.is_built
        cpal.update(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
        assert cpal.is_built


@pytest.mark.parametrize(("warmup", "expected"), [(True, [1, 2, 4, 5, 10]), (False, [5, 10])])
def test_module_recluster_schedule(warmup, expected):
    cpal = _module(recluster_every=5, warmup_reclusters=warmup)
    steps = []
    original = cpal.recluster

    def spy():
        steps.append(cpal._steps)
        original()

    cpal.recluster = spy
    for s in range(12):
        _step(cpal, *_batch(s))
    assert steps == expected and int(cpal.num_reclusters) == len(expected)


def test_module_recluster_every_none_warmup_any_power_of_two():
    cpal = _module(recluster_every=None)
    for _ in range(9):
        cpal.update(torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool))
    assert int(cpal.num_reclusters) == 4  # s = 1, 2, 4, 8


def test_module_update_checks_shapes():
    cpal = _module()
    with pytest.raises(ShapeError, match="prototypes"):
        cpal.update(torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="prototype_valid"):
        cpal.update(torch.randn(2, 4, 6), torch.ones(3, 4, dtype=torch.bool))
    assert int(cpal.num_steps) == 0


def test_module_state_dict_round_trip_resumes_identically():
    a = _module(recluster_every=3)
    for s in range(4):
        _step(a, *_batch(s))
    b = _module(recluster_every=3)
    b.load_state_dict(a.state_dict())
    assert b._steps == 4 and b._reclusters == a._reclusters
    for s in range(4, 7):  # step 6 reclusters in both, with the same seed
        oa, ob = _step(a, *_batch(s)), _step(b, *_batch(s))
        for key in ("pacam", "loss"):
            assert torch.equal(getattr(oa, key), getattr(ob, key)), key
    assert torch.equal(a.context, b.context) and int(a.num_reclusters) == int(b.num_reclusters)


def test_module_equals_function():
    cpal = _module(recluster_every=1, similarity="l2", weighting="uniform", bg_threshold=0.3)
    feats, cams, labels = _batch(1)
    _step(cpal, feats, cams, labels)  # fills bank + context
    out = cpal(feats, cams, labels)
    ref = cpal_forward(cpal.project(feats), cams, labels, cpal.context, cpal.context_valid, top_k=2,
                       similarity="l2", weighting="uniform", bg_threshold=0.3)
    for key in ("pacam", "loss", "prototypes", "active"):
        assert torch.equal(getattr(out, key), getattr(ref, key)), key
    assert out.active.any() and out.loss > 0 and out.terms["self"] is out.loss


def test_module_head_options_and_detach_features():
    feats, cams, labels = _batch()
    cpal = _module(hidden_dim=5)
    assert [m.__class__.__name__ for m in cpal.head] == ["Conv2d", "ReLU", "Conv2d"]
    assert cpal.head[0].out_channels == 5 and cpal.head[2].out_channels == 6
    ident = CPAL(12, 3, projection=False, capacity=4, num_prototypes=2, top_k=1)
    assert ident.proj_dim == 12 and ident.context.shape == (4, 2, 12)
    det = _module(detach_features=True, recluster_every=1)
    _step(det, feats, cams, labels)
    f = feats.clone().requires_grad_(True)
    out = det(f, cams.clone().requires_grad_(True), labels)
    assert out.loss > 0
    out.loss.backward()
    assert f.grad is None and det.head[0].weight.grad is not None


def test_module_fp64_state_and_dtype():
    cpal = _module(dtype=torch.float64, recluster_every=1)
    assert cpal.bank.memory.dtype == torch.float64 and cpal.context.dtype == torch.float64
    feats, cams, labels = _batch()
    _step(cpal, feats.double(), cams.double(), labels)
    out = _step(cpal, feats.double(), cams.double(), labels)
    assert out.pacam.dtype == torch.float64 and torch.isfinite(out.loss)


def test_module_no_host_sync_on_non_recluster_steps():
    cpal = _module(recluster_every=100, warmup_reclusters=False, warn_unbuilt=True)
    cpal.recluster()  # context from an empty bank, then fill it
    with pytest.warns(UserWarning):
        _step(cpal, *_batch(0))
    cpal.recluster()
    feats, cams, labels = _batch(1)
    feats.requires_grad_(True)
    labels = labels.bool()  # CPU label value checks read bool without .item()
    with no_host_sync():
        out = cpal(feats, cams, labels)
        out.loss.backward()
        cpal.update(out.prototypes, out.prototype_valid)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("b", "k", "h", "w"), [(1, 1, 2, 5), (2, 1, 1, 1), (1, 4, 3, 2)])
def test_edge_sizes_finite(b, k, h, w):
    cpal = CPAL(5, k, proj_dim=3, capacity=4, num_prototypes=2, top_k=2, recluster_every=1, warn_unbuilt=False)
    gen = torch.Generator().manual_seed(b * 10 + k)
    feats = torch.randn(b, 5, h, w, generator=gen, requires_grad=True)
    cams = torch.rand(b, k, h, w, generator=gen)
    labels = torch.ones(b, k)
    for _ in range(2):
        out = _step(cpal, feats, cams, labels)
        assert torch.isfinite(out.loss) and torch.isfinite(out.pacam).all()
        assert out.pacam.shape == (b, k + 1, h, w)
    out.loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_all_labels_zero_only_background_active():
    cpal = _module(recluster_every=1)
    feats, cams, _ = _batch()
    labels = torch.zeros(4, 3)
    out = _step(cpal, feats, cams, labels)
    assert torch.equal(out.cams_with_bg[:, 0], torch.ones(4, 3, 4))
    z = cpal.project(feats)
    torch.testing.assert_close(out.prototypes[:, 0], z.flatten(2).mean(-1).detach())
    out = _step(cpal, feats, cams, labels)
    assert out.active[:, 0].all() and not out.active[:, 1:].any()
    assert torch.isfinite(out.loss)


def test_tiny_temperature_and_zero_features_finite():
    z, cams, labels, context, context_valid = _random_case(5)
    out = cpal_forward(z, cams, labels, context, context_valid, temperature=1e-12, top_k=3)
    assert torch.isfinite(out.pacam).all() and torch.isfinite(out.loss)
    z0 = z.clone()
    z0[:, :, 0, 0] = 0.0
    out = cpal_forward(z0, cams, labels, context, context_valid, top_k=3)
    assert not out.pacam[:, :, 0, 0].any()


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    z, cams, labels, context, context_valid = _random_case(0)
    with pytest.raises(ShapeError, match="norm_cams"):
        cpal_forward(z, cams[:, :, :2], labels, context, context_valid)
    with pytest.raises(ShapeError, match="labels"):
        cpal_forward(z, cams, labels[:, :2], context, context_valid)
    with pytest.raises(ShapeError, match="context"):
        cpal_forward(z, cams, labels, context[:3], context_valid)
    with pytest.raises(ShapeError, match="context_valid"):
        cpal_forward(z, cams, labels, context, context_valid.float())
    with pytest.raises(ShapeError, match="labels"):
        cpal_forward(z, cams, labels * 2, context, context_valid)
    with pytest.raises(ShapeError, match="features"):
        pacam(z[0], context, torch.rand(3, 4, 6))
    with pytest.raises(ShapeError, match="neighbor_weights"):
        pacam(z, context, torch.rand(3, 4, 5))
    with pytest.raises(ShapeError, match="pacam"):
        self_loss(cams, cams[:, :2])
    with pytest.raises(ShapeError, match="active"):
        self_loss(cams, cams, active=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match="count"):
        context_prototypes(torch.randn(3, 4, 2), torch.tensor([1, 2]))
    with pytest.raises(ShapeError, match="anchor_valid"):
        alignment_shift(torch.randn(2, 4, 5), torch.ones(2, 3, dtype=torch.bool), context, context_valid)
    with pytest.raises(ValueError, match="top_k"):
        soft_neighbors(torch.randn(2, 4, 5), context, context_valid, top_k=7)
    with pytest.raises(ValueError, match="similarity"):
        positiveness(torch.randn(2, 4, 5), context, context_valid, similarity="dotty")
    with pytest.raises(ValueError, match="temperature"):
        positiveness(torch.randn(2, 4, 5), context, context_valid, temperature=0.0)
    with pytest.raises(ValueError, match="weighting"):
        neighbor_weights(torch.rand(1, 1, 3), torch.zeros(1, 1, 2, dtype=torch.long),
                         torch.ones(1, 1, 2, dtype=torch.bool), weighting="soft")
    with pytest.raises(ValueError, match="threshold"):
        instance_prototypes(z, torch.rand(3, 4, 3, 4), labels, threshold=1.0)
    with pytest.raises(ValueError, match="bg_threshold"):
        instance_prototypes(z, torch.rand(3, 4, 3, 4), labels, bg_threshold=0.0)


def test_module_errors():
    with pytest.raises(ValueError, match="top_k"):
        CPAL(4, 2, num_prototypes=5, top_k=6)
    with pytest.raises(ValueError, match="num_prototypes"):
        CPAL(4, 2, capacity=10, num_prototypes=11, top_k=1)
    with pytest.raises(ValueError, match="recluster_every"):
        CPAL(4, 2, recluster_every=0)
    with pytest.raises(ValueError, match="temperature"):
        CPAL(4, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        CPAL(4, 2, threshold=0.0)
    with pytest.raises(ValueError, match="bg_threshold"):
        CPAL(4, 2, bg_threshold=1.0)
    with pytest.raises(ValueError, match="weighting"):
        CPAL(4, 2, weighting="soft")
    with pytest.raises(ValueError, match="similarity"):
        CPAL(4, 2, similarity="cos")
    with pytest.raises(ValueError, match="capacity"):
        CPAL(4, 2, capacity=2.5)
    cpal = CPAL(4, 2, proj_dim=3, capacity=4, num_prototypes=2, top_k=1)
    with pytest.raises(ShapeError, match="features"):
        cpal(torch.randn(1, 5, 2, 2), torch.rand(1, 2, 2, 2), torch.ones(1, 2))
    with pytest.raises(ShapeError, match="norm_cams"):
        cpal(torch.randn(1, 4, 2, 2), torch.rand(1, 2, 2, 3), torch.ones(1, 2))
    with pytest.raises(ShapeError, match="norm_cams"):
        cpal(torch.randn(1, 4, 2, 2), torch.rand(1, 3, 2, 2), torch.ones(1, 2))


# ----------------------------------------------------------------------------- 13. timm ViT, autocast


def test_timm_vit_tokens_to_grid_non_square():
    timm = pytest.importorskip("timm")
    from wsss_blocks.tokens import tokens_to_grid

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 96), depth=2)
    tokens = vit.forward_features(torch.randn(2, 3, 64, 96))[:, vit.num_prefix_tokens:]
    grid = tokens_to_grid(tokens, (4, 6))
    cpal = CPAL(vit.embed_dim, 3, proj_dim=16, capacity=8, num_prototypes=4, top_k=2, recluster_every=1,
                warn_unbuilt=False)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    _step(cpal, grid.detach(), torch.rand(2, 3, 4, 6), labels)
    out = cpal(grid, torch.rand(2, 3, 4, 6), labels)
    assert out.pacam.shape == (2, 4, 4, 6) and torch.isfinite(out.loss)
    out.loss.backward()
    assert vit.patch_embed.proj.weight.grad is not None


def test_bf16_autocast_close_to_fp32():
    cpal = _module(recluster_every=1)
    feats, cams, labels = _batch(2)
    _step(cpal, feats, cams, labels)
    ref = cpal(feats, cams, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpal(feats, cams, labels)
    assert got.pacam.dtype == torch.float32 and got.loss.dtype == torch.float32
    assert torch.isfinite(got.pacam).all()
    torch.testing.assert_close(got.pacam, ref.pacam, atol=2e-2, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------- 12. DDP, 14. CUDA


def _ddp_batches(rank: int):
    gen = torch.Generator().manual_seed(11 + rank)
    return [_batch(int(torch.randint(0, 1000, (1,), generator=gen)), b=3) for _ in range(4)]


def _ddp_rank(rank: int) -> dict:
    cpal = _module(recluster_every=2)
    for feats, cams, labels in _ddp_batches(rank):
        _step(cpal, feats, cams, labels)
    return cpal.state_dict()


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process_concatenation():
    states = run_gloo(_ddp_rank)
    single = _module(recluster_every=2)
    for b0, b1 in zip(_ddp_batches(0), _ddp_batches(1), strict=True):
        feats = torch.cat([b0[0], b1[0]])
        # the bank sees both ranks' prototypes; each rank projects its own half with the same head
        z = single.project(feats)
        out = cpal_forward(z, torch.cat([b0[1], b1[1]]), torch.cat([b0[2], b1[2]]), single.context,
                           single.context_valid, top_k=2)
        single.update(out.prototypes, out.prototype_valid)
    for key in ("bank.memory", "bank.count", "bank.ptr", "context", "context_valid", "num_steps",
                "num_reclusters"):
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], single.state_dict()[key], msg=key)
    assert states[0]["context_valid"].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_on_non_recluster_steps():
    cpal = _module(recluster_every=100, warmup_reclusters=False, device="cuda")
    feats, cams, labels = (t.cuda() for t in _batch())
    _step(cpal, feats, cams, labels)
    cpal.recluster()
    labels = labels.bool()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cpal(feats.requires_grad_(True), cams, labels)
        out.loss.backward()
        cpal.update(out.prototypes, out.prototype_valid)
        assert cpal.is_built
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.pacam.device.type == "cuda"
