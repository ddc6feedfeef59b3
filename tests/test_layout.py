"""One feature layout everywhere: every entry that takes features takes an NCHW map or tokens.

For each entry: tokens give exactly the result of their ``tokens_to_grid`` map; tokens without
a grid are an error that says to pass ``size=(h, w)`` (where the call has no CAMs to take the
grid from); a channels-last map is an error that names the fix; a map off the grid is an error.
Also: ``valid`` masks at any resolution where a model takes a padding mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch

from wsss_blocks import ShapeError
from wsss_blocks.cam import valid_to_grid
from wsss_blocks.cpal import CPAL, cpal_forward, instance_prototypes, pacam
from wsss_blocks.pcm import HVBiLSTM, PatchClassifier, ViTPCM
from wsss_blocks.swtformer import (
    HFF,
    PrototypeRefiner,
    SeedLocator,
    SwinCAMHead,
    SWTformer,
    SWTformerHead,
    cams_with_background,
    locate_seeds,
    refine_cams,
    seed_prototypes,
    structure_affinity,
)
from wsss_blocks.tokens import features_as_grid, grid_to_tokens, stage_taps, tokens_to_grid

pytestmark = pytest.mark.usefixtures("single_thread")

B, D, H, W, K = 2, 8, 3, 5, 2
SIZE = (H, W)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels() -> torch.Tensor:
    return torch.tensor([[1, 0], [1, 1]])


def _cams_with_bg() -> torch.Tensor:
    return cams_with_background(torch.rand(B, K, H, W, generator=_gen(1)), _labels())


def _seeds() -> torch.Tensor:
    return locate_seeds(torch.randn(B, D, H, W, generator=_gen(2)), _cams_with_bg(), _labels()).seeds


def _cpal() -> CPAL:
    torch.manual_seed(0)
    cpal = CPAL(D, K, proj_dim=4, capacity=8, num_prototypes=4, top_k=2, warn_unbuilt=False)
    feats, cams = torch.randn(4, D, H, W, generator=_gen(3)), torch.rand(4, K, H, W, generator=_gen(4))
    out = cpal(feats, cams, torch.tensor([[1, 0], [0, 1], [1, 1], [1, 1]]))
    cpal.update(out.prototypes, out.prototype_valid)  # a built context: the loss is not 0
    assert cpal.is_built
    return cpal


def _vit_pcm() -> ViTPCM:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1)
    return ViTPCM(vit, K).eval()


def _context() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(K + 1, 4, D, generator=_gen(5)), torch.ones(K + 1, 4, dtype=torch.bool)


Call = Callable[..., Any]

# name -> (the call, whether the grid comes from the call's CAMs / seeds; else from ``size``)
CASES: dict[str, tuple[Callable[[], Call], bool, int]] = {
    # ViT-PCM
    "PatchClassifier.forward": (lambda: PatchClassifier(D, K).eval(), False, D),
    "HVBiLSTM.forward": (lambda: HVBiLSTM(D).eval(), False, D),
    "ViTPCM.head": (lambda: _vit_pcm().head, False, 192),
    # SWTformer
    "SwinCAMHead.forward": (lambda: SwinCAMHead(D, K), False, D),
    "structure_affinity": (lambda: structure_affinity, False, D),
    "locate_seeds": (lambda: lambda f, **kw: locate_seeds(f, _cams_with_bg(), _labels(), **kw), True, D),
    "SeedLocator.forward": (lambda: lambda f, **kw: SeedLocator()(f, _cams_with_bg(), _labels(), **kw), True, D),
    "seed_prototypes": (lambda: lambda f, **kw: seed_prototypes(f, _seeds(), **kw), False, D),
    "refine_cams": (lambda: lambda f, **kw: refine_cams(f, _seeds(), **kw), False, D),
    "PrototypeRefiner.forward": (lambda: lambda f, **kw: PrototypeRefiner()(f, _seeds(), **kw), False, D),
    # CPAL
    "CPAL.forward": (
        lambda: (lambda c: lambda f, **kw: c(f, torch.rand(B, K, H, W, generator=_gen(6)), _labels(), **kw))(_cpal()),
        True, D,
    ),
    "CPAL.project": (lambda: _cpal().project, False, D),
    "cpal_forward": (
        lambda: lambda f, **kw: cpal_forward(
            f, torch.rand(B, K, H, W, generator=_gen(6)), _labels(), *_context(), top_k=2, **kw
        ),
        True, D,
    ),
    "instance_prototypes": (lambda: lambda f, **kw: instance_prototypes(f, _cams_with_bg(), _labels(), **kw), True, D),
    "pacam": (
        lambda: lambda f, **kw: pacam(f, _context()[0], torch.rand(B, K + 1, 4, generator=_gen(7)), **kw),
        False, D,
    ),
}


def _features(dim: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(B, dim, H, W, generator=_gen(8)).requires_grad_(requires_grad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokens_give_exactly_the_map_result(name):
    make, from_cams, dim = CASES[name]
    fn = make()
    tokens = grid_to_tokens(_features(dim))
    kw = {} if from_cams else {"size": SIZE}
    torch.manual_seed(0)
    a = fn(tokens, **kw)
    torch.manual_seed(0)
    b = fn(tokens_to_grid(tokens, SIZE))
    assert _equal(a, b)
    if not from_cams:  # the map with the size it lies on: the same again
        torch.manual_seed(0)
        assert _equal(fn(tokens_to_grid(tokens, SIZE), size=SIZE), b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokens_without_a_grid_and_maps_off_the_grid_are_errors(name):
    make, from_cams, dim = CASES[name]
    fn = make()
    x = _features(dim)
    tokens = grid_to_tokens(x)
    if from_cams:  # the grid is the CAMs': a token count off it names where it comes from
        with pytest.raises(ShapeError, match=r"features: .*the grid \(3, 5\) comes from"):
            fn(tokens[:, :-1])
        with pytest.raises(ShapeError, match=r"features: .*the grid \(3, 5\) comes from"):
            fn(x[..., :-1])
        return
    with pytest.raises(ShapeError, match=r"features: token input \(B, N, D\) needs the grid: pass size=\(h, w\)"):
        fn(tokens)
    with pytest.raises(ShapeError, match=r"features: .*the grid \(5, 3\) comes from size"):
        fn(tokens[:, :-1], size=(5, 3))
    with pytest.raises(ShapeError, match=r"features: expected shape .*got \(2, \d+, 3, 5\); the grid \(5, 3\)"):
        fn(x, size=(5, 3))
    with pytest.raises(ShapeError, match="features: expected a"):
        fn(x[0, 0], size=SIZE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_channels_last_map_names_the_fix(name):
    make, from_cams, dim = CASES[name]
    fn = make()
    nhwc = _features(dim).permute(0, 2, 3, 1)  # what a timm Swin hands over
    fix = 'input_fmt="NHWC"' if name == "SwinCAMHead.forward" else r"permute it to NCHW with \.permute\(0, 3, 1, 2\)"
    with pytest.raises(ShapeError, match=rf"features: .*looks channels-last \(B, h, w, {dim}\).*{fix}"):
        fn(nhwc) if from_cams else fn(nhwc, size=SIZE)


def test_swin_cam_head_nhwc_and_tokens():
    head = SwinCAMHead(D, K)
    nhwc = SwinCAMHead(D, K, input_fmt="NHWC")
    nhwc.load_state_dict(head.state_dict())
    x = _features(D)
    tokens = grid_to_tokens(x)
    assert _equal(nhwc(tokens, size=SIZE), head(tokens, size=SIZE))  # tokens are tokens in either format
    torch.testing.assert_close(nhwc(x.permute(0, 2, 3, 1)).cams, head(x).cams)
    with pytest.raises(ShapeError, match=r"features: expected shape \(B, h, w, 8\)"):
        nhwc(x)


def test_maps_pass_through_unchanged():
    """An NCHW map reaches the computation as the very tensor given: results as before, bit for bit."""
    x = _features(D)
    assert features_as_grid("features", x) is x
    assert features_as_grid("features", x, SIZE, channels=D) is x
    dims: dict[str, int] = {}
    out = features_as_grid("features", grid_to_tokens(x), SIZE, dims, grid=("hf", "wf"))
    assert torch.equal(out, x) and dims == {"B": B, "D": D, "hf": H, "wf": W}
    with pytest.raises(ShapeError, match="D=8 disagrees with D=7"):
        features_as_grid("features", x, dims={"D": 7})
    with pytest.raises(TypeError, match="features"):
        features_as_grid("features", x.numpy())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_fmt"):
        features_as_grid("features", x, input_fmt="NLC")
    with pytest.raises(ShapeError, match="expected a float tensor"):
        features_as_grid("features", x.long(), dtype="float")


def test_gradients_reach_token_input():
    x = _features(D, requires_grad=True)
    tokens = grid_to_tokens(x)
    out = CPAL(D, K, proj_dim=4, capacity=8, num_prototypes=4, top_k=2, warn_unbuilt=False).project(
        tokens, size=SIZE
    )
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4), window_size=2, img_size=64,
    )


def test_swtformer_takes_valid_at_any_resolution():
    model = SWTformer(_swin(), K).eval()
    x = torch.randn(B, 3, 64, 64, generator=_gen(9))
    small = torch.ones(B, 16, 16, dtype=torch.bool)
    small[0, 10:] = False
    small[1, :, 5:] = False
    full = small.repeat_interleave(4, 1).repeat_interleave(4, 2)  # the same mask at image size
    with torch.no_grad():
        a = model(x, _labels(), valid=small)
        b = model(x, _labels(), valid=full)
    assert _equal(a, b)
    assert not torch.equal(valid_to_grid(small, (2, 2)), torch.ones(B, 2, 2, dtype=torch.bool))  # it masks
    with torch.no_grad():
        c = model.heads(stage_taps(model.backbone, x, final_norm=True).features, _labels(), valid=small)
    assert _equal(a, c)


def test_stage_sequences_stay_maps():
    """HFF and SWTformerHead take per-stage maps (NCHW, or NHWC by HFF's input_fmt), never tokens."""
    chans, grids = (4, 8, 16, 32), ((8, 6), (4, 3), (2, 2), (1, 1))
    maps = [torch.randn(B, c, h, w, generator=_gen(i)) for i, (c, (h, w)) in enumerate(zip(chans, grids, strict=True))]
    with pytest.raises(ShapeError, match=r"features\[1\]: expected 4 dims"):
        HFF(chans)([maps[0], grid_to_tokens(maps[1]), *maps[2:]])
    nhwc = [m.permute(0, 2, 3, 1) for m in maps]
    torch.manual_seed(0)
    a = HFF(chans)
    torch.manual_seed(0)
    b = HFF(chans, input_fmt="NHWC")
    assert torch.equal(a(maps), b(nhwc))
    with pytest.raises(ShapeError, match=r'features\[0\]: .*channels-last.*input_fmt="NHWC"'):
        a(nhwc)
    with pytest.raises(ShapeError, match=r"features\[3\]: .*channels-last.*permute it to NCHW"):
        SWTformerHead(chans, K)([*maps[:3], nhwc[3]])
