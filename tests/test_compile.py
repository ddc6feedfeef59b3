"""torch.compile smoke tests: compiled == eager for the losses, CAM helpers, kmeans and DOEI.

``backend="aot_eager"`` traces through dynamo and AOTAutograd (forward and backward graphs)
but runs the ops eagerly, so the tests are fast on CPU and catch what breaks tracing (data
dependent Python control flow, hooks, in-place state) without a compiler toolchain. Graph
breaks are allowed (validation reads values on the host); the results must match eager.
"""

from __future__ import annotations

import pytest
import timm
import torch

from wsss_blocks import doei, mct
from wsss_blocks.cam import normalize_cam, pseudo_labels
from wsss_blocks.cpews import CPEWSHead, CPEWSLoss, PrototypePool, ism_loss, pdl_loss, ssl_loss
from wsss_blocks.doei import DOEIConfig
from wsss_blocks.prototypes import kmeans

pytestmark = pytest.mark.usefixtures("single_thread")

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, backend=BACKEND, dynamic=False)


def _grads_equal(fn, *leaves):
    """fn(*leaves) eager and compiled: equal values and equal gradients w.r.t. every leaf."""
    want = fn(*leaves)
    want_g = torch.autograd.grad(want, leaves, allow_unused=True)
    got = _compiled(fn)(*leaves)
    got_g = torch.autograd.grad(got, leaves, allow_unused=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert any(g is not None for g in want_g)
    for a, b in zip(got_g, want_g, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# While compiling, checks are off (torch.compiler.is_compiling()); check_shape must still bind
# the sizes these callers read from it (it returned an empty mapping before: KeyError).
def _case(seed=0, b=2, k=3, grid=(3, 4), d=8, m=3):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    tokens = torch.randn(b, n, d, generator=gen, requires_grad=True)
    cam = torch.randn(b, k, *grid, generator=gen, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    pos, neg = torch.randn(k, m, d, generator=gen), torch.randn(k, m, d, generator=gen)
    pv, nv = torch.ones(k, m, dtype=torch.bool), torch.rand(k, m, generator=gen) > 0.3
    nv[:, 0] = True
    token_labels = torch.randint(0, k + 1, (b, *grid), generator=gen)
    token_labels[0, 0] = 255
    return tokens, cam, labels, pos, pv, neg, nv, token_labels


def test_ism_loss_compiles():
    tokens, *_, token_labels = _case()
    _grads_equal(lambda t: ism_loss(t, token_labels), tokens)


@pytest.mark.parametrize("compact", [True, False])
def test_pdl_and_ssl_losses_compile(compact):
    tokens, cam, labels, pos, pv, neg, nv, _ = _case(1)
    _grads_equal(lambda t, c: pdl_loss(t, c, labels, pos, pv, neg, nv, compact=compact), tokens, cam)
    _grads_equal(lambda t, c: ssl_loss(t, c, labels, pos, pv, neg, nv, compact=compact), tokens, cam)


def test_cpews_loss_module_compiles():
    gen = torch.Generator().manual_seed(2)
    k, d, grid = 3, 8, (3, 4)
    pool = PrototypePool(d, k, num_prototypes=2, score="cam_mean")
    pool.update(torch.randn(8, 12, d, generator=gen), torch.randn(8, k, *grid, generator=gen),
                (torch.rand(8, k, generator=gen) > 0.5).float())
    pool.finalize()
    crit = CPEWSLoss(pool)
    head = CPEWSHead(d, k)
    tokens, _, labels, *_, token_labels = _case(2, grid=grid, d=d)
    token_labels = token_labels.clamp_max(k)  # ISM labels in 0..K (the pseudo-label range)

    def total(t):
        out = head(t, t, grid)
        return crit(logits_mid=out.logits_mid, logits_final=out.logits_final, features_final=t,
                    cams_final=out.cams_final, masks_mid=token_labels, labels=labels).loss

    _grads_equal(total, tokens)


@pytest.mark.parametrize("mode", ["max", "minmax"])
def test_normalize_cam_and_pseudo_labels_compile(mode):
    _, cam, labels, *_ = _case(3)

    def fn(c):
        norm = normalize_cam(c, mode=mode)
        return norm, pseudo_labels(norm, labels, low=0.2, high=0.6)

    want_n, want_pl = fn(cam)
    got_n, got_pl = _compiled(fn)(cam)
    torch.testing.assert_close(got_n, want_n)
    assert torch.equal(got_pl, want_pl)
    assert set(want_pl.unique().tolist()) >= {0, 255}  # both thresholds in play


def test_kmeans_compiles():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, 5, generator=gen)
    valid = torch.rand(3, 40, generator=gen) > 0.2
    want = kmeans(x, 4, point_valid=valid, num_iters=5, seed=7)
    got = _compiled(lambda p, v: kmeans(p, 4, point_valid=v, num_iters=5, seed=7))(x, valid)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _tiny_vit(c: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          num_heads=2, depth=2)
    if c > 1:
        mct.add_class_tokens(m, c)
    return m.eval()


def test_doei_patched_vit_forward_compiles():
    c = 4  # class tokens (MCT) exercise both DOEI branches
    model = _tiny_vit(c)
    cfg = DOEIConfig(st_p2c=0.1, st_c2c=0.25, af_p2c=1.5, sf_p2c=0.7, af_c2c=1.3, sf_c2c=0.6)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model.forward_features(img)
        with doei.patch(model, config=cfg):
            want = model.forward_features(img)
            got = _compiled(model.forward_features)(img)
    assert (want - plain).abs().max() > 1e-4  # DOEI is active
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
