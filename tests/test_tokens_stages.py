"""Hierarchical backbone taps (tokens.stage_info / check_stage_input / stage_taps) on tiny timm models."""

import pytest
import timm
import torch

from wsss_blocks import ShapeError
from wsss_blocks.tokens import StageInfo, check_stage_input, stage_info, stage_taps

pytestmark = pytest.mark.usefixtures("single_thread")


def _swin(**kw):
    cfg = dict(pretrained=False, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
               window_size=2, img_size=64, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **cfg)


def test_stage_info_reads_feature_info():
    m = _swin(embed_dim=8)
    info = stage_info(m)
    assert info == (StageInfo(8, 4, "layers.0"), StageInfo(16, 8, "layers.1"),
                    StageInfo(32, 16, "layers.2"), StageInfo(64, 32, "layers.3"))
    with pytest.raises(TypeError, match="feature_info"):
        stage_info(torch.nn.Linear(2, 2))


def test_stage_taps_nchw_and_final_norm_matches_forward_features():
    m = _swin()
    x = torch.randn(2, 3, 64, 64)
    maps = stage_taps(m, x, final_norm=True).features
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    assert all(f.is_contiguous() for f in maps)
    ref = m.forward_features(x)  # timm Swin keeps NHWC internally
    torch.testing.assert_close(maps[-1], ref.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    raw = stage_taps(m, x, final_norm=False).features
    torch.testing.assert_close(m.norm(raw[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2), maps[-1])
    for a, b in zip(raw[:3], maps[:3], strict=True):  # norm touches the last stage only
        torch.testing.assert_close(a, b)


def test_stage_taps_manual_layer_loop_oracle():
    m = _swin()
    x = torch.randn(1, 3, 64, 64)
    h = m.patch_embed(x)
    expected = []
    for layer in m.layers:  # NHWC residual stream stage by stage
        h = layer(h)
        expected.append(h.permute(0, 3, 1, 2))
    got = stage_taps(m, x).features
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stage_taps_subset_order_and_negative_indices():
    m = _swin()
    x = torch.randn(1, 3, 64, 64)
    full = stage_taps(m, x).features
    taps = stage_taps(m, x, stages=(-1, 1))
    assert (taps.stages, taps.strides) == ((3, 1), (32, 8))
    sub = taps.features
    assert len(sub) == 2
    torch.testing.assert_close(sub[0], full[3])
    torch.testing.assert_close(sub[1], full[1])
    with pytest.raises(ValueError, match="stage index 4 is out of range"):
        stage_taps(m, x, stages=(4,))
    with pytest.raises(ValueError, match=r"stages\[0\]: expected an int"):
        stage_taps(m, x, stages=(1.0,))
    with pytest.raises(ValueError, match="at least one"):
        stage_taps(m, x, stages=())


@pytest.mark.parametrize(("size", "grids"), [
    ((64, 48), [(16, 12), (8, 6), (4, 3), (2, 2)]),
    ((200, 136), [(50, 34), (25, 17), (13, 9), (7, 5)]),
    ((60, 60), [(15, 15), (8, 8), (4, 4), (2, 2)]),
])
def test_stage_taps_non_square_dynamic(size, grids):
    m = _swin(dynamic_img_size=True)
    maps = stage_taps(m, torch.randn(1, 3, *size)).features
    assert [tuple(f.shape[-2:]) for f in maps] == grids
    for i in range(3):  # Swin's padded merging: h_{i+1} = ceil(h_i / 2)
        assert maps[i + 1].shape[-2] == -(-maps[i].shape[-2] // 2)


def test_stage_taps_fixed_size_non_square_model():
    m = _swin(img_size=(64, 48))
    assert [tuple(f.shape[-2:]) for f in stage_taps(m, torch.randn(1, 3, 64, 48)).features][-1] == (2, 2)


def test_input_size_errors_say_what_works():
    strict = _swin()
    with pytest.raises(ValueError, match=r"built for img_size \(64, 64\).*dynamic_img_size=True"):
        stage_taps(strict, torch.randn(1, 3, 64, 48))
    dyn = _swin(dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"height 62 is not a multiple of the patch size 4 \(try 60 or 64\)"):
        stage_taps(dyn, torch.randn(1, 3, 62, 64))
    with pytest.raises(ValueError, match=r"width 2 .*\(try 4\)"):
        check_stage_input(dyn, (64, 2))
    assert check_stage_input(dyn, (200, 136)) == (200, 136)
    with pytest.raises(ValueError, match="image_size"):
        check_stage_input(dyn, (0, 4))


def test_stage_taps_input_errors_and_gradients():
    m = _swin()
    with pytest.raises(ShapeError, match="images: expected 4 dims"):
        stage_taps(m, torch.randn(3, 64, 64))
    with pytest.raises(ShapeError, match="images: expected a float tensor"):
        stage_taps(m, torch.zeros(1, 3, 64, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="forward_intermediates"):
        stage_taps(torch.nn.Linear(2, 2), torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    maps = stage_taps(m, x).features
    sum(f.sum() for f in maps).backward()
    assert x.grad is not None and m.patch_embed.proj.weight.grad is not None
    assert m.training  # mode untouched


def test_stage_taps_other_hierarchical_model_convnext():
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    maps = stage_taps(m, torch.randn(1, 3, 64, 96)).features
    assert [tuple(f.shape) for f in maps] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 24, 4, 6), (1, 32, 2, 3)]
    assert [s.stride for s in stage_info(m)] == [4, 8, 16, 32]


def test_vit_taps_still_work():
    from wsss_blocks.tokens import vit_taps

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)
    assert vit_taps(m, torch.randn(1, 3, 32, 32)).size == (2, 2)
