"""SWTformer HFF and the full model on a tiny random-init timm Swin."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from wsss_blocks import ShapeError
from wsss_blocks.swtformer import HFF, SWTformer, SWTformerHead, rcam_pseudo_mask
from wsss_blocks.tokens import stage_taps

pytestmark = pytest.mark.usefixtures("single_thread")

SWIN_T = (96, 192, 384, 768)


def _maps(dims, grids, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) for c, (h, w) in zip(dims, grids, strict=True)]


def _grids(h, w):
    out = [(h, w)]
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


# ----------------------------------------------------------------------------- HFF
@pytest.mark.parametrize(("stage1", "target", "expected"), [
    ((56, 56), "stage3", (384, 14, 14)),   # 224
    ((96, 96), "stage3", (384, 24, 24)),   # 384
    ((56, 56), "stage2", (384, 28, 28)),   # 224, stride 8
    ((56, 40), "stage3", (384, 14, 10)),   # 224 x 160
    ((50, 34), "stage3", (384, 13, 9)),    # 200 x 136
])
def test_hff_shapes_swin_t(stage1, target, expected):
    torch.manual_seed(0)
    hff = HFF(SWIN_T, target=target)
    with torch.no_grad():
        out = hff(_maps(SWIN_T, _grids(*stage1)))
    assert out.shape == (1, *expected)


@pytest.mark.parametrize("target", ["stage3", "stage2"])
def test_hff_conv_oracle_pins_wiring(target):
    torch.manual_seed(1)
    dims = (4, 6, 8, 10)
    hff = HFF(dims, 5, target, normalize=True)
    s = _maps(dims, _grids(13, 9), b=2)
    n = [x / (x.norm(dim=1, keepdim=True) + 1e-5) for x in s]
    f12 = torch.cat([F.conv2d(n[0], hff.down1.weight, stride=2, padding=1), n[1]], 1)
    up4 = F.interpolate(n[3], size=n[2].shape[-2:], mode="bilinear", align_corners=False)
    f34 = torch.cat([n[2], up4], 1)
    if target == "stage3":
        assert hff.down12 is not None
        fused = torch.cat([F.conv2d(f12, hff.down12.weight, stride=2, padding=1), f34], 1)
    else:
        assert hff.down12 is None
        fused = torch.cat([f12, F.interpolate(f34, size=f12.shape[-2:], mode="bilinear", align_corners=False)], 1)
    ref = F.conv2d(fused, hff.fuse.weight)
    torch.testing.assert_close(hff(s), ref, atol=1e-5, rtol=1e-5)
    assert hff.fuse.weight.shape == (5, sum(dims), 1, 1)
    assert all(c.bias is None for c in hff.modules() if isinstance(c, torch.nn.Conv2d))
    raw = HFF(dims, 5, target, normalize=False)
    raw.load_state_dict(hff.state_dict())
    assert not torch.allclose(raw(s), hff(s))


def test_hff_detach_flag_and_nhwc():
    dims = (4, 6, 8, 10)
    s = [x.requires_grad_() for x in _maps(dims, _grids(8, 8))]
    HFF(dims)(s).sum().backward()
    assert all(x.grad is None for x in s)
    HFF(dims, detach_inputs=False)(s).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    torch.manual_seed(2)
    a = HFF(dims)
    b = HFF(dims, input_fmt="NHWC")
    b.load_state_dict(a.state_dict())
    plain = _maps(dims, _grids(8, 6))
    torch.testing.assert_close(b([x.permute(0, 2, 3, 1) for x in plain]), a(plain))


def test_hff_errors():
    dims = (4, 6, 8, 10)
    hff = HFF(dims)
    good = _maps(dims, _grids(8, 8))
    with pytest.raises(ShapeError, match="4 stage maps"):
        hff(good[:3])
    with pytest.raises(ShapeError, match=r"feats\[1\]: expected shape \(B=1, 6"):
        hff([good[0], torch.randn(1, 7, 4, 4), good[2], good[3]])
    with pytest.raises(ShapeError, match=r"feats\[2\]: expected grid \(2, 2\) = ceil"):
        hff([good[0], good[1], torch.randn(1, 8, 3, 2), good[3]])
    with pytest.raises(ShapeError, match="B=1"):
        hff([good[0], torch.randn(2, 6, 4, 4), good[2], good[3]])
    with pytest.raises(ValueError, match="in_dims"):
        HFF((4, 6, 8))
    with pytest.raises(ValueError, match="target"):
        HFF(dims, target="stage1")
    with pytest.raises(ValueError, match="out_dim"):
        HFF(dims, 0)
    assert HFF(dims).out_dim == 8


# ----------------------------------------------------------------------------- SWTformer
def _swin(**kw):
    cfg = dict(pretrained=False, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
               window_size=2, img_size=64, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **cfg)


V1_KEYS = {"scores", "f_out", "cam"}
V2_KEYS = V1_KEYS | {"cam_with_bg", "seeds", "features", "rcam"}


def test_last_intermediate_is_forward_features():
    swin = _swin()
    x = torch.randn(2, 3, 64, 64)
    model = SWTformer(swin, 3, version="v1")
    out = model(x)
    ref = model.head(swin.forward_features(x).permute(0, 3, 1, 2))[0]
    torch.testing.assert_close(out["f_out"], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_model_keys_shapes_losses_and_backward(version):
    swin = _swin()
    model = SWTformer(swin, 3, version=version)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out = model(x, y)
    losses = {"loss_cls", "loss"} | ({"loss_gsc", "loss_ccl"} if version == "v2" else set())
    assert set(out) == (V1_KEYS if version == "v1" else V2_KEYS) | losses
    assert out["scores"].shape == (2, 3) and out["cam"].shape == (2, 3, 2, 2)
    if version == "v2":
        assert out["seeds"].shape == (2, 4, 2, 2) and out["seeds"].dtype == torch.bool
        assert out["features"].shape == (2, 64, 4, 4) and out["rcam"].shape == (2, 4, 4, 4)
        assert out["cam_with_bg"].shape == (2, 4, 2, 2)
        total = out["loss_cls"] + out["loss_gsc"] + out["loss_ccl"]
        torch.testing.assert_close(out["loss"], total)
    assert all(out[k].dim() == 0 and torch.isfinite(out[k]) for k in losses)
    out["loss"].backward()
    assert model.head.conv.weight.grad is not None
    assert swin.patch_embed.proj.weight.grad is not None and swin.patch_embed.proj.weight.grad.abs().sum() > 0
    if version == "v2":
        assert model.hff is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hff.parameters())
    assert swin.training  # never eval()-ed


def test_model_labels_none_valid_non_square_and_options():
    swin = _swin(dynamic_img_size=True)
    model = SWTformer(swin, 2, hff_target="stage2", ccl_variant="plain", affinity="relu_cos",
                      gsc_weight=0.5, ccl_weight=0.0)
    x = torch.randn(1, 3, 200, 136)
    out = model(x)
    assert not any(k.startswith("loss") for k in out)
    assert out["cam"].shape == (1, 2, 7, 5) and out["rcam"].shape == (1, 3, 25, 17)
    valid = torch.ones(1, 200, 136, dtype=torch.bool)
    valid[:, 100:] = False
    out = model(x, torch.tensor([[0, 1]]), valid)
    assert not out["seeds"][..., 4:, :].any() and out["cam_with_bg"][..., 4:, :].eq(0).all()
    torch.testing.assert_close(out["loss"], out["loss_cls"] + 0.5 * out["loss_gsc"])
    mask = rcam_pseudo_mask(out["rcam"], torch.tensor([[0, 1]]), size=(200, 136), valid=valid)
    assert mask.shape == (1, 200, 136) and mask[:, 100:].eq(255).all() and not (mask == 1).any()


def test_model_errors_and_state_dict_round_trip():
    swin = _swin()
    model = SWTformer(swin, 3)
    with pytest.raises(ShapeError, match="labels"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 4))
    with pytest.raises(ShapeError, match="images"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ShapeError, match="valid"):
        model(torch.randn(2, 3, 64, 64), valid=torch.ones(2, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"img_size \(64, 64\)"):
        model(torch.randn(1, 3, 64, 48))
    with pytest.raises(ValueError, match="version"):
        SWTformer(swin, 3, version="v3")
    with pytest.raises(ValueError, match="gsc_weight"):
        SWTformer(swin, 3, gsc_weight=-1.0)
    with pytest.raises(TypeError, match="feature_info"):
        SWTformer(torch.nn.Linear(2, 2), 3)
    other = SWTformer(_swin(), 3)
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other(x)["rcam"], model(x)["rcam"])
    assert set(model.state_dict()) >= {f"backbone.{k}" for k in swin.state_dict()}


def test_model_bf16_autocast_finite():
    swin = _swin()
    model = SWTformer(swin, 3)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert torch.isfinite(out["loss"]) and out["rcam"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_cuda_follows_device():
    swin = _swin().cuda()
    model = SWTformer(swin, 3, device="cuda")
    out = model(torch.randn(2, 3, 64, 64, device="cuda"), torch.tensor([[1, 0, 1], [0, 1, 0]], device="cuda"))
    assert out["rcam"].is_cuda and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_head_module_on_stage_taps_equals_model():
    swin = _swin()
    model = SWTformer(swin, 3)
    heads = SWTformerHead(model.heads.stage_channels, 3)
    heads.load_state_dict(model.heads.state_dict())
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    a = model(x, y)
    b = heads(stage_taps(swin, x, final_norm=True).features, y)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ShapeError, match="4 stage maps"):
        heads(stage_taps(swin, x).features[:3])
    with pytest.raises(ValueError, match="stage_channels"):
        SWTformerHead((8, 16, 32), 3)
