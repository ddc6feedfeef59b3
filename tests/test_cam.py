import pytest
import torch
import torch.nn.functional as F

from wsss_blocks import ShapeError
from wsss_blocks.cam import (
    add_background,
    box_to_valid_mask,
    cam_from_features,
    masked_average_pool,
    multiscale_cam,
    normalize_cam,
    pseudo_labels,
    token_pseudo_labels,
    valid_to_grid,
)


def _labels(b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(b, k, generator=g) > 0.5).float()
    y[:, 0] = 1  # at least one present class per image
    return y


# ---------------------------------------------------------------- cam_from_features
def test_cam_from_features_oracle_and_layouts():
    feats = torch.randn(2, 6, 3, 5)
    weight, bias = torch.randn(4, 6), torch.randn(4)
    cam = cam_from_features(feats, weight, bias=bias)
    expected = torch.zeros(2, 4, 3, 5)
    for b in range(2):
        for k in range(4):
            for i in range(3):
                for j in range(5):
                    expected[b, k, i, j] = weight[k] @ feats[b, :, i, j] + bias[k]
    torch.testing.assert_close(cam, expected)
    torch.testing.assert_close(cam_from_features(feats, weight[:, :, None, None], bias=bias), cam)
    tokens = feats.flatten(2).transpose(1, 2)
    torch.testing.assert_close(cam_from_features(tokens, weight, size=(3, 5), bias=bias), cam)


def test_cam_from_features_errors():
    with pytest.raises(ShapeError, match="needs size"):
        cam_from_features(torch.zeros(2, 15, 6), torch.zeros(4, 6))
    with pytest.raises(ShapeError, match="D=7 disagrees with D=6"):
        cam_from_features(torch.zeros(2, 7, 3, 5), torch.zeros(4, 6))
    with pytest.raises(ShapeError, match="bias"):
        cam_from_features(torch.zeros(2, 6, 3, 5), torch.zeros(4, 6), bias=torch.zeros(3))


def test_cam_from_features_gradcheck():
    feats = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: cam_from_features(f, w), (feats, weight))


# ---------------------------------------------------------------- normalize_cam
@pytest.mark.parametrize("mode", ["max", "minmax"])
def test_normalize_cam_oracle(mode):
    cam = torch.randn(3, 4, 5, 6)
    cam[0, 1] = -torch.rand(5, 6)  # all negative map
    out = normalize_cam(cam, mode=mode)
    for b in range(3):
        for k in range(4):
            m = cam[b, k]
            if mode == "max":
                ref = m.clamp(min=0) / (m.clamp(min=0).max() + 1e-5)
            else:
                ref = (m - m.min()) / (m.max() - m.min() + 1e-5)
            torch.testing.assert_close(out[b, k], ref)
    if mode == "max":
        assert torch.all(out[0, 1] == 0)
    assert out.min() >= 0 and out.max() <= 1


def test_normalize_cam_dtype_grad_and_errors():
    cam = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = normalize_cam(cam.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, normalize_cam(cam), atol=2e-2, rtol=0)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: normalize_cam(c, mode="minmax"), (x,))
    with pytest.raises(ValueError, match=r"mode: expected one of \['max', 'minmax'\], got 'mean'"):
        normalize_cam(cam, mode="mean")
    with pytest.raises(ShapeError, match="cams: expected 4 dims"):
        normalize_cam(cam[0])
    with pytest.raises(ShapeError, match="cams: expected a float tensor"):
        normalize_cam(cam.long())


# ---------------------------------------------------------------- background
def test_add_background_oracle_and_errors():
    cam = torch.rand(2, 3, 4, 5)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out = add_background(cam, y)
    assert out.shape == (2, 4, 4, 5)
    for b in range(2):
        fg = torch.stack([cam[b, k] * y[b, k] for k in range(3)])
        torch.testing.assert_close(out[b, 0], 1 - fg.max(0).values)
        torch.testing.assert_close(out[b, 1:], fg)
    with pytest.raises(ShapeError, match="labels: expected shape \\(B=2, K=3\\), got \\(2, 4\\)"):
        add_background(cam, torch.ones(2, 4))
    with pytest.raises(ShapeError, match="labels: expected values in \\{0, 1\\}, got 2"):
        add_background(cam, torch.full((2, 3), 2))
    assert torch.equal(add_background(cam, y.bool()), out)


# ---------------------------------------------------------------- pseudo labels
def test_pseudo_labels_known_answer_and_no_grad():
    cam = torch.tensor([[[[0.8, 0.7, 0.3, 0.25]], [[0.9, 0.1, 0.9, 0.9]]]], requires_grad=True)
    out = pseudo_labels(cam, torch.tensor([[1.0, 0.0]]))
    assert out.tolist() == [[[1, 255, 255, 0]]] and out.dtype == torch.int64
    assert out.requires_grad is False
    both = pseudo_labels(cam, torch.tensor([[1.0, 1.0]]), ignore_index=99)
    assert both.tolist() == [[[2, 99, 2, 2]]]


def test_pseudo_labels_oracle_with_valid():
    cam = torch.rand(3, 4, 5, 6)
    y = _labels(3, 4)
    valid = torch.rand(3, 5, 6) > 0.3
    out = pseudo_labels(cam, y, low=0.3, high=0.6, valid=valid)
    for b in range(3):
        for i in range(5):
            for j in range(6):
                scores = [float(cam[b, k, i, j] * y[b, k]) for k in range(4)]
                v = max(scores)
                a = scores.index(v) + 1
                ref = a if v > 0.6 else (255 if v > 0.3 else 0)
                if not valid[b, i, j]:
                    ref = 255
                assert out[b, i, j] == ref


def test_pseudo_labels_edge_cases_and_errors():
    cam = torch.rand(2, 3, 4, 4)
    assert torch.all(pseudo_labels(cam, torch.zeros(2, 3)) == 0)  # no present class
    all_invalid = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert torch.all(pseudo_labels(cam, torch.ones(2, 3), valid=all_invalid) == 255)
    with pytest.raises(ValueError, match="low=0.7 must be smaller than high=0.25"):
        pseudo_labels(cam, torch.ones(2, 3), low=0.7, high=0.25)
    with pytest.raises(ShapeError, match="valid: expected shape \\(B=2"):
        pseudo_labels(cam, torch.ones(2, 3), valid=torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="valid: expected a bool tensor"):
        pseudo_labels(cam, torch.ones(2, 3), valid=torch.ones(2, 4, 4))


# ---------------------------------------------------------------- boxes and token labels
def test_box_to_valid_mask_oracle():
    box = torch.tensor([[0, 3, 1, 4], [2, 5, 0, 6], [0, 0, 0, 0]])
    out = box_to_valid_mask(box, (5, 6))
    for b in range(3):
        ref = torch.zeros(5, 6, dtype=torch.bool)
        ref[box[b, 0] : box[b, 1], box[b, 2] : box[b, 3]] = True
        assert torch.equal(out[b], ref)


def _toco_sliced_valid(box, size):
    """ToCo's bug: a pixel box sliced directly at token resolution."""
    valid = torch.zeros(box.shape[0], *size, dtype=torch.bool)
    for b in range(box.shape[0]):
        h0, h1, w0, w1 = box[b].tolist()
        valid[b, h0:h1, w0:w1] = True
    return valid


def test_token_pseudo_labels_spec_cases():
    # thresholds on a 1x4 CAM already at token size
    cam = torch.tensor([[[[0.8, 0.7, 0.3, 0.25]], [[0.0, 0.0, 0.0, 0.0]]]])
    assert token_pseudo_labels(cam, torch.tensor([[1, 0]]), (1, 4)).tolist() == [[[1, 255, 255, 0]]]
    # a 448x448 image with 28x28 tokens, boxes in pixels
    cam = torch.ones(2, 1, 448, 448)
    box = torch.tensor([[0, 100, 0, 448], [100, 350, 0, 448]])
    valid = box_to_valid_mask(box, (448, 448))
    out = token_pseudo_labels(cam, torch.ones(2, 1), (28, 28), valid=valid)
    rows_valid = (out != 255).all(dim=2)
    assert rows_valid[0].nonzero().flatten().tolist() == list(range(0, 6))
    assert rows_valid[1].nonzero().flatten().tolist() == list(range(6, 22))
    # ToCo's slicing keeps all rows for the first box and none for the second: ours differs.
    toco = _toco_sliced_valid(box, (28, 28))
    assert toco[0].all() and not toco[1].any()
    assert not torch.equal(valid_to_grid(valid, (28, 28)), toco)


def test_token_pseudo_labels_resizes_bilinear():
    cam = torch.rand(2, 3, 32, 48)
    y = _labels(2, 3)
    out = token_pseudo_labels(cam, y, (4, 6))
    resized = F.interpolate(cam, size=(4, 6), mode="bilinear", align_corners=False)
    assert torch.equal(out, pseudo_labels(resized, y))
    with pytest.raises(ValueError, match="size"):
        token_pseudo_labels(cam, y, (4,))


def test_valid_to_grid_rule():
    valid = torch.zeros(1, 4, 8, dtype=torch.bool)
    valid[0, :, :5] = True  # columns 0-4 of 8 -> cells of 2 columns: 1, 1, 0.5, 0
    assert valid_to_grid(valid, (1, 4)).tolist() == [[[True, True, True, False]]]
    assert valid_to_grid(valid, (4, 8)) is valid


# ---------------------------------------------------------------- masked average pooling
@pytest.mark.parametrize("threshold", [None, 0.4])
def test_masked_average_pool_oracle(threshold):
    feats = torch.randn(2, 12, 5)
    weights = torch.rand(2, 3, 3, 4)
    weights[1, 2] = 0  # empty region
    valid = torch.rand(2, 3, 4) > 0.2
    pooled, nonempty = masked_average_pool(feats, weights, threshold=threshold, valid=valid)
    for b in range(2):
        for k in range(3):
            w = weights[b, k].flatten()
            if threshold is not None:
                w = (w > threshold).float()
            w = w * valid[b].flatten().float()
            ref = (w[:, None] * feats[b]).sum(0) / (w.sum() + 1e-5)
            torch.testing.assert_close(pooled[b, k], ref)
            assert bool(nonempty[b, k]) == bool(w.sum() > 0)
    assert not nonempty[1, 2] and torch.all(pooled[1, 2] == 0)


def test_masked_average_pool_layouts_grad_autocast():
    feats = torch.randn(2, 5, 3, 4)
    weights = torch.rand(2, 3, 3, 4)
    pooled, _ = masked_average_pool(feats, weights)
    pooled2, _ = masked_average_pool(feats.flatten(2).transpose(1, 2), weights)
    torch.testing.assert_close(pooled, pooled2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = masked_average_pool(feats.bfloat16(), weights.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, pooled, atol=5e-2, rtol=5e-2)
    f = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: masked_average_pool(f, w)[0], (f, w))
    with pytest.raises(ShapeError, match="features"):
        masked_average_pool(torch.randn(2, 11, 5), weights)


# ---------------------------------------------------------------- multi-scale CAM
def test_multiscale_cam_oracle():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    images = torch.randn(2, 3, 8, 12)
    out = multiscale_cam(conv, images, scales=(1.0, 0.5), flip=True)
    ref = torch.zeros(2, 2, 8, 12)
    with torch.no_grad():
        for b in range(2):
            for s in (1.0, 0.5):
                x = images[b : b + 1]
                if s != 1.0:
                    x = F.interpolate(x, size=(int(8 * s), int(12 * s)), mode="bilinear")
                a = F.interpolate(conv(x), size=(8, 12), mode="bilinear")
                f = F.interpolate(conv(x.flip(-1)), size=(8, 12), mode="bilinear").flip(-1)
                ref[b] += torch.maximum(a, f)[0].relu()
    torch.testing.assert_close(out, ref)
    assert out.requires_grad is False
    mean = multiscale_cam(conv, images, scales=(1.0, 0.5), fuse="mean", size=(4, 6))
    assert mean.shape == (2, 2, 4, 6)
    single = multiscale_cam(conv, images, scales=(1.0,), flip=False, fuse="max")
    torch.testing.assert_close(single, conv(images).relu().detach())
    with pytest.raises(ValueError, match="fuse"):
        multiscale_cam(conv, images, fuse="median")
    with pytest.raises(ValueError, match="scales"):
        multiscale_cam(conv, images, scales=())
