"""Tests for wsss_blocks.mct: the class-token conversion, the MCT logits and attention CAMs."""

from __future__ import annotations

import pytest
import timm
import torch
from _timm_helpers import set_fused
from timm.layers import PatchDropout
from torch import nn

from wsss_blocks import ShapeError, doei, mct

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=3)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        model.cls_token.add_(torch.randn_like(model.cls_token))
        model.pos_embed.add_(0.5 * torch.randn_like(model.pos_embed))
        for blk in model.blocks:  # sharper (less uniform) attention than the random init
            blk.attn.qkv.weight.mul_(5.0)


# --------------------------------------------------------------------------- add_class_tokens


def test_add_class_tokens_shapes_keys_and_pos_slots():
    model = tiny(patch_drop_rate=0.25, reg_tokens=2)
    old_cls, old_pos = model.cls_token.detach().clone(), model.pos_embed.detach().clone()
    keys = list(model.state_dict())
    assert mct.add_class_tokens(model, 4) is model
    assert list(model.state_dict()) == keys
    assert model.cls_token.shape == (1, 4, 32) and isinstance(model.cls_token, nn.Parameter)
    assert model.pos_embed.shape == (1, old_pos.shape[1] + 3, 32)
    for c in range(4):
        assert torch.equal(model.cls_token[0, c], old_cls[0, 0])
        assert torch.equal(model.pos_embed[0, c], old_pos[0, 0])
    assert torch.equal(model.pos_embed[0, 4:], old_pos[0, 1:])  # registers + patches unchanged
    assert model.num_prefix_tokens == 4 + 2
    assert isinstance(model.patch_drop, PatchDropout) and model.patch_drop.num_prefix_tokens == 6
    assert model.cls_token.requires_grad and model.pos_embed.requires_grad
    cls, patches = mct.final_tokens(model, torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 4, 32) and patches.shape == (2, 16, 32)


def test_add_class_tokens_no_embed_class_and_noop():
    model = tiny(no_embed_class=True)
    pos = model.pos_embed.detach().clone()
    mct.add_class_tokens(model, 3)
    assert torch.equal(model.pos_embed, pos) and model.cls_token.shape[1] == 3
    model(torch.randn(1, 3, 32, 32))
    other = tiny()
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    mct.add_class_tokens(other, 1)
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items()) and other.num_prefix_tokens == 1


def test_add_class_tokens_errors():
    with pytest.raises(ValueError, match="no class token"):
        mct.add_class_tokens(tiny(class_token=False, global_pool="avg"), 3)
    model = mct.add_class_tokens(tiny(), 3)
    with pytest.raises(ValueError, match="already has 3"):
        mct.add_class_tokens(model, 3)
    with pytest.raises(ValueError, match="num_classes"):
        mct.add_class_tokens(tiny(), 0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(ValueError, match="distillation"):
        mct.add_class_tokens(deit, 3)


def test_class_tokens_identical_after_conversion_and_dynamic_nonsquare():
    model = mct.add_class_tokens(tiny(dynamic_img_size=True), 5)
    cls, patches = mct.final_tokens(model, torch.randn(2, 3, 24, 40))
    assert patches.shape == (2, 15, 32)
    for c in range(1, 5):
        torch.testing.assert_close(cls[:, c], cls[:, 0], atol=1e-6, rtol=0)
    cams = mct.attention_cams(model, torch.randn(1, 3, 24, 40), last_k=2)
    assert cams.shape == (1, 5, 3, 5)


def test_state_dict_round_trip_into_converted_fresh_model():
    src = mct.add_class_tokens(tiny(seed=1), 4)
    perturb(src)
    dst = mct.add_class_tokens(tiny(seed=2), 4)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = mct.final_tokens(src, x), mct.final_tokens(dst, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_final_tokens_norm_and_registers():
    model = mct.add_class_tokens(tiny(reg_tokens=1), 3)
    x = torch.randn(2, 3, 32, 32)
    out = mct.final_tokens(model, x)
    assert isinstance(out, mct.FinalTokens) and out._fields == ("class_tokens", "features")
    cls, patches = out
    assert cls is out.class_tokens and patches is out.features
    cls_n, patches_n = mct.final_tokens(model, x, final_norm=True)
    torch.testing.assert_close(cls_n, model.norm(cls))
    full = model.forward_features(x)  # after norm
    torch.testing.assert_close(patches_n, full[:, 4:])
    torch.testing.assert_close(cls_n, full[:, :3])
    with pytest.raises(ShapeError, match="images"):
        mct.final_tokens(model, torch.randn(3, 32, 32))
    with pytest.raises(ShapeError, match="images"):
        mct.final_tokens(model, torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="num_class_tokens"):
        mct.final_tokens(model, x, num_class_tokens=5)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="num_class_tokens"):
            mct.final_tokens(model, x, num_class_tokens=bad)


def test_class_scores_hand_case():
    tokens = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]], [[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]])
    torch.testing.assert_close(mct.class_scores(tokens), torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    with pytest.raises(ShapeError, match="class_tokens"):
        mct.class_scores(torch.zeros(2, 3))


# --------------------------------------------------------------------------- attention_cams


def _cams_oracle(model, x, c, last_k, fuse, refine):
    """Explicit attention per block (B, H, N, N), loops over images and classes."""
    p0 = model.num_prefix_tokens
    big_l = len(model.blocks)
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        attns = []
        for blk in model.blocks:
            a = blk.attn
            xn = blk.norm1(h)
            b, n_all, _ = xn.shape
            qkv = a.qkv(xn).reshape(b, n_all, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            attns.append(torch.softmax(a.q_norm(q) * a.scale @ a.k_norm(k).transpose(-1, -2), -1))
            h = blk(h)  # the real block (DOEI-patched if the model is)
    b, n = x.shape[0], attns[0].shape[-1] - p0
    cam = torch.zeros(b, c, n)
    for bi in range(b):
        for ci in range(c):
            for layer in range(big_l - last_k, big_l):
                cam[bi, ci] += attns[layer][bi, :, ci, p0:].mean(0)
            if fuse == "mean":
                cam[bi, ci] /= last_k
    if refine:
        app = sum(a[:, :, p0:, p0:].mean(1) for a in attns)
        out = torch.zeros_like(cam)
        for bi in range(b):
            for ci in range(c):
                out[bi, ci] = app[bi] @ cam[bi, ci]
        cam = out
    return cam


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "last_k, fuse, refine",
    [(3, "sum", False), (2, "mean", False), (1, "sum", True), (2, "mean", True), (3, "sum", True)],
)
def test_attention_cams_oracle(fused, last_k, fuse, refine):
    model = mct.add_class_tokens(tiny(reg_tokens=1, qk_norm=True), 4)
    perturb(model)
    set_fused(model, fused)
    x = torch.randn(2, 3, 32, 32)
    got = mct.attention_cams(model, x, last_k=last_k, fuse=fuse, refine=refine)
    want = _cams_oracle(model, x, 4, last_k, fuse, refine).reshape(2, 4, 4, 4)
    assert got.shape == (2, 4, 4, 4) and not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_cams_with_doei_active(fused):
    model = mct.add_class_tokens(tiny(), 5)
    perturb(model)
    set_fused(model, fused)
    x = torch.randn(2, 3, 32, 32)
    plain = mct.attention_cams(model, x, last_k=3, refine=True)
    cfg = doei.DOEIConfig(st_p2c=0.1, st_c2c=0.25)
    with doei.patch(model, config=cfg):
        got = mct.attention_cams(model, x, last_k=3, refine=True)
        want = _cams_oracle(model, x, 5, 3, "sum", True).reshape(2, 5, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-5  # DOEI changed the model's attention


def test_attention_cams_errors_and_no_hooks_left():
    model = mct.add_class_tokens(tiny(), 3)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="last_k"):
        mct.attention_cams(model, x, last_k=0)
    with pytest.raises(ValueError, match="last_k"):
        mct.attention_cams(model, x, last_k=4)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="last_k"):
            mct.attention_cams(model, x, last_k=bad)
    with pytest.raises(ValueError, match="num_class_tokens"):
        mct.attention_cams(model, x, num_class_tokens=1.5)
    with pytest.raises(ShapeError, match="images"):
        mct.attention_cams(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="fuse"):
        mct.attention_cams(model, x, fuse="max")
    with pytest.raises(ShapeError, match="images"):
        mct.attention_cams(model, x[0])
    with pytest.raises(TypeError):  # last_k is keyword-only
        mct.attention_cams(model, x, 2)
    mct.attention_cams(model, x, refine=True)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("refine", [False, True])
def test_attention_cams_bf16_autocast(refine):
    model = mct.add_class_tokens(tiny(), 3)
    perturb(model)
    x = torch.randn(1, 3, 32, 32)
    ref = mct.attention_cams(model, x, refine=refine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mct.attention_cams(model, x, refine=refine)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
