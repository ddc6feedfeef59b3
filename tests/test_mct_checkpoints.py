"""mct.load_mctformer: released MCTformer V1 / V2 / MCTformer+ checkpoints into a timm ViT.

The references are tiny stand-ins of the released models (``vendored_vits``): their own
``forward`` outputs (class logits, attention maps, PatchCAM logits, fused CAMs) must equal
what the library computes on the converted timm ViT, to 1e-5 in fp32.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F
import vendored_vits as vv
from torch import nn

from wsss_blocks import ShapeError, mct

pytestmark = pytest.mark.usefixtures("single_thread")

C, L = 3, 2
ATOL = 1e-5


def tiny_timm(num_classes: int = 0, img_size=32, depth: int = L) -> nn.Module:
    torch.manual_seed(123)  # weights are overwritten by the checkpoint
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, embed_dim=32,
        num_heads=2, depth=depth, num_classes=num_classes,
    ).eval()


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial parameters everywhere (norm gains, biases, tokens), sharper attention."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = "norm" in name or "token" in name or "pos_embed" in name
            p.add_((0.3 if big else 0.03) * torch.randn(p.shape, generator=gen))
            if name.endswith("attn.qkv.weight"):
                p.mul_(6.0)
    return model.eval()


def images(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return torch.allclose(a, b, atol=ATOL, rtol=0)


def gwrp(patch_cams: torch.Tensor, decay: float) -> torch.Tensor:
    """MCTformer+'s ranking pooling, written from its definition (for the reference logits)."""
    ranked = patch_cams.flatten(2).sort(dim=-1, descending=True).values
    w = decay ** torch.arange(ranked.shape[-1], dtype=ranked.dtype)
    return (ranked * w).sum(-1) / w.sum()


# --------------------------------------------------------------------------- V1


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (32, 48)])
def test_v1_class_scores_and_attention_cams_match(size):
    ref = perturbed(vv.MCTformerV1Like(num_classes=C, depth=L))
    vit = tiny_timm(C, img_size=size)
    out = mct.load_mctformer(vit, {"model": ref.state_dict()})
    h, w = size[0] // 8, size[1] // 8
    assert out.variant == "v1" and out.num_classes == C and out.head is None and out.size == (h, w)
    assert out.resized_from == (None if size == (32, 32) else (4, 4))
    assert out.missing_keys == out.unexpected_keys == out.dropped_keys == []
    assert vit.cls_token.shape == (1, C, 32) and vit.num_prefix_tokens == C
    assert torch.equal(vit.head.weight, ref.head.weight)  # V1's unused head takes a same-shape slot
    x = images(*size)
    with torch.no_grad():
        for n in (1, L):
            logits, mtatt, patch_attn = ref(x, n_layers=n, return_att=True)
            assert close(mct.attention_cams(vit, x, last_k=n, fuse="sum"), mtatt.reshape(2, C, h, w))
        refined = torch.einsum("bij,bcj->bci", patch_attn.sum(0), mtatt).reshape(2, C, h, w)
        assert close(mct.attention_cams(vit, x, last_k=L, fuse="sum", refine=True), refined)
        assert close(mct.class_scores(mct.final_tokens(vit, x).class_tokens), logits)


def test_v1_into_headless_model_drops_the_unused_head():
    ref = perturbed(vv.MCTformerV1Like(num_classes=C, depth=L))
    vit = tiny_timm(0)
    out = mct.load_mctformer(vit, ref.state_dict())
    assert out.dropped_keys == ["head.weight", "head.bias"] and out.head is None
    x = images(32, 32)
    with torch.no_grad():
        assert close(mct.class_scores(mct.final_tokens(vit, x).class_tokens), ref(x))


def test_v1_fc_option_head_is_dropped():
    ref = perturbed(vv.MCTformerV1Like(num_classes=C, depth=L, last_opt="fc"))
    with pytest.raises(ValueError, match=r"variant='v1'.*missing keys \['head.weight', 'head.bias'\].*num_classes=0"):
        mct.load_mctformer(tiny_timm(C), ref.state_dict())  # all or nothing: the bias alone would fit
    out = mct.load_mctformer(tiny_timm(0), ref.state_dict())
    assert out.variant == "v1" and out.dropped_keys == ["head.weight", "head.bias"]


# --------------------------------------------------------------------------- V2


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_v2_scores_attention_patch_cam_and_fused_cam_match(size):
    ref = perturbed(vv.MCTformerV2Like(num_classes=C, depth=L))
    vit = tiny_timm(0, img_size=size)
    out = mct.load_mctformer(vit, {"model": ref.state_dict(), "epoch": 7})
    assert out.size == (size[0] // 8, size[1] // 8) and out.resized_from == (None if size == (32, 32) else (4, 4))
    assert out.variant == "v2" and isinstance(out.head, mct.PatchCAM) and isinstance(out.head, nn.Conv2d)
    assert torch.equal(out.head.weight, ref.head.weight) and torch.equal(out.head.bias, ref.head.bias)
    x = images(*size)
    with torch.no_grad():
        cls_logits, patch_logits = ref(x)
        final = mct.final_tokens(vit, x)
        pcam = out.head(final.features, out.size)
        assert close(mct.class_scores(final.class_tokens), cls_logits)
        assert close(pcam.mean((2, 3)), patch_logits)  # V2's patch logits: GAP of PatchCAM
        assert close(mct.patch_cam(final.features, ref.head.weight, out.size, bias=ref.head.bias), pcam)
        _, only_patch, _ = ref(x, return_att=True, attention_type="patchcam")
        assert close(pcam.relu(), only_patch)
        for n in (1, L):
            _, fused, _ = ref(x, return_att=True, n_layers=n, attention_type="fused")
            _, attn, _ = ref(x, return_att=True, n_layers=n, attention_type="mct")
            cams = mct.attention_cams(vit, x, last_k=n, fuse="sum")
            assert close(cams, attn)
            assert close(mct.fused_cam(cams, pcam), fused)
            assert close(mct.FusedCAM()(cams, pcam), fused)


# --------------------------------------------------------------------------- MCTformer+


@pytest.mark.parametrize("vit_size", [64, 32])
def test_plus_scores_attention_and_fused_cam_match(vit_size):
    """At the training size (no resize) and at half of it (pos_embed_pat resized 8x8 -> 4x4)."""
    ref = perturbed(vv.MCTformerPlusLike(num_classes=C, depth=L, input_size=64))
    vit = tiny_timm(0, img_size=vit_size)
    out = mct.load_mctformer(vit, {"model": ref.state_dict()})
    side = vit_size // 8
    assert out.variant == "plus" and out.dropped_keys == ["pos_embed"] and out.size == (side, side)
    assert out.resized_from == (None if vit_size == 64 else (8, 8))
    assert torch.equal(vit.pos_embed[:, :C], ref.pos_embed_cls)
    if vit_size == 64:
        assert torch.equal(vit.pos_embed[:, C:], ref.pos_embed_pat)
    x = images(vit_size, vit_size)
    with torch.no_grad():
        cls_logits, class_embeds, patch_logits = ref(x)  # eval: position grid resized as released
        final = mct.final_tokens(vit, x)
        pcam = out.head(final.features, out.size)
        assert close(mct.class_scores(final.class_tokens), cls_logits)
        assert close(final.class_tokens, class_embeds[-1])
        assert close(gwrp(pcam, ref.decay_parameter), patch_logits)
        for n in (1, L):
            logits, attn, _ = ref(x, return_att=True, n_layers=n, attention_type="mct")
            _, fused, _ = ref(x, return_att=True, n_layers=n, attention_type="fused")
            cams = mct.attention_cams(vit, x, last_k=n, fuse="mean")
            assert close(cams, attn)
            assert close(mct.fused_cam(cams, pcam, fuse="geometric"), fused)
        assert close((mct.class_scores(final.class_tokens) + gwrp(pcam, ref.decay_parameter)) / 2, logits)


def test_plus_train_mode_matches_at_its_input_size():
    ref = perturbed(vv.MCTformerPlusLike(num_classes=C, depth=L, input_size=64)).train()
    vit = tiny_timm(0, img_size=64)
    mct.load_mctformer(vit, ref.state_dict())
    x = images(64, 64)
    with torch.no_grad():
        cls_logits, _, _ = ref(x)  # train mode: pos_embed_pat added as is
        assert close(mct.class_scores(mct.final_tokens(vit, x).class_tokens), cls_logits)


# --------------------------------------------------------------------------- checkpoint objects


@pytest.mark.parametrize("layout,variant", [("mctformer_v1", "v1"), ("mctformer_v2", "v2"),
                                            ("mctformer_plus", "plus")])
def test_official_key_tables_load_strictly(layout, variant):
    """Every key of the released layouts has a place (or is reported as dropped)."""
    ckpt = vv.official_checkpoint(layout, depth=L, num_classes=C, input_size=64)
    vit = tiny_timm(C if variant == "v1" else 0, img_size=64 if variant == "plus" else 32)
    out = mct.load_mctformer(vit, ckpt)
    sd = ckpt["model"]
    assert out.variant == variant and vit.cls_token.shape == (1, C, 32)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(vit.norm.weight, sd["norm.weight"])
    assert torch.equal(vit.cls_token, sd["cls_token"])
    pos = sd["pos_embed"] if variant != "plus" else torch.cat([sd["pos_embed_cls"], sd["pos_embed_pat"]], 1)
    assert torch.equal(vit.pos_embed, pos)
    # explicit variant, a DataParallel prefix and another wrapper key give the same result
    prefixed = {"state_dict": OrderedDict(("module." + k, v) for k, v in sd.items())}
    other = tiny_timm(C if variant == "v1" else 0, img_size=64 if variant == "plus" else 32)
    assert mct.load_mctformer(other, prefixed, variant=variant).variant == variant
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), other.state_dict().values(), strict=True))


def test_loads_into_a_model_that_already_has_c_class_tokens_and_follows_its_dtype():
    ref = perturbed(vv.MCTformerV2Like(num_classes=C, depth=L))
    vit = mct.add_class_tokens(tiny_timm(0), C).double()
    out = mct.load_mctformer(vit, ref.state_dict())
    assert vit.cls_token.dtype == torch.float64 and out.head is not None
    assert out.head.weight.dtype == torch.float64
    x = images(32, 32).double()
    with torch.no_grad():
        assert torch.allclose(mct.class_scores(mct.final_tokens(vit, x).class_tokens), ref.double()(x)[0], atol=1e-10)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_variant_and_the_keys():
    v1_sd = vv.official_state_dict("mctformer_v1", depth=L, num_classes=C)
    v2_sd = vv.official_state_dict("mctformer_v2", depth=L, num_classes=C)
    with pytest.raises(ShapeError, match=r"variant='v2'.*head.weight.*\(3, 32\)"):
        mct.load_mctformer(tiny_timm(0), v1_sd, variant="v2")
    with pytest.raises(ValueError, match=r"variant='plus'.*lacks \['pos_embed_cls', 'pos_embed_pat'\].*'v2'"):
        mct.load_mctformer(tiny_timm(0), v2_sd, variant="plus")
    vit = tiny_timm(5)  # V2 into a ViT with a Linear head: the head has no source
    with pytest.raises(ValueError, match=r"variant='v2'.*missing keys \['head.weight', 'head.bias'\].*num_classes=0"):
        mct.load_mctformer(vit, v2_sd)
    assert vit.cls_token.shape[1] == 1  # a refused load leaves the model alone
    with pytest.raises(ValueError, match=r"variant='v2'.*missing keys \[.*'blocks.2.norm1.weight'"):
        mct.load_mctformer(tiny_timm(0, depth=3), v2_sd)
    with pytest.raises(ShapeError, match="pos_embed: 15 patch positions do not form a square grid"):
        mct.load_mctformer(tiny_timm(0), {**v2_sd, "pos_embed": v2_sd["pos_embed"][:, :-1]})
    with pytest.raises(ValueError, match=r"unexpected keys \['patch_embed.proj.weight'\].*shape mismatches.*"
                                         r"patch_embed.proj.weight: \(32, 3, 8, 8\) vs model \(32, 3, 4, 4\)"):
        mct.load_mctformer(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                                             num_heads=2, depth=L, num_classes=0), v2_sd)
    with pytest.raises(ValueError, match="has 4 class tokens, the checkpoint 3"):
        mct.load_mctformer(mct.add_class_tokens(tiny_timm(0), 4), v2_sd)
    with pytest.raises(ValueError, match="variant"):
        mct.load_mctformer(tiny_timm(0), v2_sd, variant="v3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state_dict"):
        mct.load_mctformer(tiny_timm(0), [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lacks"):
        mct.load_mctformer(tiny_timm(0), {"model": {"epoch": torch.tensor(1)}})
    with pytest.raises(ValueError, match="register"):
        mct.load_mctformer(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                             num_heads=2, depth=L, num_classes=0, reg_tokens=2), v2_sd)


def test_non_strict_loads_what_fits_and_reports_the_rest():
    ref = perturbed(vv.MCTformerV2Like(num_classes=C, depth=L))
    vit = tiny_timm(5, depth=3)
    out = mct.load_mctformer(vit, ref.state_dict(), strict=False)
    assert out.variant == "v2" and vit.cls_token.shape == (1, C, 32)
    assert set(out.missing_keys) == {"head.weight", "head.bias"} | {
        k for k in vit.state_dict() if k.startswith("blocks.2.")
    }
    assert out.unexpected_keys == []
    assert torch.equal(vit.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_resize_matches_the_released_interpolation():
    """V1 / V2 resize with DINO's +0.1 scale factor, MCTformer+ with the plain ratio."""
    ref = perturbed(vv.MCTformerV2Like(num_classes=C, depth=L))
    vit = tiny_timm(0, img_size=(40, 56))
    out = mct.load_mctformer(vit, ref.state_dict())
    assert out.resized_from == (4, 4) and out.size == (5, 7)
    with torch.no_grad():
        expect = ref.interpolate_pos_encoding(torch.zeros(1, C + 35, 32), 40, 56)
    assert torch.equal(vit.pos_embed, expect)
    grid = ref.pos_embed[:, C:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(5, 7), mode="bicubic", align_corners=False)
    assert not torch.allclose(vit.pos_embed[:, C:], plain.flatten(2).transpose(1, 2), atol=1e-3)
