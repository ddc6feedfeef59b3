"""ViT-PCM functional parts: dihedral transforms, mosaic, teacher warp, MCE, ET, pseudo masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles.pcm import (
    dihedral_loop,
    et_loss_loop,
    mce_loss_loop,
    mosaic_loop,
    renormalize_loop,
    teacher_to_tiles_loop,
)

from wsss_blocks import ShapeError
from wsss_blocks.pcm import (
    ETLoss,
    MCELoss,
    MosaicOutput,
    MosaicRecord,
    PatchProbs,
    dihedral_inverse,
    dihedral_transform,
    et_loss,
    masked_renormalize,
    mce_loss,
    mosaic,
    patch_class_probs,
    pseudo_mask,
    random_dihedral_codes,
    teacher_to_tiles,
    unmosaic,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------- dihedral

KNOWN = {
    1: [[2, 1, 0], [5, 4, 3], [8, 7, 6]],
    2: [[6, 7, 8], [3, 4, 5], [0, 1, 2]],
    4: [[0, 3, 6], [1, 4, 7], [2, 5, 8]],
    5: [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
    6: [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    7: [[8, 5, 2], [7, 4, 1], [6, 3, 0]],
}


@pytest.mark.parametrize("code", sorted(KNOWN))
def test_dihedral_known(code):
    x = torch.arange(9).view(1, 1, 3, 3)
    assert dihedral_transform(x, torch.tensor([code]))[0, 0].tolist() == KNOWN[code]


def test_dihedral_rotations_and_inverse_codes():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(dihedral_transform(x, torch.tensor([5])), torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(dihedral_transform(x, torch.tensor([6])), torch.rot90(x, -1, (-2, -1)))
    assert torch.equal(dihedral_transform(x, torch.tensor([3])), torch.rot90(x, 2, (-2, -1)))
    for c in range(8):
        code = torch.tensor([c])
        assert torch.equal(dihedral_inverse(dihedral_transform(x, code), code), x)
        assert torch.equal(dihedral_transform(dihedral_inverse(x, code), code), x)


def test_dihedral_mixed_batch_vs_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 5, generator=g)
    codes = random_dihedral_codes(batch_size=16, generator=g)
    assert torch.equal(dihedral_transform(x, codes), dihedral_loop(x, codes))
    assert torch.equal(dihedral_inverse(x, codes), dihedral_loop(x, codes, inverse=True))


def test_dihedral_non_square():
    x = torch.randn(4, 2, 3, 5)
    codes = torch.arange(4)
    y = dihedral_transform(x, codes)
    assert torch.equal(y, dihedral_loop(x, codes))
    assert torch.equal(dihedral_inverse(y, codes), x)
    with pytest.raises(ShapeError, match="square"):
        dihedral_transform(x, torch.tensor([0, 1, 4, 2]))
    assert int(random_dihedral_codes(batch_size=500, square=False).max()) == 3


def test_dihedral_errors_grad_and_device():
    with pytest.raises(ShapeError, match="codes"):
        dihedral_transform(torch.zeros(2, 1, 3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="codes"):
        dihedral_transform(torch.zeros(2, 1, 3, 3), torch.zeros(2))
    with pytest.raises(ShapeError, match="codes"):
        dihedral_transform(torch.zeros(1, 1, 3, 3), torch.tensor([8]))
    with pytest.raises(ShapeError, match="maps"):
        dihedral_transform(torch.zeros(1, 3, 3), torch.tensor([0]))
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dihedral_transform(t, torch.tensor([5, 3])), (x,))


# ------------------------------------------------------------------------------------- mosaic

def test_mosaic_quadrants_and_two_mosaics():
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 32, 32)
    m, rec = mosaic(images, crop_prob=0.0, patch_size=8, dihedral=False)
    assert m.shape == (2, 3, 32, 32)
    assert m[0, 0, ::16, ::16].tolist() == [[0, 1], [2, 3]]
    assert m[1, 0, ::16, ::16].tolist() == [[4, 5], [6, 7]]
    assert torch.equal(rec.boxes, torch.tensor([[0, 0, 32, 32]] * 8))
    assert rec.tile_size == (16, 16) and rec.image_size == (32, 32) and rec.patch_size == 8
    assert torch.equal(unmosaic(m)[:, 0, 0, 0], torch.arange(8.0))


@pytest.mark.parametrize("align_corners", [False, True])
def test_mosaic_vs_loop(align_corners):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 48, 64, dtype=torch.float64, generator=g)
    boxes = torch.tensor([[0, 0, 48, 64], [16, 8, 40, 32], [8, 16, 48, 64], [0, 0, 16, 16],
                          [24, 40, 48, 64], [0, 8, 48, 16], [8, 0, 16, 64], [0, 0, 48, 64]])
    codes = torch.randint(0, 4, (8,), generator=g)  # 24 x 32 tiles: no transpose
    m, rec = mosaic(images, scale=0.5, patch_size=8, boxes=boxes, codes=codes, align_corners=align_corners)
    ref = mosaic_loop(images, boxes, codes, (24, 32), align_corners)
    assert m.shape == (2, 3, 48, 64)
    torch.testing.assert_close(m, ref, atol=1e-12, rtol=0)
    assert rec.align_corners is align_corners


def test_mosaic_square_codes_and_sampling():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2000, 1, 48, 48)[:, :, :1, :1].expand(2000, 1, 48, 48)
    _, rec = mosaic(images, crop_prob=0.3, crop=16, scale=0.5, patch_size=8, generator=g)
    y0, x0, y1, x1 = rec.boxes.unbind(1)
    cropped = (y1 - y0) == 16
    assert abs(cropped.float().mean().item() - 0.3) < 0.05
    assert ((y0 % 8 == 0) & (x0 % 8 == 0) & (y1 <= 48) & (x1 <= 48) & (y0 >= 0)).all()
    assert torch.equal(cropped, (x1 - x0) == 16)
    assert torch.equal(rec.boxes[~cropped], torch.tensor([0, 0, 48, 48]).expand(int((~cropped).sum()), 4))
    starts = set(y0[cropped].tolist())
    assert starts == {0, 8, 16, 24, 32}
    assert set(rec.codes.tolist()) == set(range(8))


def test_mosaic_errors():
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ShapeError, match="divisible by 4"):
        mosaic(torch.zeros(6, 3, 32, 32), patch_size=8, crop=16)
    with pytest.raises(ShapeError, match="images"):
        mosaic(torch.zeros(4, 32, 32), patch_size=8)
    with pytest.raises(ValueError, match="scale"):
        mosaic(x, patch_size=8, crop=16, scale=0.3)  # 9.6 px tile
    with pytest.raises(ValueError, match="crop"):
        mosaic(x, patch_size=8, crop=12)
    with pytest.raises(ValueError, match="crop"):
        mosaic(x, patch_size=8, crop=40)
    with pytest.raises(ValueError, match="crop_prob"):
        mosaic(x, patch_size=8, crop=16, crop_prob=1.5)
    with pytest.raises(ValueError, match="boxes"):
        mosaic(x, patch_size=8, boxes=torch.tensor([[0, 0, 12, 16]] * 4))
    with pytest.raises(ValueError, match="boxes"):
        mosaic(x, patch_size=8, boxes=torch.tensor([[0, 0, 40, 16]] * 4))
    with pytest.raises(ShapeError, match="maps"):
        unmosaic(torch.zeros(1, 3, 5, 4))


def test_mosaic_scale_error():
    with pytest.raises(ValueError, match="scale"):
        mosaic(torch.zeros(4, 3, 32, 32), patch_size=16, crop=16, scale=0.75)  # tile 24, p 16


def test_named_returns_and_keyword_only_options():
    out = patch_class_probs(torch.zeros(1, 3, 2, 2))
    assert isinstance(out, PatchProbs) and out._fields == ("probs", "pooled_probs")
    assert torch.equal(out.pooled_probs, out.probs.amax((-2, -1)))
    res = mosaic(torch.zeros(4, 3, 16, 16), crop_prob=0.0, patch_size=8)
    assert isinstance(res, MosaicOutput) and res._fields == ("images", "record")
    assert res.images.shape == (1, 3, 16, 16) and res.record.tile_size == (8, 8)
    with pytest.raises(TypeError):
        mce_loss(torch.rand(1, 3), torch.ones(1, 2), "ignore")  # type: ignore[misc]
    with pytest.raises(TypeError):
        random_dihedral_codes(4)  # type: ignore[misc]
    with pytest.raises(TypeError):
        pseudo_mask(torch.rand(1, 3, 2, 2), None, (4, 4))  # type: ignore[misc]


# ------------------------------------------------------------------------------ teacher warp

@pytest.mark.parametrize("crop", [None, 192])
def test_equivariance_identity(crop):
    """teacher_to_tiles(f(T_c1 x), rec, c1) == unmosaic(f(mosaic(x))) for f = avg_pool(p)."""
    g = torch.Generator().manual_seed(3)
    p = 16
    x = torch.randn(4, 3, 384, 384, dtype=torch.float64, generator=g)
    c1 = random_dihedral_codes(batch_size=4, generator=g)
    kw = {"crop_prob": 0.0} if crop is None else {"crop_prob": 1.0, "crop": crop}
    m, rec = mosaic(x, scale=0.5, patch_size=p, generator=g, **kw)
    student = unmosaic(F.avg_pool2d(m, p))
    teacher = F.avg_pool2d(dihedral_transform(x, c1), p)
    torch.testing.assert_close(teacher_to_tiles(teacher, rec, teacher_codes=c1), student, atol=1e-10, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_teacher_to_tiles_vs_loop(align_corners):
    g = torch.Generator().manual_seed(4)
    teacher = torch.rand(8, 4, 6, 6, dtype=torch.float64, generator=g)
    _, rec = mosaic(torch.zeros(8, 3, 48, 48), crop_prob=0.5, crop=24, scale=0.5, patch_size=8,
                    align_corners=align_corners, generator=g)
    c1 = random_dihedral_codes(batch_size=8, generator=g)
    out = teacher_to_tiles(teacher, rec, teacher_codes=c1)
    ref = teacher_to_tiles_loop(teacher, rec.boxes, rec.codes, c1, 8, (24, 24), align_corners)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert out.requires_grad is False
    with pytest.raises(ShapeError, match="teacher_probs"):
        teacher_to_tiles(torch.rand(8, 4, 5, 6), rec)


# ---------------------------------------------------------------------------------------- MCE

@pytest.mark.parametrize(("background", "labels", "expected"), [
    ("always_one", [[1, 0]], 0.1446214),
    ("from_labels", [[0, 1, 0]], 0.6067194),
    ("ignore", [[1, 0]], 0.1053604),
])
def test_mce_known(background, labels, expected):
    y_hat = torch.tensor([[0.8, 0.9, 0.1]])
    assert mce_loss(y_hat, torch.tensor(labels), background=background).item() == pytest.approx(expected, abs=1e-6)
    assert MCELoss(background=background)(y_hat, torch.tensor(labels)).item() == pytest.approx(expected, abs=1e-6)


def test_mce_keras_clipping():
    y_hat = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = mce_loss(y_hat, torch.tensor([[0]]))   # y = [1, 0]: both fully wrong
    assert loss.item() == pytest.approx(-math.log(2e-7), abs=1e-4)
    assert loss.item() == pytest.approx(15.4249, abs=1e-4)
    loss.backward()
    assert torch.all(y_hat.grad == 0)


def test_mce_vs_loop_and_grad_only_at_argmax():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 5, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (3, 3), generator=g)
    probs, pooled = patch_class_probs(logits)
    probs.retain_grad()
    loss = mce_loss(pooled, labels)
    torch.testing.assert_close(loss, mce_loss_loop(pooled, labels), atol=1e-6, rtol=0)
    loss.backward()
    flat = probs.detach().flatten(2)
    arg = F.one_hot(flat.argmax(-1), flat.shape[-1]).bool()
    grad = probs.grad.flatten(2)
    assert torch.all(grad[~arg] == 0) and torch.all(grad[arg] != 0)


def test_mce_errors_edge_and_dtypes():
    with pytest.raises(ShapeError, match="labels"):
        mce_loss(torch.rand(2, 3), torch.ones(2, 3))
    with pytest.raises(ShapeError, match="labels"):
        mce_loss(torch.rand(2, 3), torch.ones(2, 2), background="from_labels")
    with pytest.raises(ShapeError, match="labels"):
        mce_loss(torch.rand(2, 3), torch.full((2, 2), 0.5))
    with pytest.raises(ShapeError, match="pooled_probs"):
        mce_loss(torch.rand(2, 3, 1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="background"):
        mce_loss(torch.rand(2, 3), torch.ones(2, 2), background="never")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="background"):
        mce_loss(torch.rand(2, 1), torch.ones(2, 0))
    assert torch.isfinite(mce_loss(torch.rand(1, 2), torch.zeros(1, 1)))  # K = 1, B = 1, empty labels
    assert mce_loss(torch.rand(2, 3, dtype=torch.float64), torch.ones(2, 2)).dtype == torch.float64
    assert mce_loss(torch.rand(2, 3).bfloat16(), torch.ones(2, 2)).dtype == torch.float32
    x = torch.rand(2, 3, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mce_loss(t, torch.tensor([[1, 0], [0, 1]])), (x,))


# ---------------------------------------------------------------------------------- targets / ET

TEACHER = torch.tensor([[[0.5, 0.2]], [[0.25, 0.5]], [[0.25, 0.3]]])  # (3, 1, 2): C = 3, 1 x 2 tile


def _identity_record(b=4, size=(1, 2)):
    return MosaicRecord(torch.tensor([[0, 0, *size]] * b), torch.zeros(b, dtype=torch.long), size, size, 1, False)


def test_target_known():
    t = masked_renormalize(TEACHER[None], torch.tensor([[1, 0]]))
    expected = torch.tensor([[2 / 3, 1 / 3, 0.0], [2 / 7, 5 / 7, 0.0]]).T[:, None, :]
    torch.testing.assert_close(t[0], expected)


def test_et_known_values():
    teacher = TEACHER.expand(4, 3, 1, 2)
    labels = torch.tensor([[1, 0]] * 4)
    rec = _identity_record()
    assert et_loss(torch.full((4, 3, 1, 2), 1 / 3), teacher, labels, rec).item() == pytest.approx(math.log(3))
    student = torch.tensor([[[0.7, 0.2]], [[0.2, 0.7]], [[0.1, 0.1]]]).expand(4, 3, 1, 2)
    assert et_loss(student, teacher, labels, rec).item() == pytest.approx(0.7444349, abs=1e-6)
    assert ETLoss()(student, teacher, labels, rec).item() == pytest.approx(0.7444349, abs=1e-6)
    none = et_loss(student, teacher, labels, rec, reduction="none")
    assert none.shape == (4, 1, 2)


def test_et_zero_when_student_is_target():
    """ET equals the target's entropy (its minimum over students) when S = T; 0 for one-hot T."""
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(4, 3, 4, 4, dtype=torch.float64, generator=g)
    teacher = F.one_hot(scores.argmax(1), 3).permute(0, 3, 1, 2).double()
    rec = _identity_record(4, (4, 4))
    labels = torch.ones(4, 2)
    target = masked_renormalize(teacher, labels)
    assert et_loss(target, teacher, labels, rec).item() == pytest.approx(0.0, abs=1e-5)
    soft = torch.rand(4, 3, 4, 4, dtype=torch.float64, generator=g).softmax(1)
    target = masked_renormalize(soft, labels)
    entropy = -(target * target.clamp_min(1e-7).log()).sum(1).mean()
    assert et_loss(target, soft, labels, rec).item() == pytest.approx(entropy.item(), abs=1e-6)


def test_et_vs_loop_and_gradients():
    g = torch.Generator().manual_seed(7)
    teacher = torch.rand(8, 4, 6, 6, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    labels = torch.randint(0, 2, (8, 3), generator=g)
    _, rec = mosaic(torch.zeros(8, 3, 48, 48), crop_prob=0.5, crop=24, scale=0.5, patch_size=8, generator=g)
    c1 = random_dihedral_codes(batch_size=8, generator=g)
    student = torch.rand(8, 4, 3, 3, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    loss = et_loss(student, teacher, labels, rec, teacher_codes=c1)
    ref = et_loss_loop(student.detach(), teacher.detach(), labels, rec.boxes, rec.codes, c1, 8, (24, 24), False)
    torch.testing.assert_close(loss.detach(), ref, atol=1e-10, rtol=0)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    s = torch.rand(4, 3, 1, 2, dtype=torch.float64).clamp(1e-3, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: et_loss(t, TEACHER.expand(4, 3, 1, 2).double(),
                                                      torch.tensor([[1, 0]] * 4), _identity_record()), (s,))


def test_et_target_norm_image_and_edges():
    g = torch.Generator().manual_seed(8)
    teacher = torch.rand(4, 3, 6, 6, generator=g).softmax(1)
    student = torch.rand(4, 3, 3, 3, generator=g).softmax(1)
    _, rec = mosaic(torch.zeros(4, 3, 48, 48), crop_prob=1.0, crop=16, patch_size=8, generator=g)
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    a = et_loss(student, teacher, labels, rec, target_norm="tile")
    b = et_loss(student, teacher, labels, rec, target_norm="image")
    assert torch.isfinite(a) and torch.isfinite(b) and not torch.allclose(a, b)
    # all-background labels: target = background one-hot -> loss = -log S_bg
    none = et_loss(student, teacher, torch.zeros(4, 2), rec, reduction="none")
    torch.testing.assert_close(none, -student[:, 0].log(), atol=1e-5, rtol=1e-5)
    # all-zero teacher: every target 0, loss 0
    assert et_loss(student, torch.zeros_like(teacher), labels, rec).item() == 0.0
    # from_labels with background 0 removes it from the target
    full = torch.cat([torch.zeros(4, 1), torch.ones(4, 2)], 1)
    t = et_loss(student, teacher, full, rec, background="from_labels", reduction="none")
    assert torch.isfinite(t).all()


def test_et_errors():
    rec = _identity_record()
    s = torch.full((4, 3, 1, 2), 1 / 3)
    with pytest.raises(ShapeError, match="divisible by 4"):
        et_loss(s[:2], s[:2], torch.ones(2, 2), rec)
    with pytest.raises(ShapeError, match="student_probs"):
        et_loss(torch.rand(4, 3, 2, 2), s, torch.ones(4, 2), rec)
    with pytest.raises(ShapeError, match="teacher_probs"):
        et_loss(s, torch.rand(4, 3, 2, 2), torch.ones(4, 2), rec)
    with pytest.raises(ShapeError, match="teacher_probs"):
        et_loss(s, torch.rand(8, 3, 1, 2), torch.ones(4, 2), rec)
    with pytest.raises(ShapeError, match="labels"):
        et_loss(s, s, torch.ones(4, 3), rec)
    with pytest.raises(ValueError, match="target_norm"):
        et_loss(s, s, torch.ones(4, 2), rec, target_norm="x")  # type: ignore[arg-type]


def test_et_bf16_autocast_close():
    g = torch.Generator().manual_seed(9)
    teacher = torch.rand(4, 3, 6, 6, generator=g).softmax(1)
    logits = torch.randn(4, 3, 3, 3, generator=g)
    _, rec = mosaic(torch.zeros(4, 3, 48, 48), crop_prob=0.5, crop=16, patch_size=8, generator=g)
    ref = et_loss(patch_class_probs(logits)[0], teacher, torch.ones(4, 2), rec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = et_loss(patch_class_probs(logits.bfloat16())[0], teacher, torch.ones(4, 2), rec)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


# ------------------------------------------------------------------------------------ renorm / mask

def test_masked_renormalize_vs_loop():
    g = torch.Generator().manual_seed(10)
    probs = torch.rand(3, 4, 3, 5, generator=g)
    probs[1, 2] = 0  # a present class with an all-zero map
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    y = torch.cat([torch.ones(3, 1), labels.float()], 1)
    torch.testing.assert_close(masked_renormalize(probs, labels), renormalize_loop(probs, y))
    full = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    from_labels = masked_renormalize(probs, full, background="from_labels")
    torch.testing.assert_close(from_labels, renormalize_loop(probs, full.float()))
    assert torch.equal(from_labels[2], torch.zeros(4, 3, 5))
    torch.testing.assert_close(masked_renormalize(probs, labels, background="ignore"),
                               masked_renormalize(probs, labels))


@pytest.mark.parametrize(("labels", "expected"), [
    ([[1, 1]], [1, 0, 2]), ([[1, 0]], [1, 0, 0]), ([[0, 0]], [0, 0, 0]), (None, [0, 0, 0]),
])
def test_pseudo_mask_known(labels, expected):
    probs = torch.tensor([[[[0.6, 0.8, 0.5]], [[0.4, 0.1, 0.2]], [[0.0, 0.1, 0.3]]]])
    lab = None if labels is None else torch.tensor(labels)
    out = pseudo_mask(probs, lab)
    assert out.dtype == torch.int64 and out[0, 0].tolist() == expected


def test_pseudo_mask_size_and_errors():
    probs = torch.rand(2, 3, 3, 4).softmax(1).requires_grad_()
    out = pseudo_mask(probs, torch.ones(2, 2), size=(30, 17))
    assert out.shape == (2, 30, 17) and out.requires_grad is False
    assert pseudo_mask(probs, torch.zeros(2, 2), size=(6, 8)).eq(0).all()
    with pytest.raises(ShapeError, match="probs"):
        pseudo_mask(torch.rand(2, 1, 3, 3))
    with pytest.raises(ShapeError, match="labels"):
        pseudo_mask(probs, torch.ones(2, 3))
    with pytest.raises(ValueError, match="size"):
        pseudo_mask(probs, None, size=(2.5, 3))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_square_path():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(8, 3, 64, 64, device=dev)
    teacher = torch.rand(8, 4, 8, 8, device=dev).softmax(1)
    labels = torch.ones(8, 3, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c1 = random_dihedral_codes(batch_size=8, device=dev, generator=g)
        x1 = dihedral_transform(images, c1)
        m, rec = mosaic(x1, crop=16, patch_size=8, generator=g)
        student = unmosaic(torch.rand(2, 4, 8, 8, device=dev).softmax(1))
        loss = et_loss(student, teacher, labels, rec, teacher_codes=c1) + mce_loss(teacher.amax((-2, -1)), labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.device.type == "cuda" and m.device.type == "cuda"


def test_equivariance_identity_non_square():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 3, 64, 96, dtype=torch.float64, generator=g)
    c1 = random_dihedral_codes(batch_size=8, square=False, generator=g)
    m, rec = mosaic(x, crop_prob=0.0, scale=0.5, patch_size=16, generator=g)
    assert int(rec.codes.max()) < 4 and m.shape == (2, 3, 64, 96)
    teacher = F.avg_pool2d(dihedral_transform(x, c1), 16)
    torch.testing.assert_close(teacher_to_tiles(teacher, rec, teacher_codes=c1), unmosaic(F.avg_pool2d(m, 16)),
                               atol=1e-10, rtol=0)
