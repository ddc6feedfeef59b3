"""Tests for wsss_blocks.adapters: ViT copies, timm's other attention families, registration.

The ViT copies come from ``tests/vendored_vits.py`` (tiny random-init modules with the module
trees, forward signatures and return conventions of MCTformer V1/V2/+, TS-CAM, ToCo, CPEWS and
the timm 0.4-0.6 layouts). Oracles are hand-run loops over the blocks and the attention
weights the models return themselves.
"""

from __future__ import annotations

import pytest
import timm
import torch
import vendored_vits as vv
from _timm_helpers import set_fused
from torch import Tensor, nn

from wsss_blocks import adapters, doei, mct, vit_taps
from wsss_blocks.cpews import cpews_taps
from wsss_blocks.doei import DOEIConfig, doei_delta, hybrid_attention, patch_color_affinity, progressive_count
from wsss_blocks.tokens import tokens_to_grid

pytestmark = pytest.mark.usefixtures("single_thread")

C, D, L = 4, 32, 3
ACTIVE = dict(st_p2c=0.1, st_c2c=0.25, af_p2c=1.5, sf_p2c=0.7, af_c2c=1.3, sf_c2c=0.6)


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Less uniform attention and distinct class tokens than the random init (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            qkv = getattr(m, "qkv", None)
            if isinstance(qkv, nn.Linear):
                qkv.weight.mul_(5.0)
        cls = getattr(model, "cls_token", None)
        if cls is not None:
            cls.add_(torch.randn(cls.shape, generator=gen))
    return model


VENDORED = {
    "mct_v1": lambda: vv.MCTformerV1Like(num_classes=C, depth=L),
    "mct_v2": lambda: vv.MCTformerV2Like(num_classes=C, depth=L),
    "mct_plus": lambda: vv.MCTformerPlusLike(num_classes=C, depth=L, input_size=32),
    "tscam": lambda: vv.TSCAMViTLike(num_classes=C, depth=L),
    "toco": lambda: vv.ToCoViTLike(depth=L),
    "cpews": lambda: vv.CPEWSViTLike(depth=L),
    "timm04": lambda: vv.OldTimmViT(depth=L),
    "timm04_distilled": lambda: vv.OldTimmViT(depth=L, distilled=True),
    "timm06": lambda: vv.Timm06ViT(depth=L, init_values=0.5),
}


def vendored(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return sharpen(VENDORED[name](), seed).eval()


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """The token sequence each layout feeds its first block, computed by hand."""
    m: object = model
    if isinstance(m, vv.MCTformerPlusLike):
        t = m.patch_embed(images)
        t = t + m.interpolate_pos_encoding(t, images.shape[-2], images.shape[-1])
        cls = m.cls_token.expand(images.shape[0], -1, -1) + m.pos_embed_cls
        return torch.cat([cls, t], 1)
    if isinstance(m, vv.MCTformerV1Like):
        return m._embed(images)
    if isinstance(m, vv.ToCoViTLike):
        return m.prepare_tokens(images)
    if isinstance(m, vv.Timm06ViT):
        return m._pos_embed(m.patch_embed(images))
    prefix = [m.cls_token.expand(images.shape[0], -1, -1)]
    if getattr(m, "dist_token", None) is not None:
        prefix.append(m.dist_token.expand(images.shape[0], -1, -1))
    return torch.cat([*prefix, m.patch_embed(images)], 1) + m.pos_embed


def block_loop(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Every block's output, running the blocks by hand."""
    x, outs = embed(model, images), []
    for blk in model.blocks:
        x = blk(x)
        x = x[0] if isinstance(x, tuple) else x
        outs.append(x)
    return outs


def prefix_count(model: nn.Module) -> int:
    return model.cls_token.shape[1] + (getattr(model, "dist_token", None) is not None)


# --------------------------------------------------------------------------- taps on ViT copies


@pytest.mark.parametrize("name", list(VENDORED))
def test_vit_taps_on_vit_copies_equal_a_hand_run_block_loop(name):
    model = vendored(name)
    images = torch.randn(2, 3, 32, 32)
    taps = vit_taps(model, images, layers=(0, -2))
    outs = block_loop(model, images)
    p = prefix_count(model)
    normed = model.norm(outs[-1])
    assert taps.size == (4, 4) and taps.logits is None
    torch.testing.assert_close(taps.final, normed[:, p:], atol=0, rtol=0)
    torch.testing.assert_close(taps.prefix, normed[:, :p], atol=0, rtol=0)
    assert sorted(taps.intermediate) == [0, L - 2]
    for i, tokens in taps.intermediate.items():
        torch.testing.assert_close(tokens, outs[i][:, p:], atol=0, rtol=0)


def test_taps_of_toco_and_cpews_equal_their_own_encoder_outputs():
    for name in ("toco", "cpews"):
        model = vendored(name)
        images = torch.randn(2, 3, 48, 40)  # ToCo resizes its position embeddings to any size
        _, patches, aux = model.forward_features(images)[:3]
        taps = cpews_taps(model, images, mid_layer=-3)
        assert taps.size == (6, 5)
        torch.testing.assert_close(taps.final, patches, atol=0, rtol=0)
        torch.testing.assert_close(taps.intermediate[0], aux, atol=0, rtol=0)


def test_vit_taps_head_gives_the_logits_of_the_same_pass():
    model = vendored("timm06")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit_taps(model, images, head=True).logits, model(images))
    with pytest.raises(TypeError, match="forward_head.*register_vit_adapter"):
        vit_taps(vendored("mct_v1"), images, head=True)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_vit_taps_head_on_timm_and_the_fc_norm_case(global_pool):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              num_heads=2, depth=2, num_classes=3, global_pool=global_pool).eval()
    images = torch.randn(2, 3, 32, 32)
    taps = vit_taps(model, images, layers=(-1,), head=True)
    torch.testing.assert_close(taps.logits, model(images), atol=0, rtol=0)
    last = taps.intermediate[1]
    if global_pool == "avg":  # norm is Identity, fc_norm normalises the pooled token
        assert isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity)
        torch.testing.assert_close(taps.final, last, atol=0, rtol=0)
    else:
        torch.testing.assert_close(taps.final, model.norm(torch.cat([taps.prefix, last], 1))[:, 1:])
    assert vit_taps(model, images, layers=()).logits is None


# --------------------------------------------------------------------------- MCT on ViT copies


@pytest.mark.parametrize("refine", [False, True])
def test_attention_cams_equal_mctformer_v1s_own_attention(refine):
    model = vendored("mct_v1")
    images = torch.randn(2, 3, 32, 32)
    logits, mtatt, patch_attn = model(images, n_layers=2, return_att=True)  # (B, C, P), (L, B, P, P)
    want = torch.einsum("bij,bcj->bci", patch_attn.sum(0), mtatt) if refine else mtatt
    got = mct.attention_cams(model, images, last_k=2, refine=refine)
    assert got.shape == (2, C, 4, 4)
    torch.testing.assert_close(got.flatten(2), want, atol=1e-6, rtol=1e-5)
    tokens = mct.final_tokens(model, images)
    torch.testing.assert_close(mct.class_scores(tokens.class_tokens), logits, atol=0, rtol=0)


def test_attention_cams_equal_mctformer_v2_and_plus_own_attention():
    images = torch.randn(2, 3, 32, 32)
    v2 = vendored("mct_v2")
    want = v2(images, return_att=True, n_layers=2, attention_type="mct")[1]
    torch.testing.assert_close(mct.attention_cams(v2, images, last_k=2), want, atol=1e-6, rtol=1e-5)
    plus = vendored("mct_plus")  # eval at its input size: MCTformer+ averages the blocks
    want = plus(images, return_att=True, n_layers=2, attention_type="mct")[1]
    torch.testing.assert_close(mct.attention_cams(plus, images, last_k=2, fuse="mean"), want, atol=1e-6, rtol=1e-5)
    cls, patches = mct.final_tokens(plus, images)
    want_cls, want_patches = plus.forward_features(images)[:2]
    torch.testing.assert_close(cls, want_cls, atol=0, rtol=0)
    torch.testing.assert_close(patches, want_patches, atol=0, rtol=0)


def test_one_class_token_gives_one_map_tscam():
    model = vendored("tscam")
    images = torch.randn(2, 3, 32, 32)
    _, want = model(images)  # eval: (logits, attention map x conv map), attention summed over all blocks
    attn = mct.attention_cams(model, images, last_k=L)
    assert attn.shape == (2, 1, 4, 4)
    taps = vit_taps(model, images, layers=())
    s_map = model.head(tokens_to_grid(taps.final, taps.size))
    torch.testing.assert_close(attn * s_map, want, atol=1e-6, rtol=1e-5)


def test_add_class_tokens_on_a_vit_copy_and_a_distilled_count():
    model = vendored("timm04")
    mct.add_class_tokens(model, C)
    assert model.cls_token.shape == (1, C, D) and model.num_tokens == C
    images = torch.randn(2, 3, 32, 32)
    assert mct.final_tokens(model, images).class_tokens.shape == (2, C, D)
    assert mct.attention_cams(model, images, last_k=1).shape == (2, C, 4, 4)
    distilled = vendored("timm04_distilled")  # [cls, dist, patches]: two class tokens, as in timm
    assert mct.final_tokens(distilled, images).class_tokens.shape == (2, 2, D)


def test_errors_name_the_cause_and_the_fix():
    images = torch.randn(1, 3, 32, 32)
    no_cls = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, class_token=False,
                               global_pool="avg")
    for fn in (mct.final_tokens, mct.attention_cams):
        with pytest.raises(ValueError, match=r"has none \(num_prefix_tokens=0\).*mct\.add_class_tokens\(model"):
            fn(no_cls, images)
    with pytest.raises(ValueError, match=r"doei\.patch needs class tokens.*add_class_tokens"):
        doei.patch(no_cls)


# --------------------------------------------------------------------------- DOEI on ViT copies


def dense_doei_v1(model: nn.Module, images: Tensor, cfg: DOEIConfig) -> Tensor:
    """DOEI on MCTformer-V1's blocks with explicit attention and the dense public functions."""
    c = p0 = model.cls_token.shape[1]
    big_l = len(model.blocks)
    r = patch_color_affinity(images, model.patch_embed.patch_size, rgb_sigma=cfg.rgb_sigma,
                             mean=cfg.image_mean, std=cfg.image_std)
    x = embed(model, images)
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        xn = blk.norm1(x)
        b, n_all, d = xn.shape
        q, k, v = a.qkv(xn).reshape(b, n_all, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-1, -2)) * a.scale, -1)
        y = a.proj((attn @ v).transpose(1, 2).reshape(b, n_all, d))
        n = n_all - p0
        y = y + doei_delta(
            y, hybrid_attention(xn, attn.mean(1), r, num_prefix_tokens=p0, alpha=cfg.alpha),
            num_class_tokens=c, num_prefix_tokens=p0,
            t_p2c=progressive_count(n, block_index=i, num_blocks=big_l, st=cfg.st_p2c),
            t_c2c=progressive_count(c - 1, block_index=i, num_blocks=big_l, st=cfg.st_c2c),
            af_p2c=cfg.af_p2c, sf_p2c=cfg.sf_p2c, af_c2c=cfg.af_c2c, sf_c2c=cfg.sf_c2c,
        )
        x = x + y
        x = x + blk.mlp(blk.norm2(x))
    return x


def test_doei_on_mctformer_v1_equals_the_dense_reference_and_keeps_its_weights():
    model = vendored("mct_v1")
    images = torch.randn(2, 3, 32, 32)
    cfg = DOEIConfig(**ACTIVE, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    plain = mct.final_tokens(model, images)
    with doei.patch(model, config=cfg) as h:
        assert (h.num_class_tokens, h.num_prefix_tokens, h.num_blocks) == (C, C, L)
        got = mct.final_tokens(model, images)
        logits, mtatt, _ = model(images, n_layers=2, return_att=True)
        # the weights the patched blocks return are the model's own attention, as attention_cams reads it
        torch.testing.assert_close(mct.attention_cams(model, images, last_k=2).flatten(2), mtatt,
                                   atol=1e-6, rtol=1e-5)
    want = dense_doei_v1(model, images, cfg)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)
    assert (got.class_tokens - plain.class_tokens).abs().max() > 1e-4
    torch.testing.assert_close(logits, mct.class_scores(got.class_tokens))


@pytest.mark.parametrize("name", list(VENDORED))
def test_doei_on_vit_copies_trains_and_unpatches_exactly(name):
    model = vendored(name)
    images = torch.randn(2, 3, 32, 32)
    before = vit_taps(model, images, layers=(0,))
    keys = list(model.state_dict())
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        assert list(model.state_dict()) == keys
        model.train()
        taps = vit_taps(model, images, layers=(0,))
        (taps.final.square().mean() + taps.prefix.square().mean()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert (taps.final - before.final).abs().max() > 1e-5
        model.eval()
    after = vit_taps(model, images, layers=(0,))
    assert list(model.state_dict()) == keys
    assert torch.equal(after.final, before.final) and torch.equal(after.intermediate[0], before.intermediate[0])
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_doei_head_mean_false_needs_a_per_head_output():
    model = vendored("mct_v1")
    with pytest.raises(NotImplementedError, match="head_mean=False.*per-head outputs"):
        doei.patch(model, config=DOEIConfig(head_mean=False))
    assert not hasattr(model, "_doei_handle")


def test_patch_before_add_class_tokens_is_refused():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=32,
                              num_heads=2)
    images = torch.randn(1, 3, 32, 32)
    with doei.patch(model):
        with pytest.raises(ValueError, match=r"patched by DOEI.*doei\.unpatch\(model\)"):
            mct.add_class_tokens(model, 3)
        assert model.cls_token.shape[1] == 1
        with torch.no_grad():  # a change of the class tokens behind the handle's back
            model.cls_token = nn.Parameter(model.cls_token.repeat(1, 2, 1))
            model.pos_embed = nn.Parameter(torch.cat([model.pos_embed[:, :1], model.pos_embed], 1))
            model.num_prefix_tokens = 2
        with pytest.raises(RuntimeError, match=r"prefix tokens changed since doei\.patch \(P0 1 -> 2"):
            model(images)


# --------------------------------------------------------------------------- image sizes


def test_image_sizes_the_model_cannot_take_are_named():
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              num_heads=2, depth=2)
    mct.add_class_tokens(fixed, 2)
    bad = torch.randn(1, 3, 48, 32)
    msg = r"image size \(48, 32\): VisionTransformer was built for img_size \(32, 32\).*dynamic_img_size=True"
    fns = (lambda m, x: vit_taps(m, x, layers=()), mct.final_tokens, lambda m, x: mct.attention_cams(m, x, last_k=1))
    for fn in fns:
        with pytest.raises(ValueError, match=msg):
            fn(fixed, bad)
    with doei.patch(fixed), pytest.raises(ValueError, match=msg):
        fixed(bad)
    dynamic = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                num_heads=2, depth=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"height 44 is not a multiple of the patch size 8 \(try 40 or 48\)"):
        vit_taps(dynamic, torch.randn(1, 3, 44, 32), layers=())
    tscam = vendored("tscam")  # a copy that asserts the size in its own patch embedding
    with pytest.raises(ValueError, match=r"image size \(40, 40\): TSCAMViTLike refused it.*img_size \(32, 32\)"):
        mct.attention_cams(tscam, torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="smaller than the patch size 8"):
        vit_taps(vendored("mct_v1"), torch.randn(1, 3, 4, 32))
    old = vendored("timm04")  # timm 0.4-0.6: fixed size, no dynamic_img_size to suggest
    with pytest.raises(ValueError, match=r"accepts only that size; pass \(32, 32\)$"):
        vit_taps(old, torch.randn(1, 3, 40, 40))


# --------------------------------------------------------------------------- timm's other attention families


def explicit_cams(model: nn.Module, images: Tensor, c: int, last_k: int) -> Tensor:
    """Head-mean class-to-patch probabilities the model computes itself (explicit path)."""
    set_fused(model, False)
    probs: list[Tensor] = []
    hooks = [m.attn_drop.register_forward_pre_hook(lambda _m, a: probs.append(a[0]))
             for m in (blk.attn for blk in model.blocks)]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        set_fused(model, True)
    p0 = model.num_prefix_tokens
    return sum(a.mean(1)[:, :c, p0:] for a in probs[-last_k:])


def eva(**kw) -> nn.Module:
    from timm.models.eva import Eva

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=True,
                ref_feat_shape=(4, 4))
    return sharpen(Eva(**{**args, **kw})).eval()


FAMILIES = {
    "eva_rope_qkv_bias": lambda: eva(),
    "eva_separate_qkv": lambda: eva(qkv_fused=False, qk_norm=True),
    "eva_attn_rope_gqa": lambda: eva(attn_type="rope", num_heads=4, num_kv_heads=2, qkv_fused=False),
    "beit": lambda: sharpen(timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        use_shared_rel_pos_bias=False)).eval(),
    "beit_shared_bias": lambda: sharpen(timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        use_rel_pos_bias=False, use_shared_rel_pos_bias=True)).eval(),
    "relpos": lambda: sharpen(timm.create_model(
        "vit_relpos_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, class_token=True, global_pool="token", init_values=0.0, rel_pos_type="bias")).eval(),
}


def _randomise_biases(model: nn.Module) -> None:
    """Non-zero q/v biases and relative position tables (timm initialises them to zero)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_cams_on_timm_families_equal_their_explicit_probabilities(family):
    model = FAMILIES[family]()
    _randomise_biases(model)
    mct.add_class_tokens(model, 3) if family.startswith("eva") else None
    c = model.num_prefix_tokens
    images = torch.randn(2, 3, 32, 32)
    got = mct.attention_cams(model, images, last_k=2)
    assert got.shape == (2, c, 4, 4)
    torch.testing.assert_close(got.flatten(2), explicit_cams(model, images, c, 2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_doei_on_timm_families_fused_equals_explicit_and_unpatches_exactly(family):
    model = FAMILIES[family]()
    _randomise_biases(model)
    images = torch.randn(2, 3, 32, 32)
    before = model.forward_features(images)
    keys = list(model.state_dict())
    outs = []
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        for fused in (True, False):
            set_fused(model, fused)
            model.train()
            out = model.forward_features(images)
            out.square().mean().backward()
            assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
            outs.append(out.detach())
            model.zero_grad()
    set_fused(model, True)
    model.eval()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    assert (outs[0] - before).abs().max() > 1e-4
    assert list(model.state_dict()) == keys and torch.equal(model.forward_features(images), before)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_relpos_mlp_bias_with_dropout_is_read_in_eval_and_refused_fused_in_training():
    torch.manual_seed(0)
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, class_token=True, global_pool="token").eval()
    assert isinstance(model.blocks[0].attn.rel_pos.mlp.drop1, nn.Dropout)  # the MLP bias has dropout
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(mct.attention_cams(model, images, last_k=2).flatten(2),
                               explicit_cams(model, images, 1, 2), atol=1e-5, rtol=1e-4)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        model.train()
        with pytest.raises(NotImplementedError, match="sampled anew.*fused_attn=False"):
            model(images)
        set_fused(model, False)
        assert torch.isfinite(model(images)).all()


def test_doei_per_head_on_eva_fused_equals_explicit():
    model = eva()
    images = torch.randn(2, 3, 32, 32)
    outs = []
    with doei.patch(model, config=DOEIConfig(**ACTIVE, head_mean=False)):
        for fused in (True, False):
            set_fused(model, fused)
            outs.append(model.forward_features(images))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    beit = FAMILIES["beit"]()
    with pytest.raises(NotImplementedError, match="head_mean=False"):
        doei.patch(beit, config=DOEIConfig(head_mean=False))


def test_add_class_tokens_refuses_beit_and_updates_eva_rope():
    with pytest.raises(ValueError, match="relative position bias"):
        mct.add_class_tokens(FAMILIES["beit"](), 3)
    model = mct.add_class_tokens(eva(), 3)
    assert model.num_prefix_tokens == 3 and all(b.attn.num_prefix_tokens == 3 for b in model.blocks)
    assert mct.final_tokens(model, torch.randn(1, 3, 32, 32)).class_tokens.shape == (1, 3, 32)


# --------------------------------------------------------------------------- registration


class ToyAttention(nn.Module):
    """Separate to_q / to_k / to_v projections; forward(x, attn_mask, is_causal) as timm's Block calls it."""

    def __init__(self, dim: int, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.seen: list[Tensor] = []

    def split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_v(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        self.seen.append(probs.detach())
        return self.proj((probs @ v).transpose(1, 2).flatten(2))


class ToyAdapter(adapters.AttentionAdapter):
    captures = ("to_q", "to_k")
    mask_kwargs = ("attn_mask", "is_causal")

    def query_key(self, module, call):
        return adapters.QueryKey(module.split(call.captured["to_q"]), module.split(call.captured["to_k"]),
                                 module.scale)


class UnknownAttention(ToyAttention):
    pass


def toy_vit(attention: type) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              num_heads=2, depth=2).eval()
    for blk in model.blocks:
        blk.attn = attention(32)
    return sharpen(mct.add_class_tokens(model, 3))


def test_registered_toy_attention_works_and_unknown_ones_name_the_registration():
    adapters.register_attention_adapter(ToyAttention, ToyAdapter())
    model = toy_vit(ToyAttention)
    images = torch.randn(2, 3, 32, 32)
    for blk in model.blocks:
        blk.attn.seen.clear()
    got = mct.attention_cams(model, images, last_k=2)
    want = sum(blk.attn.seen[-1].mean(1)[:, :3, 3:] for blk in model.blocks)
    torch.testing.assert_close(got.flatten(2), want, atol=1e-6, rtol=1e-5)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        out = model.forward_features(images)
        out.sum().backward()
        with pytest.raises(NotImplementedError, match="attn_mask"):
            model.blocks[0].attn(torch.randn(1, 19, 32), attn_mask=torch.zeros(19, 19))
    assert torch.isfinite(out).all() and model.blocks[0].attn.to_q.weight.grad is not None
    unknown = toy_vit(UnknownAttention)  # a subclass of a registered class is not read blindly
    for fn in (doei.patch, lambda m: mct.attention_cams(m, images)):
        with pytest.raises(TypeError, match=r"UnknownAttention.*register_attention_adapter\(UnknownAttention"):
            fn(unknown)


def test_registration_argument_errors_and_lookup():
    with pytest.raises(TypeError, match="attention_class"):
        adapters.register_attention_adapter(object, adapters.FusedQKVAdapter())
    with pytest.raises(TypeError, match="adapter"):
        adapters.register_attention_adapter(ToyAttention, object())
    with pytest.raises(TypeError, match="adapter"):
        adapters.register_vit_adapter(nn.Module, adapters.FusedQKVAdapter())
    assert adapters.attention_adapter(nn.Linear(2, 2)) is None
    assert isinstance(adapters.attention_adapter(vv.VendoredAttention(8, 2)), adapters.FusedQKVAdapter)
    assert isinstance(adapters.attention_adapter(vv.LegacyAttention(8, 2)), adapters.FusedQKVAdapter)

    class TalkingHeadsAttention(vv.VendoredAttention):  # an extra child: not the fused-qkv structure
        def __init__(self):
            super().__init__(8, 2)
            self.proj_l = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"TalkingHeadsAttention.*register_attention_adapter\(TalkingHeadsAttention"):
        adapters.attention_adapter(TalkingHeadsAttention())


def test_a_registered_vit_adapter_reads_a_wrapped_layout():
    class Network(nn.Module):  # a segmentation network that keeps its ViT as .encoder
        def __init__(self):
            super().__init__()
            self.encoder = vendored("toco")

    class NetworkAdapter(adapters.ViTAdapter):
        def blocks(self, model):
            return model.encoder.blocks

        def num_prefix_tokens(self, model):
            return 1

        def patch_embed(self, model):
            return model.encoder.patch_embed

        def final_norm(self, model):
            return model.encoder.norm

        def run(self, model, images):
            return model.encoder.forward_features(images)

    net = Network()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match="register_vit_adapter"):
        vit_taps(net, images)
    adapters.register_vit_adapter(Network, NetworkAdapter())
    torch.testing.assert_close(vit_taps(net, images).final, vit_taps(net.encoder, images).final, atol=0, rtol=0)


def test_doei_images_and_hfa_on_a_nonsquare_vit_copy():
    model = vendored("toco")  # ToCo takes any size; the grid comes from the patch embedding
    images = torch.randn(2, 3, 40, 24)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        taps = vit_taps(model, images)
    assert taps.size == (5, 3) and taps.final.shape == (2, 15, D) and torch.isfinite(taps.final).all()
