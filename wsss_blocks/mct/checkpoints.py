"""Released MCTformer checkpoints (V1, V2, MCTformer+) loaded into a timm ViT with ``C`` class tokens.

The three MCTformer models subclass a vendored timm-0.3-era ViT whose block, patch-embedding
and norm parameters carry the same names and shapes as a timm 1.x ``VisionTransformer``
(``global_pool="token"``, so the final norm is ``norm``). What differs:

* **Class tokens**: ``cls_token`` ``(1, C, D)``, one per class, as after
  ``mct.add_class_tokens(model, C)``.
* **Position embeddings**: V1 / V2 hold ``pos_embed`` ``(1, C + P, D)`` (a slot per class
  token, then the patches), which is the layout of the converted timm model. MCTformer+ splits
  them into ``pos_embed_cls`` ``(1, C, D)`` (added to the class tokens) and ``pos_embed_pat``
  ``(1, P, D)`` (added to the patch tokens, ``P`` from its ``input_size``, 784 at 448) and keeps
  a stale, unused ``pos_embed`` from its DeiT initialisation; the conversion joins the two
  and drops the stale one. Adding the joined embedding after the concatenation equals adding
  the parts before it.
* **Head**: V1's ``head`` (a ``Linear(D, C)``, or a grouped ``Conv1d`` under its ``fc``
  option) is never used by MCTformer (the logits are the class tokens averaged over ``D``);
  V2 and MCTformer+ replace it with the 3x3 PatchCAM convolution ``head.weight``
  ``(C, D, 3, 3)``, ``head.bias`` ``(C,)``, which has no place in a timm ViT and comes back
  separately as a ``PatchCAM`` module.

The released checkpoints are ``{"model": state_dict}`` (the per-epoch save adds
``"epoch"``), without a ``module.`` prefix; both wrappers and the prefix are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype
from wsss_blocks._validate import ShapeError, check_bool, check_instance, check_option
from wsss_blocks.mct.class_tokens import add_class_tokens
from wsss_blocks.mct.patch_head import PatchCAM

__all__ = ["LoadResult", "load_mctformer"]

VARIANTS = ("auto", "v1", "v2", "plus")
#: keys of the checkpoint objects the MCTformer scripts (and common trainers) wrap a state dict in
WRAPPERS = ("model", "state_dict", "model_state_dict")


class LoadResult(NamedTuple):
    """What ``load_mctformer`` did.

    Attributes:
        variant: ``"v1"``, ``"v2"`` or ``"plus"`` (MCTformer+), detected or as given.
        num_classes: ``C``, the checkpoint's class tokens.
        head: the PatchCAM convolution of V2 / MCTformer+ (a loaded ``PatchCAM``, an
            ``nn.Conv2d``, on the model's device and dtype, to keep beside the ViT);
            ``None`` for V1.
        size: the model's patch grid ``(h, w)`` the position embeddings now cover.
        resized_from: the checkpoint's patch grid when it differed from ``size`` and the
            position embeddings were resized; ``None`` when they were copied as they are.
        missing_keys: model keys the checkpoint did not set (empty when ``strict``).
        unexpected_keys: converted keys the model has no place for, and keys whose shapes
            differ from the model's (empty when ``strict``).
        dropped_keys: checkpoint keys left out on purpose: V1's unused head (unless the
            model has a head of the same shape) and MCTformer+'s stale ``pos_embed``.

    Examples:
        >>> r = LoadResult("v2", 20, None, (14, 14), None, [], [], [])
        >>> r.variant, r.size
        ('v2', (14, 14))
    """

    variant: str
    num_classes: int
    head: PatchCAM | None
    size: tuple[int, int]
    resized_from: tuple[int, int] | None
    missing_keys: list[str]
    unexpected_keys: list[str]
    dropped_keys: list[str]


def _unwrap(state_dict: Any) -> dict[str, Tensor]:
    """The state dict inside a checkpoint object, with a ``module.`` prefix removed."""
    obj = state_dict
    for _ in range(2):  # {"model": {...}} or {"state_dict": {...}}; at most one level in practice
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(f"state_dict: expected a state dict or a checkpoint dict, got {type(state_dict).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        keys = sorted(str(k) for k in obj)[:8]
        raise ValueError(f"state_dict: no tensors found (keys {keys}); expected MCTformer parameters")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _detect(sd: Mapping[str, Tensor]) -> str:
    if "pos_embed_cls" in sd or "pos_embed_pat" in sd:
        return "plus"
    head = sd.get("head.weight")
    return "v2" if head is not None and head.dim() == 4 else "v1"


def _require(sd: Mapping[str, Tensor], variant: str) -> None:
    """Raise when keys the variant needs are absent or the head has the wrong rank."""
    need = ["cls_token", "patch_embed.proj.weight"]
    need += ["pos_embed_cls", "pos_embed_pat"] if variant == "plus" else ["pos_embed"]
    if variant in ("v2", "plus"):
        need += ["head.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(
            f"state_dict: load_mctformer(variant={variant!r}): the checkpoint lacks {missing} "
            f"(detected variant: {_detect(sd)!r}; {len(sd)} tensors, first keys {sorted(sd)[:6]})"
        )
    if variant in ("v2", "plus") and sd["head.weight"].dim() != 4:
        raise ShapeError(
            f"state_dict: load_mctformer(variant={variant!r}): head.weight should be the PatchCAM conv (C, D, k, k), "
            f"got shape {tuple(sd['head.weight'].shape)} (a V1 checkpoint?)"
        )
    cls = sd["cls_token"]
    if cls.dim() != 3 or cls.shape[0] != 1:
        raise ShapeError(f"state_dict: cls_token: expected shape (1, C, D), got {tuple(cls.shape)}")


def _square_side(name: str, count: int) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ShapeError(
            f"state_dict: {name}: {count} patch positions do not form a square grid (MCTformer's are square)"
        )
    return side


def _resize_grid(patch_pos: Tensor, side: int, size: tuple[int, int], plus_tenth: bool) -> Tensor:
    """Bicubic resize of a ``side x side`` position grid ``(1, side*side, D)`` to ``size``.

    As the released models resize at inference: ``align_corners=False``, no antialias, with
    the scale factor ``(h + 0.1) / side`` (V1 / V2, DINO's offset) or ``h / side``
    (MCTformer+); when float rounding would give a grid off by one, the exact ``size`` is used.
    """
    h, w = size
    d = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, side, side, d).permute(0, 3, 1, 2).to(compute_dtype(patch_pos))
    off = 0.1 if plus_tenth else 0.0
    out = F.interpolate(grid, scale_factor=((h + off) / side, (w + off) / side), mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != (h, w):
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, h * w, d).to(patch_pos.dtype)


def _model_grid(model: nn.Module) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is None:
        raise TypeError(f"model: {type(model).__name__}: expected a timm VisionTransformer (patch_embed.grid_size)")
    return int(grid[0]), int(grid[1])


def _check_model(model: nn.Module, c: int, d: int) -> dict[str, tuple[int, ...]]:
    """Check the model can take the checkpoint; its key -> shape once it has ``C`` class tokens."""
    cls = getattr(model, "cls_token", None)
    pos = getattr(model, "pos_embed", None)
    if not isinstance(cls, Tensor) or not isinstance(pos, Tensor):
        raise TypeError(
            f"model: {type(model).__name__}: expected a timm VisionTransformer with a class token and position "
            "embeddings"
        )
    if int(getattr(model, "num_reg_tokens", 0) or 0) > 0 or getattr(model, "dist_token", None) is not None:
        raise ValueError("model: MCTformer has no register or distillation tokens; build the ViT without them")
    if getattr(model, "no_embed_class", False):
        raise ValueError("model: no_embed_class=True; MCTformer gives every class token a position slot")
    if cls.shape[-1] != d:
        raise ShapeError(f"model: D={cls.shape[-1]} (its cls_token), the checkpoint's (state_dict) D={d}")
    if cls.shape[1] != c and cls.shape[1] != 1:
        raise ValueError(f"model: has {cls.shape[1]} class tokens, the checkpoint {c}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cls.shape[1] == 1:  # as after add_class_tokens(model, C)
        shapes["cls_token"] = (1, c, d)
        shapes["pos_embed"] = (1, pos.shape[1] + c - 1, d)
    return shapes


def _hints(variant: str, missing: list[str], unexpected: list[str]) -> str:
    hints = []
    if any(k.startswith("head.") for k in missing):
        hints.append(
            "the checkpoint's head is the PatchCAM conv (returned as LoadResult.head): build the ViT with num_classes=0"
            if variant in ("v2", "plus")
            else "V1's head does not fit the model's (MCTformer never uses it): build the ViT with num_classes=0"
        )
    if any(k.startswith("fc_norm.") for k in missing):
        hints.append("build the ViT with global_pool='token' (MCTformer's final norm is `norm`)")
    if any(k.startswith(("patch_embed.", "blocks.", "pos_embed")) for k in unexpected + missing):
        hints.append("patch size, width, depth or grid differ from the checkpoint's?")
    return ("; " + "; ".join(hints)) if hints else ""


@torch.no_grad()
def load_mctformer(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    variant: Literal["auto", "v1", "v2", "plus"] = "auto",
    strict: bool = True,
) -> LoadResult:
    """Load a released MCTformer V1, V2 or MCTformer+ checkpoint into a timm ViT, in place.

    The ViT becomes the library's MCT form: ``C`` class tokens (``mct.add_class_tokens`` is
    applied when the model still has one), so ``mct.final_tokens`` + ``mct.class_scores``
    give MCTformer's class logits and ``mct.attention_cams`` its attention maps. Build it
    with MCTformer's backbone settings: ``timm.create_model("deit_small_patch16_224",
    num_classes=0)`` for the DeiT-S releases (``num_classes=C`` also takes V1's unused head),
    ``global_pool="token"`` (the default), no registers.

    Conversion:

    * ``variant="auto"`` detects it from the keys: ``pos_embed_cls`` / ``pos_embed_pat``
      -> MCTformer+; a 4-D ``head.weight`` -> V2; otherwise V1.
    * Blocks, patch embedding, ``norm`` and ``cls_token`` load by name, unchanged.
    * Position embeddings: V1 / V2 ``pos_embed`` as is; MCTformer+ ``pos_embed_cls`` and
      ``pos_embed_pat`` joined (class slots first) and its stale ``pos_embed`` dropped.
      When the checkpoint's (square) patch grid differs from the model's
      ``patch_embed.grid_size`` (e.g. MCTformer+ trained at 448 loaded into a 224 model), the
      patch part is resized bicubically (``align_corners=False``, no antialias) with the scale
      factor the released model uses at that size: ``(h + 0.1) / side`` for V1 / V2 and
      ``h / side`` for MCTformer+; the class slots are kept. ``resized_from`` reports it.
      Exact parity with the released models at other input sizes needs a model built for
      that size: timm's ``dynamic_img_size`` resamples differently (antialiased).
    * Head: V2 / MCTformer+'s 3x3 conv comes back as ``LoadResult.head`` (a ``PatchCAM``);
      V1's unused head loads only into a model head of the same shape, else it is dropped.

    MCTformer never applies the final ``norm`` (use ``final_tokens(final_norm=False)``, the
    default); V1 / V2 sum the maps of the last blocks (``attention_cams(fuse="sum")``, the
    released scripts use ``last_k=3``) and MCTformer+ averages them (``fuse="mean"``).

    Args:
        model: a timm ``VisionTransformer`` with one class token or the checkpoint's ``C``.
        state_dict: the state dict, or the checkpoint object around it (``{"model": ...}``,
            ``{"state_dict": ...}``; a ``module.`` prefix is removed).
        variant: ``"auto"``, ``"v1"``, ``"v2"`` or ``"plus"``.
        strict: raise (``ValueError``, naming the variant and every missing, unexpected or
            mis-shaped key) unless the converted checkpoint sets exactly the model's keys;
            ``False`` loads the keys that fit and reports the rest.

    Returns:
        ``LoadResult(variant, num_classes, head, size, resized_from, missing_keys,
        unexpected_keys, dropped_keys)``.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
        ...                         depth=1, num_heads=2, num_classes=0)
        >>> src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
        ...                         depth=1, num_heads=2, num_classes=0)
        >>> sd = add_class_tokens(src, 3).state_dict()            # an MCTformer-V2-like checkpoint:
        >>> sd["head.weight"], sd["head.bias"] = torch.randn(3, 32, 3, 3), torch.zeros(3)
        >>> out = load_mctformer(vit, {"model": sd})
        >>> out.variant, vit.cls_token.shape, out.head.weight.shape
        ('v2', torch.Size([1, 3, 32]), torch.Size([3, 32, 3, 3]))
    """
    check_instance("model", model, nn.Module, "an nn.Module (a timm VisionTransformer)")
    check_option("variant", variant, VARIANTS)
    strict = check_bool("strict", strict)
    sd = _unwrap(state_dict)
    kind = _detect(sd) if variant == "auto" else variant
    _require(sd, kind)
    cls = sd["cls_token"]
    c, d = int(cls.shape[1]), int(cls.shape[2])
    target = _check_model(model, c, d)
    size = _model_grid(model)

    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    skip = {"pos_embed", "pos_embed_cls", "pos_embed_pat"}
    for k, v in sd.items():
        if k in skip or k.startswith("head."):
            continue
        converted[k] = v
    if kind == "plus":
        cls_pos, patch_pos = sd["pos_embed_cls"], sd["pos_embed_pat"]
        if "pos_embed" in sd:
            dropped.append("pos_embed")
        if tuple(cls_pos.shape) != (1, c, d):
            raise ShapeError(f"state_dict: pos_embed_cls: expected shape (1, {c}, {d}), got {tuple(cls_pos.shape)}")
        name = "pos_embed_pat"
    else:
        pos = sd["pos_embed"]
        if pos.dim() != 3 or pos.shape[1] <= c or pos.shape[2] != d:
            raise ShapeError(f"state_dict: pos_embed: expected shape (1, {c} + P, {d}), got {tuple(pos.shape)}")
        cls_pos, patch_pos = pos[:, :c], pos[:, c:]
        name = "pos_embed"
    if patch_pos.dim() != 3 or patch_pos.shape[2] != d:
        raise ShapeError(f"state_dict: {name}: expected shape (1, P, {d}), got {tuple(patch_pos.shape)}")
    side = _square_side(name, int(patch_pos.shape[1]))
    resized_from = None
    if (side, side) != size:
        patch_pos = _resize_grid(patch_pos, side, size, plus_tenth=kind != "plus")
        resized_from = (side, side)
    converted["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)

    head: PatchCAM | None = None
    head_keys = [k for k in sd if k.startswith("head.")]
    if kind == "v1":
        if all(target.get(k) == tuple(sd[k].shape) for k in head_keys):  # all or nothing
            converted.update((k, sd[k]) for k in head_keys)
        else:
            dropped.extend(head_keys)
    else:
        w = sd["head.weight"]
        b = sd.get("head.bias")
        if w.shape[0] != c or w.shape[1] != d or w.shape[2] != w.shape[3] or w.shape[2] % 2 != 1:
            raise ShapeError(
                f"state_dict: head.weight: expected the PatchCAM conv ({c}, {d}, k, k), got {tuple(w.shape)}"
            )
        ref = model.get_parameter("cls_token")
        head = PatchCAM(d, c, kernel_size=int(w.shape[2]), bias=b is not None, device=ref.device, dtype=ref.dtype)
        head.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
        extra = [k for k in head_keys if k not in ("head.weight", "head.bias")]
        if extra:
            raise ValueError(f"state_dict: load_mctformer(variant={kind!r}): unexpected head keys {extra}")

    fits = {k: v for k, v in converted.items() if target.get(k) == tuple(v.shape)}
    missing = [k for k in target if k not in fits]
    unexpected = [k for k in converted if k not in fits]
    if strict and (missing or unexpected):
        shapes = [f"{k}: {tuple(converted[k].shape)} vs model {target[k]}" for k in unexpected if k in target]
        raise ValueError(
            f"state_dict: load_mctformer(variant={kind!r}): missing keys {missing}, unexpected keys {unexpected}"
            + (f", shape mismatches [{'; '.join(shapes)}]" if shapes else "")
            + _hints(kind, missing, unexpected)
        )
    if model.get_parameter("cls_token").shape[1] != c:
        add_class_tokens(model, c)
    model.load_state_dict(fits, strict=strict)
    return LoadResult(kind, c, head, size, resized_from, missing, unexpected, dropped)
