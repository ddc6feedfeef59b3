import pytest
import timm
import torch

from wsss_blocks import ShapeError
from wsss_blocks.tokens import (
    features_as_tokens,
    grid_to_tokens,
    patch_grid,
    resolve_block_index,
    split_prefix_tokens,
    tokens_to_grid,
    vit_taps,
)


def test_tokens_to_grid_is_row_major():
    tokens = torch.arange(6.0).view(1, 6, 1)
    grid = tokens_to_grid(tokens, (2, 3))
    assert grid.shape == (1, 1, 2, 3)
    assert grid[0, 0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert torch.equal(grid_to_tokens(grid), tokens)


def test_tokens_to_grid_rejects_wrong_count():
    with pytest.raises(ShapeError, match=r"tokens: expected shape \(B, 6, D\), got \(1, 5, 1\)"):
        tokens_to_grid(torch.zeros(1, 5, 1), (2, 3))
    with pytest.raises(ShapeError, match="features: expected 4 dims"):
        grid_to_tokens(torch.zeros(1, 6, 1))


def test_features_as_tokens_both_layouts_and_errors():
    grid = torch.randn(2, 5, 3, 4)
    tokens = features_as_tokens("features", grid, (3, 4))
    assert torch.equal(tokens, grid.flatten(2).transpose(1, 2))
    assert features_as_tokens("features", tokens, (3, 4)) is tokens
    with pytest.raises(ShapeError, match="features"):
        features_as_tokens("features", torch.zeros(2, 11, 5), (3, 4))
    with pytest.raises(ShapeError, match="features"):
        features_as_tokens("features", torch.zeros(2, 5, 4, 3), (3, 4))
    with pytest.raises(ShapeError, match="features: expected"):
        features_as_tokens("features", torch.zeros(2, 12), (3, 4))
    dims = {"D": 7}
    with pytest.raises(ShapeError, match="D=5 disagrees with D=7"):
        features_as_tokens("features", grid, (3, 4), dims)


def test_split_prefix_tokens():
    x = torch.randn(2, 7, 4)
    prefix, patches = split_prefix_tokens(x, 3)
    assert torch.equal(prefix, x[:, :3]) and torch.equal(patches, x[:, 3:])
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        split_prefix_tokens(x, 8)


def _tiny(name="vit_tiny_patch16_224", **kw):
    kw.setdefault("img_size", 32)
    kw.setdefault("depth", 4)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


def _block_outputs(model, images):
    """Oracle: block outputs and final-normed tokens from forward hooks on plain forward."""
    outs = {}
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o))
        for k, blk in enumerate(model.blocks)
    ]
    normed = {}
    handles.append(model.norm.register_forward_hook(lambda m, i, o: normed.__setitem__("x", o)))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return outs, normed["x"]


@pytest.mark.parametrize(
    "name,kw,size",
    [
        ("vit_tiny_patch16_224", {}, (32, 32)),
        ("deit_tiny_patch16_224", {}, (32, 32)),
        ("deit_tiny_distilled_patch16_224", {}, (32, 32)),
        ("vit_tiny_patch16_224", {"reg_tokens": 2}, (32, 32)),
        ("vit_tiny_patch16_224", {"dynamic_img_size": True}, (48, 80)),
        ("vit_tiny_patch16_224", {"img_size": (32, 64), "patch_size": 8}, (32, 64)),
        ("eva02_tiny_patch14_224", {"img_size": 28}, (28, 28)),
        ("beit_base_patch16_224", {"embed_dim": 64, "num_heads": 2}, (32, 32)),
    ],
)
def test_vit_taps_matches_hooked_forward(name, kw, size):
    model = _tiny(name, **kw).eval()
    images = torch.randn(2, 3, *size)
    taps = vit_taps(model, images, layers=(-3, -1))
    blocks, normed = _block_outputs(model, images)
    p = model.num_prefix_tokens
    h, w = patch_grid(model, size)
    assert taps.size == (h, w)
    assert taps.final.shape == (2, h * w, model.embed_dim)
    assert taps.prefix.shape == (2, p, model.embed_dim)
    torch.testing.assert_close(taps.final, normed[:, p:])
    torch.testing.assert_close(taps.prefix, normed[:, :p])
    assert sorted(taps.intermediate) == [1, 3]
    for k, tokens in taps.intermediate.items():
        torch.testing.assert_close(tokens, blocks[k][:, p:])  # un-normed residual stream


def test_vit_taps_grad_mode_and_empty_layers():
    model = _tiny().train()
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    taps = vit_taps(model, images, layers=())
    assert taps.intermediate == {}
    taps.final.sum().backward()
    assert images.grad is not None and model.training
    with pytest.raises(ValueError, match="out of range"):
        vit_taps(model, images, layers=(4,))
    with pytest.raises(ShapeError, match="images"):
        vit_taps(model, torch.randn(1, 1, 32, 32))


def test_vit_taps_gradients_under_grad_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = _tiny(depth=3, embed_dim=32, num_heads=2, patch_size=8).train()
        model.set_grad_checkpointing(checkpointing)
        images = torch.randn(1, 3, 32, 32, requires_grad=True)
        taps = vit_taps(model, images, layers=(0,))
        (taps.final.sum() + taps.intermediate[0].square().sum()).backward()
        grads.append((images.grad, model.blocks[0].attn.qkv.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_resolve_block_index():
    model = _tiny(depth=12)
    assert resolve_block_index(model, -3) == 9
    assert resolve_block_index(model, 0) == 0
    for bad in (12, -13):
        with pytest.raises(ValueError, match="out of range"):
            resolve_block_index(model, bad)
    with pytest.raises(TypeError, match="blocks"):
        resolve_block_index(torch.nn.Linear(2, 2), 0)
