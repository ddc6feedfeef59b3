"""Dense DOEI reference: explicit (B, H, N, N) attention through the public functions.

Verified against the patched forward by ``tests/test_doei.py`` (fp32 at 1e-5, fp64 at 1e-9)
and timed as the naive baseline by ``benchmarks/bench_doei.py``.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor, nn

from wsss_blocks.doei import DOEIConfig, doei_delta, hybrid_attention, patch_color_affinity, progressive_count


def reference_features(
    model: nn.Module, img: Tensor, cfg: DOEIConfig, c: int, layers: Collection[int] | None = None
) -> Tensor:
    """Slow dense block loop of a timm ViT: explicit softmax -> hybrid_attention -> doei_delta.

    ``c`` class tokens (``mct.add_class_tokens`` when > 1); ``layers`` the block indices DOEI
    acts on (all when None). Follows every ``DOEIConfig`` switch the patch reads: the branch
    flags, ``alpha``/``use_hfa``, ``head_mean`` (per-head delta before ``attn.norm``/``proj``
    when False), ``image_mean``/``image_std`` (``pretrained_cfg`` when None) and the patch
    embedding's ``dynamic_img_pad``.
    """
    p0 = model.num_prefix_tokens
    big_l = len(model.blocks)
    layers = range(big_l) if layers is None else layers
    mean = cfg.image_mean or model.pretrained_cfg["mean"]
    std = cfg.image_std or model.pretrained_cfg["std"]
    pe = model.patch_embed
    r = patch_color_affinity(img, pe.patch_size, rgb_sigma=cfg.rgb_sigma, mean=mean, std=std, pad=pe.dynamic_img_pad)
    x = model.norm_pre(model.patch_drop(model._pos_embed(pe(img))))
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        xn = blk.norm1(x)
        b, n_all, _ = xn.shape
        qkv = a.qkv(xn).reshape(b, n_all, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        attn = ((q * a.scale) @ k.transpose(-1, -2)).softmax(dim=-1)
        o = attn @ v
        n = n_all - p0
        kw = dict(
            num_class_tokens=c, num_prefix_tokens=p0,
            t_p2c=progressive_count(n, block_index=i, num_blocks=big_l, st=cfg.st_p2c) if cfg.use_ppdo else 0,
            t_c2c=progressive_count(c - 1, block_index=i, num_blocks=big_l, st=cfg.st_c2c) if cfg.use_cpdo else 0,
            af_p2c=cfg.af_p2c, sf_p2c=cfg.sf_p2c, af_c2c=cfg.af_c2c, sf_c2c=cfg.sf_c2c,
        )
        alpha = cfg.alpha if cfg.use_hfa else 0.0
        if i in layers and not cfg.head_mean:
            o = o + doei_delta(o, hybrid_attention(xn, attn, r, num_prefix_tokens=p0, alpha=alpha), **kw)
        y = a.proj(a.norm(o.transpose(1, 2).reshape(b, n_all, -1)))
        if i in layers and cfg.head_mean:
            y = y + doei_delta(y, hybrid_attention(xn, attn.mean(1), r, num_prefix_tokens=p0, alpha=alpha), **kw)
        x = x + blk.ls1(y)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.norm(x)
