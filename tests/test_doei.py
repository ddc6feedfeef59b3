"""Tests for wsss_blocks.doei: the dense functions, the patch and its handle."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from _timm_helpers import set_fused
from oracles.doei import reference_features
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

from wsss_blocks import ShapeError, doei, mct
from wsss_blocks.doei import (
    DOEIConfig,
    doei_delta,
    hybrid_attention,
    patch_color_affinity,
    progressive_count,
    select_top_bottom,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# Config that makes both branches active on tiny models (n ~ 16, C = 5, L = 3).
ACTIVE = dict(st_p2c=0.1, st_c2c=0.25, af_p2c=1.5, sf_p2c=0.7, af_c2c=1.3, sf_c2c=0.6)


def tiny_vit(*, c: int = 1, reg: int = 0, dynamic: bool = False, pad: bool = False, depth: int = 3,
             img: int = 32, patch: int = 8, fused: bool = True, dtype=torch.float32, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch, embed_dim=32, num_heads=2,
        depth=depth, reg_tokens=reg, dynamic_img_size=dynamic, dynamic_img_pad=pad, **kw,
    )
    if c > 1:
        mct.add_class_tokens(m, c)
    with torch.no_grad():  # break the symmetry of repeated class tokens / pos slots (no ties)
        m.cls_token.add_(torch.randn_like(m.cls_token))
        if m.pos_embed is not None:
            m.pos_embed.add_(0.5 * torch.randn_like(m.pos_embed))
        if m.reg_token is not None:
            m.reg_token.add_(torch.randn_like(m.reg_token))
    set_fused(m, fused)
    return m.to(dtype).eval()


# --------------------------------------------------------------------------- T1


@pytest.mark.parametrize(
    "args, expected",
    [((196, 0, 12, 0.02), 43), ((196, 10, 12, 0.02), 3), ((196, 11, 12, 0.02), 0), ((10, 0, 12, 0.1), 5),
     ((19, 0, 12, 0.02), 4), ((100, 0, 12, 0.03), 33), ((5, 1, 12, 0.02), 1), ((0, 0, 12, 0.5), 0)],
)
def test_progressive_count_known(args, expected):
    n, i, big_l, st = args
    assert progressive_count(n, block_index=i, num_blocks=big_l, st=st) == expected


def test_progressive_count_errors():
    with pytest.raises(ValueError, match="block_index"):
        progressive_count(10, block_index=12, num_blocks=12, st=0.02)
    with pytest.raises(ValueError, match="num_candidates"):
        progressive_count(-1, block_index=0, num_blocks=12, st=0.02)
    with pytest.raises(ValueError, match="st"):
        progressive_count(10, block_index=0, num_blocks=12, st=1.5)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_blocks"):
            progressive_count(10, block_index=0, num_blocks=bad, st=0.02)
    for name, kw in (("num_candidates", dict(num_candidates=10.5)), ("block_index", dict(block_index=1.5)),
                     ("num_blocks", dict(num_blocks=12.0))):
        args = {"num_candidates": 10, "block_index": 0, "num_blocks": 12, "st": 0.02, **kw}
        n = args.pop("num_candidates")
        with pytest.raises(ValueError, match=name):  # never truncated
            progressive_count(n, **args)
    with pytest.raises(TypeError):  # the options are keyword-only
        progressive_count(10, 0, 12, 0.02)


# --------------------------------------------------------------------------- T2


def _as_sets(mask: Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask.reshape(-1, mask.shape[-1])]


def test_select_top_bottom_known():
    row = torch.tensor([[0.5, 0.4, 0.4, 0.2]])
    top, bottom = select_top_bottom(row, t=1)
    assert _as_sets(top) == [{0}] and _as_sets(bottom) == [{3}]
    top, bottom = select_top_bottom(row, t=2)
    assert _as_sets(top) == [{0, 1}] and _as_sets(bottom) == [{2, 3}]
    w = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 0.05], [0.1, 0.1, 0.6]])
    top, bottom = select_top_bottom(w + w.T, t=1, exclude_diagonal=True)
    assert top.int().argmax(-1).tolist() == [1, 0, 0]
    assert bottom.int().argmax(-1).tolist() == [2, 2, 1]
    assert top.sum().item() == 3 and bottom.sum().item() == 3


@pytest.mark.parametrize("exclude", [False, True])
def test_select_top_bottom_oracle(exclude):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (2, 3, 7, 7), generator=g).float()  # many ties
    scores.requires_grad_(True)
    t = 3 if exclude else 2
    top, bottom = select_top_bottom(scores, t=t, exclude_diagonal=exclude)
    assert top.dtype == torch.bool and bottom.dtype == torch.bool
    assert torch.all(top.sum(-1) == t) and torch.all(bottom.sum(-1) == t)
    assert not (top & bottom).any()
    flat = scores.detach().reshape(-1, 7, 7)
    for b in range(flat.shape[0]):
        for r in range(7):
            cand = [j for j in range(7) if not (exclude and j == r)]
            order = sorted(cand, key=lambda j: (-flat[b, r, j].item(), j))
            assert set(order[:t]) == set(torch.nonzero(top.reshape(-1, 7, 7)[b, r]).flatten().tolist())
            assert set(order[-t:]) == set(torch.nonzero(bottom.reshape(-1, 7, 7)[b, r]).flatten().tolist())


def test_select_top_bottom_returns_named_masks():
    out = select_top_bottom(torch.tensor([[0.5, 0.4, 0.4, 0.2]]), t=1)
    assert isinstance(out, doei.TopBottom) and out._fields == ("top", "bottom")
    assert out.top.int().tolist() == [[1, 0, 0, 0]] and out.bottom.int().tolist() == [[0, 0, 0, 1]]
    with pytest.raises(TypeError):  # t is keyword-only
        select_top_bottom(torch.randn(2, 5), 1)


def test_select_top_bottom_errors():
    with pytest.raises(ValueError, match="t: expected"):
        select_top_bottom(torch.randn(2, 5), t=3)
    with pytest.raises(ValueError, match="t: expected"):
        select_top_bottom(torch.randn(5, 5), t=3, exclude_diagonal=True)
    with pytest.raises(ShapeError, match="scores"):
        select_top_bottom(torch.randn(2, 5), t=1, exclude_diagonal=True)
    with pytest.raises(ShapeError, match="scores"):
        select_top_bottom(torch.randn(5), t=1)


# --------------------------------------------------------------------------- T3


def test_doei_delta_hand_ppdo():
    attn = torch.zeros(1, 5, 5)
    attn[0, 0, 1:] = torch.tensor([0.5, 0.4, 0.4, 0.2])
    y = torch.zeros(1, 5, 2)
    y[0, 0] = torch.tensor([1.0, 2.0])
    kw = dict(num_class_tokens=1, num_prefix_tokens=1, t_c2c=0, af_p2c=2.0, sf_p2c=0.5)
    d1 = doei_delta(y, attn, t_p2c=1, **kw)
    torch.testing.assert_close(d1[0, 1:], torch.tensor([[1.0, 2.0], [0, 0], [0, 0], [-0.1, -0.2]]))
    d2 = doei_delta(y, attn, t_p2c=2, **kw)
    torch.testing.assert_close(d2[0, 1:], torch.tensor([[1.0, 2.0], [0.8, 1.6], [-0.2, -0.4], [-0.1, -0.2]]))
    assert torch.all(d1[0, 0] == 0)
    # the same P reached through the patch->class column instead of the class row
    attn_t = attn.transpose(1, 2).contiguous()
    torch.testing.assert_close(doei_delta(y, attn_t, t_p2c=1, **kw), d1)


def test_doei_delta_hand_cpdo():
    attn = torch.zeros(1, 5, 5)
    attn[0, :3, :3] = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 0.05], [0.1, 0.1, 0.6]])
    y = torch.zeros(1, 5, 2)
    y[0, :3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = doei_delta(y, attn, num_class_tokens=3, num_prefix_tokens=3, t_p2c=0, t_c2c=1)
    torch.testing.assert_close(d[0, :3], torch.tensor([[-0.2, 0.3], [0.35, -0.15], [0.2, -0.15]]))
    assert torch.all(d[0, 3:] == 0)


def _delta_oracle(y, attn, c, p0, t_p, t_c, af_p, sf_p, af_c, sf_c, labels=None):
    out = torch.zeros_like(y)
    b_, n_all = y.shape[0], y.shape[1]
    for b in range(b_):
        w = attn[b]
        for r in range(c):
            if labels is not None and labels[b, r] == 0:
                continue
            pr = [(w[r, p0 + j] + w[p0 + j, r]).item() for j in range(n_all - p0)]
            order = sorted(range(len(pr)), key=lambda j: (-pr[j], j))
            for j in order[:t_p]:
                out[b, p0 + j] += af_p * (w[r, p0 + j] + w[p0 + j, r]) * y[b, r]
            if t_p:
                for j in order[-t_p:]:
                    out[b, p0 + j] -= sf_p * (w[r, p0 + j] + w[p0 + j, r]) * y[b, r]
            sr = {j: (w[r, j] + w[j, r]).item() for j in range(c) if j != r}
            order = sorted(sr, key=lambda j: (-sr[j], j))
            for j in order[:t_c]:
                out[b, r] += af_c * (w[r, j] + w[j, r]) * y[b, j]
            if t_c:
                for j in order[-t_c:]:
                    out[b, r] -= sf_c * (w[r, j] + w[j, r]) * y[b, j]
    return out


@pytest.mark.parametrize("with_labels", [False, True])
def test_doei_delta_oracle_and_registers(with_labels):
    torch.manual_seed(0)
    b, c, p0, n, d = 3, 5, 7, 9, 4
    y = torch.randn(b, p0 + n, d)
    attn = torch.softmax(torch.randn(b, p0 + n, p0 + n), -1)
    labels = torch.randint(0, 2, (b, c)) if with_labels else None
    got = doei_delta(y, attn, num_class_tokens=c, num_prefix_tokens=p0, t_p2c=3, t_c2c=2,
                     af_p2c=1.5, sf_p2c=0.5, af_c2c=2.0, sf_c2c=0.3, labels=labels)
    want = _delta_oracle(y, attn, c, p0, 3, 2, 1.5, 0.5, 2.0, 0.3, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, c:p0] == 0)  # registers untouched
    assert got[:, :c].abs().sum() > 0 and got[:, p0:].abs().sum() > 0


def test_doei_delta_per_head_matches_loop_over_heads():
    torch.manual_seed(1)
    y = torch.randn(2, 3, 8, 4)
    attn = torch.softmax(torch.randn(2, 3, 8, 8), -1)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1]])
    kw = dict(num_class_tokens=3, num_prefix_tokens=3, t_p2c=2, t_c2c=1, labels=labels)
    got = doei_delta(y, attn, **kw)
    for h in range(3):
        torch.testing.assert_close(got[:, h], doei_delta(y[:, h], attn[:, h], **kw))


def test_doei_delta_gradcheck():
    torch.manual_seed(2)
    y = torch.randn(1, 7, 3, dtype=torch.float64, requires_grad=True)
    attn = torch.softmax(torch.randn(1, 7, 7, dtype=torch.float64), -1).requires_grad_(True)
    fn = lambda yy, aa: doei_delta(yy, aa, num_class_tokens=3, num_prefix_tokens=3, t_p2c=1, t_c2c=1,
                                   af_p2c=1.5, sf_p2c=0.5)
    assert torch.autograd.gradcheck(fn, (y, attn))


def test_doei_delta_errors():
    y, a = torch.randn(2, 6, 4), torch.softmax(torch.randn(2, 6, 6), -1)
    kw = dict(num_class_tokens=1, num_prefix_tokens=1, t_p2c=1, t_c2c=0)
    with pytest.raises(ShapeError, match="attn"):
        doei_delta(y, a[:, :5, :5], **kw)
    with pytest.raises(ShapeError, match="labels"):
        doei_delta(y, a, labels=torch.ones(2, 2), **kw)
    with pytest.raises(ShapeError, match="labels"):
        doei_delta(y, a, labels=torch.full((2, 1), 0.5), **kw)
    with pytest.raises(ValueError, match="num_class_tokens"):
        doei_delta(y, a, num_class_tokens=2, num_prefix_tokens=1, t_p2c=1, t_c2c=0)
    with pytest.raises(ValueError, match="t: expected"):
        doei_delta(y, a, num_class_tokens=1, num_prefix_tokens=1, t_p2c=3, t_c2c=0)
    with pytest.raises(ShapeError, match="attn_output"):
        doei_delta(y[0], a, **kw)
    with pytest.raises(ValueError, match="t_p2c"):
        doei_delta(y, a, num_class_tokens=1, num_prefix_tokens=1, t_p2c=1.5, t_c2c=0)


def test_doei_delta_label_all_zero_is_zero():
    y, a = torch.randn(2, 6, 4), torch.softmax(torch.randn(2, 6, 6), -1)
    d = doei_delta(y, a, num_class_tokens=2, num_prefix_tokens=2, t_p2c=2, t_c2c=0, labels=torch.zeros(2, 2))
    assert torch.all(d == 0)


# --------------------------------------------------------------------------- T4


def test_patch_color_affinity_black_white():
    img = torch.zeros(1, 3, 4, 4)
    img[..., 2:] = 1.0
    img.requires_grad_(True)
    r = patch_color_affinity(img, 2, mean=(0, 0, 0), std=(1, 1, 1))
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(r[0][same], torch.ones(8))
    torch.testing.assert_close(r[0][~same], torch.full((8,), math.exp(-150.0)), rtol=1e-4, atol=0)
    assert r.dtype == torch.float32 and not r.requires_grad


def test_patch_color_affinity_crop_pad_and_oracle():
    torch.manual_seed(3)
    img = torch.randn(2, 3, 5, 7)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    crop = patch_color_affinity(img, 2, rgb_sigma=0.3, mean=mean, std=std)
    padded = patch_color_affinity(img, (2, 3), rgb_sigma=0.3, mean=mean, std=std, pad=True)
    assert crop.shape == (2, 6, 6) and padded.shape == (2, 9, 9)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for b in range(2):
        # crop oracle
        cols = []
        for i in range(2):
            for j in range(3):
                cols.append((img[b, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] * s + m).mean((1, 2)))
        for u in range(6):
            for v in range(6):
                want = math.exp(-((cols[u] - cols[v]) ** 2).sum().item() / (2 * 0.09))
                assert abs(crop[b, u, v].item() - want) < 1e-5
        # pad oracle: zero-padded normalised pixels count inside the patch mean
        full = torch.zeros(3, 6, 9)
        full[:, :5, :7] = img[b]
        cols = [(full[:, 2 * i:2 * i + 2, 3 * j:3 * j + 3] * s + m).mean((1, 2)) for i in range(3) for j in range(3)]
        for u in range(9):
            for v in range(9):
                want = math.exp(-((cols[u] - cols[v]) ** 2).sum().item() / (2 * 0.09))
                assert abs(padded[b, u, v].item() - want) < 1e-5


def test_patch_color_affinity_errors():
    with pytest.raises(ShapeError, match="images"):
        patch_color_affinity(torch.zeros(1, 4, 8, 8), 2)
    with pytest.raises(ShapeError, match="images"):
        patch_color_affinity(torch.zeros(1, 3, 8, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="rgb_sigma"):
        patch_color_affinity(torch.zeros(1, 3, 8, 8), 2, rgb_sigma=0.0)
    for bad in (0, -2, (2, 0), (0, 2)):
        with pytest.raises(ValueError, match="patch_size"):
            patch_color_affinity(torch.zeros(1, 3, 8, 8), bad)


# --------------------------------------------------------------------------- T5


def test_hybrid_attention_orthonormal_tokens():
    torch.manual_seed(4)
    p0, n, d = 2, 4, 8
    q, _ = torch.linalg.qr(torch.randn(d, d))
    tokens = (q[: p0 + n] * torch.tensor([1.0, 2, 3, 0.5, 1, 4]).view(-1, 1)).unsqueeze(0)  # scale-invariant
    r = torch.rand(1, n, n)
    r = (r + r.transpose(1, 2)) / 2
    attn = torch.softmax(torch.randn(1, p0 + n, p0 + n), -1)
    g = hybrid_attention(tokens, attn, r, num_prefix_tokens=p0, alpha=1.0)
    want = torch.zeros(p0 + n, p0 + n)
    want[:p0, :p0] = torch.eye(p0)
    want[p0:, p0:] = r[0] / r[0].sum(-1, keepdim=True)
    torch.testing.assert_close(g[0], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hybrid_attention(tokens, attn, r, num_prefix_tokens=p0, alpha=0.0), attn)


def test_hybrid_attention_oracle_and_rows():
    torch.manual_seed(5)
    b, h, p0, n, d = 2, 3, 2, 5, 4
    tokens = torch.randn(b, p0 + n, d)
    tokens[0, 3] = 0  # zero-norm token -> zero d_emb row -> G row 0
    r = patch_color_affinity(torch.randn(b, 3, 5, 5), 1, rgb_sigma=0.5)[:, :n, :n]
    attn = torch.softmax(torch.randn(b, h, p0 + n, p0 + n), -1)
    out = hybrid_attention(tokens, attn, r, num_prefix_tokens=p0, alpha=0.35)
    assert out.shape == attn.shape and torch.isfinite(out).all()
    for bi in range(b):
        xh = [tokens[bi, i] / max(tokens[bi, i].norm().item(), 1e-6) for i in range(p0 + n)]
        for i in range(p0 + n):
            row = []
            for j in range(p0 + n):
                if j < p0:
                    row.append(float(xh[i] @ xh[j]))
                else:
                    row.append(sum(float(xh[i] @ xh[p0 + m]) * r[bi, m, j - p0].item() for m in range(n)))
            row = [max(v, 0.0) for v in row]
            tot = max(sum(row), 1e-6)
            for hh in range(h):
                for j in range(p0 + n):
                    want = 0.65 * attn[bi, hh, i, j].item() + 0.35 * row[j] / tot
                    assert abs(out[bi, hh, i, j].item() - want) < 1e-5
    sums = out[1].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert torch.allclose(out[0, :, 3], 0.65 * attn[0, :, 3])  # zero-norm token row


def test_hybrid_attention_errors():
    a, t = torch.softmax(torch.randn(1, 5, 5), -1), torch.randn(1, 5, 3)
    with pytest.raises(ShapeError, match="color_affinity"):
        hybrid_attention(t, a, torch.ones(1, 3, 3), num_prefix_tokens=1)
    with pytest.raises(ShapeError, match="attn"):
        hybrid_attention(t, a[:, :4, :4], torch.ones(1, 4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="alpha"):
        hybrid_attention(t, a, torch.ones(1, 4, 4), num_prefix_tokens=1, alpha=1.5)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="num_prefix_tokens"):
            hybrid_attention(t, a, torch.ones(1, 4, 4), num_prefix_tokens=bad)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [("alpha", -0.1), ("rgb_sigma", 0.0), ("st_p2c", 1.5), ("sf_c2c", -1.0), ("af_p2c", float("inf")),
     ("chunk_rows", 0), ("image_std", (1.0, 0.0, 1.0)), ("image_mean", (0.5, 0.5)), ("use_hfa", 1)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        DOEIConfig(**{field: value})


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        DOEIConfig(0.5)
    assert DOEIConfig(alpha=0.5).alpha == 0.5


# --------------------------------------------------------------------------- T6


T6_CASES = {
    "c1": dict(model=dict(c=1), img=(32, 32), cfg={}, c=1),
    "c5": dict(model=dict(c=5), img=(32, 32), cfg={}, c=5),
    "reg2": dict(model=dict(c=3, reg=2), img=(32, 32), cfg={}, c=3),
    "dyn_nonsquare_chunk7": dict(model=dict(c=5, dynamic=True), img=(24, 40), cfg=dict(chunk_rows=7), c=5),
    "dyn_pad": dict(model=dict(c=3, dynamic=True, pad=True), img=(28, 44), cfg=dict(chunk_rows=5), c=3),
    "layers1": dict(model=dict(c=5), img=(32, 32), cfg={}, c=5, layers=[1]),
    "per_head": dict(model=dict(c=5, reg=1), img=(32, 32), cfg=dict(head_mean=False, chunk_rows=3), c=5),
    "no_hfa_ppdo_only": dict(model=dict(c=5), img=(32, 32), cfg=dict(use_hfa=False, use_cpdo=False), c=5),
    "cpdo_only_mean": dict(model=dict(c=5), img=(32, 32), cfg=dict(use_ppdo=False, image_mean=(0.4, 0.4, 0.4)), c=5),
    # n = 36 patches > D = 32: with PPDO (all N rows) HFA takes the X^(X^T R) form in both paths;
    # CPDO only (C rows) takes (X^X^T)R in the patched path and X^(X^T R) in the dense reference.
    "n_gt_d": dict(model=dict(c=5, img=48), img=(48, 48), cfg={}, c=5),
    "n_gt_d_cpdo_only": dict(model=dict(c=5, img=48), img=(48, 48), cfg=dict(use_ppdo=False), c=5),
}


def _run_t6(case: str, fused: bool, dtype: torch.dtype):
    spec = T6_CASES[case]
    model = tiny_vit(fused=fused, dtype=dtype, **spec["model"])
    cfg = DOEIConfig(**{**ACTIVE, **spec["cfg"]})
    torch.manual_seed(11)
    img = torch.randn(2, 3, *spec["img"], dtype=dtype, requires_grad=True)
    weight = model.blocks[0].attn.qkv.weight
    with torch.no_grad():
        unpatched = model.forward_features(img)
    with doei.patch(model, config=cfg, layers=spec.get("layers")):
        got = model.forward_features(img)
        g_img, g_w = torch.autograd.grad(got.square().sum(), (img, weight))
    want = reference_features(model, img, cfg, spec["c"], spec.get("layers"))
    w_img, w_w = torch.autograd.grad(want.square().sum(), (img, weight))
    return got, want, (g_img, g_w), (w_img, w_w), unpatched


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(T6_CASES))
def test_patched_equals_dense_reference_fp32(case, fused):
    got, want, g, w, unpatched = _run_t6(case, fused, torch.float32)
    assert (got - unpatched).abs().max() > 1e-4  # DOEI is actually active
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, w, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "case", ["c1", "c5", "reg2", "per_head", "dyn_nonsquare_chunk7", "dyn_pad", "layers1", "n_gt_d_cpdo_only"]
)
def test_patched_equals_dense_reference_fp64(case, fused):
    got, want, g, w, _ = _run_t6(case, fused, torch.float64)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    for a, b in zip(g, w, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_fused_and_nonfused_agree():
    img = torch.randn(2, 3, 32, 32)
    outs = []
    for fused in (True, False):
        model = tiny_vit(c=5, fused=fused)
        with doei.patch(model, config=DOEIConfig(**ACTIVE)):
            outs.append(model.forward_features(img))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- T7


@pytest.mark.parametrize("fused", [True, False])
def test_zero_factors_identity_train_mode(fused):
    model = tiny_vit(c=5, fused=fused, attn_drop_rate=0.3).train()
    img = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    base = model(img)
    cfg = DOEIConfig(st_p2c=0.1, st_c2c=0.25, af_p2c=0, sf_p2c=0, af_c2c=0, sf_c2c=0, alpha=0.8)
    with doei.patch(model, config=cfg) as h:
        torch.manual_seed(5)
        torch.testing.assert_close(model(img), base, atol=1e-6, rtol=0)
        # the full (non-fast) path with all rows masked out also returns Y
        h.config = DOEIConfig(**ACTIVE, restrict_to_labels=True)
        h.set_labels(torch.zeros(2, 5))
        torch.manual_seed(5)
        torch.testing.assert_close(model(img), base, atol=1e-6, rtol=0)
        h.set_labels(torch.ones(2, 5))
        torch.manual_seed(5)
        assert (model(img) - base).abs().max() > 1e-4
    assert model.training


@pytest.mark.parametrize("fused", [True, False])
def test_remove_restores_exactly(fused):
    model = tiny_vit(c=3, fused=fused)
    img = torch.randn(2, 3, 32, 32)
    before = model(img)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    h = doei.patch(model, config=DOEIConfig(**ACTIVE))
    assert list(model.state_dict()) == list(sd_before)
    assert not torch.equal(model(img), before)
    assert not model.training and h.patched_blocks == (0, 1, 2) and h.num_blocks == 3
    h.remove()
    h.remove()  # idempotent
    assert torch.equal(model(img), before)
    sd = model.state_dict()
    assert list(sd) == list(sd_before) and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    assert not hasattr(model, "_doei_handle")
    assert all("forward" not in m.__dict__ for m in model.modules())
    for m in model.modules():  # no hooks left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_patch_twice_unpatch_context_and_existing_forward():
    model = tiny_vit()
    img = torch.randn(1, 3, 32, 32)
    attn0 = model.blocks[0].attn
    calls = []
    plain = attn0.forward

    def custom(x, attn_mask=None, is_causal=False):
        calls.append(1)
        return plain(x)

    attn0.forward = custom
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        with pytest.raises(RuntimeError, match="already patched"):
            doei.patch(model)
        model(img)
        assert calls
    assert attn0.__dict__["forward"] is custom
    with pytest.raises(ValueError, match="not patched"):
        doei.unpatch(model)
    doei.patch(model)
    doei.unpatch(model)


def test_config_reassignment_changes_output():
    model = tiny_vit(c=5)
    img = torch.randn(2, 3, 32, 32)
    with doei.patch(model) as h:
        a = model(img)
        h.config = DOEIConfig(**ACTIVE)
        b = model(img)
        with pytest.raises(TypeError, match="config"):
            h.config = {"alpha": 0.3}
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------- T8


def test_errors_no_attention_and_unsupported_classes():
    with pytest.raises(ValueError, match="no attention module.*register_attention_adapter"):
        doei.patch(nn.Sequential(nn.Linear(2, 2)))
    diff = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, attn_layer="diff")
    with pytest.raises(TypeError, match=r"DiffAttention.*two softmax maps.*register_attention_adapter"):
        doei.patch(diff)

    class MyAttention(timm.layers.Attention):
        pass

    model = tiny_vit(depth=1)
    model.blocks[0].attn = MyAttention(32, num_heads=2)
    with pytest.raises(TypeError, match=r"MyAttention.*subclass.*register_attention_adapter\(MyAttention"):
        doei.patch(model)
    assert not hasattr(model, "_doei_handle")


def test_errors_at_forward():
    model = tiny_vit(c=3)
    x_tok = torch.randn(2, 3 + 16, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)) as h:
        with pytest.raises(NotImplementedError, match="attn_mask"):
            model.blocks[0].attn(x_tok, attn_mask=torch.zeros(19, 19))
        with pytest.raises(RuntimeError, match="set_images"):
            model.blocks(x_tok)  # no image was ever seen
        h.config = DOEIConfig(**ACTIVE, use_hfa=False)
        model.blocks(x_tok)  # no images needed without HFA
        h.config = DOEIConfig(**ACTIVE, restrict_to_labels=True)
        with pytest.raises(RuntimeError, match="set_labels"):
            model(torch.randn(2, 3, 32, 32))
        h.set_labels(torch.ones(3, 3))
        with pytest.raises(ShapeError, match="labels"):
            model(torch.randn(2, 3, 32, 32))
        with pytest.raises(ShapeError, match="labels"):
            h.set_labels(torch.ones(2, 4))
        h.set_labels(None)
        h.config = DOEIConfig(**ACTIVE)
        h.set_images(torch.randn(3, 3, 32, 32))
        with pytest.raises(ShapeError, match="images"):
            model(torch.randn(2, 3, 32, 32))
        h.set_images(torch.randn(2, 3, 40, 32))
        with pytest.raises(ShapeError, match="images"):
            model(torch.randn(2, 3, 32, 32))
        with pytest.raises(ShapeError, match="images"):
            h.set_images(torch.randn(2, 1, 32, 32))
        h.set_images(None)
        model(torch.randn(2, 3, 32, 32))


def test_patch_argument_errors():
    model = tiny_vit(c=3, reg=1)
    with pytest.raises(ValueError, match="num_class_tokens"):
        doei.patch(model, num_class_tokens=0)
    with pytest.raises(ValueError, match="num_class_tokens"):
        doei.patch(model, num_class_tokens=5)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="num_class_tokens"):
            doei.patch(model, num_class_tokens=bad)
    with pytest.raises(ValueError, match="layers"):
        doei.patch(model, layers=[1.5])
    with pytest.raises(ValueError, match="layers"):
        doei.patch(model, layers=[0, -3])
    with pytest.raises(ValueError, match="layers"):
        doei.patch(model, layers=[3])
    with pytest.raises(TypeError, match="config"):
        doei.patch(model, config={"alpha": 1})
    h = doei.patch(model, layers=[-1, 0])
    assert h.patched_blocks == (0, 2) and h.num_class_tokens == 3 and h.num_prefix_tokens == 4
    h.remove()


def test_set_images_overrides_input():
    model = tiny_vit(c=3)
    img, other = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)) as h:
        a = model(img)
        h.set_images(other)
        b = model(img)
        h.set_images(None)
        c = model(img)
    torch.testing.assert_close(a, c)
    assert not torch.allclose(a, b)


def test_set_images_override_updated_in_place_is_not_stale():
    model = tiny_vit(c=3)
    img, other = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)) as h:
        buffer = img.clone()
        h.set_images(buffer)
        a = model(img)
        buffer.copy_(other)  # the caller refills the same tensor between forwards
        b = model(img)
        h.set_images(other)
        want = model(img)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, want)


# --------------------------------------------------------------------------- T9


def test_fused_mode_never_saves_full_attention():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=4, embed_dim=32,
                              num_heads=2, depth=2)
    b, h, n_all = 2, 2, 1 + 256
    limit = b * h * n_all * n_all
    img = torch.randn(b, 3, 64, 64, requires_grad=True)
    seen: list[int] = []

    def pack(t):
        seen.append(t.numel())
        return t

    def run():
        seen.clear()
        with saved_tensors_hooks(pack, lambda t: t):
            out = model(img)
        out.sum().backward()
        return max(seen)

    set_fused(model, False)
    assert run() >= limit  # control: the explicit path does keep (B, H, N, N)
    set_fused(model, True)
    with doei.patch(model, config=DOEIConfig(chunk_rows=64)) as handle:
        assert handle._plan(0, n_all) is not None  # DOEI active in block 0
        assert run() < limit
        assert model.blocks[0].attn.qkv.weight.grad is not None


# --------------------------------------------------------------------------- training, autocast, checkpointing


def test_patched_model_trains():
    model = tiny_vit(c=1, fused=True, drop_path_rate=0.1, attn_drop_rate=0.1, num_classes=4).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    img, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 4)).float()
    with doei.patch(model, config=DOEIConfig(st_p2c=0.1)):
        for _ in range(3):
            opt.zero_grad()
            loss = F.multilabel_soft_margin_loss(model(img), labels)
            loss.backward()
            assert torch.isfinite(loss)
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            opt.step()


def test_mct_doei_trains_class_tokens():
    model = tiny_vit(c=4, fused=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    img, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]]).float()
    with doei.patch(model, config=DOEIConfig(**ACTIVE, restrict_to_labels=True)) as h:
        h.set_labels(labels)
        for _ in range(2):
            opt.zero_grad()
            cls = mct.final_tokens(model, img).class_tokens
            loss = F.multilabel_soft_margin_loss(mct.class_scores(cls), labels)
            loss.backward()
            assert torch.isfinite(loss)
            assert model.cls_token.grad.abs().sum() > 0 and model.pos_embed.grad.abs().sum() > 0
            opt.step()


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast(fused):
    model = tiny_vit(c=5, fused=fused)
    img = torch.randn(2, 3, 32, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)):
        ref = model.forward_features(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features(img)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_grad_checkpointing_matches():
    img = torch.randn(2, 3, 32, 32, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        model = tiny_vit(c=3)
        model.set_grad_checkpointing(ckpt)
        with doei.patch(model, config=DOEIConfig(**ACTIVE)):
            out = model.forward_features(img)
            (g,) = torch.autograd.grad(out.square().sum(), img)
        grads.append((out.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("use_hfa", [True, False])
def test_patch_dropout_in_training(use_hfa):
    model = tiny_vit(c=3, patch_drop_rate=0.25).train()
    img = torch.randn(2, 3, 32, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE, use_hfa=use_hfa)):
        if use_hfa:
            with pytest.raises(NotImplementedError, match="patch dropout drops patch tokens.*use_hfa=False"):
                model(img)
        else:
            assert torch.isfinite(model(img)).all()  # PPDO / CPDO alone work on the kept tokens
        model.eval()  # PatchDropout is off in eval: HFA works
        assert torch.isfinite(model(img)).all()


def test_deepcopy_of_patched_model_fails_loudly():
    model = tiny_vit(c=3)
    img = torch.randn(2, 3, 32, 32)
    cfg = DOEIConfig(**ACTIVE)
    with doei.patch(model, config=cfg):
        want = model(img)
        dup = copy.deepcopy(model)
        with pytest.raises(RuntimeError, match=r"copy of a DOEI-patched model.*doei\.patch\(copy\)"):
            dup(img)
        torch.testing.assert_close(model(img), want, atol=0, rtol=0)  # the original is unaffected
    doei.unpatch(dup)  # the advertised way out: unpatch the copy, then patch it separately
    with doei.patch(dup, config=cfg):
        torch.testing.assert_close(dup(img), want, atol=0, rtol=0)


def test_deepcopy_keeps_state_dict_loadable():
    model = tiny_vit(c=3)
    with doei.patch(model):
        sd = copy.deepcopy(model.state_dict())
    fresh = tiny_vit(c=3, seed=1)
    fresh.load_state_dict(sd)


def test_distilled_deit_default_two_class_tokens_and_causal():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, num_heads=2, depth=3).eval()
    img = torch.randn(2, 3, 32, 32)
    with doei.patch(model, config=DOEIConfig(**ACTIVE)) as h:
        assert h.num_class_tokens == 2 and h.num_prefix_tokens == 2
        out2 = model.forward_features(img)
        with pytest.raises(NotImplementedError):
            model.blocks[0].attn(torch.randn(2, 18, 32), is_causal=True)
    with doei.patch(model, num_class_tokens=1, config=DOEIConfig(**ACTIVE)) as h:
        out1 = model.forward_features(img)
        want = reference_features(model, img, h.config, 1)
    torch.testing.assert_close(out1, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out2).all() and not torch.allclose(out1, out2)
