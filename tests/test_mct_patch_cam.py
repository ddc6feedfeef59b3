"""mct.patch_cam / PatchCAM and mct.fused_cam / FusedCAM: known answers, layouts, dtypes, errors.

Equality with MCTformer-V2 / MCTformer+'s own PatchCAM logits and fused CAMs, after
``load_mctformer``, is in ``test_mct_checkpoints.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_blocks import ShapeError, mct
from wsss_blocks import functional as WF

pytestmark = pytest.mark.usefixtures("single_thread")


def test_patch_cam_known_answer_3x3_same_padding():
    """Ones through a 3x3 ones kernel: each cell counts its in-grid neighbours (zero padding)."""
    feats = torch.ones(1, 1, 3, 4)
    out = mct.patch_cam(feats, torch.ones(1, 1, 3, 3), bias=torch.tensor([0.5]))
    expect = torch.tensor([[4.0, 6.0, 6.0, 4.0], [6.0, 9.0, 9.0, 6.0], [4.0, 6.0, 6.0, 4.0]]) + 0.5
    assert torch.equal(out, expect[None, None])


def test_patch_cam_tokens_are_row_major_on_the_grid():
    tokens = torch.arange(6.0).reshape(1, 6, 1)  # grid (2, 3): row 0 = 0 1 2, row 1 = 3 4 5
    out = mct.patch_cam(tokens, torch.tensor([[2.0]]), (2, 3))  # (K, D) weight: a 1x1 kernel
    assert torch.equal(out, torch.tensor([[[[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]]]))
    shift = torch.zeros(1, 1, 3, 3)
    shift[0, 0, 1, 2] = 1.0  # picks the right neighbour
    right = mct.patch_cam(tokens, shift, (2, 3))
    assert torch.equal(right, torch.tensor([[[[1.0, 2.0, 0.0], [4.0, 5.0, 0.0]]]]))


def test_patch_cam_equals_conv2d_in_both_layouts_and_module():
    torch.manual_seed(0)
    head = mct.PatchCAM(8, 3)
    assert isinstance(head, nn.Conv2d) and head.padding == (1, 1) and sorted(head.state_dict()) == ["bias", "weight"]
    fmap = torch.randn(2, 8, 3, 5)
    ref = F.conv2d(fmap, head.weight, head.bias, padding=1)
    tokens = fmap.flatten(2).transpose(1, 2)
    assert torch.allclose(head(fmap), ref, atol=1e-6)
    assert torch.allclose(head(tokens, (3, 5)), ref, atol=1e-6)
    assert torch.allclose(WF.patch_cam(tokens, head.weight, (3, 5), bias=head.bias), ref, atol=1e-6)
    one = mct.PatchCAM(8, 2, kernel_size=1, bias=False)
    assert one.bias is None and one(tokens, (3, 5)).shape == (2, 2, 3, 5)


def test_patch_cam_computes_mixed_dtypes_in_the_promoted_one():
    w = torch.randn(2, 4, 3, 3)
    x = torch.randn(1, 4, 2, 2)
    assert mct.patch_cam(x.double(), w).dtype == torch.float64
    half = mct.patch_cam(x.bfloat16(), w, bias=torch.zeros(2))
    assert half.dtype == torch.float32  # bfloat16 features with float32 weights: float32
    torch.testing.assert_close(half, mct.patch_cam(x.bfloat16().float(), w, bias=torch.zeros(2)))
    assert mct.patch_cam(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mct.patch_cam(x, w).dtype == torch.bfloat16  # autocast decides


def test_patch_cam_errors():
    w = torch.randn(2, 4, 3, 3)
    with pytest.raises(ShapeError, match="size: required"):
        mct.patch_cam(torch.randn(1, 6, 4), w)
    with pytest.raises(ShapeError, match="features"):
        mct.patch_cam(torch.randn(1, 6, 4), w, (2, 2))
    with pytest.raises(ShapeError, match="a 2x3 map, but size=\\(3, 2\\)"):
        mct.patch_cam(torch.randn(1, 4, 2, 3), w, (3, 2))
    with pytest.raises(ShapeError, match="weight"):
        mct.patch_cam(torch.randn(1, 5, 2, 2), w)
    with pytest.raises(ShapeError, match="odd square kernel"):
        mct.patch_cam(torch.randn(1, 4, 2, 2), torch.randn(2, 4, 2, 2))
    with pytest.raises(ShapeError, match="bias"):
        mct.patch_cam(torch.randn(1, 4, 2, 2), w, bias=torch.zeros(3))
    with pytest.raises(ShapeError, match="float"):
        mct.patch_cam(torch.ones(1, 4, 2, 2, dtype=torch.long), w)
    with pytest.raises(ValueError, match="kernel_size: expected an odd size"):
        mct.PatchCAM(4, 2, kernel_size=2)


def test_fused_cam_known_answer_and_module():
    attn = torch.tensor([[[[0.25, 1.0], [2.0, 0.5]]]])
    pcam = torch.tensor([[[[4.0, -1.0], [8.0, 0.5]]]])
    assert torch.equal(mct.fused_cam(attn, pcam), torch.tensor([[[[1.0, 0.0], [16.0, 0.25]]]]))
    assert torch.equal(mct.fused_cam(attn, pcam, fuse="geometric"), torch.tensor([[[[1.0, 0.0], [4.0, 0.5]]]]))
    assert torch.equal(mct.FusedCAM(fuse="geometric")(attn, pcam), WF.fused_cam(attn, pcam, fuse="geometric"))
    assert "geometric" in repr(mct.FusedCAM(fuse="geometric"))


def test_fused_cam_detaches_the_patch_cam():
    attn = torch.rand(1, 2, 2, 2, requires_grad=True)
    pcam = torch.rand(1, 2, 2, 2, requires_grad=True)
    mct.fused_cam(attn, pcam).sum().backward()
    assert pcam.grad is None
    assert torch.allclose(attn.grad, pcam.detach())


def test_fused_cam_precision():
    attn, pcam = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mct.fused_cam(attn.bfloat16(), pcam.bfloat16()).dtype == torch.float32
    assert mct.fused_cam(attn.double(), pcam).dtype == torch.float64


def test_fused_cam_errors():
    with pytest.raises(ShapeError, match="patch_cams"):
        mct.fused_cam(torch.rand(1, 2, 3, 3), torch.rand(1, 3, 3, 3))
    with pytest.raises(ValueError, match="fuse"):
        mct.fused_cam(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3), fuse="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fuse"):
        mct.FusedCAM(fuse="max")  # type: ignore[arg-type]
