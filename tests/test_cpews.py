"""CPEWS: tables, taps/head and the ISM loss."""

from __future__ import annotations

import math

import pytest
import torch
from oracles.cpews import toco_ptc

from wsss_blocks import ShapeError
from wsss_blocks.constants import COCO_CLASSES, VOC_CLASSES
from wsss_blocks.cpews import (
    COCO_SUPERCLASSES,
    PRESETS,
    VOC_SUPERCLASSES,
    CPEWSHead,
    ISMLoss,
    cpews_taps,
    ism_loss,
    superclass_index,
)

E1 = [1.0, 0.0]
E2 = [0.0, 1.0]


def _ism(feats, labels, **kw):
    return ism_loss(torch.tensor([feats]), torch.tensor([labels]), **kw).item()


# ----------------------------------------------------------------------------- tables
def test_class_names_and_superclass_partitions():
    assert len(VOC_CLASSES) == 20 and len(COCO_CLASSES) == 80
    assert VOC_CLASSES[14] == "person" and COCO_CLASSES[0] == "person"
    for table, k, groups in ((VOC_SUPERCLASSES, 20, 4), (COCO_SUPERCLASSES, 80, 12)):
        assert len(table) == groups
        members = sorted(c for v in table.values() for c in v)
        assert members == list(range(k))
    assert [VOC_CLASSES[c] for c in VOC_SUPERCLASSES["vehicle"]] == [
        "aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"]
    assert COCO_CLASSES[min(COCO_SUPERCLASSES["kitchen"])] == "bottle"
    assert COCO_CLASSES[max(COCO_SUPERCLASSES["indoor"])] == "toothbrush"
    g = superclass_index("voc", 20)
    assert g.dtype == torch.int64 and g.shape == (20,)
    assert g[5] == g[18] and g[5] != g[11]


def test_superclass_index_errors():
    with pytest.raises(ShapeError, match="num_classes=20"):
        superclass_index("voc", 21)
    with pytest.raises(ShapeError, match="num_classes=80"):
        superclass_index("coco", 20)
    with pytest.raises(ShapeError, match="no group"):
        superclass_index({"a": (0,)}, 2)
    with pytest.raises(ShapeError, match="more than one"):
        superclass_index({"a": (0, 1), "b": (1,)}, 2)
    with pytest.raises(ShapeError, match="outside"):
        superclass_index({"a": (0, 5)}, 2)
    with pytest.raises(ValueError, match="voc"):
        superclass_index("pascal", 20)


def test_presets_exact_values():
    assert PRESETS["paper"]["loss_weights"] == {"ism": 0.12, "pdl": 1.5e-4, "ssl": 0.2}
    assert PRESETS["official"]["loss_weights"] == {"ism": 0.2, "pdl": 0.12, "ssl": 1.5e-4}
    off = PRESETS["official"]
    assert off["pdl"] == {"distance": "rms", "offset": 0.1, "threshold": 0.1}
    assert off["ssl"] == {"suppress_singletons": False}
    assert off["pool"] == {"score": "cam_mean", "threshold": 0.1}
    pap = PRESETS["paper"]
    assert pap["pdl"] == {"distance": "l2", "offset": 0.0, "threshold": None}
    assert pap["ssl"] == {"suppress_singletons": True}
    assert pap["pool"] == {"score": "prob", "threshold": None}


# ----------------------------------------------------------------------------- ISM
def test_ism_hand_built_known_answers():
    assert _ism([E1, E1, E2], [1, 1, 2]) == pytest.approx(1 / 6, abs=1e-6)
    assert _ism([E1, [-1.0, 0.0], E2], [1, 1, 2]) == pytest.approx(1 / 6, abs=1e-6)
    assert _ism([E1, [-1.0, 0.0], E2], [1, 1, 2], abs_cos=False) == pytest.approx(5 / 6, abs=1e-6)
    r = 1 / math.sqrt(2)
    assert _ism([E1, E1, [r, r]], [1, 1, 2]) == pytest.approx(0.449509, abs=1e-6)
    # background-background pairs are positive
    assert _ism([E1, E1, E2], [0, 0, 1]) == pytest.approx(1 / 6, abs=1e-6)
    assert _ism([E1, E2, E1], [0, 0, 1]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 5, abs=1e-6)
    # an ignored token removes its pairs: with it counted, E1 vs E1 would be a negative pair
    assert _ism([E1, E1, E1], [1, 1, 255]) == pytest.approx(1 / 6, abs=1e-6)
    assert _ism([E1, E1, E1], [1, 1, 3]) == pytest.approx(1 / 6 + 0.5 * 4 / 5, abs=1e-6)
    # count_offset = 0 -> plain means
    assert _ism([E1, E1, E2], [1, 1, 2], count_offset=0.0) == pytest.approx(0.0, abs=1e-6)


def _loop_oracle(tokens, labels, abs_cos, c, ignore=255):
    """Pairs enumerated one by one."""
    f = torch.nn.functional.normalize(tokens.double(), dim=-1, eps=1e-8)
    sp = sn = 0.0
    npos = nneg = 0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            for j in range(tokens.shape[1]):
                yi, yj = int(labels[b, i]), int(labels[b, j])
                if i == j or yi == ignore or yj == ignore:
                    continue
                s = float(f[b, i] @ f[b, j])
                if yi == yj:
                    npos += 1
                    sp += abs(s) if abs_cos else s
                else:
                    nneg += 1
                    sn += abs(s) if abs_cos else max(s, 0.0)
    dp = npos + c if c > 0 else max(npos, 1)
    dn = nneg + c if c > 0 else max(nneg, 1)
    return 0.5 * (1 - sp / dp) + 0.5 * sn / dn


def _random_token_labels(gen, b, n, k=4):
    y = torch.randint(0, k, (b, n), generator=gen)
    y[torch.rand(b, n, generator=gen) < 0.2] = 255
    return y


def test_ism_equals_toco_construction():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 37, 16, generator=gen)
    labels = _random_token_labels(gen, 3, 37)
    out = ism_loss(tokens, labels)
    assert out.dtype == torch.float32 and out.shape == ()
    assert out.item() == pytest.approx(toco_ptc(tokens.double(), labels).item(), abs=1e-5)


@pytest.mark.parametrize("abs_cos", [True, False])
@pytest.mark.parametrize("c", [1.0, 0.0, 2.5])
def test_ism_loop_oracle(abs_cos, c):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 9, 5, generator=gen)
    labels = _random_token_labels(gen, 2, 9, k=3)
    out = ism_loss(tokens, labels, abs_cos=abs_cos, count_offset=c)
    assert out.item() == pytest.approx(_loop_oracle(tokens, labels, abs_cos, c), abs=1e-5)


def test_ism_layouts_agree():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 6, 4, generator=gen)  # grid (2, 3)
    labels = _random_token_labels(gen, 2, 6, k=2)
    grid = tokens.transpose(1, 2).reshape(2, 4, 2, 3)
    ref = ism_loss(tokens, labels)
    torch.testing.assert_close(ism_loss(tokens, labels.view(2, 2, 3)), ref)
    torch.testing.assert_close(ism_loss(grid, labels.view(2, 2, 3)), ref)
    torch.testing.assert_close(ism_loss(grid, labels), ref)


@pytest.mark.parametrize("abs_cos", [True, False])
def test_ism_gradcheck(abs_cos):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 255, 1], [2, 1, 0, 0, 2]])
    assert torch.autograd.gradcheck(lambda t: ism_loss(t, labels, abs_cos=abs_cos), (tokens,))


def test_ism_edge_cases():
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    out = ism_loss(tokens, torch.full((2, 4), 255))
    assert out.item() == pytest.approx(0.5)
    out.backward()
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))
    one = torch.tensor([[3, 255, 255, 255], [255, 255, 255, 255]])
    assert ism_loss(tokens, one).item() == pytest.approx(0.5)
    # no negative pairs: only the positive term
    t = torch.tensor([[E1, E1]])
    assert ism_loss(t, torch.tensor([[2, 2]])).item() == pytest.approx(0.5 * (1 - 2 / 3), abs=1e-6)
    # zero token: normalize with eps, finite
    z = torch.zeros(1, 3, 2, requires_grad=True)
    out = ism_loss(z, torch.tensor([[1, 1, 2]]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    # B=1, K=1 style: single label everywhere
    assert torch.isfinite(ism_loss(torch.randn(1, 5, 3), torch.zeros(1, 5, dtype=torch.long)))


def test_ism_bf16_autocast_and_module():
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 16, 8, generator=gen)
    labels = _random_token_labels(gen, 2, 16)
    ref = ism_loss(tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ism_loss(tokens.bfloat16(), labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), abs=2e-2)
    for kw in ({}, {"abs_cos": False, "count_offset": 0.0, "ignore_index": 7}):
        torch.testing.assert_close(ISMLoss(**kw)(tokens, labels), ism_loss(tokens, labels, **kw))
    assert "abs_cos=True" in repr(ISMLoss())


def test_ism_validation():
    t = torch.randn(2, 6, 4)
    y = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ShapeError, match="masks"):
        ism_loss(t, y.float())
    with pytest.raises(ShapeError, match="masks"):
        ism_loss(t, y[:, :, None, None])
    with pytest.raises(ShapeError, match="features"):
        ism_loss(t, y[:, :5])
    with pytest.raises(ShapeError, match="features"):
        ism_loss(t[:1], y)
    with pytest.raises(ShapeError, match="features"):
        ism_loss(t, y.view(2, 3, 2)[:, :, :1])
    with pytest.raises(ShapeError, match="features"):
        ism_loss(t.long(), y)
    with pytest.raises(ShapeError, match="features"):
        ism_loss(torch.randn(2, 4, 2, 2), y)  # 4 cells vs N=6
    with pytest.raises(ValueError, match="count_offset"):
        ism_loss(t, y, count_offset=-1.0)
    with pytest.raises(ValueError, match="count_offset"):
        ISMLoss(count_offset=-1.0)


# ----------------------------------------------------------------------------- head / taps
def test_head_gmp_feat_and_gmp_cam():
    head = CPEWSHead(2, 1)
    with torch.no_grad():
        head.classifier_final.weight.copy_(torch.tensor([[1.0, 1.0]]))
        head.classifier_mid.weight.copy_(torch.tensor([[2.0, -1.0]]))
    tokens = torch.tensor([[E1, E2]])  # (1, 2, 2), grid (1, 2)
    out = head(tokens, tokens, (1, 2))
    assert out.logits_final.item() == pytest.approx(2.0)  # W . max_n x = 1 + 1
    assert out.logits_mid.item() == pytest.approx(1.0)  # 2*1 - 1*1
    head_cam = CPEWSHead(2, 1, pooling="gmp_cam")
    head_cam.load_state_dict(head.state_dict())
    out_cam = head_cam(tokens, tokens, (1, 2))
    assert out_cam.logits_final.item() == pytest.approx(1.0)  # max_n CAM = max(1, 1)
    assert out_cam.logits_mid.item() == pytest.approx(2.0)
    torch.testing.assert_close(out.cams_final, torch.tensor([[[[1.0, 1.0]]]]))
    torch.testing.assert_close(out.cams_mid, torch.tensor([[[[2.0, -1.0]]]]))


def test_head_shapes_grads_and_oracle():
    gen = torch.Generator().manual_seed(5)
    head = CPEWSHead(6, 3)
    mid = torch.randn(2, 12, 6, generator=gen, requires_grad=True)
    fin = torch.randn(2, 6, 3, 4, generator=gen, requires_grad=True)  # NCHW layout
    out = head(mid, fin, (3, 4))
    assert out.cams_mid.shape == (2, 3, 3, 4) and out.logits_mid.shape == (2, 3)
    w = head.classifier_final.weight
    ftok = fin.flatten(2).transpose(1, 2)
    for b in range(2):
        for k in range(3):
            ref = (ftok[b] @ w[k]).view(3, 4)
            torch.testing.assert_close(out.cams_final[b, k], ref)
            torch.testing.assert_close(out.logits_final[b, k], ftok[b].amax(0) @ w[k])
    sum(o.sum() for o in out).backward()
    assert mid.grad.abs().sum() > 0 and fin.grad.abs().sum() > 0
    assert head.classifier_mid.weight.grad is not None
    assert head.classifier_final.bias is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = head(mid, fin, (3, 4))
    assert torch.isfinite(o.logits_final.float()).all()
    h64 = CPEWSHead(6, 3, dtype=torch.float64)
    assert h64.classifier_mid.weight.dtype == torch.float64


def test_head_validation():
    head = CPEWSHead(4, 2)
    with pytest.raises(ShapeError, match="features_mid"):
        head(torch.randn(2, 5, 4), torch.randn(2, 6, 4), (2, 3))
    with pytest.raises(ShapeError, match="features_final"):
        head(torch.randn(2, 6, 4), torch.randn(3, 6, 4), (2, 3))
    with pytest.raises(ShapeError, match="D=4"):
        head(torch.randn(2, 6, 5), torch.randn(2, 6, 5), (2, 3))
    with pytest.raises(ValueError, match="pooling"):
        CPEWSHead(4, 2, pooling="gap")


@pytest.fixture(scope="module")
def vit12():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=12, num_classes=0
    )


def test_cpews_taps_block_index_and_unnormed(vit12):
    images = torch.randn(2, 3, 32, 32)
    taps = cpews_taps(vit12, images)
    assert list(taps.intermediate) == [9]
    mid = taps.intermediate[9]
    assert mid.shape == taps.final.shape == (2, 4, 192) and taps.size == (2, 2)
    with torch.no_grad():  # manual residual stream after block 9, prefix dropped, no norm
        x = vit12.patch_embed(images)
        x = vit12._pos_embed(x)
        x = vit12.norm_pre(x)
        for blk in vit12.blocks[:10]:
            x = blk(x)
        ref = x[:, vit12.num_prefix_tokens :]
        final = vit12.norm(vit12.blocks[10:](x))[:, vit12.num_prefix_tokens :]
    torch.testing.assert_close(mid.detach(), ref)
    torch.testing.assert_close(taps.final.detach(), final)
    assert mid.requires_grad and taps.final.requires_grad
    assert list(cpews_taps(vit12, images, mid_layer=4).intermediate) == [4]
    with pytest.raises(ValueError, match="mid_layer: .*out of range"):
        cpews_taps(vit12, images, mid_layer=-13)
    with pytest.raises(ValueError, match="mid_layer: .*out of range"):
        cpews_taps(vit12, images, mid_layer=12)
