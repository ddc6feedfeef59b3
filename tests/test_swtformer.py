"""SWTformer functional blocks: head/CAM, background, seeds, prototypes/R-CAM, GSC, CCL, pseudo mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles.swtformer import (
    loop_ccl,
    loop_rcam,
    loop_seeds,
    sipe_prototypes_global,
    sipe_rcam_broadcast,
    sipe_seeds_broadcast,
)

from wsss_blocks import ShapeError
from wsss_blocks.swtformer import (
    CCLLoss,
    GSCLoss,
    PrototypeRefiner,
    SeedLocator,
    SwinCAMHead,
    cams_with_background,
    ccl_loss,
    gsc_loss,
    locate_seeds,
    rcam_pseudo_mask,
    refine_cams,
    seed_prototypes,
    structure_affinity,
    swin_cam,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _grid(rows):
    """(C, N) nested list -> (1, C, 1, N) tensor (a 1 x N grid)."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None]


# ----------------------------------------------------------------------------- head / CAM
def test_swin_cam_normalises_and_upsamples():
    f = torch.randn(2, 3, 5, 4)
    cam = swin_cam(f)
    ref = f.relu() / (f.relu().amax((-2, -1), keepdim=True) + 1e-5)
    torch.testing.assert_close(cam, ref)
    up = swin_cam(f, size=(10, 7))
    torch.testing.assert_close(up, F.interpolate(ref, size=(10, 7), mode="bilinear", align_corners=False))
    assert swin_cam(-f.abs()).abs().sum() == 0  # all-negative -> 0, not NaN
    with pytest.raises(ShapeError, match="cams: expected 4 dims"):
        swin_cam(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="eps"):
        swin_cam(f, eps=0.0)
    with pytest.raises(ValueError, match="size"):
        swin_cam(f, size=(2.5, 3))


def test_swin_cam_gradcheck_through_max():
    f = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: swin_cam(x), (f,))


def test_head_shapes_kernel_nhwc_and_errors():
    torch.manual_seed(0)
    head = SwinCAMHead(8, 3)
    assert head.conv.bias is None and head.conv.kernel_size == (1, 1)
    x = torch.randn(2, 8, 7, 5)
    out = head(x)
    assert out.cams is out[0] and out.logits is out[1]
    f_out, scores = out
    assert f_out.shape == (2, 3, 7, 5) and scores.shape == (2, 3)
    torch.testing.assert_close(scores, f_out.mean((-2, -1)))
    torch.testing.assert_close(f_out, torch.einsum("bdhw,kd->bkhw", x, head.conv.weight[:, :, 0, 0]))
    mct = SwinCAMHead(8, 3, kernel_size=3, bias=True)
    assert mct(x)[0].shape == (2, 3, 7, 5) and mct.conv.bias is not None
    nhwc = SwinCAMHead(8, 3, input_fmt="NHWC")
    nhwc.load_state_dict(head.state_dict())
    for a, b in zip(nhwc(x.permute(0, 2, 3, 1)), head(x), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ShapeError, match=r"features: expected shape \(B, 8, h, w\)"):
        head(torch.randn(2, 6, 7, 5))
    with pytest.raises(ShapeError, match='input_fmt="NHWC"'):  # timm Swin's channels-last map
        head(x.permute(0, 2, 3, 1))
    with pytest.raises(ShapeError, match=r"features: expected shape \(B, h, w, 8\)"):
        nhwc(x)
    with pytest.raises(ValueError, match="odd"):
        SwinCAMHead(8, 3, kernel_size=2)
    with pytest.raises(ValueError, match="num_classes"):
        SwinCAMHead(8, 0)
    with pytest.raises(ValueError, match="input_fmt"):
        SwinCAMHead(8, 3, input_fmt="NLC")


def test_cams_with_background_eq3_valid_and_none_labels():
    cam = torch.rand(2, 3, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    m = cams_with_background(cam, labels)
    fg = cam * labels[:, :, None, None]
    torch.testing.assert_close(m, torch.cat([1 - fg.amax(1, keepdim=True), fg], 1))
    assert m[1, 0].eq(1).all()  # all labels 0: background everywhere
    m.sum().backward()
    assert cam.grad is not None
    free = cams_with_background(cam.detach())
    torch.testing.assert_close(free[:, 1:], cam.detach())
    valid = torch.ones(2, 8, 10, dtype=torch.bool)
    valid[:, :, 6:] = False  # right 40% padded at image size -> grid columns 3, 4 invalid
    mv = cams_with_background(cam.detach(), labels, valid=valid)
    assert mv[..., 3:].eq(0).all()
    torch.testing.assert_close(mv[..., :3], m.detach()[..., :3])
    with pytest.raises(ShapeError, match="labels"):
        cams_with_background(cam, torch.ones(2, 4))
    with pytest.raises(ShapeError, match="valid: expected a bool"):
        cams_with_background(cam, labels, valid=valid.float())


# ----------------------------------------------------------------------------- seeds
TOKENS = _grid([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
CAM = _grid([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize(("similarity", "labels", "expected"), [
    ("abs_cos", [1, 1], [1, 1, 2, 2]),
    ("relu_cos", [1, 1], [1, 0, 2, 2]),
    ("abs_cos", [1, 0], [1, 1, 0, 0]),
    ("relu_cos", [1, 0], [1, 0, 0, 0]),
])
def test_seeds_hand_built(similarity, labels, expected):
    y = torch.tensor([labels])
    m = cams_with_background(CAM, y)
    out = locate_seeds(TOKENS, m, y, similarity=similarity)
    seeds, iou = out
    assert out.seeds is seeds and out.iou is iou
    assert seeds.dtype == torch.bool and seeds.shape == (1, 3, 1, 4)
    assert seeds.sum(1).eq(1).all()  # every token exactly one seed (decision 8)
    assert seeds.int().argmax(1).flatten().tolist() == expected
    if similarity == "abs_cos" and labels == [1, 1]:
        torch.testing.assert_close(iou[0, 1, 0], torch.tensor([0.5, 0.5, 0.0, 0.0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(iou[0, 0, 0, :2], torch.tensor([1 / 6, 1 / 6]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("similarity", ["abs_cos", "relu_cos", "cos"])
def test_seeds_match_sipe_broadcast_and_loop(similarity):
    torch.manual_seed(1)
    tokens = torch.randn(3, 6, 4, 3)
    cam = torch.rand(3, 4, 4, 3)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    m = cams_with_background(cam, labels)
    seeds, iou = locate_seeds(tokens, m, labels, similarity=similarity)
    ref_seeds, ref_iou = sipe_seeds_broadcast(tokens, m, labels, similarity=similarity)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    assert torch.equal(seeds, ref_seeds)
    assert torch.equal(seeds, loop_seeds(tokens, m, labels, similarity=similarity))
    assert not seeds.requires_grad and not iou.requires_grad


def test_seeds_no_grad_partition_zero_tokens_and_valid():
    torch.manual_seed(2)
    tokens = torch.randn(2, 5, 3, 4, requires_grad=True)
    cam = torch.rand(2, 3, 3, 4, requires_grad=True)
    labels = torch.tensor([[1, 1, 0], [0, 0, 1]])
    m = cams_with_background(cam, labels)
    seeds = locate_seeds(tokens, m, labels).seeds
    assert not seeds.requires_grad and seeds.sum(1).eq(1).all()
    assert not seeds[0, 3].any()  # absent class never seeds
    zero = torch.zeros(1, 5, 3, 4)
    s0, iou0 = locate_seeds(zero, m[:1].detach(), labels[:1])
    assert iou0.eq(0).all() and s0[:, 0].all()  # all-zero IoU -> background
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[1, 2] = False
    sv = locate_seeds(tokens, m, labels, valid=valid).seeds
    assert not sv[1, :, 2].any() and torch.equal(sv[0], seeds[0])
    assert not locate_seeds(tokens, m, labels, valid=torch.zeros_like(valid)).seeds.any()
    k1 = locate_seeds(tokens, cams_with_background(cam[:, :1], labels[:, :1]), labels[:, :1]).seeds
    assert k1.shape == (2, 2, 3, 4) and k1.sum(1).eq(1).all()


def test_seeds_errors_and_module():
    m = cams_with_background(CAM, torch.tensor([[1, 1]]))
    with pytest.raises(ShapeError, match="cams_with_bg"):
        locate_seeds(TOKENS, m[..., :3])
    with pytest.raises(ShapeError, match="labels"):
        locate_seeds(TOKENS, m, torch.tensor([[1, 1, 1]]))
    with pytest.raises(ShapeError, match="labels: expected values in"):
        locate_seeds(TOKENS, m, torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="similarity"):
        locate_seeds(TOKENS, m, similarity="dot")
    with pytest.raises(ValueError, match="bg_scale"):
        locate_seeds(TOKENS, m, bg_scale=-1.0)
    with pytest.raises(ShapeError, match="features"):
        locate_seeds(TOKENS[0], m)
    loc = SeedLocator(similarity="relu_cos", bg_scale=0.3)
    y = torch.tensor([[1, 1]])
    for a, b in zip(loc(TOKENS, m, y), locate_seeds(TOKENS, m, y, similarity="relu_cos", bg_scale=0.3), strict=True):
        assert torch.equal(a, b)
    assert "relu_cos" in repr(loc)


def test_structure_affinity_and_gradcheck():
    t = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    s = structure_affinity(t)
    assert s.shape == (2, 6, 6) and s.dtype == torch.float64
    torch.testing.assert_close(s, s.transpose(1, 2))
    assert torch.autograd.gradcheck(lambda x: structure_affinity(x, similarity="cos"), (t,))
    with pytest.raises(ShapeError, match="features"):
        structure_affinity(torch.randn(2, 6, 4))


# ----------------------------------------------------------------------------- prototypes / R-CAM
FEATS = _grid([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
SEEDS = _grid([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()


def test_rcam_hand_built_and_sipe_global_prototype():
    rcam, protos = refine_cams(FEATS, SEEDS), seed_prototypes(FEATS, SEEDS)
    expected = torch.tensor([[0, 0, 1, 0.7071], [1, 1, 0, 0.7071], [0, 0, 0, 0]])
    torch.testing.assert_close(rcam[0, :, 0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(protos[0], torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
    sipe = sipe_rcam_broadcast(FEATS, sipe_prototypes_global(FEATS, SEEDS))
    torch.testing.assert_close(rcam, sipe, atol=1e-6, rtol=0)


def test_rcam_loop_oracle_resize_and_gradients():
    torch.manual_seed(3)
    feats = torch.randn(2, 6, 8, 6, requires_grad=True)
    seeds = torch.rand(2, 4, 4, 3) > 0.6
    seeds[1, 2] = False  # empty seed
    rcam = refine_cams(feats, seeds)
    assert rcam.shape == (2, 4, 8, 6) and rcam[1, 2].eq(0).all()
    torch.testing.assert_close(rcam.double(), loop_rcam(feats.detach(), seeds), atol=1e-5, rtol=1e-5)
    sipe = sipe_rcam_broadcast(feats.detach(), sipe_prototypes_global(feats.detach(), seeds))
    torch.testing.assert_close(rcam.detach(), sipe, atol=1e-5, rtol=1e-5)
    rcam.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert torch.isfinite(feats.grad).all()
    assert torch.equal(PrototypeRefiner(eps=1e-3)(feats, seeds), refine_cams(feats, seeds, eps=1e-3))
    f64 = torch.randn(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    s64 = torch.tensor([[[[1, 0], [0, 1], [0, 0]], [[0, 1], [1, 0], [1, 1]]]]).bool()
    assert torch.autograd.gradcheck(lambda x: refine_cams(x, s64, eps=1e-3), (f64,))


def test_prototype_errors():
    with pytest.raises(ShapeError, match="seeds"):
        seed_prototypes(FEATS, SEEDS[0])
    with pytest.raises(ShapeError, match="features"):
        seed_prototypes(FEATS[0], SEEDS)
    with pytest.raises(ValueError, match="eps"):
        refine_cams(FEATS, SEEDS, eps=0.0)


# ----------------------------------------------------------------------------- GSC
def test_gsc_known_answers_valid_and_gradients():
    m = torch.ones(2, 3, 4, 4, requires_grad=True)
    r = torch.zeros(2, 3, 4, 4, requires_grad=True)
    loss = gsc_loss(m, r)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert m.grad is not None and r.grad is not None and r.grad.abs().sum() > 0
    m2 = torch.rand(2, 3, 4, 4)
    r2 = torch.rand(2, 3, 4, 4)
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[:, :2] = True
    expected = (m2 - r2).abs()[..., :2, :].mean()
    assert gsc_loss(m2, r2, valid=valid).item() == pytest.approx(expected.item(), rel=1e-6)
    none = gsc_loss(m.detach().requires_grad_(), r, valid=torch.zeros_like(valid))
    assert none.item() == 0 and none.requires_grad
    up = gsc_loss(m2[..., ::2, ::2], r2)  # CAM upsampled to the R-CAM grid
    m_up = F.interpolate(m2[..., ::2, ::2], size=(4, 4), mode="bilinear", align_corners=False)
    assert up.item() == pytest.approx((m_up - r2).abs().mean().item(), rel=1e-6)
    assert GSCLoss()(m2, r2, valid=valid).item() == gsc_loss(m2, r2, valid=valid).item()
    with pytest.raises(ShapeError, match="cams_with_bg"):
        gsc_loss(torch.rand(2, 2, 4, 4), r2)


# ----------------------------------------------------------------------------- CCL
def _ccl_pair(r_values):
    m = _grid([[0.0, 1.0], [1.0, 0.0]])  # background [0, 1], class [1, 0]
    r = _grid([[0.0, 1.0], r_values])
    return m, r


def test_ccl_hand_built_minimum():
    y = torch.tensor([[1]])
    s = 9 / 13
    m, r = _ccl_pair([s, math.sqrt(1 - s * s)])
    bg = 2 / 9  # background channel: identical maps, s = 1
    assert ccl_loss(m, r, y).item() == pytest.approx((2 / 13 + bg) / 2, abs=1e-6)
    assert ccl_loss(m, r, y, variant="plain").item() == pytest.approx((4 / 13 + 0) / 2, abs=1e-6)
    # the background channel is identical in both maps (s = 1, term 2/9), so the class term is isolated
    m1, r1 = _ccl_pair([1.0, 0.0])
    assert ccl_loss(m1, r1, y).item() == pytest.approx(2 / 9, abs=1e-6)
    m0, r0 = _ccl_pair([0.0, 0.0])
    assert ccl_loss(m0, r0, y).item() == pytest.approx((0.5 + 2 / 9) / 2, abs=1e-6)
    assert ccl_loss(m0, r0, y, variant="plain").item() == pytest.approx(0.5, abs=1e-6)
    grid = torch.linspace(0, 1, 1001)
    vals = 0.5 * ((2 / 3 * grid) ** 2 + (1 - grid) ** 2)
    assert grid[vals.argmin()].item() == pytest.approx(9 / 13, abs=1e-3)


def test_ccl_loop_oracle_valid_detach_and_module():
    torch.manual_seed(4)
    m = torch.rand(3, 4, 5, 4, requires_grad=True)
    r = torch.rand(3, 4, 5, 4, requires_grad=True)
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]])
    valid = torch.rand(3, 5, 4) > 0.3
    valid[1] = False
    for variant in ("paper", "plain"):
        for v in (None, valid):
            got = ccl_loss(m, r, labels, variant=variant, valid=v)
            assert got.item() == pytest.approx(loop_ccl(m.detach(), r.detach(), labels, variant, v), abs=1e-5)
    loss = ccl_loss(m, r, labels, detach_rcam=True)
    loss.backward()
    assert m.grad is not None and r.grad is None
    mod = CCLLoss(variant="plain", detach_rcam=True)
    assert mod(m, r, labels, valid=valid).item() == ccl_loss(m, r, labels, variant="plain", valid=valid,
                                                      detach_rcam=True).item()
    zero = ccl_loss(m, r, labels, valid=torch.zeros_like(valid))
    assert zero.item() == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="variant"):
        ccl_loss(m, r, labels, variant="squared")
    with pytest.raises(ShapeError, match="labels"):
        ccl_loss(m, r, labels[:, :2])


def test_ccl_empty_rcam_has_zero_gradient():
    m = torch.rand(1, 2, 3, 3, requires_grad=True)
    r = torch.zeros(1, 2, 3, 3)
    r[:, 0] = torch.rand(3, 3)
    loss = ccl_loss(m, r, torch.tensor([[1]]))
    loss.backward()
    assert torch.isfinite(loss) and m.grad[0, 1].abs().max() == 0


def test_losses_gradcheck_float64():
    m = torch.rand(1, 3, 3, 2, dtype=torch.float64, requires_grad=True) + 0.1
    r = torch.rand(1, 3, 3, 2, dtype=torch.float64, requires_grad=True) + 0.1
    y = torch.tensor([[1, 1]])
    assert torch.autograd.gradcheck(lambda a, b: ccl_loss(a, b, y), (m, r))
    assert torch.autograd.gradcheck(lambda a, b: ccl_loss(a, b, y, variant="plain"), (m, r))


# ----------------------------------------------------------------------------- pseudo mask
def test_rcam_pseudo_mask_rules():
    r = _grid([[0.2, 0.5, 0.3], [0.9, 0.5, 0.1], [1.0, 0.1, 0.3]])
    out = rcam_pseudo_mask(r, torch.tensor([[1, 0]]))
    assert out.dtype == torch.int64 and out.tolist() == [[[1, 0, 0]]]  # absent never, ties -> 0
    assert rcam_pseudo_mask(r).tolist() == [[[2, 0, 0]]]
    big = rcam_pseudo_mask(torch.rand(2, 4, 3, 5), torch.tensor([[1, 0, 0], [0, 0, 1]]), size=(12, 20))
    assert big.shape == (2, 12, 20)
    assert not (big[0] == 2).any() and not (big[0] == 3).any() and not (big[1] == 1).any()
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    valid[..., 4:] = False
    masked = rcam_pseudo_mask(r, torch.tensor([[1, 1]]), size=(2, 6), valid=valid)
    assert masked[..., 4:].eq(255).all() and masked[..., :4].ne(255).all()
    allbad = rcam_pseudo_mask(r, valid=torch.zeros(1, 1, 3, dtype=torch.bool))
    assert allbad.eq(255).all()
    with pytest.raises(ShapeError, match="labels"):
        rcam_pseudo_mask(r, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="ignore_index"):
        rcam_pseudo_mask(r, ignore_index=2.5)


# ----------------------------------------------------------------------------- precision
def test_bf16_autocast_finite_and_close():
    torch.manual_seed(5)
    tokens = torch.randn(2, 8, 4, 4)
    feats = torch.randn(2, 8, 8, 8)
    cam = torch.rand(2, 3, 4, 4)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    m = cams_with_background(cam, y)
    ref_seeds = locate_seeds(tokens, m, y).seeds
    ref_rcam = refine_cams(feats, ref_seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seeds = locate_seeds(tokens.bfloat16(), m.bfloat16(), y).seeds
        rcam = refine_cams(feats.bfloat16(), ref_seeds)
        g = gsc_loss(m.bfloat16(), rcam)
        c = ccl_loss(m.bfloat16(), rcam, y)
    assert rcam.dtype == torch.float32 and g.dtype == torch.float32 and c.dtype == torch.float32
    assert (seeds == ref_seeds).float().mean() > 0.9
    torch.testing.assert_close(rcam, ref_rcam, atol=3e-2, rtol=0)
    assert torch.isfinite(g) and torch.isfinite(c)
    assert g.item() == pytest.approx(gsc_loss(m, ref_rcam).item(), abs=2e-2)
