"""Valid baseline calls of every public callable, for the API fuzz test (``tests/test_fuzz_api.py``).

``REGISTRY`` maps the qualified name of a callable (as ``tests/test_vocabulary.py`` walks them
from the package's ``__all__``) to a factory ``make(seed) -> Call``: a cheap valid call with tiny
tensors (values from ``seed``), a fresh instance for a method, and tiny timm models (built once per
configuration) only where the callable needs one. A new public name without an entry here fails
the fuzz test.

Sizes are distinct per concept so that one perturbation of a dimension size hits one concept:
B = 2 (4 where a mosaic needs it), K = 3 (K + 1 = 4), D = 8, grid 5 x 6 (N = 30), images 10 x 12
(32 x 32 for the timm models: depth <= 2, pretrained=False), M = 7 prototypes, L = 9 bank slots.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _fuzz import Call, Pert, Rule
from torch import nn

from wsss_blocks import adapters, cam, metrics, outputs, prototypes, tokens, utils
from wsss_blocks.constants import pascal_palette
from wsss_blocks.cpal import (
    CPAL,
    alignment_shift,
    context_prototypes,
    cpal_forward,
    instance_prototypes,
    neighbor_weights,
    pacam,
    positiveness,
    self_loss,
    soft_neighbors,
)
from wsss_blocks.cpews import (
    CPEWSHead,
    CPEWSLoss,
    ISMLoss,
    PDLLoss,
    PrototypePool,
    SSLLoss,
    cpews_taps,
    ism_loss,
    pdl_loss,
    prototypes_from_cpews_upload,
    region_embeddings,
    ssl_loss,
    superclass_index,
)
from wsss_blocks.data import (
    COCO,
    VOC,
    EvalTransform,
    SyntheticScenes,
    TrainTransform,
    collate,
    labels_from_mask,
    normalize,
)
from wsss_blocks.doei import (
    DOEIConfig,
    DOEIHandle,
    doei_delta,
    hybrid_attention,
    patch,
    patch_color_affinity,
    progressive_count,
    select_top_bottom,
    unpatch,
)
from wsss_blocks.mct import (
    FusedCAM,
    PatchCAM,
    add_class_tokens,
    attention_cams,
    class_scores,
    final_tokens,
    fused_cam,
    load_mctformer,
    patch_cam,
)
from wsss_blocks.pcm import (
    ETLoss,
    HVBiLSTM,
    MCELoss,
    MosaicRecord,
    PatchClassifier,
    ViTPCM,
    dihedral_inverse,
    dihedral_transform,
    et_loss,
    masked_renormalize,
    mce_loss,
    mosaic,
    patch_class_probs,
    pseudo_mask,
    random_dihedral_codes,
    teacher_to_tiles,
    unmosaic,
)
from wsss_blocks.refine import (
    PAR,
    DenseCRF,
    SegLoss,
    combine_levels,
    crf_available,
    dense_crf,
    par,
    par_affinity,
    par_label_levels,
    par_pseudo_labels,
    par_stencil,
    seg_loss,
)
from wsss_blocks.swtformer import (
    HFF,
    CCLLoss,
    GSCLoss,
    PrototypeRefiner,
    SeedLocator,
    SwinCAMHead,
    SWTformer,
    SWTformerHead,
    cams_with_background,
    ccl_loss,
    gsc_loss,
    locate_seeds,
    rcam_pseudo_mask,
    refine_cams,
    seed_prototypes,
    structure_affinity,
    swin_cam,
)

B, K, D, H, W, M, L = 2, 3, 8, 5, 6, 7, 9
N = H * W

Factory = Callable[[int], Call]
REGISTRY: dict[str, Factory] = {}


def case(*names: str) -> Callable[[Factory], Factory]:
    """Register a factory under one or more qualified names (``wsss_blocks.`` is prepended)."""

    def deco(fn: Factory) -> Factory:
        for name in names:
            REGISTRY[f"wsss_blocks.{name}"] = fn
        return fn

    return deco


class Rand:
    """Tensors from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g)

    def labels(self, b: int = B, k: int = K) -> torch.Tensor:
        lab = (torch.rand(b, k, generator=self.g) > 0.5).long()
        lab[:, 0] = 1
        return lab

    def masks(self, b: int = B, h: int = H, w: int = W, k: int = K, ignore: bool = True) -> torch.Tensor:
        m = torch.randint(0, k + 1, (b, h, w), generator=self.g)
        if ignore:
            m[:, 0, 0] = 255
        return m

    def valid(self, b: int = B, h: int = 10, w: int = 12) -> torch.Tensor:
        v = torch.ones(b, h, w, dtype=torch.bool)
        v[:, :, -2:] = False
        return v

    def bool(self, *shape: int, p: float = 0.7) -> torch.Tensor:
        x = torch.rand(*shape, generator=self.g) < p
        x.view(-1)[0] = True
        return x


def _state(module: nn.Module, *, exclude: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Observe a stateful block's buffers after a call that returns nothing (``exclude``: by design not finite)."""
    return lambda out: (out, {k: v.clone() for k, v in module.state_dict().items() if k not in exclude})


#: the pool's store scores are -inf in empty slots by design
POOL_EXCLUDE = ("neg_scores",)


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)

    return inner


# ----------------------------------------------------------------------------- timm models


@functools.cache
def _timm() -> Any:
    import timm

    return timm


def vit(*, dynamic: bool = False, fresh: bool = False, depth: int = 2) -> nn.Module:
    """A tiny timm ViT (img_size 32, patch 8 -> a 4 x 4 grid, D = 32), cached unless ``fresh``."""
    if fresh:
        return _vit(dynamic, depth)
    return _vit_cached(dynamic, depth)


def _vit(dynamic: bool, depth: int, num_classes: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return _timm().create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                                patch_size=8, embed_dim=32, num_heads=2, depth=depth,
                                dynamic_img_size=dynamic).eval()


@functools.cache
def _vit_cached(dynamic: bool, depth: int) -> nn.Module:
    return _vit(dynamic, depth)


@functools.cache
def vit_with_head() -> nn.Module:
    """The tiny ViT with a K-class linear head (``forward_head`` gives logits)."""
    return _vit(False, 1, num_classes=K)


@functools.cache
def swin() -> nn.Module:
    """A tiny timm Swin (img_size 32, stages 8 x 8 ... 1 x 1, dims 16, 32, 64, 128)."""
    torch.manual_seed(0)
    return _timm().create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                                depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2, img_size=32,
                                drop_path_rate=0.0).eval()


SWIN_DIMS = (16, 32, 64, 128)


def swin_stages(r: Rand, b: int = B) -> list[torch.Tensor]:
    return [r.randn(b, c, s, s) for c, s in zip(SWIN_DIMS, (8, 4, 2, 1), strict=True)]


# ----------------------------------------------------------------------------- cam


@case("cam.cam_from_features")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.cam_from_features, {"features": r.randn(B, D, H, W), "weight": r.randn(K, D),
                                        "size": (H, W), "bias": r.randn(K)})


@case("cam.normalize_cam")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.normalize_cam, {"cams": r.randn(B, K, H, W), "mode": "minmax", "eps": 1e-5})


@case("cam.add_background")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.add_background, {"norm_cams": r.rand(B, K, H, W), "labels": r.labels()},
                bounded=frozenset({"norm_cams"}))


@case("cam.pseudo_labels")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.pseudo_labels, {"norm_cams": r.rand(B, K, H, W), "labels": r.labels(), "low": 0.25,
                                    "high": 0.7, "valid": r.valid(), "ignore_index": 255},
                bounded=frozenset({"norm_cams"}),
                extra=[Pert("ignore_index=1 (a class value)", "option", {"ignore_index": 1}, ("ignore_index",),
                            "error"),
                       Pert("ignore_index=0 (background)", "option", {"ignore_index": 0}, ("ignore_index",),
                            "error")])


@case("cam.token_pseudo_labels")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.token_pseudo_labels, {"norm_cams": r.rand(B, K, 10, 12), "labels": r.labels(),
                                          "size": (H, W), "low": 0.25, "high": 0.7, "valid": r.valid(),
                                          "ignore_index": 255},
                bounded=frozenset({"norm_cams"}),
                extra=[Pert("ignore_index=2 (a class value)", "option", {"ignore_index": 2}, ("ignore_index",),
                            "error")])


@case("cam.box_to_valid_mask")
def _(seed: int) -> Call:
    return Call(cam.box_to_valid_mask, {"boxes": torch.tensor([[0, 4, 1, 5], [1, 5, 0, 6]]), "size": (H, W)})


@case("cam.valid_to_grid")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.valid_to_grid, {"valid": r.valid(), "size": (H, W)})


@case("cam.masked_average_pool")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cam.masked_average_pool, {"features": r.randn(B, N, D), "weights": r.rand(B, K, H, W),
                                          "threshold": 0.3, "valid": r.valid(), "eps": 1e-5},
                bounded=frozenset({"weights"}))


@case("cam.multiscale_cam")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, K, 1)

    def cam_fn(images: torch.Tensor) -> torch.Tensor:  # the caller's model, in its own dtype
        return conv(images.to(conv.weight.dtype))

    return Call(cam.multiscale_cam, {"cam_fn": cam_fn, "images": r.randn(B, 3, 8, 10), "scales": (1.0, 0.5),
                                     "flip": True, "fuse": "sum", "size": (H, W)},
                rules={"size": Rule(1)})


# ----------------------------------------------------------------------------- tokens


@case("tokens.tokens_to_grid")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(tokens.tokens_to_grid, {"tokens": r.randn(B, N, D), "size": (H, W)})


@case("tokens.grid_to_tokens")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(tokens.grid_to_tokens, {"features": r.randn(B, D, H, W)})


@case("tokens.split_prefix_tokens")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(tokens.split_prefix_tokens, {"tokens": r.randn(B, N + 1, D), "num_prefix_tokens": 1})


@case("tokens.num_blocks")
def _(seed: int) -> Call:
    return Call(tokens.num_blocks, {"model": vit()}, batch=None)


@case("tokens.resolve_block_index")
def _(seed: int) -> Call:
    return Call(tokens.resolve_block_index, {"model": vit(), "index": -1}, batch=None,
                rules={"index": Rule(-2, 1)})


@case("tokens.patch_grid")
def _(seed: int) -> Call:
    return Call(tokens.patch_grid, {"model": vit(dynamic=True), "image_size": (32, 48)}, batch=None)


@case("tokens.vit_taps")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(tokens.vit_taps, {"model": vit(), "images": r.randn(B, 3, 32, 32), "layers": (0, -1), "head": False},
                rules={"layers": Rule(-2, 1)}, same_rtol=1e-4)


@case("tokens.stage_info")
def _(seed: int) -> Call:
    return Call(tokens.stage_info, {"model": swin()}, batch=None)


@case("tokens.check_stage_input")
def _(seed: int) -> Call:
    return Call(tokens.check_stage_input, {"model": swin(), "image_size": (32, 32)}, batch=None,
                skip={"image_size[0]=-1": "a fixed-size model names its one size", })


@case("tokens.stage_taps")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(tokens.stage_taps, {"model": swin(), "images": r.randn(B, 3, 32, 32), "stages": (1, -1),
                                    "final_norm": True}, rules={"stages": Rule(-4, 3)}, same_rtol=1e-4)


# ----------------------------------------------------------------------------- adapters


def _attention_call(module: nn.Module, adapter: adapters.AttentionAdapter, x: torch.Tensor) -> adapters.AttentionCall:
    """One call of ``module`` on ``x`` as the library records it: the outputs of the adapter's ``captures``.

    An empty batch (some modules cannot run one) is recorded from one sample, cut to 0 rows.
    """
    captured: dict[str, Any] = {}
    hooks = [getattr(module, name).register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out))
             for name in adapter.captures]
    try:
        with torch.no_grad():
            module(x if x.shape[0] else x.new_zeros((1, *x.shape[1:])))
    finally:
        for h in hooks:
            h.remove()
    if not x.shape[0]:
        captured = {k: v[:0] for k, v in captured.items()}
    return adapters.AttentionCall(x, captured, {})


def _query_key_case(adapter: adapters.AttentionAdapter, build: Callable[[], nn.Module], n: int,
                    fn: Callable[..., Any] | None = None) -> Factory:
    """``adapter.query_key`` on one call of a tiny attention module (D = 8, 2 heads, ``n`` tokens).

    The call's tensors come from one forward of the module, so they agree with each other and
    with the module; the generated call-level perturbations would change some of them (the
    tokens, not the captured child outputs). Batch 0 and float64 are therefore given as whole
    calls of the module (``extra``).
    """

    def make(seed: int) -> Call:
        r = Rand(seed)
        torch.manual_seed(seed)
        module = build().eval()
        x = r.randn(B, n, D)
        module64 = build().double().eval()
        module64.load_state_dict(module.state_dict())
        extra = [
            Pert("batch 0 (one call of the module)", "batch0", {"call": _attention_call(module, adapter, x[:0])},
                 ("call",), "batch0"),
            Pert("float64 (module and call)", "dtype",
                 {"module": module64, "call": _attention_call(module64, adapter, x.double())}, ("module", "call"),
                 "success"),
            Pert("call: a plain tuple", "pytype", {"call": tuple(_attention_call(module, adapter, x))}, ("call",),
                 "error"),
            Pert("call=str", "pytype", {"call": "x"}, ("call",), "error"),
            Pert("call=None", "pytype", {"call": None}, ("call",), "error"),
        ]
        return Call(fn or adapter.query_key, {"module": module, "call": _attention_call(module, adapter, x)},
                    batch_args=(), extra=extra,
                    skip={"cls:size1": "a size-1 dim of the tokens alone is not a call the module can make (its "
                                       "captured outputs keep their sizes); batch 0 and float64 come as whole calls",
                          "all float64": "given as a float64 module and its own call (extra)"})

    return make


def _timm_attention() -> nn.Module:
    return _timm().layers.Attention(D, num_heads=2)


def _eva_attention() -> nn.Module:
    from timm.models.eva import EvaAttention

    return EvaAttention(D, num_heads=2, norm_layer=nn.LayerNorm)


def _beit_attention() -> nn.Module:
    from timm.models.beit import Attention

    return Attention(D, num_heads=2, qkv_bias=True, window_size=(2, 2))  # 2 x 2 patches + the class token


def _relpos_attention() -> nn.Module:
    from timm.models.vision_transformer_relpos import RelPosAttention

    return RelPosAttention(D, num_heads=2)


def _base_query_key(module: Any, call: Any) -> str:
    """The base class's ``query_key``: it checks its arguments, then says a subclass must implement it."""
    try:
        adapters.AttentionAdapter().query_key(module, call)
    except NotImplementedError:
        return "not implemented"
    raise AssertionError("AttentionAdapter.query_key returned")


case("adapters.AttentionAdapter.query_key")(_query_key_case(adapters.FusedQKVAdapter(), _timm_attention, 5,
                                                            fn=_base_query_key))
case("adapters.FusedQKVAdapter.query_key")(_query_key_case(adapters.FusedQKVAdapter(), _timm_attention, 5))
case("adapters.EvaAttentionAdapter.query_key")(_query_key_case(adapters.EvaAttentionAdapter(), _eva_attention, 5))
case("adapters.BeitAttentionAdapter.query_key")(_query_key_case(adapters.BeitAttentionAdapter(), _beit_attention, 5))
case("adapters.RelPosAttentionAdapter.query_key")(
    _query_key_case(adapters.RelPosAttentionAdapter(), _relpos_attention, 5))


def _summary(x: Any) -> Any:
    """Numbers as they are, modules by their class name and length (outputs the checker compares)."""
    if isinstance(x, nn.Module):
        return type(x).__name__, len(x) if hasattr(x, "__len__") else None
    return x


for _name in ("blocks", "num_prefix_tokens", "num_class_tokens", "patch_embed", "patch_size", "native_image_size",
              "final_norm"):
    @case(f"adapters.ViTAdapter.{_name}")
    def _(seed: int, _name: str = _name) -> Call:
        method = getattr(adapters.ViTAdapter(), _name)
        return Call(lambda model: _summary(method(model)), {"model": vit()}, batch=None)


@case("adapters.ViTAdapter.check_image_size")
def _(seed: int) -> Call:
    return Call(adapters.ViTAdapter().check_image_size, {"model": vit(), "image_size": (32, 32)}, batch=None,
                extra=[Pert("image_size: another size than the model's", "option", {"image_size": (32, 40)},
                            ("image_size",), "error")])


@case("adapters.ViTAdapter.grid")
def _(seed: int) -> Call:
    return Call(adapters.ViTAdapter().grid, {"model": vit(dynamic=True), "image_size": (32, 48)}, batch=None)


@case("adapters.ViTAdapter.run")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(adapters.ViTAdapter().run, {"model": vit(), "images": r.randn(B, 3, 32, 32)}, same_rtol=1e-4)


@case("adapters.ViTAdapter.head")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(adapters.ViTAdapter().head, {"model": vit_with_head(), "tokens": r.randn(B, 1 + 16, 32)},
                same_rtol=1e-4)


@case("adapters.attention_adapter")
def _(seed: int) -> Call:
    return Call(lambda module: type(adapters.attention_adapter(module)).__name__,
                {"module": vit().blocks[0].attn}, batch=None,
                extra=[Pert("module: not attention", "pytype", {"module": nn.Linear(2, 2)}, ("module",))])


@case("adapters.vit_adapter")
def _(seed: int) -> Call:
    return Call(lambda model: type(adapters.vit_adapter(model)).__name__, {"model": vit()}, batch=None)


class _ThrowawayAttention(nn.Module):
    """A class registered and unregistered by the registration entries (the global registry stays clean)."""


class _ThrowawayViT(nn.Module):
    """As ``_ThrowawayAttention``, for ``register_vit_adapter``."""


def _unregister(table: dict[type, Any], cls: type) -> Callable[[], None]:
    return lambda: table.pop(cls, None)


@case("adapters.register_attention_adapter")
def _(seed: int) -> Call:
    # observe: the class is read with the registered adapter; cleanup: the registration is undone
    return Call(adapters.register_attention_adapter,
                {"attention_class": _ThrowawayAttention, "adapter": adapters.FusedQKVAdapter()}, batch=None,
                observe=lambda _: type(adapters.attention_adapter(_ThrowawayAttention())).__name__,
                cleanup=_unregister(adapters._ATTENTION, _ThrowawayAttention),
                extra=[Pert("attention_class=str", "pytype", {"attention_class": "Attention"}, ("attention_class",),
                            "error"),
                       Pert("attention_class: not a module class", "pytype", {"attention_class": int},
                            ("attention_class",), "error"),
                       Pert("attention_class: an instance", "pytype", {"attention_class": _ThrowawayAttention()},
                            ("attention_class",), "error"),
                       Pert("adapter=None", "pytype", {"adapter": None}, ("adapter",), "error"),
                       Pert("adapter: a ViTAdapter", "pytype", {"adapter": adapters.ViTAdapter()}, ("adapter",),
                            "error"),
                       Pert("adapter: the class", "pytype", {"adapter": adapters.FusedQKVAdapter}, ("adapter",),
                            "error")])


@case("adapters.register_vit_adapter")
def _(seed: int) -> Call:
    return Call(adapters.register_vit_adapter, {"model_class": _ThrowawayViT, "adapter": adapters.ViTAdapter()},
                batch=None, observe=lambda _: adapters.vit_adapter(_ThrowawayViT()) is not adapters._DEFAULT_VIT,
                cleanup=_unregister(adapters._VIT, _ThrowawayViT),
                extra=[Pert("model_class=str", "pytype", {"model_class": "ViT"}, ("model_class",), "error"),
                       Pert("model_class: not a module class", "pytype", {"model_class": int}, ("model_class",),
                            "error"),
                       Pert("adapter=None", "pytype", {"adapter": None}, ("adapter",), "error"),
                       Pert("adapter: an AttentionAdapter", "pytype", {"adapter": adapters.FusedQKVAdapter()},
                            ("adapter",), "error")])


# ----------------------------------------------------------------------------- prototypes, metrics, outputs


@case("prototypes.kmeans")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(prototypes.kmeans, {"points": r.randn(K, 11, D), "num_clusters": 4,
                                    "point_valid": r.bool(K, 11), "num_iters": 3, "seed": 0}, batch=None,
                extra=[Pert("num_clusters=10**5", "option", {"num_clusters": 10**5}, ("num_clusters",))])


def _bank(seed: int) -> tuple[prototypes.ClassBank, Rand]:
    r = Rand(seed)
    bank = prototypes.ClassBank(D, K, capacity=L)
    bank.update(r.randn(B, K, D), r.bool(B, K))
    return bank, r


@case("prototypes.ClassBank.__init__")
def _(seed: int) -> Call:
    return Call(prototypes.ClassBank, {"in_dim": D, "num_classes": K, "capacity": L, "device": None,
                                       "dtype": torch.float32}, batch=None)


@case("prototypes.ClassBank.extra_repr", "prototypes.ClassBank.reset", "prototypes.ClassBank.filled")
def _(seed: int) -> Call:
    bank, _ = _bank(seed)
    return Call(lambda: (bank.extra_repr(), bank.reset(), bank.filled()), {}, batch=None)


@case("prototypes.ClassBank.update")
def _(seed: int) -> Call:
    bank, r = _bank(seed)
    return Call(bank.update, {"items": r.randn(B, K, D), "item_valid": r.bool(B, K), "distributed": True},
                observe=_state(bank))


@case("metrics.confusion_matrix")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(metrics.confusion_matrix, {"preds": r.masks(ignore=False), "masks": r.masks(), "num_classes": K + 1,
                                           "ignore_index": 255})


@case("metrics.iou_from_confusion")
def _(seed: int) -> Call:
    r = Rand(seed)
    conf = torch.randint(0, 9, (K + 1, K + 1), generator=r.g)
    conf[-1] = 0
    conf[:, -1] = 0
    return Call(metrics.iou_from_confusion, {"confusion": conf}, batch=None, nan_ok=True,
                extra=[Pert("confusion: negative counts", "nonfinite", {"confusion": -conf - 1}, ("confusion",),
                            "error")])


def _miou(seed: int) -> tuple[metrics.MeanIoU, Rand]:
    r = Rand(seed)
    m = metrics.MeanIoU(K + 1, ignore_index=255, class_names=["bg", "a", "b", "c"])
    m.update(r.masks(ignore=False), r.masks())
    return m, r


@case("metrics.MeanIoU.__init__")
def _(seed: int) -> Call:
    return Call(metrics.MeanIoU, {"num_classes": K + 1, "ignore_index": 255,
                                  "class_names": ["bg", "a", "b", "c"]}, batch=None)


@case("metrics.MeanIoU.extra_repr", "metrics.MeanIoU.reset", "metrics.MeanIoU.compute")
def _(seed: int) -> Call:
    m, _ = _miou(seed)
    return Call(lambda: (m.extra_repr(), m.compute(), m.reset()), {}, batch=None, nan_ok=True)


@case("metrics.MeanIoU.update", "metrics.MeanIoU.forward")
def _(seed: int) -> Call:
    m, r = _miou(seed)
    return Call(m.update, {"preds": r.randn(B, K + 1, H, W), "masks": r.masks()}, observe=_state(m))


@case("outputs.weighted_total")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(outputs.weighted_total, {"terms": {"a": r.rand(()), "b": r.rand(())},
                                         "loss_weights": {"a": 1.0, "b": 0.5}}, batch=None)


@case("utils.eval_mode")
def _(seed: int) -> Call:
    net = nn.Sequential(nn.Dropout(), nn.Linear(2, 2))

    def enter(modules: Any) -> list[bool]:
        with utils.eval_mode(*modules):
            return [m.training for m in net.modules()]

    return Call(enter, {"modules": (net,)}, batch=None,
                extra=[Pert("modules: a string", "pytype", {"modules": ("net",)}, ("modules",), "error")])


@case("constants.pascal_palette")
def _(seed: int) -> Call:
    return Call(pascal_palette, {"num_colors": 21}, batch=None)


# ----------------------------------------------------------------------------- refine


@case("refine.balanced_loss.seg_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(seg_loss, {"logits": r.randn(B, K + 1, H, W), "masks": r.masks(), "ignore_index": 255})


@case("refine.balanced_loss.SegLoss.__init__", "refine.balanced_loss.SegLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda ignore_index: SegLoss(ignore_index=ignore_index).extra_repr(), {"ignore_index": 255},
                batch=None)


@case("refine.balanced_loss.SegLoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(SegLoss().forward, {"logits": r.randn(B, K + 1, H, W), "masks": r.masks()})


@case("refine.labels.combine_levels")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(combine_levels, {"masks_high": r.masks(ignore=False), "masks_low": r.masks(ignore=False),
                                 "ignore_index": 255},
                extra=[Pert("ignore_index=0 (background)", "option", {"ignore_index": 0}, ("ignore_index",),
                            "error")])


PAR_OPTS = {"dilations": (1, 2), "num_iters": 2, "kernel_width": 0.3, "pos_weight": 0.01}


@case("refine.labels.par_pseudo_labels")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(par_pseudo_labels, {"images": r.randn(B, 3, 10, 12), "norm_cams": r.rand(B, K, H, W),
                                    "labels": r.labels(), "low": 0.25, "high": 0.7, "valid": r.valid(),
                                    "size": (10, 12), "ignore_index": 255, **PAR_OPTS},
                bounded=frozenset({"norm_cams"}),
                extra=[Pert("ignore_index=1 (a class value)", "option", {"ignore_index": 1}, ("ignore_index",),
                            "error")])


@case("refine.labels.par_label_levels")
def _(seed: int) -> Call:
    c = REGISTRY["wsss_blocks.refine.labels.par_pseudo_labels"](seed)
    c.fn = par_label_levels
    return c


@case("refine.pixel_adaptive.par")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(par, {"images": r.randn(B, 3, 10, 12), "maps": r.rand(B, K, H, W), "valid": r.valid(),
                      **PAR_OPTS, "eps": 1e-8})


@case("refine.pixel_adaptive.par_affinity")
def _(seed: int) -> Call:
    r = Rand(seed)
    opts = {k: v for k, v in PAR_OPTS.items() if k != "num_iters"}
    return Call(par_affinity, {"images": r.randn(B, 3, 10, 12), "valid": r.valid(), **opts, "eps": 1e-8})


@case("refine.pixel_adaptive.par_stencil")
def _(seed: int) -> Call:
    return Call(par_stencil, {"dilations": (1, 2)}, batch=None)


@case("refine.pixel_adaptive.PAR.__init__", "refine.pixel_adaptive.PAR.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: PAR(**kw).extra_repr(), {**PAR_OPTS, "eps": 1e-8}, batch=None)


@case("refine.pixel_adaptive.PAR.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(PAR(**PAR_OPTS).forward, {"images": r.randn(B, 3, 10, 12), "maps": r.rand(B, K, H, W),
                                          "valid": r.valid()})


CRF_OPTS = {"num_iters": 2, "pos_xy_std": 1.0, "pos_w": 1.0, "bi_xy_std": 10.0, "bi_rgb_std": 5.0, "bi_w": 4.0,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "workers": 0}


@case("refine.crf.crf_available")
def _(seed: int) -> Call:
    return Call(crf_available, {}, batch=None)


@case("refine.crf.dense_crf")
def _(seed: int) -> Call:
    r = Rand(seed)
    probs = torch.softmax(r.randn(B, K + 1, 6, 7), 1)
    return Call(dense_crf, {"images": r.randn(B, 3, 6, 7), "probs": probs, **CRF_OPTS},
                bounded=frozenset({"probs"}))


@case("refine.crf.DenseCRF.__init__", "refine.crf.DenseCRF.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: DenseCRF(**kw).extra_repr(), dict(CRF_OPTS), batch=None)


@case("refine.crf.DenseCRF.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    probs = torch.softmax(r.randn(B, K + 1, 6, 7), 1)
    return Call(DenseCRF(num_iters=2).forward, {"images": r.randn(B, 3, 6, 7), "probs": probs},
                bounded=frozenset({"probs"}))


# ----------------------------------------------------------------------------- cpal


def _context(r: Rand) -> tuple[torch.Tensor, torch.Tensor]:
    return r.randn(K + 1, M, D), r.bool(K + 1, M)


@case("cpal.alignment.alignment_shift")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, ok = _context(r)
    return Call(alignment_shift, {"anchors": r.randn(B, K + 1, D), "anchor_valid": r.bool(B, K + 1),
                                  "context": ctx, "context_valid": ok})


@case("cpal.branch.cpal_forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, ok = _context(r)
    return Call(cpal_forward, {"features": r.randn(B, D, H, W), "norm_cams": r.rand(B, K, H, W),
                               "labels": r.labels(), "context": ctx, "context_valid": ok, "threshold": 0.1,
                               "bg_threshold": 0.2, "top_k": 4, "temperature": 0.5, "similarity": "cosine",
                               "weighting": "positiveness", "align": True, "normalize_pacam": True,
                               "detach_pacam": False}, bounded=frozenset({"norm_cams"}),
                rules={"top_k": Rule(1)})


@case("cpal.loss.self_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(self_loss, {"cams_with_bg": r.rand(B, K + 1, H, W), "pacam": r.rand(B, K + 1, H, W),
                            "active": r.bool(B, K + 1), "detach_pacam": False})


@case("cpal.neighbors.positiveness")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, ok = _context(r)
    return Call(positiveness, {"anchors": r.randn(B, K + 1, D), "context": ctx, "context_valid": ok,
                               "temperature": 0.5, "similarity": "cosine"})


@case("cpal.neighbors.soft_neighbors")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, ok = _context(r)
    return Call(soft_neighbors, {"anchors": r.randn(B, K + 1, D), "context": ctx, "context_valid": ok, "top_k": 4})


@case("cpal.neighbors.neighbor_weights")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, ok = _context(r)
    anchors = r.randn(B, K + 1, D)
    pos = positiveness(anchors, ctx, ok, temperature=0.5)
    idx, sel = soft_neighbors(anchors, ctx, ok, top_k=4)
    return Call(neighbor_weights, {"positiveness": pos, "indices": idx, "selected": sel,
                                   "weighting": "positiveness"}, bounded=frozenset({"positiveness"}))


@case("cpal.prototype_cam.pacam")
def _(seed: int) -> Call:
    r = Rand(seed)
    ctx, _ = _context(r)
    w = torch.softmax(r.randn(B, K + 1, M), -1)
    return Call(pacam, {"features": r.randn(B, N, D), "context": ctx, "neighbor_weights": w, "size": (H, W),
                        "normalize": True})


@case("cpal.prototypes.instance_prototypes")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(instance_prototypes, {"features": r.randn(B, D, H, W), "cams_with_bg": r.rand(B, K + 1, H, W),
                                      "labels": r.labels(), "threshold": 0.1, "bg_threshold": 0.2},
                bounded=frozenset({"cams_with_bg"}))


@case("cpal.prototypes.context_prototypes")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(context_prototypes, {"memory": r.randn(K + 1, L, D), "count": torch.tensor([9, 4, 0, 2]),
                                     "num_prototypes": 3, "num_iters": 2, "seed": 0}, batch=None)


CPAL_OPTS = {"proj_dim": 5, "capacity": L, "num_prototypes": 3, "top_k": 2, "kmeans_iters": 2}


def _cpal(seed: int, **kw: Any) -> tuple[CPAL, Rand]:
    r = Rand(seed)
    torch.manual_seed(seed)
    c = CPAL(D, K, **{**CPAL_OPTS, **kw})
    c.update(r.randn(4, K + 1, 5), r.bool(4, K + 1))
    c.recluster()
    return c, r


@case("cpal.module.CPAL.__init__")
def _(seed: int) -> Call:
    return Call(CPAL, {"in_dim": D, "num_classes": K, "projection": True, "hidden_dim": 6, "proj_dim": 5,
                       "detach_features": False, "threshold": 0.1, "bg_threshold": 0.2, "capacity": L,
                       "num_prototypes": 3, "top_k": 2, "temperature": 0.5, "similarity": "cosine",
                       "weighting": "positiveness", "align": True, "normalize_pacam": False,
                       "detach_pacam": False, "recluster_every": 3, "warmup_reclusters": True,
                       "kmeans_iters": 2, "seed": 0, "warn_unbuilt": True, "device": None, "dtype": None},
                batch=None, rules={"recluster_every": Rule(1)})


@case("cpal.module.CPAL.extra_repr", "cpal.module.CPAL.recluster", "cpal.module.CPAL.reset")
def _(seed: int) -> Call:
    c, _ = _cpal(seed)
    return Call(lambda: (c.extra_repr(), c.recluster(), c.reset()), {}, batch=None, observe=_state(c))


@case("cpal.module.CPAL.update")
def _(seed: int) -> Call:
    c, r = _cpal(seed, recluster_every=1)
    return Call(c.update, {"prototypes": r.randn(B, K + 1, 5), "prototype_valid": r.bool(B, K + 1)},
                observe=_state(c))


@case("cpal.module.CPAL.project")
def _(seed: int) -> Call:
    c, r = _cpal(seed)
    return Call(c.project, {"features": r.randn(B, N, D), "size": (H, W)})


@case("cpal.module.CPAL.forward")
def _(seed: int) -> Call:
    c, r = _cpal(seed)
    return Call(c.forward, {"features": r.randn(B, D, H, W), "norm_cams": r.rand(B, K, H, W), "labels": r.labels()},
                bounded=frozenset({"norm_cams"}))


# ----------------------------------------------------------------------------- cpews


@case("cpews.head.CPEWSHead.__init__", "cpews.head.CPEWSHead.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda in_dim, num_classes, **kw: CPEWSHead(in_dim, num_classes, **kw).extra_repr(),
                {"in_dim": D, "num_classes": K, "pooling": "gmp_cam", "device": None, "dtype": None}, batch=None)


@case("cpews.head.CPEWSHead.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    return Call(CPEWSHead(D, K).forward, {"features_mid": r.randn(B, N, D), "features_final": r.randn(B, N, D),
                                          "size": (H, W)})


@case("cpews.head.cpews_taps")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cpews_taps, {"model": vit(), "images": r.randn(B, 3, 32, 32), "mid_layer": 0},
                rules={"mid_layer": Rule(-2, 1)}, same_rtol=1e-4)


@case("cpews.ism.ism_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(ism_loss, {"features": r.randn(B, N, D), "masks": r.masks(), "abs_cos": True, "count_offset": 1.0,
                           "ignore_index": 255},
                extra=[Pert("masks: label 10**6", "nonfinite", {"masks": torch.full((B, H, W), 10**6)}, ("masks",)),
                       Pert("masks: label -1", "nonfinite", {"masks": torch.full((B, H, W), -1)}, ("masks",),
                            "error")])


@case("cpews.ism.ISMLoss.__init__", "cpews.ism.ISMLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: ISMLoss(**kw).extra_repr(), {"abs_cos": True, "count_offset": 1.0,
                                                          "ignore_index": 255}, batch=None)


@case("cpews.ism.ISMLoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(ISMLoss().forward, {"features": r.randn(B, D, H, W), "masks": r.masks()})


def _pool(seed: int, **kw: Any) -> tuple[PrototypePool, Rand]:
    r = Rand(seed)
    pool = PrototypePool(D, K, num_prototypes=2, capacity=8, kmeans_iters=2, **kw)
    for _ in range(2):
        labels = torch.ones(4, K, dtype=torch.long) - torch.eye(4, K).long()
        pool.update(r.randn(4, N, D), r.randn(4, K, H, W), labels, class_probs=r.rand(4, K))
    _quiet(pool.finalize)()
    return pool, r


def _protos(r: Rand) -> dict[str, torch.Tensor]:
    return {"pos": r.randn(K, 2, D), "pos_valid": r.bool(K, 2), "neg": r.randn(K, 4, D)}


@case("cpews.pdl.pdl_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(pdl_loss, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "labels": r.labels(),
                           **_protos(r), "neg_valid": r.bool(K, 4), "temperature": 13.0, "distance": "l2",
                           "offset": 0.0, "threshold": None, "valid": r.valid(), "eps": 1e-6, "compact": None},
                rules={"offset": Rule()})


@case("cpews.pdl.PDLLoss.__init__", "cpews.pdl.PDLLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: PDLLoss(**kw).extra_repr(), {"temperature": 13.0, "distance": "rms", "offset": 0.0,
                                                          "threshold": 0.2, "eps": 1e-6, "compact": True,
                                                          "warn_unbuilt": True}, batch=None)


@case("cpews.pdl.PDLLoss.forward")
def _(seed: int) -> Call:
    pool, r = _pool(seed)
    return Call(PDLLoss().forward, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "labels": r.labels(),
                                    "pool": pool, "valid": r.valid()})


@case("cpews.ssl.ssl_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(ssl_loss, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "labels": r.labels(),
                           **_protos(r), "neg_keep": r.bool(K, 4), "act_threshold": 0.1, "cam_activation": "relu",
                           "cam_scale": "raw", "denominator": "phi", "valid": r.valid(), "compact": None})


@case("cpews.ssl.SSLLoss.__init__", "cpews.ssl.SSLLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: SSLLoss(**kw).extra_repr(), {"suppress_singletons": True, "act_threshold": 0.1,
                                                          "cam_activation": "relu", "cam_scale": "max",
                                                          "denominator": "gate", "source_share": 0.5,
                                                          "compact": None, "warn_unbuilt": True}, batch=None)


@case("cpews.ssl.SSLLoss.forward")
def _(seed: int) -> Call:
    pool, r = _pool(seed)
    return Call(SSLLoss().forward, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "labels": r.labels(),
                                    "pool": pool, "valid": r.valid()})


@case("cpews.regions.region_embeddings")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(region_embeddings, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "threshold": None,
                                    "valid": r.valid(), "eps": 1e-5})


@case("cpews.tables.superclass_index")
def _(seed: int) -> Call:
    return Call(superclass_index, {"superclasses": {"a": (0, 2), "b": (1,)}, "num_classes": K, "device": None},
                batch=None)


@case("cpews.pool.PrototypePool.__init__")
def _(seed: int) -> Call:
    return Call(PrototypePool, {"in_dim": D, "num_classes": K, "num_prototypes": 2, "capacity": 8,
                                "superclasses": {"a": (0, 2), "b": (1,)}, "score": "prob", "threshold": 0.2,
                                "kmeans_iters": 2, "seed": 0, "device": None}, batch=None)


@case("cpews.pool.PrototypePool.extra_repr", "cpews.pool.PrototypePool.reset",
      "cpews.pool.PrototypePool.finalize")
def _(seed: int) -> Call:
    pool, _ = _pool(seed)
    return Call(_quiet(lambda: (pool.extra_repr(), pool.finalize(), pool.reset())), {}, batch=None,
                observe=_state(pool, exclude=POOL_EXCLUDE))


@case("cpews.pool.PrototypePool.update")
def _(seed: int) -> Call:
    pool, r = _pool(seed)
    return Call(pool.update, {"features": r.randn(B, N, D), "cams": r.randn(B, K, H, W), "labels": r.labels(),
                              "class_probs": r.rand(B, K), "valid": r.valid()},
                observe=_state(pool, exclude=POOL_EXCLUDE),
                bounded=frozenset({"class_probs"}))


@case("cpews.pool.PrototypePool.build")
def _(seed: int) -> Call:
    r = Rand(seed)
    pool = PrototypePool(D, K, num_prototypes=2, capacity=8, kmeans_iters=2)
    batches = [(r.randn(B, N, D), r.randn(B, K, H, W), r.labels()) for _ in range(2)]

    def model_fn(batch: Any) -> dict[str, torch.Tensor]:
        return {"features": batch[0], "cams": batch[1], "labels": batch[2],
                "class_probs": batch[1].amax((2, 3)).sigmoid()}

    return Call(_quiet(pool.build), {"model_fn": model_fn, "loader": batches}, batch=None,
                observe=_state(pool, exclude=POOL_EXCLUDE),
                skip={"cls:size1": "the loader's batches reach the pool as model_fn's outputs, named by their keys"})


@case("cpews.pool.PrototypePool.suppression_mask")
def _(seed: int) -> Call:
    pool, _ = _pool(seed, superclasses={"a": (0, 2), "b": (1,)})
    return Call(pool.suppression_mask, {"suppress_singletons": True, "source_share": 0.5}, batch=None)


@case("cpews.pool.PrototypePool.load_prototypes")
def _(seed: int) -> Call:
    r = Rand(seed)
    pool = PrototypePool(D, K, num_prototypes=3, capacity=8, superclasses={"a": (0, 2), "b": (1,)})
    neg_labels = r.bool(K, 2, K, p=0.4)
    return Call(pool.load_prototypes, {"pos": r.randn(K, 2, D), "pos_valid": r.bool(K, 2), "neg": r.randn(K, 2, D),
                                       "neg_valid": r.bool(K, 2), "neg_labels": neg_labels,
                                       "neg_keep": r.bool(K, 2)},
                batch=None, observe=_state(pool, exclude=POOL_EXCLUDE),
                extra=[Pert("pos: more prototypes than the pool holds", "dim",
                            {"pos": r.randn(K, 4, D), "pos_valid": r.bool(K, 4)}, ("pos",), "error"),
                       Pert("neg_labels: a value 2", "nonfinite", {"neg_labels": neg_labels.long() * 2},
                            ("neg_labels",), "error")])


def _upload(r: Rand) -> dict[str, list[torch.Tensor]]:
    """A CPEWS clusters.pth: per class a (n, D) tensor or an empty one; neg_unshared a subset of neg, in order."""
    neg = [r.randn(2, D), r.randn(3, D), torch.Tensor([])]
    return {"pos": [r.randn(2, D), torch.Tensor([]), r.randn(1, D)], "neg": neg,
            "neg_unshared": [neg[0][1:], neg[1][[0, 2]], torch.Tensor([])]}


@case("cpews.pool.prototypes_from_cpews_upload")
def _(seed: int) -> Call:
    r = Rand(seed)
    up = _upload(r)
    bad = {**up, "neg_unshared": [r.randn(1, D), torch.Tensor([]), torch.Tensor([])]}
    return Call(prototypes_from_cpews_upload, {"clusters": up, "num_prototypes": 4}, batch=None,
                extra=[Pert("clusters: as the (pos, neg, neg_unshared) tuple", "pytype",
                            {"clusters": (up["pos"], up["neg"], up["neg_unshared"])}, ("clusters",), "success"),
                       Pert("clusters: no 'neg'", "option", {"clusters": {"pos": up["pos"]}}, ("clusters",), "error"),
                       Pert("clusters: a class count that differs", "dim", {"clusters": {**up, "neg": up["neg"][:2]}},
                            ("clusters",), "error"),
                       Pert("clusters: a D that differs", "dim",
                            {"clusters": {**up, "pos": [r.randn(2, D + 1), *up["pos"][1:]]}}, ("clusters",), "error"),
                       Pert("clusters: a 3-dim entry", "rank",
                            {"clusters": {**up, "pos": [r.randn(1, 2, D), *up["pos"][1:]]}}, ("clusters",), "error"),
                       Pert("clusters: an int64 entry", "dtype",
                            {"clusters": {**up, "pos": [torch.ones(2, D, dtype=torch.long), *up["pos"][1:]]}},
                            ("clusters",), "error"),
                       Pert("clusters: an entry that is not a tensor", "pytype",
                            {"clusters": {**up, "pos": [[1.0] * D, *up["pos"][1:]]}}, ("clusters",), "error"),
                       Pert("clusters: neg_unshared not among neg", "option", {"clusters": bad}, ("clusters",),
                            "error"),
                       Pert("num_prototypes below the largest count", "option", {"num_prototypes": 2},
                            ("num_prototypes",), "error")])


def _cpews_loss(seed: int) -> tuple[CPEWSLoss, Rand]:
    pool, r = _pool(seed)
    return CPEWSLoss(pool), r


@case("cpews.loss.CPEWSLoss.__init__", "cpews.loss.CPEWSLoss.extra_repr")
def _(seed: int) -> Call:
    pool, _ = _pool(seed)
    return Call(lambda pool, **kw: CPEWSLoss(pool, **kw).extra_repr(),
                {"pool": pool, "preset": "official", "loss_weights": {"ism": 0.5}, "ism": ISMLoss(),
                 "pdl": PDLLoss(), "ssl": SSLLoss(), "warn_unbuilt": True}, batch=None)


@case("cpews.loss.CPEWSLoss.from_preset")
def _(seed: int) -> Call:
    return Call(CPEWSLoss.from_preset, {"in_dim": D, "num_classes": K, "preset": "paper",
                                        "loss_weights": {"ism": 0.5}, "superclasses": None,
                                        "pool": {"num_prototypes": 2}, "pdl": {"temperature": 10.0},
                                        "ssl": {"act_threshold": 0.2}, "ism": {"count_offset": 0.0},
                                        "warn_unbuilt": True, "device": None}, batch=None)


@case("cpews.loss.CPEWSLoss.forward")
def _(seed: int) -> Call:
    crit, r = _cpews_loss(seed)
    return Call(crit.forward, {"logits_mid": r.randn(B, K), "logits_final": r.randn(B, K),
                               "features_final": r.randn(B, N, D), "cams_final": r.randn(B, K, H, W),
                               "masks_mid": r.masks(), "labels": r.labels(), "valid": r.valid()},
                extra=[Pert("masks_mid: label K + 1", "nonfinite", {"masks_mid": torch.full((B, H, W), K + 1)},
                            ("masks_mid",), "error")])


# ----------------------------------------------------------------------------- pcm


@case("pcm.classifier.patch_class_probs")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(patch_class_probs, {"logits": r.randn(B, K + 1, H, W)})


def _classifier(seed: int) -> PatchClassifier:
    torch.manual_seed(seed)
    return PatchClassifier(D, K, dropout=0.2).eval()


@case("pcm.classifier.PatchClassifier.__init__")
def _(seed: int) -> Call:
    return Call(PatchClassifier, {"in_dim": D, "num_classes": K, "with_background": True, "bias": True,
                                  "dropout": 0.2, "init_std": 0.05, "l2": 0.01, "device": None, "dtype": None},
                batch=None)


@case("pcm.classifier.PatchClassifier.extra_repr", "pcm.classifier.PatchClassifier.l2_penalty",
      "pcm.classifier.PatchClassifier.reset_parameters")
def _(seed: int) -> Call:
    m = _classifier(seed)
    return Call(lambda: (m.extra_repr(), m.l2_penalty(), m.reset_parameters()), {}, batch=None)


@case("pcm.classifier.PatchClassifier.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(_classifier(seed).forward, {"features": r.randn(B, N, D), "size": (H, W)})


@case("pcm.dihedral.dihedral_transform")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(dihedral_transform, {"maps": r.randn(B, K, H, H), "codes": torch.tensor([1, 6])})


@case("pcm.dihedral.dihedral_inverse")
def _(seed: int) -> Call:
    c = REGISTRY["wsss_blocks.pcm.dihedral.dihedral_transform"](seed)
    c.fn = dihedral_inverse
    return c


@case("pcm.dihedral.random_dihedral_codes")
def _(seed: int) -> Call:
    return Call(random_dihedral_codes, {"batch_size": 5, "square": False, "device": None,
                                        "generator": torch.Generator().manual_seed(seed)}, batch=None)


def _record(b: int = 4) -> MosaicRecord:
    return MosaicRecord(torch.tensor([[0, 0, 16, 16]] * b), torch.arange(b) % 8, (32, 32), (16, 16), 8, False)


@case("pcm.equivariance.et_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    student = torch.softmax(r.randn(4, K + 1, 2, 2), 1)
    teacher = torch.softmax(r.randn(4, K + 1, 4, 4), 1)
    return Call(et_loss, {"student_probs": student, "teacher_probs": teacher, "labels": r.labels(4),
                          "record": _record(), "teacher_codes": torch.tensor([0, 1, 2, 3]),
                          "background": "always_one", "target_norm": "tile", "eps": 1e-7, "reduction": "mean"},
                batch=4, bounded=frozenset({"student_probs", "teacher_probs"}))


@case("pcm.equivariance.ETLoss.__init__", "pcm.equivariance.ETLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: ETLoss(**kw).extra_repr(), {"background": "from_labels", "target_norm": "image",
                                                         "eps": 1e-7, "reduction": "none"}, batch=None)


@case("pcm.equivariance.ETLoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    student = torch.softmax(r.randn(4, K + 1, 2, 2), 1)
    teacher = torch.softmax(r.randn(4, K + 1, 4, 4), 1)
    return Call(ETLoss().forward, {"student_probs": student, "teacher_probs": teacher, "labels": r.labels(4),
                                   "record": _record(), "teacher_codes": None}, batch=4,
                bounded=frozenset({"student_probs", "teacher_probs"}))


def _hv(seed: int) -> HVBiLSTM:
    torch.manual_seed(seed)
    return HVBiLSTM(D, hidden_dim=3, dropout=0.2).eval()


@case("pcm.hv_bilstm.HVBiLSTM.__init__")
def _(seed: int) -> Call:
    return Call(HVBiLSTM, {"in_dim": D, "hidden_dim": 3, "dropout": 0.2, "lstm_dropout": 0.1, "keras_init": True,
                           "device": None, "dtype": None}, batch=None)


@case("pcm.hv_bilstm.HVBiLSTM.extra_repr", "pcm.hv_bilstm.HVBiLSTM.reset_parameters")
def _(seed: int) -> Call:
    m = _hv(seed)
    return Call(lambda: (m.extra_repr(), m.reset_parameters()), {}, batch=None)


@case("pcm.hv_bilstm.HVBiLSTM.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(_hv(seed).forward, {"features": r.randn(B, N, D), "size": (H, W)}, same_rtol=1e-4)


@case("pcm.masks.masked_renormalize")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(masked_renormalize, {"probs": torch.softmax(r.randn(B, K + 1, H, W), 1), "labels": r.labels(),
                                     "background": "always_one"}, bounded=frozenset({"probs"}))


@case("pcm.masks.pseudo_mask")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(pseudo_mask, {"probs": torch.softmax(r.randn(B, K + 1, H, W), 1), "labels": r.labels(),
                              "size": (10, 12), "align_corners": False}, bounded=frozenset({"probs"}))


@case("pcm.mce.mce_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(mce_loss, {"pooled_probs": r.rand(B, K + 1) * 0.9 + 0.05, "labels": r.labels(),
                           "background": "always_one", "eps": 1e-7}, bounded=frozenset({"pooled_probs"}))


@case("pcm.mce.MCELoss.__init__", "pcm.mce.MCELoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: MCELoss(**kw).extra_repr(), {"background": "from_labels", "eps": 1e-7}, batch=None)


@case("pcm.mce.MCELoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(MCELoss().forward, {"pooled_probs": r.rand(B, K + 1) * 0.9 + 0.05, "labels": r.labels()},
                bounded=frozenset({"pooled_probs"}))


@case("pcm.tiling.mosaic")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(mosaic, {"images": r.randn(4, 3, 32, 32), "crop_prob": 0.5, "crop": 16, "scale": 0.5,
                         "patch_size": 8, "dihedral": True, "boxes": None, "codes": None, "align_corners": False,
                         "generator": torch.Generator().manual_seed(seed)}, batch=4)


@case("pcm.tiling.unmosaic")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(unmosaic, {"maps": r.randn(B, K, 4, 6)})


@case("pcm.tiling.teacher_to_tiles")
def _(seed: int) -> Call:
    r = Rand(seed)
    bad = _record()._replace(boxes=torch.tensor([[100, 100, 200, 200]] * 4))
    return Call(teacher_to_tiles, {"teacher_probs": torch.softmax(r.randn(4, K + 1, 4, 4), 1), "record": _record(),
                                   "teacher_codes": torch.tensor([0, 1, 2, 3])}, batch=4,
                bounded=frozenset({"teacher_probs"}),
                extra=[Pert("record: a box outside the image", "option", {"record": bad}, ("record",), "error")])


def _pcm(seed: int, *, fresh: bool = False) -> ViTPCM:
    torch.manual_seed(seed)
    return ViTPCM(vit(fresh=fresh), K, hidden_dim=3, crop=16).eval()


@case("pcm.model.ViTPCM.__init__")
def _(seed: int) -> Call:
    return Call(ViTPCM, {"backbone": vit(), "num_classes": K, "hv_lstm": True, "hidden_dim": 3, "dropout": 0.2,
                         "keras_init": True, "with_background": True, "bias": False, "init_std": 0.05, "l2": 0.01,
                         "background": "always_one", "target_norm": "tile", "crop_prob": 0.3, "crop": 16,
                         "scale": 0.5, "align_corners": False, "device": None, "dtype": None}, batch=None)


@case("pcm.model.ViTPCM.from_preset")
def _(seed: int) -> Call:
    return Call(ViTPCM.from_preset, {"backbone": vit(), "num_classes": K, "preset": "official"}, batch=None)


@case("pcm.model.ViTPCM.extra_repr", "pcm.model.ViTPCM.l2_penalty")
def _(seed: int) -> Call:
    m = _pcm(seed)
    return Call(lambda: (m.extra_repr(), m.l2_penalty()), {}, batch=None)


@case("pcm.model.ViTPCM.set_backbone_trainable")
def _(seed: int) -> Call:
    m = _pcm(seed, fresh=True)
    return Call(lambda **kw: len(m.set_backbone_trainable(**kw)), {"num_blocks": 1}, batch=None,
                rules={"num_blocks": Rule(-1, 2)})


for _name in ("features", "forward", "teacher"):
    @case(f"pcm.model.ViTPCM.{_name}")
    def _(seed: int, _name: str = _name) -> Call:
        r = Rand(seed)
        return Call(getattr(_pcm(seed), _name), {"images": r.randn(B, 3, 32, 32)}, same_rtol=1e-4)


@case("pcm.model.ViTPCM.head")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(_pcm(seed).head, {"features": r.randn(B, 16, 32), "size": (4, 4)}, same_rtol=1e-4)


@case("pcm.model.ViTPCM.training_losses")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(_pcm(seed).training_losses,
                {"images": r.randn(4, 3, 32, 32), "labels": r.labels(4), "images_et": r.randn(4, 3, 32, 32),
                 "background": None, "use_et": True, "crop_prob": 0.5, "crop": 16, "scale": 0.5,
                 "generator": torch.Generator().manual_seed(seed), "shared_teacher": False}, batch=4,
                same_rtol=1e-4, batch_free=frozenset({"out.loss", "out.terms['l2']"}))


# ----------------------------------------------------------------------------- swtformer


@case("swtformer.head.swin_cam")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(swin_cam, {"cams": r.randn(B, K, H, W), "size": (10, 12), "eps": 1e-5})


@case("swtformer.head.cams_with_background")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(cams_with_background, {"norm_cams": r.rand(B, K, H, W), "labels": r.labels(), "valid": r.valid()},
                bounded=frozenset({"norm_cams"}))


@case("swtformer.head.SwinCAMHead.__init__", "swtformer.head.SwinCAMHead.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda in_dim, num_classes, **kw: SwinCAMHead(in_dim, num_classes, **kw).extra_repr(),
                {"in_dim": D, "num_classes": K, "kernel_size": 3, "bias": True, "input_fmt": "NHWC",
                 "device": None, "dtype": None}, batch=None)


@case("swtformer.head.SwinCAMHead.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    return Call(SwinCAMHead(D, K, kernel_size=3).forward, {"features": r.randn(B, N, D), "size": (H, W)})


@case("swtformer.hff.HFF.__init__", "swtformer.hff.HFF.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda in_dims, **kw: HFF(in_dims, **kw).extra_repr(),
                {"in_dims": SWIN_DIMS, "out_dim": 12, "output_stage": "stage2", "normalize": True,
                 "detach_inputs": True, "input_fmt": "NCHW", "eps": 1e-5, "device": None, "dtype": None},
                batch=None)


@case("swtformer.hff.HFF.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    return Call(HFF(SWIN_DIMS, out_dim=12).forward, {"features": swin_stages(r)})


@case("swtformer.losses.gsc_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(gsc_loss, {"cams_with_bg": r.rand(B, K + 1, H, W), "rcams": r.rand(B, K + 1, 10, 12),
                           "valid": r.valid()}, bounded=frozenset({"cams_with_bg", "rcams"}))


@case("swtformer.losses.GSCLoss.__init__")
def _(seed: int) -> Call:
    return Call(GSCLoss, {}, batch=None)


@case("swtformer.losses.GSCLoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(GSCLoss().forward, {"cams_with_bg": r.rand(B, K + 1, H, W), "rcams": r.rand(B, K + 1, H, W),
                                    "valid": None}, bounded=frozenset({"cams_with_bg", "rcams"}))


@case("swtformer.losses.ccl_loss")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(ccl_loss, {"cams_with_bg": r.rand(B, K + 1, H, W), "rcams": r.rand(B, K + 1, 10, 12),
                           "labels": r.labels(), "variant": "paper", "valid": r.valid(), "detach_rcam": False,
                           "eps": 1e-8}, bounded=frozenset({"cams_with_bg", "rcams"}))


@case("swtformer.losses.CCLLoss.__init__", "swtformer.losses.CCLLoss.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: CCLLoss(**kw).extra_repr(), {"variant": "plain", "detach_rcam": True, "eps": 1e-8},
                batch=None)


@case("swtformer.losses.CCLLoss.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(CCLLoss().forward, {"cams_with_bg": r.rand(B, K + 1, H, W), "rcams": r.rand(B, K + 1, H, W),
                                    "labels": r.labels(), "valid": None},
                bounded=frozenset({"cams_with_bg", "rcams"}))


def _seeds(r: Rand, h: int = H, w: int = W) -> torch.Tensor:
    idx = torch.randint(0, K + 1, (B, h, w), generator=r.g)
    return torch.nn.functional.one_hot(idx, K + 1).permute(0, 3, 1, 2).bool()


@case("swtformer.prototypes.seed_prototypes")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(seed_prototypes, {"features": r.randn(B, 10 * 12, D), "seeds": _seeds(r), "size": (10, 12)})


@case("swtformer.prototypes.refine_cams")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(refine_cams, {"features": r.randn(B, D, 10, 12), "seeds": _seeds(r), "size": None, "eps": 1e-5})


@case("swtformer.prototypes.PrototypeRefiner.__init__", "swtformer.prototypes.PrototypeRefiner.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: PrototypeRefiner(**kw).extra_repr(), {"eps": 1e-5}, batch=None)


@case("swtformer.prototypes.PrototypeRefiner.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(PrototypeRefiner().forward, {"features": r.randn(B, N, D), "seeds": _seeds(r), "size": (H, W)})


@case("swtformer.prototypes.rcam_pseudo_mask")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(rcam_pseudo_mask, {"rcams": r.rand(B, K + 1, H, W), "labels": r.labels(), "size": (10, 12),
                                   "valid": r.valid(), "ignore_index": 255}, bounded=frozenset({"rcams"}),
                extra=[Pert("ignore_index=1 (a class value)", "option", {"ignore_index": 1}, ("ignore_index",),
                            "error")])


@case("swtformer.seeds.structure_affinity")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(structure_affinity, {"features": r.randn(B, N, D), "size": (H, W), "similarity": "abs_cos",
                                     "eps": 1e-5})


@case("swtformer.seeds.locate_seeds")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(locate_seeds, {"features": r.randn(B, D, H, W), "cams_with_bg": r.rand(B, K + 1, H, W),
                               "labels": r.labels(), "similarity": "abs_cos", "bg_scale": 0.5, "valid": r.valid(),
                               "eps": 1e-5}, bounded=frozenset({"cams_with_bg"}))


@case("swtformer.seeds.SeedLocator.__init__", "swtformer.seeds.SeedLocator.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: SeedLocator(**kw).extra_repr(), {"similarity": "relu_cos", "bg_scale": 0.5,
                                                              "eps": 1e-5}, batch=None)


@case("swtformer.seeds.SeedLocator.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(SeedLocator().forward, {"features": r.randn(B, N, D), "cams_with_bg": r.rand(B, K + 1, H, W),
                                        "labels": r.labels(), "valid": None}, bounded=frozenset({"cams_with_bg"}))


SWT_OPTS = {"version": "v2", "head_kernel_size": 1, "head_bias": False, "hff_out_dim": 12,
            "hff_output_stage": "stage3", "hff_normalize": True, "hff_detach_inputs": True, "similarity": "abs_cos",
            "bg_scale": 0.5, "ccl_variant": "paper", "loss_weights": {"gsc": 0.5}, "device": None, "dtype": None}


@case("swtformer.model.SWTformerHead.__init__", "swtformer.model.SWTformerHead.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda in_dims, num_classes, **kw: SWTformerHead(in_dims, num_classes, **kw).extra_repr(),
                {"in_dims": SWIN_DIMS, "num_classes": K, **SWT_OPTS}, batch=None)


@case("swtformer.model.SWTformerHead.from_preset")
def _(seed: int) -> Call:
    return Call(SWTformerHead.from_preset, {"in_dims": SWIN_DIMS, "num_classes": K, "preset": "official"},
                batch=None)


@case("swtformer.model.SWTformerHead.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    heads = SWTformerHead(SWIN_DIMS, K, hff_out_dim=12)
    return Call(heads.forward, {"features": swin_stages(r), "labels": r.labels(), "valid": r.valid()},
                same_rtol=1e-4)


@case("swtformer.model.SWTformer.__init__", "swtformer.model.SWTformer.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda backbone, num_classes, **kw: SWTformer(backbone, num_classes, **kw).extra_repr(),
                {"backbone": swin(), "num_classes": K, "final_norm": True, **SWT_OPTS}, batch=None)


@case("swtformer.model.SWTformer.from_preset")
def _(seed: int) -> Call:
    return Call(SWTformer.from_preset, {"backbone": swin(), "num_classes": K, "preset": "official"}, batch=None)


@case("swtformer.model.SWTformer.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    model = SWTformer(swin(), K, hff_out_dim=12)
    return Call(model.forward, {"images": r.randn(B, 3, 32, 32), "labels": r.labels(), "valid": r.valid()},
                same_rtol=1e-4)


# ----------------------------------------------------------------------------- doei


@case("doei.config.DOEIConfig.__init__")
def _(seed: int) -> Call:
    return Call(DOEIConfig, {"alpha": 0.35, "rgb_sigma": 0.1, "st_p2c": 0.02, "af_p2c": 1.0, "sf_p2c": 1.0,
                             "st_c2c": 0.02, "af_c2c": 1.0, "sf_c2c": 1.0, "use_ppdo": True, "use_cpdo": True,
                             "use_hfa": True, "restrict_to_labels": False, "head_mean": True,
                             "image_mean": (0.5, 0.5, 0.5), "image_std": (0.2, 0.2, 0.2), "chunk_rows": 64},
                batch=None)


@case("doei.functional.doei_delta")
def _(seed: int) -> Call:
    r = Rand(seed)
    n = 1 + 16
    return Call(doei_delta, {"attn_output": r.randn(B, n, D), "attn": torch.softmax(r.randn(B, n, n), -1),
                             "num_class_tokens": 1, "num_prefix_tokens": 1, "t_p2c": 2, "t_c2c": 0, "af_p2c": 1.0,
                             "sf_p2c": 1.0, "af_c2c": 1.0, "sf_c2c": 1.0, "labels": None},
                bounded=frozenset({"attn"}))


@case("doei.functional.hybrid_attention")
def _(seed: int) -> Call:
    r = Rand(seed)
    n = 1 + 16
    aff = torch.softmax(r.randn(B, 16, 16), -1)
    return Call(hybrid_attention, {"tokens": r.randn(B, n, D), "attn": torch.softmax(r.randn(B, n, n), -1),
                                   "color_affinity": aff, "num_prefix_tokens": 1, "alpha": 0.35},
                bounded=frozenset({"attn", "color_affinity"}))


@case("doei.functional.patch_color_affinity")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(patch_color_affinity, {"images": r.randn(B, 3, 16, 24), "patch_size": 8, "rgb_sigma": 0.1,
                                       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "pad": False})


@case("doei.functional.progressive_count")
def _(seed: int) -> Call:
    return Call(progressive_count, {"num_candidates": 196, "block_index": 3, "num_blocks": 12, "st": 0.02},
                batch=None, rules={"block_index": Rule(0, 11)},
                extra=[Pert("num_candidates=196.9", "option", {"num_candidates": 196.9}, ("num_candidates",),
                            "error")])


@case("doei.functional.select_top_bottom")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(select_top_bottom, {"scores": r.randn(B, 6, 6), "t": 2, "exclude_diagonal": True})


def _unpatch(model: nn.Module) -> Callable[[], None]:
    """Undo a patch of ``model`` after a call (nothing to undo when the call failed)."""

    def undo() -> None:
        if hasattr(model, "_doei_handle"):  # not patched when the perturbed call failed
            unpatch(model)

    return undo


def _patched(seed: int) -> tuple[DOEIHandle, nn.Module, Rand]:
    r = Rand(seed)
    model = vit(fresh=True)
    return patch(model, num_class_tokens=1, config=DOEIConfig(), layers=(-1,)), model, r


@case("doei.patching.patch")
def _(seed: int) -> Call:
    model = vit(fresh=True)
    return Call(patch, {"model": model, "num_class_tokens": 1, "config": DOEIConfig(alpha=0.5), "layers": (-1,)},
                batch=None, cleanup=_unpatch(model), rules={"layers": Rule(-2, 1)})


@case("doei.patching.unpatch")
def _(seed: int) -> Call:
    _, model, _ = _patched(seed)
    return Call(unpatch, {"model": model}, batch=None)


@case("doei.patching.DOEIHandle.__init__")
def _(seed: int) -> Call:
    model = vit(fresh=True)
    attn = [blk.attn for blk in model.blocks]
    return Call(DOEIHandle, {"model": model, "modules": attn, "num_class_tokens": 1, "config": DOEIConfig(),
                             "layers": [1]}, batch=None, cleanup=_unpatch(model),
                rules={"layers": Rule(-2, 1)})


@case("doei.patching.DOEIHandle.set_images")
def _(seed: int) -> Call:
    h, model, r = _patched(seed)

    def run(images: Any) -> torch.Tensor:  # set_images gets the perturbed images, the model valid ones
        h.set_images(images)
        b = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else B
        return model.forward_features(torch.zeros(b, 3, 32, 32))

    return Call(run, {"images": r.randn(B, 3, 32, 32)}, cleanup=h.remove, same_rtol=1e-4)


@case("doei.patching.DOEIHandle.set_labels")
def _(seed: int) -> Call:
    h, model, r = _patched(seed)

    def run(labels: Any) -> torch.Tensor:
        h.set_labels(labels)
        b = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() else B
        return model.forward_features(torch.zeros(b, 3, 32, 32))

    return Call(run, {"labels": r.labels(k=1)}, cleanup=h.remove, same_rtol=1e-4)


@case("doei.patching.DOEIHandle.remove")
def _(seed: int) -> Call:
    h, _, _ = _patched(seed)
    return Call(lambda: (h.remove(), h.remove()), {}, batch=None)


# ----------------------------------------------------------------------------- mct


@case("mct.class_tokens.add_class_tokens")
def _(seed: int) -> Call:
    return Call(add_class_tokens, {"model": vit(fresh=True), "num_classes": K}, batch=None,
                observe=lambda m: m.cls_token.shape)


@functools.cache
def _mct_vit() -> nn.Module:
    return add_class_tokens(vit(fresh=True), K)


@case("mct.class_tokens.final_tokens")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(final_tokens, {"model": _mct_vit(), "images": r.randn(B, 3, 32, 32), "num_class_tokens": K,
                               "final_norm": True}, same_rtol=1e-4)


@case("mct.class_tokens.class_scores")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(class_scores, {"class_tokens": r.randn(B, K, D)})


@case("mct.class_tokens.attention_cams")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(attention_cams, {"model": _mct_vit(), "images": r.randn(B, 3, 32, 32), "last_k": 2,
                                 "num_class_tokens": K, "fuse": "sum", "refine": True}, same_rtol=1e-4,
                rules={"last_k": Rule(1, 2)})


@case("mct.patch_head.patch_cam")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(patch_cam, {"features": r.randn(B, N, D), "weight": r.randn(K, D, 3, 3), "size": (H, W),
                            "bias": r.randn(K)},
                extra=[Pert("features: a map", "layout", {"features": tokens.tokens_to_grid(r.randn(B, N, D), (H, W)),
                                                          "size": None}, ("features",), "success"),
                       Pert("weight: (K, D), a 1 x 1 kernel", "rank", {"weight": r.randn(K, D)}, ("weight",),
                            "success"),
                       Pert("weight: an even kernel", "dim", {"weight": r.randn(K, D, 2, 2)}, ("weight",), "error")])


@case("mct.patch_head.PatchCAM.__init__")
def _(seed: int) -> Call:
    return Call(PatchCAM, {"in_dim": D, "num_classes": K, "kernel_size": 3, "bias": True, "device": None,
                           "dtype": torch.float32}, batch=None,
                extra=[Pert("kernel_size=2 (even)", "option", {"kernel_size": 2}, ("kernel_size",), "error")])


@case("mct.patch_head.PatchCAM.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    torch.manual_seed(seed)
    return Call(PatchCAM(D, K).forward, {"features": r.randn(B, N, D), "size": (H, W)})


@case("mct.patch_head.fused_cam")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(fused_cam, {"attn_cams": r.rand(B, K, H, W), "patch_cams": r.randn(B, K, H, W), "fuse": "geometric"})


@case("mct.patch_head.FusedCAM.__init__", "mct.patch_head.FusedCAM.extra_repr")
def _(seed: int) -> Call:
    return Call(lambda **kw: FusedCAM(**kw).extra_repr(), {"fuse": "geometric"}, batch=None)


@case("mct.patch_head.FusedCAM.forward")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(FusedCAM().forward, {"attn_cams": r.rand(B, K, H, W), "patch_cams": r.randn(B, K, H, W)})


@functools.cache
def _mct_checkpoint() -> dict[str, torch.Tensor]:
    """An MCTformer-V2-like state dict for the tiny ViT: K class tokens and a 3 x 3 PatchCAM head."""
    sd = add_class_tokens(vit(fresh=True, depth=1), K).state_dict()
    g = torch.Generator().manual_seed(0)
    return {**sd, "head.weight": torch.randn(K, 32, 3, 3, generator=g), "head.bias": torch.zeros(K)}


@case("mct.checkpoints.load_mctformer")
def _(seed: int) -> Call:
    sd = _mct_checkpoint()
    return Call(lambda model, state_dict, **kw: load_mctformer(model, state_dict, **kw)._replace(head=None),
                {"model": vit(fresh=True, depth=1), "state_dict": {"model": sd}, "variant": "auto",
                 "strict": True}, batch=None,
                extra=[Pert("state_dict: with the module. prefix", "option",
                            {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ("state_dict",), "success"),
                       Pert("state_dict: no tensors", "option", {"state_dict": {"model": {"epoch": 3}}},
                            ("state_dict",), "error"),
                       Pert("state_dict: a key missing", "option",
                            {"state_dict": {k: v for k, v in sd.items() if k != "norm.weight"}}, ("state_dict",),
                            "error"),
                       Pert("variant='v1' for a V2 checkpoint", "option", {"variant": "v1"}, ("variant",)),
                       Pert("model: another width", "pytype",
                            {"model": _timm().create_model("vit_tiny_patch16_224", num_classes=0, img_size=32,
                                                           patch_size=8, embed_dim=16, num_heads=2, depth=1)},
                            ("model",), "error"),
                       Pert("model: without position embeddings", "pytype", {"model": nn.Linear(2, 2)}, ("model",),
                            "error")])


# ----------------------------------------------------------------------------- data


@case("data.transforms.normalize")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(normalize, {"image": r.rand(3, 10, 12), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
                batch=None, bounded=frozenset({"image"}))


@case("data.transforms.labels_from_mask")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(labels_from_mask, {"mask": r.masks()[0], "num_classes": K, "ignore_index": 255}, batch=None)


@case("data.transforms.collate")
def _(seed: int) -> Call:
    r = Rand(seed)
    samples = [{"image": r.randn(3, 6, 7), "mask": r.masks(1, 6, 7)[0], "valid": torch.ones(6, 7, dtype=torch.bool),
                "labels": r.labels(1)[0], "index": i, "name": f"s{i}"} for i in range(B)]
    return Call(collate, {"samples": samples}, batch=None)


@case("data.transforms.EvalTransform.__init__")
def _(seed: int) -> Call:
    return Call(EvalTransform, {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}, batch=None)


@case("data.transforms.EvalTransform.__call__")
def _(seed: int) -> Call:
    r = Rand(seed)
    return Call(EvalTransform().__call__, {"image": (r.rand(3, 10, 12) * 255).to(torch.uint8),
                                           "mask": r.masks(1, 10, 12)[0]}, batch=None)


TRAIN_OPTS = {"crop_size": 8, "scale_range": (0.5, 1.5), "long_side": None, "hflip": 0.5,
              "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "pad_value": 0.0, "ignore_index": 255}


@case("data.transforms.TrainTransform.__init__")
def _(seed: int) -> Call:
    return Call(TrainTransform, {**TRAIN_OPTS, "generator": torch.Generator().manual_seed(seed)}, batch=None,
                rules={"long_side": Rule(1)})


@case("data.transforms.TrainTransform.__call__")
def _(seed: int) -> Call:
    r = Rand(seed)
    t = TrainTransform(crop_size=8, generator=torch.Generator().manual_seed(seed))
    return Call(t.__call__, {"image": (r.rand(3, 10, 12) * 255).to(torch.uint8), "mask": r.masks(1, 10, 12)[0]},
                batch=None)


SYN_OPTS = {"num_classes": 4, "image_size": 16, "length": 3, "split": "train", "seed": 0, "max_objects": 2,
            "co_occurrence": 0.8, "context_alone": 0.1, "part_fraction": 0.25, "part_hidden": 0.4, "noise": 0.05,
            "group_size": 2, "min_visible": 0.4, "superclass_layout": "body", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225)}


@case("data.synthetic.SyntheticScenes.__init__")
def _(seed: int) -> Call:
    def build(**kw: Any) -> Any:
        ds = SyntheticScenes(**kw)
        return len(ds), (ds[0] if len(ds) else None)

    return Call(build, dict(SYN_OPTS), batch=None, rules={"length": Rule(0)})


@case("data.synthetic.SyntheticScenes.scene")
def _(seed: int) -> Call:
    return Call(SyntheticScenes(length=3, image_size=16).scene, {"index": 1}, batch=None, rules={"index": Rule(-3, 2)},
                allowed=(IndexError,))


@case("data.synthetic.SyntheticScenes.tensors")
def _(seed: int) -> Call:
    return Call(SyntheticScenes(length=3, image_size=16).tensors, {}, batch=None)


@functools.cache
def _tmp() -> Path:
    """One scratch folder per run (removed when the process ends)."""
    return Path(_TMPDIR.name)


_TMPDIR = tempfile.TemporaryDirectory(prefix="wsss_fuzz_")


@functools.cache
def _voc_root() -> Path:
    from test_data_voc import make_voc

    (_tmp() / "voc").mkdir()
    return make_voc(_tmp() / "voc")


@functools.cache
def _coco_root() -> Path:
    from test_data_coco import make_coco

    (_tmp() / "coco").mkdir()
    return make_coco(_tmp() / "coco")


@case("data.voc.VOC.__init__")
def _(seed: int) -> Call:
    return Call(lambda root, split, **kw: len(VOC(root, split, **kw)),
                {"root": _voc_root(), "split": "train", "transform": None, "label_file": None, "split_file": None,
                 "mask_dir": None}, batch=None)


@case("data.coco.COCO.__init__")
def _(seed: int) -> Call:
    return Call(lambda root, split, **kw: len(COCO(root, split, **kw)),
                {"root": _coco_root(), "split": "train", "transform": None, "source": "auto", "mask_dir": None,
                 "annotation_file": None, "mask_values": "index", "label_file": None, "split_file": None,
                 "skip_empty": True}, batch=None)


# ----------------------------------------------------------------------------- viz


@case("viz.colorize_mask")
def _(seed: int) -> Call:
    from wsss_blocks.viz import colorize_mask

    r = Rand(seed)
    return Call(colorize_mask, {"mask": r.masks(1)[0], "palette": None, "ignore_index": 255,
                                "ignore_color": (255, 255, 255)}, batch=None)


@case("viz.denormalize")
def _(seed: int) -> Call:
    from wsss_blocks.viz import denormalize

    r = Rand(seed)
    return Call(denormalize, {"image": r.randn(3, 6, 7), "mean": (0.485, 0.456, 0.406),
                              "std": (0.229, 0.224, 0.225)}, batch=None)


@case("viz.overlay")
def _(seed: int) -> Call:
    from wsss_blocks.viz import overlay

    r = Rand(seed)
    return Call(overlay, {"image": r.randn(3, 6, 7), "mask_or_cam": r.rand(K, 3, 4), "opacity": 0.5,
                          "palette": None, "cmap": "jet", "ignore_index": 255, "mean": (0.485, 0.456, 0.406),
                          "std": (0.229, 0.224, 0.225)}, batch=None, bounded=frozenset({"mask_or_cam"}))


@case("viz.save_grid")
def _(seed: int) -> Call:
    from wsss_blocks.viz import save_grid

    r = Rand(seed)
    path = _tmp() / "grid" / "g.png"
    return Call(save_grid, {"path": path, "images": r.randn(3, 3, 6, 7), "masks": r.masks(3, 6, 7),
                            "cams": None, "ncols": 2, "palette": None, "scale": 1, "opacity": 0.5, "pad": 1},
                batch=3)

