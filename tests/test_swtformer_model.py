"""SWTformer HFF and the full model on a tiny random-init timm Swin."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from wsss_blocks import ShapeError
from wsss_blocks.swtformer import HFF, PRESETS, SWTformer, SWTformerHead, SWTformerOutput, rcam_pseudo_mask, swin_cam
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
@pytest.mark.parametrize(("stage1", "output_stage", "expected"), [
    ((56, 56), "stage3", (384, 14, 14)),   # 224
    ((96, 96), "stage3", (384, 24, 24)),   # 384
    ((56, 56), "stage2", (384, 28, 28)),   # 224, stride 8
    ((56, 40), "stage3", (384, 14, 10)),   # 224 x 160
    ((50, 34), "stage3", (384, 13, 9)),    # 200 x 136
])
def test_hff_shapes_swin_t(stage1, output_stage, expected):
    torch.manual_seed(0)
    hff = HFF(SWIN_T, output_stage=output_stage)
    with torch.no_grad():
        out = hff(_maps(SWIN_T, _grids(*stage1)))
    assert out.shape == (1, *expected)


@pytest.mark.parametrize("output_stage", ["stage3", "stage2"])
def test_hff_conv_oracle_pins_wiring(output_stage):
    torch.manual_seed(1)
    dims = (4, 6, 8, 10)
    hff = HFF(dims, out_dim=5, output_stage=output_stage, normalize=True)
    s = _maps(dims, _grids(13, 9), b=2)
    n = [x / (x.norm(dim=1, keepdim=True) + 1e-5) for x in s]
    f12 = torch.cat([F.conv2d(n[0], hff.down1.weight, stride=2, padding=1), n[1]], 1)
    up4 = F.interpolate(n[3], size=n[2].shape[-2:], mode="bilinear", align_corners=False)
    f34 = torch.cat([n[2], up4], 1)
    if output_stage == "stage3":
        assert hff.down12 is not None
        fused = torch.cat([F.conv2d(f12, hff.down12.weight, stride=2, padding=1), f34], 1)
    else:
        assert hff.down12 is None
        fused = torch.cat([f12, F.interpolate(f34, size=f12.shape[-2:], mode="bilinear", align_corners=False)], 1)
    ref = F.conv2d(fused, hff.fuse.weight)
    torch.testing.assert_close(hff(s), ref, atol=1e-5, rtol=1e-5)
    assert hff.fuse.weight.shape == (5, sum(dims), 1, 1)
    assert all(c.bias is None for c in hff.modules() if isinstance(c, torch.nn.Conv2d))
    raw = HFF(dims, out_dim=5, output_stage=output_stage, normalize=False)
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
    with pytest.raises(ShapeError, match=r'features\[0\]: .*channels-last.*input_fmt="NHWC"'):
        a([x.permute(0, 2, 3, 1) for x in plain])


def test_hff_errors():
    dims = (4, 6, 8, 10)
    hff = HFF(dims)
    good = _maps(dims, _grids(8, 8))
    with pytest.raises(ShapeError, match="4 stage maps"):
        hff(good[:3])
    with pytest.raises(ShapeError, match=r"features\[1\]: expected shape \(B=1, 6"):
        hff([good[0], torch.randn(1, 7, 4, 4), good[2], good[3]])
    with pytest.raises(ShapeError, match=r"features\[2\]: expected grid \(2, 2\) = ceil"):
        hff([good[0], good[1], torch.randn(1, 8, 3, 2), good[3]])
    with pytest.raises(ShapeError, match="B=1"):
        hff([good[0], torch.randn(2, 6, 4, 4), good[2], good[3]])
    with pytest.raises(ValueError, match="in_dims"):
        HFF((4, 6, 8))
    with pytest.raises(ValueError, match="output_stage"):
        HFF(dims, output_stage="stage1")
    with pytest.raises(ValueError, match="out_dim"):
        HFF(dims, out_dim=0)
    assert HFF(dims).out_dim == 8


# ----------------------------------------------------------------------------- SWTformer
def _swin(**kw):
    cfg = dict(pretrained=False, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
               window_size=2, img_size=64, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **cfg)


V1_FIELDS = {"logits", "cams", "norm_cams"}
V2_FIELDS = V1_FIELDS | {"cams_with_bg", "seeds", "features", "rcams"}


def _present(out) -> set[str]:
    return {k for k, v in out._asdict().items() if v is not None}


def test_last_intermediate_is_forward_features():
    swin = _swin()
    x = torch.randn(2, 3, 64, 64)
    model = SWTformer(swin, 3, version="v1")
    out = model(x)
    ref = model.head(swin.forward_features(x).permute(0, 3, 1, 2)).cams
    torch.testing.assert_close(out.cams, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_model_fields_shapes_losses_and_backward(version):
    swin = _swin()
    model = SWTformer(swin, 3, version=version)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out = model(x, y)
    assert isinstance(out, SWTformerOutput)
    assert _present(out) == (V1_FIELDS if version == "v1" else V2_FIELDS) | {"loss", "terms"}
    assert set(out.terms) == ({"cls"} if version == "v1" else {"cls", "gsc", "ccl"})
    assert out.logits.shape == (2, 3) and out.norm_cams.shape == (2, 3, 2, 2) and out.cams.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out.norm_cams, swin_cam(out.cams))
    if version == "v2":
        assert out.seeds.shape == (2, 4, 2, 2) and out.seeds.dtype == torch.bool
        assert out.features.shape == (2, 64, 4, 4) and out.rcams.shape == (2, 4, 4, 4)
        assert out.cams_with_bg.shape == (2, 4, 2, 2)
        total = out.terms["cls"] + out.terms["gsc"] + out.terms["ccl"]
        torch.testing.assert_close(out.loss, total)
    else:
        assert torch.equal(out.loss, out.terms["cls"])
    assert all(t.dim() == 0 and torch.isfinite(t) for t in (out.loss, *out.terms.values()))
    out.loss.backward()
    assert model.head.conv.weight.grad is not None
    assert swin.patch_embed.proj.weight.grad is not None and swin.patch_embed.proj.weight.grad.abs().sum() > 0
    if version == "v2":
        assert model.hff is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hff.parameters())
    assert swin.training  # never eval()-ed


def test_model_labels_none_valid_non_square_and_options():
    swin = _swin(dynamic_img_size=True)
    model = SWTformer(swin, 2, hff_output_stage="stage2", ccl_variant="plain", similarity="relu_cos",
                      loss_weights={"gsc": 0.5, "ccl": 0.0})
    x = torch.randn(1, 3, 200, 136)
    out = model(x)
    assert out.loss is None and out.terms is None
    assert out.norm_cams.shape == (1, 2, 7, 5) and out.rcams.shape == (1, 3, 25, 17)
    valid = torch.ones(1, 200, 136, dtype=torch.bool)
    valid[:, 100:] = False
    out = model(x, torch.tensor([[0, 1]]), valid=valid)
    assert not out.seeds[..., 4:, :].any() and out.cams_with_bg[..., 4:, :].eq(0).all()
    torch.testing.assert_close(out.loss, out.terms["cls"] + 0.5 * out.terms["gsc"])
    assert set(out.terms) == {"cls", "gsc", "ccl"}  # a weight of 0 keeps the term in the report
    mask = rcam_pseudo_mask(out.rcams, torch.tensor([[0, 1]]), size=(200, 136), valid=valid)
    assert mask.shape == (1, 200, 136) and mask[:, 100:].eq(255).all() and not (mask == 1).any()


def test_model_errors_and_state_dict_round_trip():
    swin = _swin()
    model = SWTformer(swin, 3)
    with pytest.raises(ShapeError, match="labels"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 4))
    with pytest.raises(ShapeError, match="images"):
        model(torch.randn(2, 64, 64))
    with pytest.raises(ShapeError, match="valid"):  # any resolution, but the batch's size
        model(torch.randn(2, 3, 64, 64), valid=torch.ones(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"img_size \(64, 64\)"):
        model(torch.randn(1, 3, 64, 48))
    with pytest.raises(ValueError, match="version"):
        SWTformer(swin, 3, version="v3")
    with pytest.raises(ValueError, match=r"loss_weights\['gsc'\]"):
        SWTformer(swin, 3, loss_weights={"gsc": -1.0})
    with pytest.raises(ValueError, match=r"loss_weights: unknown keys \['cls'\]"):
        SWTformer(swin, 3, loss_weights={"cls": 2.0})
    with pytest.raises(TypeError, match="loss_weights"):
        SWTformer(swin, 3, loss_weights=0.5)
    with pytest.raises(TypeError, match="feature_info"):
        SWTformer(torch.nn.Linear(2, 2), 3)
    other = SWTformer(_swin(), 3)
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other(x).rcams, model(x).rcams)
    assert set(model.state_dict()) >= {f"backbone.{k}" for k in swin.state_dict()}


def test_loss_weights_partial_and_total_is_weighted_terms():
    swin = _swin()
    model = SWTformer(swin, 3, loss_weights={"ccl": 0.25})
    assert model.heads.loss_weights == {"gsc": 1.0, "ccl": 0.25}
    out = model(torch.randn(2, 3, 64, 64), torch.tensor([[1, 0, 1], [0, 1, 0]]))
    t = out.terms
    assert torch.equal(out.loss, t["cls"] + 1.0 * t["gsc"] + 0.25 * t["ccl"])


def test_presets_and_overrides():
    assert set(PRESETS) == {"paper", "official"}
    swin = _swin()
    paper = SWTformer.from_preset(swin, 3, preset="paper")
    default = SWTformer(swin, 3)
    assert repr(paper) == repr(default)  # the paper preset is the constructor's defaults
    official = SWTformer.from_preset(swin, 3, preset="official")
    assert official.heads.similarity == "relu_cos" and official.heads.loss_weights == {"gsc": 1.0, "ccl": 0.0}
    tuned = SWTformer.from_preset(swin, 3, preset="official", loss_weights={"ccl": 0.5}, bg_scale=1.0,
                                  version="v2", final_norm=False)
    assert tuned.heads.loss_weights == {"gsc": 1.0, "ccl": 0.5} and tuned.heads.bg_scale == 1.0
    assert not tuned.final_norm and tuned.heads.similarity == "relu_cos"
    assert PRESETS["official"]["loss_weights"] == {"gsc": 1.0, "ccl": 0.0}  # the table is not mutated
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['affinity'\]"):
        SWTformer.from_preset(swin, 3, preset="paper", affinity="relu_cos")
    with pytest.raises(ValueError, match="preset"):
        SWTformer.from_preset(swin, 3, preset="sipe")
    heads = SWTformerHead.from_preset((8, 16, 32, 64), 3, preset="official", hff_output_stage="stage2")
    assert heads.similarity == "relu_cos" and heads.hff is not None and heads.hff.output_stage == "stage2"
    with pytest.raises(ValueError, match="final_norm"):  # a model option, not a head option
        SWTformerHead.from_preset((8, 16, 32, 64), 3, preset="paper", final_norm=False)
    swin.train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    official.load_state_dict(default.state_dict())
    out = official(x, y)
    assert torch.equal(out.loss, out.terms["cls"] + out.terms["gsc"])


def test_model_bf16_autocast_finite():
    swin = _swin()
    model = SWTformer(swin, 3)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert torch.isfinite(out.loss) and out.rcams.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_cuda_follows_device():
    swin = _swin().cuda()
    model = SWTformer(swin, 3, device="cuda")
    out = model(torch.randn(2, 3, 64, 64, device="cuda"), torch.tensor([[1, 0, 1], [0, 1, 0]], device="cuda"))
    assert out.rcams.is_cuda and torch.isfinite(out.loss)
    out.loss.backward()


def test_head_module_on_stage_taps_equals_model():
    swin = _swin()
    model = SWTformer(swin, 3)
    heads = SWTformerHead(model.heads.in_dims, 3)
    heads.load_state_dict(model.heads.state_dict())
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    a = model(x, y)
    maps = stage_taps(swin, x, final_norm=True).features
    b = heads(maps, y)
    assert _present(a) == _present(b)
    for name in _present(a) - {"terms"}:
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    for k in a.terms:
        torch.testing.assert_close(a.terms[k], b.terms[k])
    with pytest.raises(ShapeError, match="4 stage maps"):
        heads(maps[:3])
    with pytest.raises(ShapeError, match=r"features\[3\]: .*channels-last.*permute it to NCHW"):
        heads([*maps[:3], maps[3].permute(0, 2, 3, 1)])
    with pytest.raises(ValueError, match="in_dims"):
        SWTformerHead((8, 16, 32), 3)
