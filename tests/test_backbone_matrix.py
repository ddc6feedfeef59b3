"""Which method runs on which backbone: every method's main entry points on every backbone family.

Each cell of the matrix runs one method on one tiny random-init backbone (``pretrained=False``,
at most two blocks or one block per stage, images of 32-64 pixels): a training step (forward,
loss, backward; the loss and every gradient finite, the backbone reached by the gradient)
and the method's maps (CAMs, probabilities or refined CAMs; finite, on the backbone's grid).
A cell that does not apply is proven so: the library's own entry point refuses the backbone
(the exception type and message are checked), so a cell cannot stay "n.a." after the library
learns to handle it.

The table the run produces is committed as ``docs/backbones_matrix.md`` and included by
``docs/backbones.md``; ``test_committed_table_is_what_the_run_produces`` fails when they
differ. Rewrite it with ``python tests/test_backbone_matrix.py`` (from the repository root).

The last section holds the tests behind the claims of the "Coming from ..." guides
(``docs/guides/*.md``) that no other test file proves: ToCo's network outputs and multi-scale
CAM, ToCo's encoder weights in a timm ViT, SIPE's normalisation order of its seed mask, and the
two biases of a torch LSTM against Keras' one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `python tests/test_backbone_matrix.py` from the repository root
    sys.path.insert(0, str(TESTS))

import vendored_vits as vv  # noqa: E402

from wsss_blocks import doei, mct  # noqa: E402
from wsss_blocks.cam import multiscale_cam, normalize_cam, token_pseudo_labels  # noqa: E402
from wsss_blocks.cpal import CPAL  # noqa: E402
from wsss_blocks.cpews import CPEWSHead, CPEWSLoss, cpews_taps  # noqa: E402
from wsss_blocks.doei import DOEIConfig  # noqa: E402
from wsss_blocks.pcm import (  # noqa: E402
    HVBiLSTM,
    PatchClassifier,
    ViTPCM,
    dihedral_transform,
    et_loss,
    mce_loss,
    mosaic,
    pseudo_mask,
    random_dihedral_codes,
    unmosaic,
)
from wsss_blocks.swtformer import SWTformer  # noqa: E402
from wsss_blocks.tokens import stage_taps, tokens_to_grid, vit_taps  # noqa: E402
from wsss_blocks.utils import eval_mode  # noqa: E402

ROOT = TESTS.parent
TABLE = ROOT / "docs" / "backbones_matrix.md"
K = 3  # classes
LABELS = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])  # every class present and absent
ACTIVE = DOEIConfig(st_p2c=0.1, st_c2c=0.25, af_p2c=1.5, sf_p2c=0.7, af_c2c=1.3, sf_c2c=0.6)


# --------------------------------------------------------------------------- backbones


class Backbone(NamedTuple):
    """One column of the matrix: a tiny model of a family and the images it takes."""

    label: str
    kind: str  # "vit", "swin" or "cnn"
    build: Callable[[], nn.Module]
    image_size: tuple[int, int]


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return make


BACKBONES: dict[str, Backbone] = {
    "vit": Backbone("timm ViT (`vit_*`)", "vit", lambda: _timm("vit_tiny_patch16_224", **_TINY), (32, 32)),
    "deit_distilled": Backbone(
        "DeiT, distilled (`deit_*_distilled_*`)", "vit",
        lambda: _timm("deit_tiny_distilled_patch16_224", **_TINY), (32, 32)),
    "deit3": Backbone(  # layer scale at 0.1, not timm's 1e-6 init, so that DOEI's change shows
        "DeiT III (`deit3_*`)", "vit", lambda: _timm("deit3_small_patch16_224", init_values=0.1, **_TINY), (32, 32)),
    "beit": Backbone("BEiT (`beit_*`)", "vit", lambda: _timm("beit_base_patch16_224", **_TINY), (32, 32)),
    "eva": Backbone("EVA-02 (`eva02_*`)", "vit", lambda: _timm("eva02_tiny_patch14_224", **_TINY), (32, 32)),
    "registers": Backbone(
        "ViT with 4 register tokens (`reg_tokens=4`)", "vit",
        lambda: _timm("vit_tiny_patch16_224", reg_tokens=4, **_TINY), (32, 32)),
    "dynamic": Backbone(
        "ViT, `dynamic_img_size=True`, 48 x 32 images", "vit",
        lambda: _timm("vit_tiny_patch16_224", dynamic_img_size=True, **_TINY), (48, 32)),
    "copy_toco": Backbone(
        "ToCo / CPEWS ViT copy, 48 x 32 images", "vit",
        _seeded(lambda: vv.ToCoViTLike(depth=2, aux_layer=-2)), (48, 32)),
    "copy_timm04": Backbone(
        "timm 0.4 ViT copy (the layout of DeiT's checkpoints)", "vit", _seeded(lambda: vv.OldTimmViT(depth=2)),
        (32, 32)),
    "copy_mct": Backbone(
        "MCTformer-V1 ViT copy (C class tokens)", "vit",
        _seeded(lambda: vv.MCTformerV1Like(num_classes=K, depth=2)), (32, 32)),
    "swin": Backbone(
        "Swin (`swin_*`)", "swin",
        lambda: _timm("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      window_size=2, img_size=64),
        (64, 64)),
    "resnet": Backbone(
        "ResNet at output stride 16 (`resnet*`)", "cnn",
        lambda: _timm("resnet10t", channels=(16, 32, 64, 64), stem_width=8, output_stride=16, num_classes=0),
        (64, 64)),
}


def images_for(bb: Backbone, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, *bb.image_size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- cells


class Cell(NamedTuple):
    """``works`` (with an optional note on how) or ``n.a.`` with the reason."""

    works: bool
    note: str = ""


class NotApplicable(Exception):
    """Raised by a runner whose backbone the library refuses (after checking the refusal)."""


def refused(call: Callable[[], object], error: type[Exception], match: str, reason: str) -> NotApplicable:
    """Check that ``call`` raises ``error`` matching ``match``; the ``NotApplicable`` to raise."""
    with pytest.raises(error, match=match):
        call()
    return NotApplicable(reason)


def check_training_step(model: nn.Module, loss: Tensor) -> None:
    """Backward through ``loss``: finite, and the backbone gets finite, non-zero gradients."""
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no gradient reached the backbone"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def check_maps(maps: Tensor, channels: int, grid: tuple[int, int] | None = None) -> None:
    assert maps.dim() == 4 and maps.shape[1] == channels, maps.shape
    if grid is not None:
        assert tuple(maps.shape[-2:]) == grid, (maps.shape, grid)
    assert torch.isfinite(maps).all()


def final_map(bb: Backbone, model: nn.Module, images: Tensor) -> Tensor:
    """The backbone's final feature map ``(B, D, h, w)``: ViT patch tokens, last Swin stage, CNN output."""
    if bb.kind == "vit":
        taps = vit_taps(model, images, layers=())
        return tokens_to_grid(taps.final, taps.size)
    if bb.kind == "swin":
        return stage_taps(model, images, stages=(-1,), final_norm=True).features[0]
    return model.forward_features(images)


def _no_blocks(model: nn.Module, call: Callable[[], object], what: str) -> NotApplicable:
    """The refusal of a ViT-only entry point by a Swin or a CNN (they have no ``.blocks``)."""
    return refused(call, TypeError, r"has no \.blocks",
                   f"{what} reads a ViT's blocks (an intermediate and the final block on one token grid); "
                   "a Swin or a CNN has none")


def run_cpews(bb: Backbone, model: nn.Module) -> Cell:
    images = images_for(bb)
    labels = LABELS[:2]
    if bb.kind != "vit":
        raise _no_blocks(model, lambda: cpews_taps(model, images), "`cpews_taps`")
    taps = cpews_taps(model, images, mid_layer=-2)  # the first of two blocks (CPEWS: -3 of 12)
    (mid,) = taps.intermediate.values()
    d = taps.final.shape[-1]
    head = CPEWSHead(d, K)
    out = head(mid, taps.final, taps.size)
    crit = CPEWSLoss.from_preset(d, K, preset="paper", superclasses={"a": (0, 1), "b": (2,)},
                                 pool={"num_prototypes": 2})
    with torch.no_grad():
        crit.pool.update(taps.final, out.cams_final, labels, class_probs=out.logits_final.sigmoid())
    crit.pool.finalize()
    assert crit.pool.is_built
    masks_mid = token_pseudo_labels(normalize_cam(out.cams_mid.detach()), labels, taps.size)
    losses = crit(logits_mid=out.logits_mid, logits_final=out.logits_final, features_final=taps.final,
                  cams_final=out.cams_final, masks_mid=masks_mid, labels=labels)
    assert all(torch.isfinite(t) for t in losses.terms.values()) and losses.terms["pdl"] > 0
    check_training_step(model, losses.loss)
    check_maps(out.cams_final, K, taps.size)
    check_maps(out.cams_mid, K, taps.size)
    return Cell(True)


def run_cpal(bb: Backbone, model: nn.Module) -> Cell:
    images = images_for(bb)
    labels = LABELS[:2]
    features = final_map(bb, model, images)
    d = features.shape[1]
    classifier = nn.Conv2d(d, K, 1, bias=False)
    cpal = CPAL(d, K, proj_dim=8, capacity=8, num_prototypes=2, top_k=2, recluster_every=1, warn_unbuilt=False)
    for step in range(2):  # the first step fills the bank (its loss is 0 by design), the second reads it
        if step:
            features = final_map(bb, model, images)
        cams = classifier(features)
        out = cpal(features, normalize_cam(cams), labels)
        loss = F.multilabel_soft_margin_loss(cams.mean((-2, -1)), labels.float()) + out.loss
        if step:
            assert cpal.is_built and out.loss > 0
            check_training_step(model, loss)
        cpal.update(out.prototypes.detach(), out.prototype_valid)
    check_maps(out.pacam, K + 1, tuple(features.shape[-2:]))
    return Cell(True)


def run_pcm(bb: Backbone, model: nn.Module) -> Cell:
    images = images_for(bb, 4)  # ViT-PCM's mosaics take images in fours
    labels = LABELS
    if bb.kind == "vit":
        pcm = ViTPCM.from_preset(model, K, preset="official", crop=16)
        losses = pcm.training_losses(images, labels)
        assert set(losses.terms) == {"mce", "et", "l2"}
        check_training_step(model, losses.loss)
        pcm.eval()
        probs = pcm(images).probs
        grid = vit_taps(model, images[:1], layers=()).size
        check_maps(probs, K + 1, grid)
        assert pseudo_mask(probs, labels, size=bb.image_size).shape == (4, *bb.image_size)
        return Cell(True)
    # a Swin or a CNN: `ViTPCM` reads a ViT, so the head runs on the final map, as a loop that owns its backbone
    with pytest.raises(TypeError, match=r"has no \.blocks"):
        ViTPCM(model, K)(images)
    stride = bb.image_size[0] // final_map(bb, model, images[:1]).shape[-2]
    d = final_map(bb, model, images[:1]).shape[1]
    head = nn.Sequential(HVBiLSTM(d), PatchClassifier(d, K))
    codes = random_dihedral_codes(batch_size=4, generator=torch.Generator().manual_seed(0))
    x1 = dihedral_transform(images, codes)
    with eval_mode(model, head), torch.no_grad():
        teacher = head(final_map(bb, model, x1))
    out = head(final_map(bb, model, x1))
    tiles, record = mosaic(images, crop=2 * stride, patch_size=stride, generator=torch.Generator().manual_seed(0))
    student = unmosaic(head(final_map(bb, model, tiles)).probs)
    loss = (mce_loss(out.pooled_probs, labels) + et_loss(student, teacher.probs, labels, record, teacher_codes=codes)
            + head[1].l2_penalty())
    check_training_step(model, loss)
    check_maps(out.probs, K + 1)
    return Cell(True, "`ViTPCM` reads a ViT; its parts (`HVBiLSTM`, `PatchClassifier`, `mosaic`, `mce_loss`, "
                      "`et_loss`) run on the final feature map")


def _class_token_model(bb: Backbone, model: nn.Module, method: str) -> tuple[nn.Module, str]:
    """The model with one class token per class, and how it got them; ``NotApplicable`` where it cannot.

    Where a ViT cannot get one class token per class, DOEI is still checked to run on the class
    tokens the model has (PPDO only with one; no per-class maps): the page says so.
    """
    images = images_for(bb)
    if bb.kind == "swin":
        if method == "DOEI":
            raise refused(lambda: doei.patch(model), TypeError, "unsupported attention class .*WindowAttention",
                          "No class token, and window attention (`doei.patch` refuses Swin's `WindowAttention`)")
        raise refused(lambda: mct.add_class_tokens(model, K), ValueError, "has no class-token parameter",
                      "No class token (`add_class_tokens` refuses a model without one)")
    if bb.kind == "cnn":
        if method == "DOEI":
            raise refused(lambda: doei.patch(model), ValueError, "no attention module found",
                          "No attention and no class token (`doei.patch` finds no attention module)")
        raise refused(lambda: mct.add_class_tokens(model, K), ValueError, "has no class-token parameter",
                      "No class token (`add_class_tokens` refuses a model without one)")
    if model.cls_token.shape[1] == K:
        return model, ""
    reason = None
    if getattr(model, "dist_token", None) is not None:
        reason = refused(lambda: mct.add_class_tokens(model, K), ValueError, "distillation token",
                         "Needs one class token per class: `add_class_tokens` refuses a distillation token")
    elif any(getattr(m, "relative_position_index", None) is not None for m in model.modules()):
        reason = refused(lambda: mct.add_class_tokens(model, K), ValueError, "relative position bias",
                         "Needs one class token per class: `add_class_tokens` refuses BEiT's relative position "
                         "bias, which is sized for one class token")
    elif isinstance(model, vv.ToCoViTLike):  # its own embedding code places exactly one class token
        fresh = bb.build()
        mct.add_class_tokens(fresh, K)
        reason = refused(lambda: fresh.forward_features(images), RuntimeError, "must match",
                         "Needs one class token per class: ToCo's own position-embedding code places exactly "
                         "one (`add_class_tokens` succeeds, the model's forward then fails)")
    if reason is not None:
        if method == "DOEI":  # what still runs: DOEI on the class tokens the model has
            with doei.patch(model, config=ACTIVE):
                tokens = mct.final_tokens(model, images)
                assert torch.isfinite(torch.cat(tokens, 1)).all()
                assert mct.attention_cams(model, images, last_k=2).shape[1] == tokens.class_tokens.shape[1] < K
        raise reason
    mct.add_class_tokens(model, K)
    return model, "After `add_class_tokens`"


def run_mct(bb: Backbone, model: nn.Module) -> Cell:
    model, how = _class_token_model(bb, model, "MCT")
    images = images_for(bb)
    tokens = mct.final_tokens(model, images)
    scores = mct.class_scores(tokens.class_tokens)
    assert scores.shape == (2, K)
    check_training_step(model, F.multilabel_soft_margin_loss(scores, LABELS[:2].float()))
    grid = vit_taps(model, images[:1], layers=()).size
    for refine in (False, True):
        check_maps(mct.attention_cams(model, images, last_k=2, refine=refine), K, grid)
    return Cell(True, how)


def run_doei(bb: Backbone, model: nn.Module) -> Cell:
    model, how = _class_token_model(bb, model, "DOEI")
    images = images_for(bb)
    keys = list(model.state_dict())
    plain = mct.final_tokens(model, images).features.detach()
    with doei.patch(model, config=ACTIVE):
        tokens = mct.final_tokens(model, images)
        assert (tokens.features - plain).abs().max() > 1e-5, "DOEI changed nothing"
        scores = mct.class_scores(tokens.class_tokens)
        check_training_step(model, F.multilabel_soft_margin_loss(scores, LABELS[:2].float()))
        grid = vit_taps(model, images[:1], layers=()).size
        check_maps(mct.attention_cams(model, images, last_k=2), K, grid)
    assert list(model.state_dict()) == keys
    assert torch.equal(mct.final_tokens(model, images).features, plain)  # undone exactly
    return Cell(True, how)


def run_swtformer(bb: Backbone, model: nn.Module) -> Cell:
    labels = LABELS[:2]
    if bb.kind == "vit":
        if hasattr(model, "feature_info"):  # timm ViTs list their blocks as features, all at one stride
            err, match = ValueError, "expected a hierarchical model with 4 stages whose strides double"
        else:
            err, match = TypeError, "has no feature_info"
        raise refused(lambda: SWTformer(model, K), err, match,
                      "SWTformer needs a four-stage hierarchical backbone (strides 4 to 32); a ViT has one grid")
    if bb.kind == "cnn":
        raise refused(lambda: SWTformer(model, K), ValueError,
                      "expected a hierarchical model with 4 stages whose strides double",
                      "SWTformer needs four stages of strides 4 to 32 (a Swin); this ResNet lists five "
                      "feature levels and stops at stride 16")
    images = images_for(bb)
    net = SWTformer.from_preset(model, K, preset="paper")
    out = net(images, labels)
    assert set(out.terms) == {"cls", "gsc", "ccl"} and all(torch.isfinite(t) for t in out.terms.values())
    check_training_step(model, out.loss)
    check_maps(out.cams, K)
    check_maps(out.rcams, K + 1)
    return Cell(True)


METHODS: dict[str, tuple[str, Callable[[Backbone, nn.Module], Cell]]] = {
    "cpews": ("CPEWS", run_cpews),
    "cpal": ("CPAL", run_cpal),
    "pcm": ("ViT-PCM", run_pcm),
    "doei": ("DOEI", run_doei),
    "mct": ("MCT", run_mct),
    "swtformer": ("SWTformer", run_swtformer),
}


@functools.cache
def cell(method: str, backbone: str) -> Cell:
    """Run one cell on a fresh backbone (``works``), or check the library's refusal (``n.a.``)."""
    bb = BACKBONES[backbone]
    model = bb.build().train()
    try:
        return METHODS[method][1](bb, model)
    except NotApplicable as na:
        return Cell(False, str(na))


# --------------------------------------------------------------------------- the table


def render_table(cells: dict[tuple[str, str], Cell]) -> str:
    """The markdown snippet: backbones as rows, methods as columns, notes numbered below."""
    notes: list[str] = []

    def ref(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    header = "| backbone | " + " | ".join(label for label, _ in METHODS.values()) + " |"
    lines = [
        "<!-- generated by tests/test_backbone_matrix.py: do not edit; rewrite with "
        "`python tests/test_backbone_matrix.py` -->",
        "",
        header,
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for b, bb in BACKBONES.items():
        row = []
        for m in METHODS:
            c = cells[(m, b)]
            if c.works:
                row.append("works" + (f" {ref(c.note)}" if c.note else ""))
            else:
                row.append(f"n.a. {ref(c.note)}")
        lines.append(f"| {bb.label} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i}. {text}." for i, text in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def all_cells() -> dict[tuple[str, str], Cell]:
    return {(m, b): cell(m, b) for b in BACKBONES for m in METHODS}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", list(METHODS))
def test_cell(method, backbone):
    result = cell(method, backbone)
    assert isinstance(result, Cell)


def test_every_method_works_on_some_backbone_and_every_backbone_takes_some_method():
    cells = all_cells()
    assert all(any(cells[(m, b)].works for b in BACKBONES) for m in METHODS)
    assert all(any(cells[(m, b)].works for m in METHODS) for b in BACKBONES)


def test_committed_table_is_what_the_run_produces():
    want = render_table(all_cells())
    have = TABLE.read_text(encoding="utf-8") if TABLE.exists() else ""
    assert have == want, (
        f"{TABLE.relative_to(ROOT)} is stale: rewrite it with `python tests/test_backbone_matrix.py` "
        f"from the repository root.\n--- run produced ---\n{want}"
    )



# --------------------------------------------------------------------------- claims of the "Coming from ..." guides
#
# The guides (docs/guides/*.md) point here for the claims no other test file proves. References
# of the official code's computations are written from their description, never copied.


def _toco_network(depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return vv.ToCoNetworkLike(vv.ToCoViTLike(depth=depth), num_classes=K + 1).eval()


def _head_from_toco(net: nn.Module) -> CPEWSHead:
    """A ``CPEWSHead`` holding the ToCo network's two 1x1 classifiers (``(K, D, 1, 1)`` -> ``(K, D)``)."""
    head = CPEWSHead(net.encoder.embed_dim, K)
    with torch.no_grad():
        head.classifier_final.weight.copy_(net.classifier.weight[:, :, 0, 0])
        head.classifier_mid.weight.copy_(net.aux_classifier.weight[:, :, 0, 0])
    return head


def test_toco_network_logits_cams_and_tokens_from_taps_and_head():
    """cpews_taps + CPEWSHead on ToCo's own encoder give its network's logits, CAMs and token map."""
    net = _toco_network()
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cls_final, _, fmap, cls_mid = net(x)
        cam_mid, cam_final = net(x, cam_only=True)
        taps = cpews_taps(net.encoder, x, mid_layer=-3)
        (mid,) = taps.intermediate.values()
        out = _head_from_toco(net)(mid, taps.final, taps.size)
    torch.testing.assert_close(tokens_to_grid(taps.final, taps.size), fmap, atol=0, rtol=0)
    for got, want in ((out.logits_final, cls_final), (out.logits_mid, cls_mid), (out.cams_final, cam_final),
                      (out.cams_mid, cam_mid)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def toco_multi_scale_cam(net: nn.Module, images: Tensor, scales=(1.0, 0.5, 1.5)) -> tuple[Tensor, Tensor]:
    """ToCo's multi-scale CAM pass: per scale the batch and its flip in one call, CAMs resized to the
    input, the flip pair fused by max, ReLU; summed over scales; min-max normalised with 1e-5."""
    b, _, h, w = images.shape
    sums = [torch.zeros(0), torch.zeros(0)]
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(int(s * h), int(s * w)), mode="bilinear",
                                                  align_corners=False)
        cam_mid, cam_final = net(torch.cat([x, x.flip(-1)]), cam_only=True)
        for i, cam in enumerate((cam_final, cam_mid)):
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            cam = torch.maximum(cam[:b], cam[b:].flip(-1)).relu()
            sums[i] = cam if not sums[i].numel() else sums[i] + cam
    out = []
    for cam in sums:
        cam = cam - cam.amin((-2, -1), keepdim=True)
        out.append(cam / (cam.amax((-2, -1), keepdim=True) + 1e-5))
    return out[0], out[1]


def test_toco_multi_scale_cam_equals_multiscale_cam_and_minmax():
    net = _toco_network()
    head = _head_from_toco(net)
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(3))

    def cam_fn(images):  # both branches in one call: the min-max runs per channel
        taps = cpews_taps(net.encoder, images, mid_layer=-3)
        out = head(*taps.intermediate.values(), taps.final, taps.size)
        return torch.cat([out.cams_final, out.cams_mid], 1)

    with torch.no_grad():
        want_final, want_mid = toco_multi_scale_cam(net, x)
    cams = normalize_cam(multiscale_cam(cam_fn, x, scales=(1.0, 0.5, 1.5)), mode="minmax")
    got_final, got_mid = cams.split(K, dim=1)
    torch.testing.assert_close(got_final, want_final, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_mid, want_mid, atol=1e-5, rtol=1e-4)


def test_toco_encoder_weights_in_timm_equal_at_the_checkpoint_size_only():
    """ToCo's encoder keys load strictly into a timm ViT. At the size its position embeddings were
    saved for the tokens agree; elsewhere timm's resampling (antialiased bicubic) differs from
    ToCo's own (bicubic to the new grid on every forward, no antialias)."""
    torch.manual_seed(0)
    toco = vv.ToCoViTLike(depth=2, aux_layer=-2).eval()
    with torch.no_grad():  # a non-trivial position embedding, as a trained one is
        toco.pos_embed.add_(torch.randn(toco.pos_embed.shape))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True,
                            **_TINY).eval()
    vit.load_state_dict(toco.state_dict(), strict=True)
    for size, equal in (((32, 32), True), ((48, 40), False)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            _, want, _ = toco.forward_features(x)
            got = vit_taps(vit, x, layers=()).final
        gap = float((got - want).abs().max())
        assert (gap < 1e-5) if equal else (gap > 1e-3), (size, gap)


def sipe_seed_mask(features: Tensor, seeds: Tensor, labels: Tensor, size: tuple[int, int]) -> Tensor:
    """SIPE's order: the raw IS-CAM (ReLU cosine to each seed prototype) upsampled to the image,
    then divided by its maximum + 1e-5, then the arg-max over background and present classes."""
    protos = (seeds[:, :, None] * features[:, None]).mean((-2, -1))  # global mean: scale-free under cosine
    raw = F.cosine_similarity(features[:, None], protos[..., None, None], dim=2).relu()
    up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
    up = up / (up.amax((-2, -1), keepdim=True) + 1e-5)
    allowed = torch.cat([torch.ones_like(labels[:, :1]), labels], 1).bool()
    return up.masked_fill(~allowed[:, :, None, None], -1.0).argmax(1)


def test_sipe_normalises_its_seed_mask_after_upsampling_the_library_before():
    """rcam_pseudo_mask(refine_cams(...)) max-normalises on the feature grid, then upsamples; SIPE
    upsamples, then normalises. Measured on synthetic scenes (stride-16 features from the masks,
    plus noise): a few pixels in a thousand differ, each one a near tie of two classes."""
    from wsss_blocks.data import SyntheticScenes
    from wsss_blocks.swtformer import rcam_pseudo_mask, refine_cams

    classes, side, stride = 6, 256, 16
    scenes = SyntheticScenes(num_classes=classes, image_size=side, length=16, seed=0)
    gen = torch.Generator().manual_seed(0)
    changed = total = 0
    for i in range(len(scenes)):
        item = scenes[i]
        labels = item["labels"][None].long()
        onehot = F.one_hot(item["mask"][None].clamp(max=classes), classes + 1).permute(0, 3, 1, 2).float()
        pooled = F.avg_pool2d(onehot, stride)  # class fractions per stride-16 cell
        features = torch.cat([pooled, 0.6 * torch.randn(1, 8, *pooled.shape[-2:], generator=gen)], 1)
        allowed = torch.cat([torch.ones(1, 1), labels.float()], 1)[:, :, None, None]
        seeds = F.one_hot((pooled * allowed).argmax(1), classes + 1).permute(0, 3, 1, 2).bool()
        ours = rcam_pseudo_mask(refine_cams(features, seeds), labels, size=(side, side))
        sipe = sipe_seed_mask(features, seeds, labels, (side, side))
        differ = ours != sipe
        changed += int(differ.sum())
        total += differ.numel()
        if differ.any():  # every changed pixel is a near tie in SIPE's map
            protos = (seeds[:, :, None] * features[:, None]).mean((-2, -1))
            raw = F.cosine_similarity(features[:, None], protos[..., None, None], dim=2).relu()
            up = F.interpolate(raw, size=(side, side), mode="bilinear", align_corners=False)
            up = (up / (up.amax((-2, -1), keepdim=True) + 1e-5)).masked_fill(allowed == 0, -1.0)
            top2 = up.topk(2, dim=1).values
            assert float((top2[:, 0] - top2[:, 1])[differ].max()) < 0.05
    fraction = changed / total
    assert 1e-4 < fraction < 1e-2, fraction


def test_torch_lstm_has_two_biases_that_move_the_effective_bias_twice_as_far():
    """nn.LSTM adds bias_ih and bias_hh; Keras' LSTM has one bias. Both torch biases get the same
    gradient, so one Adam (or SGD) step moves their sum twice as far as Keras moves its single
    bias. Freezing bias_hh (zero after keras_init) restores the Keras step."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)

    def step(freeze_hh: bool) -> tuple[Tensor, Tensor]:
        torch.manual_seed(1)
        hv = HVBiLSTM(8, dropout=0.0, dtype=torch.float64)
        if freeze_hh:
            for name, p in hv.named_parameters():
                if "bias_hh" in name:
                    p.requires_grad_(False)
        before = hv.lstm_h.bias_ih_l0.detach() + hv.lstm_h.bias_hh_l0.detach()
        opt = torch.optim.Adam([p for p in hv.parameters() if p.requires_grad], lr=1e-3, eps=1e-7)
        hv(x).square().mean().backward()
        grad = hv.lstm_h.bias_ih_l0.grad.clone()
        if not freeze_hh:
            assert torch.equal(hv.lstm_h.bias_hh_l0.grad, grad)  # one gradient, two parameters
        opt.step()
        after = hv.lstm_h.bias_ih_l0.detach() + hv.lstm_h.bias_hh_l0.detach()
        return after - before, grad

    moved_two, grad = step(False)
    moved_one, grad_one = step(True)
    torch.testing.assert_close(grad, grad_one)
    # Keras: one bias, the same gradient, the same Adam step (lr * g / (|g| + eps) at step 1)
    keras = -1e-3 * grad / (grad.abs() + 1e-7)
    torch.testing.assert_close(moved_one, keras, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(moved_two, 2 * keras, atol=1e-12, rtol=1e-9)


if __name__ == "__main__":
    torch.set_num_threads(1)
    TABLE.write_text(render_table(all_cells()), encoding="utf-8")
    print(TABLE.read_text(encoding="utf-8"))
