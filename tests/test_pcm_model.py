"""ViT-PCM modules: PatchClassifier, HVBiLSTM and the ViTPCM model on a tiny timm ViT."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from oracles.pcm import hv_bilstm_loop

from wsss_blocks import ShapeError
from wsss_blocks.outputs import LossOutput
from wsss_blocks.pcm import (
    PRESETS,
    HVBiLSTM,
    PatchClassifier,
    ViTPCM,
    dihedral_transform,
    et_loss,
    mce_loss,
    mosaic,
    patch_class_probs,
    random_dihedral_codes,
    unmosaic,
)
from wsss_blocks.utils import eval_mode

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ PatchClassifier

def test_patch_classifier_shapes_values_and_l2():
    torch.manual_seed(0)
    head = PatchClassifier(64, 20)
    assert head.weight.shape == (21, 64) and head.linear.bias is None
    assert abs(head.weight.std().item() - 0.05) < 0.005
    assert head.l2_penalty().item() == pytest.approx(0.01 * head.weight.pow(2).sum().item(), rel=1e-6)
    head.eval()
    x = torch.randn(2, 64, 3, 5)
    out = head(x)
    assert out.logits.shape == out.probs.shape == (2, 21, 3, 5) and out.pooled_probs.shape == (2, 21)
    ref = torch.einsum("bdhw,cd->bchw", x, head.weight)
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.probs.sum(1), torch.ones(2, 3, 5))
    torch.testing.assert_close(out.pooled_probs, out.probs.amax((-2, -1)))
    nobg = PatchClassifier(64, 20, with_background=False, bias=True, init_std=None)
    assert nobg(x).probs.shape == (2, 20, 3, 5) and nobg.linear.bias is not None


def test_patch_classifier_errors_dropout_bf16():
    head = PatchClassifier(8, 3)
    with pytest.raises(ShapeError, match="features"):
        head(torch.zeros(2, 7, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        PatchClassifier(8, 3, dropout=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        PatchClassifier(8, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="logits"):
        patch_class_probs(torch.zeros(2, 3, 4))
    x = torch.randn(2, 8, 4, 4)
    head.train()
    assert not torch.equal(head(x).logits, head.eval()(x).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.probs.dtype == torch.float32 and torch.isfinite(out.probs).all()
    torch.testing.assert_close(out.probs, head(x).probs, atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------ HVBiLSTM

def test_hv_bilstm_vs_loop_non_square():
    torch.manual_seed(1)
    hv = HVBiLSTM(16, hidden_dim=3).eval()
    x = torch.randn(2, 16, 3, 5)
    out = hv(x)
    assert out.shape == (2, 12, 3, 5) and hv.out_dim == 12
    torch.testing.assert_close(out, hv_bilstm_loop(hv, x), atol=1e-5, rtol=0)


def test_hv_bilstm_dropout_one_is_zero_input():
    torch.manual_seed(2)
    hv = HVBiLSTM(8, dropout=1.0).train()
    x = torch.randn(2, 8, 4, 3)
    torch.testing.assert_close(hv(x), hv.eval()(torch.zeros_like(x)))


def test_hv_bilstm_keras_init_and_errors():
    torch.manual_seed(3)
    hv = HVBiLSTM(32)
    h = hv.hidden_dim
    assert h == 8 and hv.out_dim == 32
    limit = math.sqrt(6 / (32 + 4 * h))
    for lstm in (hv.lstm_h, hv.lstm_v):
        for sfx in ("", "_reverse"):
            w_ih = getattr(lstm, f"weight_ih_l0{sfx}")
            w_hh = getattr(lstm, f"weight_hh_l0{sfx}")
            b_ih = getattr(lstm, f"bias_ih_l0{sfx}")
            assert w_ih.abs().max() <= limit and w_ih.abs().max() > 0.8 * limit
            torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(h), atol=1e-5, rtol=0)
            expected = torch.zeros(4 * h)
            expected[h:2 * h] = 1
            assert torch.equal(b_ih, expected)
            assert torch.equal(getattr(lstm, f"bias_hh_l0{sfx}"), torch.zeros(4 * h))
    with pytest.raises(ValueError, match="divisible by 4"):
        HVBiLSTM(30)
    with pytest.raises(ShapeError, match="features"):
        hv(torch.zeros(1, 16, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hv.eval()(torch.randn(1, 32, 3, 4))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------- ViTPCM

def _vit(img_size=64, depth=2):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                             dynamic_img_size=True, depth=depth)


def _model(**kw):
    torch.manual_seed(0)
    return ViTPCM(_vit(), 3, **kw)


def test_vitpcm_shapes_non_square():
    m = _model().eval()
    assert m.in_dim == 192 and m.patch_size == 16
    assert m(torch.randn(2, 3, 64, 64)).probs.shape == (2, 4, 4, 4)
    assert m(torch.randn(2, 3, 96, 64)).probs.shape == (2, 4, 6, 4)
    x = torch.randn(1, 3, 96, 64)
    assert m.features(x).shape == (1, 192, 6, 4)
    torch.testing.assert_close(m.head(m.features(x)).probs, m(x).probs)
    # head-only use without a backbone: the two head modules on any feature map
    feats_only = PatchClassifier(192, 3).eval()
    assert feats_only(torch.randn(1, 192, 2, 3)).pooled_probs.shape == (1, 4)
    with pytest.raises(ShapeError, match="images"):
        m.features(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="backbone"):
        ViTPCM(torch.nn.Linear(4, 4), 3)
    with pytest.raises(TypeError, match="backbone"):
        ViTPCM(192, 3)  # type: ignore[arg-type]


def test_vitpcm_teacher_restores_flags_and_has_no_grad():
    m = _model().train()
    m.backbone.blocks[0].eval()
    before = [x.training for x in m.modules()]
    x = torch.randn(2, 3, 64, 64)
    out = m.teacher(x)
    assert [x.training for x in m.modules()] == before
    assert out.probs.requires_grad is False
    torch.testing.assert_close(out.probs, m.teacher(x).probs)  # no dropout: deterministic
    m.eval()
    torch.testing.assert_close(out.probs, m(x).probs)
    with pytest.raises(RuntimeError), eval_mode(m.train()):
        raise RuntimeError
    assert m.training


def test_vitpcm_set_backbone_trainable():
    m = _model()
    params = m.set_backbone_trainable(num_blocks=1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("backbone.blocks.1.", "backbone.norm.", "hv.", "classifier.")) for n in names)
    assert any(n.startswith("backbone.blocks.1.") for n in names) and "backbone.norm.weight" in names
    assert len(params) == len(names)
    frozen = m.set_backbone_trainable(num_blocks=0)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert len(frozen) == len(list(m.hv.parameters())) + len(list(m.classifier.parameters()))
    m.set_backbone_trainable(num_blocks=-1)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="num_blocks"):
        m.set_backbone_trainable(num_blocks=3)


def test_vitpcm_training_losses():
    m = _model()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    out = m.training_losses(images, labels, crop=32, generator=g)
    assert isinstance(out, LossOutput) and list(out.terms) == ["mce", "et", "l2"]
    assert out.weights == {"mce": 1.0, "et": 1.0, "l2": 1.0}
    assert all(torch.isfinite(v) for v in out.terms.values())
    torch.testing.assert_close(out.loss, out.terms["mce"] + out.terms["et"] + out.terms["l2"])
    out.loss.backward()
    assert m.classifier.weight.grad is not None and m.classifier.weight.grad.abs().sum() > 0
    assert m.hv.lstm_h.weight_ih_l0.grad.abs().sum() > 0
    no_et = m.training_losses(images[:3], labels[:3], use_et=False)
    assert no_et.terms["et"].item() == 0.0
    with pytest.raises(ShapeError, match="divisible by 4"):
        m.training_losses(images[:3], labels[:3])
    with pytest.raises(ShapeError, match="images_et"):
        m.training_losses(images, labels, images_et=images[:, :, :32])


def test_vitpcm_shared_teacher_matches_the_separate_pass():
    """Backbone without dropout: one backbone pass gives the separate pass's losses and gradients."""
    m = _model()
    assert m.hv is not None and m.classifier.dropout.p > 0  # head dropout on: the teacher must be eval
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]] * 2)
    results = []
    for shared in (False, True):
        m.zero_grad()
        torch.manual_seed(4)  # the head's dropout
        out = m.training_losses(images, labels, crop=32, generator=torch.Generator().manual_seed(5),
                                shared_teacher=shared)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (sep, g_sep), (sh, g_sh) = results
    assert float(sep.terms["et"].detach()) > 0
    torch.testing.assert_close(sh.loss, sep.loss, atol=1e-6, rtol=1e-5)
    for key in sep.terms:
        torch.testing.assert_close(sh.terms[key], sep.terms[key], atol=1e-6, rtol=1e-5)
    assert len(g_sep) == len(g_sh)
    for a, b in zip(g_sep, g_sh, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert m.training and m.classifier.training  # modes restored
    m.zero_grad()
    no_et = m.training_losses(images, labels, use_et=False, shared_teacher=True)
    assert no_et.terms["et"].item() == 0.0


@pytest.mark.slow
def test_vitpcm_loss_falls():
    torch.manual_seed(0)
    m = ViTPCM(_vit(img_size=32, depth=1), 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    images[:4, 0] += 2.0
    labels = torch.tensor([[1, 0]] * 4 + [[0, 1]] * 4)
    losses = []
    for _ in range(30):
        out = m.training_losses(images, labels, crop=16, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_vitpcm_state_dict_round_trip():
    torch.manual_seed(4)
    a = ViTPCM(_vit(img_size=32, depth=1), 2).eval()
    torch.manual_seed(5)
    b = ViTPCM(_vit(img_size=32, depth=1), 2).eval()
    x = torch.randn(1, 3, 32, 48)
    assert not torch.allclose(a(x).probs, b(x).probs)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x).probs, b(x).probs)


def test_vitpcm_stored_options_are_the_training_defaults():
    """Options stored on the module drive training_losses exactly as the free functions do."""
    torch.manual_seed(0)
    vit = _vit()
    m = ViTPCM(vit, 3, background="ignore", target_norm="image", crop_prob=1.0, crop=32, scale=0.5,
               align_corners=True)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]] * 2)
    torch.manual_seed(4)
    out = m.training_losses(images, labels, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(4)
    codes = random_dihedral_codes(batch_size=8, generator=g)
    x1 = dihedral_transform(images, codes)
    teacher = m.teacher(x1)
    mce = mce_loss(m(x1).pooled_probs, labels, background="ignore")
    tiles, record = mosaic(images, crop_prob=1.0, crop=32, scale=0.5, patch_size=16, align_corners=True,
                           generator=g)
    assert record.align_corners is True
    et = et_loss(unmosaic(m(tiles).probs), teacher.probs, labels, record, teacher_codes=codes,
                 background="ignore", target_norm="image")
    assert torch.equal(out.terms["mce"], mce) and torch.equal(out.terms["et"], et)
    # a call's own value wins over the stored one
    torch.manual_seed(4)
    other = m.training_losses(images, labels, crop_prob=0.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other.terms["et"], et)
    with pytest.raises(ValueError, match="target_norm"):
        ViTPCM(vit, 3, target_norm="patch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_prob"):
        ViTPCM(vit, 3, crop_prob=1.5)
    with pytest.raises(ValueError, match="crop"):
        ViTPCM(vit, 3, crop=(16, 16, 16))


def test_vitpcm_defaults_and_presets():
    vit = _vit()
    default = ViTPCM(vit, 3)
    assert (default.background, default.target_norm, default.crop_prob, default.crop, default.scale,
            default.align_corners) == ("always_one", "tile", 0.3, 128, 0.5, False)
    assert (default.classifier.init_std, default.classifier.l2) == (0.05, 0.01)
    assert set(PRESETS) == {"paper", "official"}
    differ = {k for k in PRESETS["paper"] if PRESETS["paper"][k] != PRESETS["official"][k]}
    assert differ == {"init_std", "l2"}
    paper = ViTPCM.from_preset(vit, 3, preset="paper")
    assert (paper.classifier.init_std, paper.classifier.l2, paper.align_corners) == (1.0, 0.1, True)
    torch.manual_seed(1)
    official = ViTPCM.from_preset(vit, 3, preset="official", crop=32, hv_lstm=False)
    torch.manual_seed(1)
    by_hand = ViTPCM(vit, 3, **{**PRESETS["official"], "crop": 32, "hv_lstm": False})
    assert official.hv is None and official.crop == 32 and official.align_corners is True
    assert official.classifier.l2 == 0.01 and official.classifier.init_std == 0.05
    for (ka, va), (kb, vb) in zip(official.state_dict().items(), by_hand.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="hiden_dim"):
        ViTPCM.from_preset(vit, 3, preset="paper", hiden_dim=8)
    with pytest.raises(ValueError, match="preset"):
        ViTPCM.from_preset(vit, 3, preset="keras")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ViTPCM.from_preset(vit, 3)  # type: ignore[call-arg]
