"""wsss_blocks.refine: PAR, the balanced seg loss, the dense CRF (extra ``crf``)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from oracles.refine import par_per_image, par_pixel_loop, par_pseudo_labels_per_image

from wsss_blocks import ShapeError
from wsss_blocks.cam import valid_to_grid
from wsss_blocks.refine import (
    PAR,
    DenseCRF,
    SegLoss,
    combine_levels,
    crf_available,
    dense_crf,
    par,
    par_affinity,
    par_label_levels,
    par_pseudo_labels,
    seg_loss,
)

needs_crf = pytest.mark.skipif(not crf_available(), reason="the crf extra (pydensecrf2) is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMALL = {"dilations": (1, 2), "num_iters": 3}


def _inputs(b=2, c=3, k=2, h=5, w=7, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, c, h, w, generator=gen, dtype=dtype)
    cams = torch.rand(b, k, h, w, generator=gen, dtype=dtype)
    return images, cams


# ----------------------------------------------------------------------------- PAR
@pytest.mark.parametrize("with_valid", [False, True], ids=["full", "valid"])
def test_par_pixel_loop_oracle(with_valid):
    images, cams = _inputs(b=2, h=5, w=7)
    valid = None
    if with_valid:
        valid = torch.ones(2, 5, 7, dtype=torch.bool)
        valid[0, :, 5:] = False  # right padding
        valid[1, 3:] = False  # bottom padding
        valid[1, 0, 0] = False  # a hole
    out = par(images, cams, valid=valid, **SMALL)
    for i in range(2):
        ref = par_pixel_loop(images[i], cams[i], None if valid is None else valid[i], **SMALL)
        torch.testing.assert_close(out[i].double(), ref, atol=1e-5, rtol=1e-5)


def test_par_toco_defaults_match_pixel_loop():
    """ToCo's 6 dilations (up to 24) on an image smaller than the stencil: replicate padding."""
    images, cams = _inputs(b=1, h=6, w=4, seed=3)
    out = par(images, cams, num_iters=2)
    ref = par_pixel_loop(images[0], cams[0], num_iters=2)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_par_matches_per_image_toco_form_and_resizes():
    images, _ = _inputs(b=3, h=16, w=12, seed=1)
    cams = torch.rand(3, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    out = par(images, cams)
    assert out.shape == (3, 4, 16, 12)
    torch.testing.assert_close(out, par_per_image(images, cams), atol=1e-5, rtol=1e-5)


def test_par_constant_image_keeps_constant_map():
    images = torch.full((2, 3, 9, 11), 0.4)
    cams = torch.full((2, 3, 9, 11), 0.7)
    out = par(images, cams)
    torch.testing.assert_close(out, torch.full_like(out, 0.7 * 1.01**10))  # rows sum to 1.01
    assert not torch.allclose(par(torch.rand(2, 3, 9, 11), torch.rand(2, 3, 9, 11)), out)


def test_par_edge_stops_propagation():
    images = torch.zeros(1, 3, 12, 16)
    images[..., 8:] = 1.0
    cams = torch.zeros(1, 1, 12, 16)
    cams[..., :2] = 1.0
    blocked = par(images, cams, pos_weight=0.0)
    assert blocked[..., 8:].abs().max() < 1e-6
    assert blocked[..., :8].min() > 0.1
    flat = par(torch.zeros_like(images), cams, pos_weight=0.0)
    assert flat[..., 8:].min() > 0.01  # without the edge it spreads
    leak = par(images, cams)[..., 8:].max()  # the position term alone leaks ~1 %
    assert leak < 0.05 * flat[..., 8:].max()


def test_par_valid_padding_neither_gives_nor_takes():
    images, cams = _inputs(b=2, h=8, w=10, seed=4)
    valid = torch.ones(2, 8, 10, dtype=torch.bool)
    valid[:, :, 7:] = False
    out = par(images, cams, valid=valid)
    assert torch.equal(out[..., 7:], cams[..., 7:])  # padding keeps its values (takes nothing)
    images2, cams2 = images.clone(), cams.clone()
    images2[..., 7:] = torch.rand(2, 3, 8, 3)
    cams2[..., 7:] = 100.0
    out2 = par(images2, cams2, valid=valid)
    torch.testing.assert_close(out2[..., :7], out[..., :7])  # and gives nothing


def test_par_isolated_valid_pixel_keeps_value():
    images, cams = _inputs(b=1, h=4, w=4)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, 1, 2] = True
    out = par(images, cams, valid=valid, **SMALL)
    torch.testing.assert_close(out, cams)


def test_par_affinity_rows_and_normalisation_invariance():
    images, _ = _inputs(b=2, h=6, w=9)
    aff = par_affinity(images)
    assert aff.shape == (2, 48, 6, 9)
    torch.testing.assert_close(aff.sum(1), torch.full((2, 6, 9), 1.01))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(par_affinity((images - mean) / std), aff, atol=1e-5, rtol=1e-4)


def test_par_shapes_dtypes_edge_cases():
    images, cams = _inputs(b=1, k=1, h=3, w=13)
    out = par(images, cams)
    assert out.shape == (1, 1, 3, 13) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out64 = par(images.double(), cams.double(), **SMALL)
    assert out64.dtype == torch.float64
    assert torch.equal(par(images, cams, num_iters=0), cams)
    half = par(images, cams.bfloat16(), **SMALL)
    assert half.dtype == torch.bfloat16


def test_par_bf16_autocast_finite_and_close():
    images, cams = _inputs(b=2, h=10, w=12)
    ref = par(images, cams)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = par(images, cams)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_par_gradcheck():
    images, cams = _inputs(b=1, k=2, h=4, w=5, dtype=torch.float64)
    cams.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: par(images, c, **SMALL), (cams,))
    flat = torch.zeros(1, 3, 4, 5, requires_grad=True)  # no gradient (and no NaN) into images
    par(flat, cams.float().detach().requires_grad_(), **SMALL).sum().backward()
    assert flat.grad is None


def test_par_module_equals_function():
    images, cams = _inputs(b=2, h=8, w=6)
    valid = torch.rand(2, 8, 6) > 0.2
    module = PAR(dilations=(1, 3), num_iters=4, kernel_width=0.5, pos_weight=0.1)
    expect = par(images, cams, valid=valid, dilations=(1, 3), num_iters=4, kernel_width=0.5, pos_weight=0.1)
    torch.testing.assert_close(module(images, cams, valid=valid), expect, rtol=0, atol=0)
    assert "num_iters=4" in repr(module) and module.state_dict() == {}


def test_par_valid_at_any_resolution_is_resampled_to_the_image():
    images, cams = _inputs(b=2, h=8, w=6)
    coarse = torch.rand(2, 4, 3) > 0.3
    fine = valid_to_grid(coarse, (8, 6))
    assert not torch.equal(fine, torch.ones_like(fine))
    torch.testing.assert_close(par(images, cams, valid=coarse, **SMALL), par(images, cams, valid=fine, **SMALL))


def test_par_errors():
    images, cams = _inputs()
    with pytest.raises(ShapeError, match="images"):
        par(images[0], cams)
    with pytest.raises(ShapeError, match="images"):
        par(images.long(), cams)
    with pytest.raises(ShapeError, match="maps"):
        par(images, cams[:1])
    with pytest.raises(ShapeError, match="maps"):
        par(images, cams.long())
    with pytest.raises(ShapeError, match="valid"):
        par(images, cams, valid=torch.ones(images.shape[0] + 1, 5, 6, dtype=torch.bool))
    with pytest.raises(ShapeError, match="valid"):
        par(images, cams, valid=torch.ones(2, 5, 7))
    with pytest.raises(ValueError, match="num_iters"):
        par(images, cams, num_iters=2.5)
    with pytest.raises(ValueError, match="dilations"):
        par(images, cams, dilations=())
    with pytest.raises(ValueError, match=r"dilations\[1\]"):
        par(images, cams, dilations=(1, 0))
    with pytest.raises(ValueError, match="kernel_width"):
        par(images, cams, kernel_width=0.0)
    with pytest.raises(ValueError, match="pos_weight"):
        PAR(pos_weight=-1.0)
    with pytest.raises(ValueError, match="eps"):
        par(images, cams, eps=0.0)


@needs_cuda
def test_par_cuda_matches_cpu():
    images, cams = _inputs(b=2, h=20, w=18)
    out = par(images.cuda(), cams.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), par(images, cams), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- seg loss
def _ce(logits, cls, y, x):
    return -torch.log_softmax(logits[0, :, y, x], dim=0)[cls]


def test_seg_loss_hand_built():
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 3.0, 1.0]], [[1.0, 1.0, -1.0]]]])  # (1, 3, 1, 3)
    target = torch.tensor([[[0, 1, 2]]])
    expect = 0.5 * _ce(logits, 0, 0, 0) + 0.5 * 0.5 * (_ce(logits, 1, 0, 1) + _ce(logits, 2, 0, 2))
    torch.testing.assert_close(seg_loss(logits, target), expect)
    # ignored pixels drop out; a missing foreground set contributes 0, not NaN
    only_bg = torch.tensor([[[0, 255, 255]]])
    torch.testing.assert_close(seg_loss(logits, only_bg), 0.5 * _ce(logits, 0, 0, 0))
    only_fg = torch.tensor([[[255, 1, 255]]])
    torch.testing.assert_close(seg_loss(logits, only_fg), 0.5 * _ce(logits, 1, 0, 1))
    custom = seg_loss(logits, torch.tensor([[[7, 1, 7]]]), ignore_index=7)
    torch.testing.assert_close(custom, 0.5 * _ce(logits, 1, 0, 1))


def test_seg_loss_balances_sets():
    """One background pixel weighs as much as all foreground pixels together."""
    logits = torch.zeros(1, 2, 1, 5)
    logits[0, 1, 0, 0] = 4.0  # the background pixel is badly predicted
    target = torch.tensor([[[0, 1, 1, 1, 1]]])
    ce_bad = math.log(1 + math.exp(4.0))
    expect = 0.5 * ce_bad + 0.5 * math.log(2.0)
    assert seg_loss(logits, target).item() == pytest.approx(expect, rel=1e-6)


def test_seg_loss_all_ignored_is_attached_zero():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = seg_loss(logits, torch.full((2, 3, 3), 255))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_seg_loss_upsamples_logits():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg_loss(logits, target), seg_loss(up, target))


def test_seg_loss_oracle_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 4, generator=gen)
    target = torch.randint(0, 5, (3, 6, 4), generator=gen)
    target[torch.rand(3, 6, 4, generator=gen) < 0.3] = 255
    bg, fg = [], []
    for b in range(3):
        for y in range(6):
            for x in range(4):
                t = int(target[b, y, x])
                if t == 255:
                    continue
                ce = -torch.log_softmax(logits[b, :, y, x], 0)[t]
                (bg if t == 0 else fg).append(ce)
    expect = 0.5 * torch.stack(bg).mean() + 0.5 * torch.stack(fg).mean()
    torch.testing.assert_close(seg_loss(logits, target), expect)


def test_seg_loss_gradcheck_and_autocast():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1, 2, 255]] * 3, [[255, 0, 0, 2]] * 3])
    assert torch.autograd.gradcheck(lambda x: seg_loss(x, target), (logits,))
    ref = seg_loss(logits.detach().float(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg_loss(logits.detach().float().bfloat16(), target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_seg_loss_module_and_errors():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    assert torch.equal(SegLoss()(logits, target), seg_loss(logits, target))
    assert repr(SegLoss(ignore_index=-1)) == "SegLoss(ignore_index=-1)"
    with pytest.raises(ShapeError, match="logits"):
        seg_loss(logits[0], target)
    with pytest.raises(ShapeError, match="masks"):
        seg_loss(logits, target.float())
    with pytest.raises(ShapeError, match="masks"):
        seg_loss(logits, target[:1])
    with pytest.raises(ShapeError, match="masks: expected values in \\[0, 2\\]"):
        seg_loss(logits, torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match="ignore_index"):
        SegLoss(ignore_index=2.5)


# ----------------------------------------------------------------------------- dense CRF
def test_import_does_not_load_pydensecrf():
    code = "import sys, wsss_blocks, wsss_blocks.refine; print('pydensecrf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dense_crf_missing_extra_names_it(monkeypatch):
    import wsss_blocks.refine.crf as crf_mod

    def boom(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(crf_mod.importlib, "import_module", boom)
    assert crf_mod.crf_available() is False
    with pytest.raises(ImportError, match=r"wsss_blocks\[crf\]"):
        dense_crf(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.full((1, 2, 4, 4), 0.5))


def test_dense_crf_errors():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    probs = torch.full((1, 2, 4, 4), 0.5)
    with pytest.raises(ShapeError, match="images"):
        dense_crf(images[:, :2], probs)
    with pytest.raises(ShapeError, match="images"):
        dense_crf(images.long(), probs)
    with pytest.raises(ShapeError, match="probs"):
        dense_crf(images, probs[..., :3])
    with pytest.raises(ValueError, match="num_iters"):
        dense_crf(images, probs, num_iters=0)
    with pytest.raises(ValueError, match="bi_rgb_std"):
        DenseCRF(bi_rgb_std=0.0)
    with pytest.raises(ValueError, match="workers"):
        DenseCRF(workers=-1)


def _two_region_scene():
    """Left half dark, right half bright; noisy probabilities that disagree with the edge."""
    images = torch.zeros(2, 3, 16, 20, dtype=torch.uint8)
    images[..., 10:] = 220
    gen = torch.Generator().manual_seed(0)
    fg = torch.zeros(2, 1, 16, 20)
    fg[..., 10:] = 0.65
    fg[..., :10] = 0.35
    fg = (fg + 0.4 * (torch.rand(2, 1, 16, 20, generator=gen) - 0.5)).clamp(0.01, 0.99)
    return images, torch.cat([1 - fg, fg], dim=1)


@needs_crf
def test_dense_crf_cleans_noisy_two_region_scene():
    images, probs = _two_region_scene()
    out = dense_crf(images, probs)
    assert out.shape == probs.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(2, 16, 20), atol=1e-4, rtol=0)
    truth = torch.zeros(2, 16, 20, dtype=torch.long)
    truth[..., 10:] = 1
    before = (probs.argmax(1) == truth).float().mean()
    after = (out.argmax(1) == truth).float().mean()
    assert after == 1.0 and before < 1.0


@needs_crf
def test_dense_crf_batch_equals_per_image_and_workers_and_module():
    images, probs = _two_region_scene()
    out = dense_crf(images, probs, num_iters=3)
    for i in range(2):
        torch.testing.assert_close(out[i : i + 1], dense_crf(images[i : i + 1], probs[i : i + 1], num_iters=3))
    torch.testing.assert_close(dense_crf(images, probs, num_iters=3, workers=2), out)
    torch.testing.assert_close(DenseCRF(num_iters=3)(images, probs), out)
    # float ImageNet-normalised images are denormalised first
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    normed = (images.float() / 255.0 - mean) / std
    torch.testing.assert_close(dense_crf(normed, probs, num_iters=3), out)


# ----------------------------------------------------------------------------- PAR pseudo labels
def _label_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 12, 10, generator=gen)
    cams = torch.rand(3, 4, 6, 5, generator=gen)
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    return images, cams, labels


def test_par_pseudo_labels_matches_per_image_toco_form():
    images, cams, labels = _label_inputs()
    out = par_pseudo_labels(images, cams, labels, size=(24, 20), num_iters=4)
    ref = par_pseudo_labels_per_image(images, cams, labels, size=(24, 20), num_iters=4)
    assert out.shape == (3, 24, 20) and out.dtype == torch.long
    assert torch.equal(out, ref)
    assert {0, 255} <= set(out.unique().tolist())  # the inputs exercise all three cases


def test_par_pseudo_labels_absent_classes_and_padding():
    images, cams, labels = _label_inputs(1)
    cams[:, 1] = 5.0  # an absent class with a huge CAM must never win
    valid = torch.ones(3, 24, 20, dtype=torch.bool)
    valid[:, 18:] = False
    out = par_pseudo_labels(images, cams, labels, valid=valid, size=(24, 20))
    assert (out[:, 18:] == 255).all()
    for i in range(3):
        allowed = {0, 255} | {k + 1 for k in range(4) if labels[i, k]}
        assert set(out[i].unique().tolist()) <= allowed
    assert not out.requires_grad


def test_combine_levels_hand_built_and_errors():
    y_high = torch.tensor([[3, 0, 0, 0, 255, 0]])
    y_low = torch.tensor([[1, 0, 2, 255, 0, 0]])
    assert combine_levels(y_high, y_low).tolist() == [[3, 0, 255, 255, 255, 0]]
    assert combine_levels(y_high, y_low, ignore_index=9).tolist() == [[3, 0, 9, 9, 255, 0]]
    with pytest.raises(ShapeError, match="masks_low"):
        combine_levels(y_high, y_low[:, :3])


def test_par_pseudo_labels_levels_and_no_propagation():
    """par_label_levels gives the maps par_pseudo_labels combines; num_iters=0 is the plain threshold rule."""
    from wsss_blocks.cam import pseudo_labels

    images, cams, labels = _label_inputs()
    valid = torch.ones(3, 24, 20, dtype=torch.bool)
    valid[:, :, 15:] = False
    y = par_label_levels(images, cams, labels, valid=valid, size=(24, 20), num_iters=4)
    assert y.shape == (3, 2, 24, 20)
    assert (y[..., 15:] == 255).all()
    out = par_pseudo_labels(images, cams, labels, valid=valid, size=(24, 20), num_iters=4)
    assert torch.equal(out, combine_levels(y[:, 0], y[:, 1]))
    assert not torch.equal(y[:, 0], y[:, 1])  # the inputs make the two levels differ
    big = torch.nn.functional.interpolate(images, size=(24, 20), mode="bilinear", align_corners=False)
    cam_big = torch.nn.functional.interpolate(cams, size=(24, 20), mode="bilinear", align_corners=False)
    plain = par_pseudo_labels(big, cam_big, labels, num_iters=0)
    assert torch.equal(plain, pseudo_labels(cam_big, labels, low=0.25, high=0.7))


def test_par_pseudo_labels_thresholds_order_and_errors():
    images, cams, labels = _label_inputs()
    lo = par_pseudo_labels(images, torch.zeros_like(cams), labels)  # empty CAMs: all background
    assert (lo == 0).all()
    with pytest.raises(ValueError, match="low"):
        par_pseudo_labels(images, cams, labels, low=0.7, high=0.25)
    with pytest.raises(ShapeError, match="labels"):
        par_pseudo_labels(images, cams, labels[:, :3])
    with pytest.raises(ShapeError, match="valid"):
        par_pseudo_labels(images, cams, labels, valid=torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="size"):
        par_pseudo_labels(images, cams, labels, size=(0, 4))


def test_runs_with_checks_disabled(monkeypatch):
    monkeypatch.setenv("WSSS_BLOCKS_CHECKS", "0")
    images, cams, labels = _label_inputs()
    assert par(images, cams, **SMALL).shape == (3, 4, 12, 10)
    assert par_pseudo_labels(images, cams, labels, num_iters=2).shape == (3, 12, 10)
    assert torch.isfinite(seg_loss(torch.randn(3, 5, 6, 5), torch.randint(0, 5, (3, 12, 10))))


@needs_cuda
def test_seg_loss_and_pseudo_labels_cuda():
    images, cams, labels = _label_inputs()
    out = par_pseudo_labels(images.cuda(), cams.cuda(), labels.cuda(), num_iters=4)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), par_pseudo_labels(images, cams, labels, num_iters=4))
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    torch.testing.assert_close(seg_loss(logits.cuda(), target.cuda()).cpu(), seg_loss(logits, target))
