"""Command line and configuration of the reference trainer: parse, fill per-dataset defaults, validate.

One concept: :class:`TrainConfig`, the one source of every flag: each field's type, default
and ``metadata`` (help text, flag name, metavar) build the command line in :func:`build_parser`
(``--field-name``; a ``bool`` that defaults to ``True`` is switched off with ``--no-field-name``,
one that defaults to ``False`` on with ``--field-name``; a ``Literal`` type gives the choices).
Fields left unset (``None``) are filled from :data:`DATASET_DEFAULTS` for the chosen ``--data``
(values from ToCo / CPEWS for VOC and COCO, tuned for a 2-core CPU for the synthetic scenes),
then :func:`validate` raises :class:`ConfigError` (a ``ValueError``) naming the bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

__all__ = ["TrainConfig", "ConfigError", "DATASET_DEFAULTS", "build_parser", "is_swin_name", "parse_config",
           "parse_recipe_options", "validate"]


class ConfigError(ValueError):
    """A command-line / configuration error; the message names the flag."""


def _arg(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A :class:`TrainConfig` field: ``default`` plus the command-line metadata (``help``, and
    ``flag`` / ``metavar`` / ``append`` overrides). For a ``bool`` defaulting to ``True`` the help
    describes the ``--no-...`` flag."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """The resolved configuration of one run (saved as ``config.json``)."""

    recipe: str = _arg("cpews", "recipe name (see examples/README.md)")
    baseline: Literal["auto", "on", "off"] = _arg(
        "auto", "also train the baseline recipe and print a comparison (auto: synthetic data only)")
    opts: dict[str, str] = _arg({}, "recipe option, repeatable", flag="--opt", metavar="KEY=VALUE", append=True)
    data: Literal["synthetic", "voc", "coco"] = _arg("synthetic")
    data_root: str | None = _arg(None, "dataset root for voc / coco")
    train_length: int | None = _arg(None, "synthetic: training items per epoch")
    scene: dict[str, str] = _arg({}, "synthetic: a SyntheticScenes keyword (num_classes, group_size, "
                                 "superclass_layout, co_occurrence, context_alone, ...), repeatable",
                                 flag="--scene", metavar="KEY=VALUE", append=True)
    # backbone
    model: str | None = _arg(None, "any timm ViT name, or a Swin (swin_*, swinv2_*)")
    pretrained: str | None = _arg(None, "local weights file (.pth/.bin/.safetensors/.npz); never downloads",
                                  metavar="FILE")
    img_size: int | None = _arg(None, "training crop / input size")
    patch_size: int | None = _arg()
    depth: int | None = _arg(None, "ViT: number of blocks")
    depths: tuple[int, ...] | None = _arg(None, "Swin: blocks per stage, e.g. 1,1")
    embed_dim: int | None = _arg()
    num_heads: tuple[int, ...] | None = _arg(None, "ViT: one value; Swin: one per stage, e.g. 2,4")
    window_size: int | None = _arg(None, "Swin: attention window (fit it to the small image)")
    dynamic_size: bool = _arg(True, "off: fixed input size (multi-scale evaluation and VOC/COCO validation "
                              "need dynamic size)")
    drop_path: float = _arg(0.0, "stochastic depth rate of the backbone (timm drop_path_rate)")
    # schedule
    iterations: int | None = _arg()
    batch_size: int | None = _arg(None, "per process")
    lr: float | None = _arg(None, "backbone learning rate (heads get x head-lr-mult)")
    head_lr_mult: float = _arg(10.0)
    warmup: int | None = _arg()
    warmup_ratio: float = _arg(1e-6)
    power: float = _arg(0.9)
    weight_decay: float = _arg(0.01)
    clip_grad: float | None = _arg(None, "max gradient norm (off by default)")
    # pseudo labels / CAM evaluation
    low: float | None = _arg(None, "pseudo-label background threshold")
    high: float | None = _arg(None, "pseudo-label foreground threshold")
    cam_threshold: float | None = _arg(None, "background score for CAM mIoU")
    # end-to-end segmentation
    seg: bool = _arg(False, "also train a LargeFOV decoder on PAR-refined CAM pseudo labels (seg_loss)")
    seg_warmup: float = _arg(0.5, "fraction of the schedule before the seg loss starts")
    seg_crf: bool = _arg(False, "--seg: also report seg_crf_miou, the decoder's probabilities refined by a "
                         "dense CRF (needs the crf extra: pip install wsss_blocks[crf])")
    # evaluation
    eval_every: int | None = _arg()
    eval_images: int | None = _arg()
    eval_batch_size: int | None = _arg()
    eval_scales: tuple[float, ...] = _arg((1.0,), "e.g. 1.0,0.5,1.5")
    eval_flip: bool = _arg(False)
    vis_images: int = _arg(8)
    # runtime
    device: str = _arg("auto", "auto | cpu | cuda | cuda:N")
    amp: Literal["auto", "bf16", "fp16", "off"] = _arg("auto", "auto: bf16 on CUDA, off on CPU")
    compile: bool = _arg(False, "torch.compile the training module")
    seed: int = _arg(0)
    deterministic: bool = _arg(False)
    workers: int | None = _arg(None, "data-loader workers")
    threads: int | None = _arg(None, "torch CPU threads")
    output: str | None = _arg(None, "run folder (default runs/<timestamp>)")
    resume: str | None = _arg(None, "checkpoint file, or 'auto' (OUTPUT/last.pt)", metavar="CKPT")
    ckpt_every: int | None = _arg(None, "checkpoint period (default: eval period)")
    stop_after: int | None = _arg(None, "stop after N steps of this invocation (checkpoint saved; continue "
                                  "with --resume auto)", metavar="N")
    log_every: int = _arg(10)
    grad_norms: int | None = _arg(None, "every N steps log the gradient norm each weighted loss term sends to "
                                  "the backbone and to the heads (metrics.jsonl kind 'grad', curves.png); "
                                  "costs one extra backward per term on those steps only", metavar="N")
    progress: bool = _arg(True, "off: no tqdm progress bar")
    plots: bool = _arg(True, "off: skip PNG overlays and curves")
    quiet: bool = _arg(False, "print only the final table")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Per-dataset defaults. VOC / COCO: ToCo's schedule (shared/notes/ref_toco_cpews_cpal.md
# §1.10); synthetic: a tiny random-init ViT that trains baseline + one recipe in
# well under three minutes on two CPU cores.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": dict(
        model="vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=96,
        num_heads=(3,), iterations=300, batch_size=16, lr=1e-3, warmup=30, low=0.25, high=0.7,
        cam_threshold=0.3, eval_every=150, eval_images=128, eval_batch_size=32, workers=0,
        train_length=2000,
        # no per-dataset recipe options: mct / doei choose refine / last_k by whether
        # --pretrained weights were given (recipes/mct.py), not by the dataset's name
    ),
    "voc": dict(
        model="vit_base_patch16_224", img_size=448, iterations=20000, batch_size=2, lr=6e-5,
        warmup=1500, low=0.25, high=0.7, cam_threshold=0.5, eval_every=2000, eval_images=1449,
        eval_batch_size=1, workers=4,
    ),
    "coco": dict(
        model="vit_base_patch16_224", img_size=448, iterations=80000, batch_size=2, lr=6e-5,
        warmup=1500, low=0.25, high=0.65, cam_threshold=0.45, eval_every=4000, eval_images=5000,
        eval_batch_size=1, workers=4,
    ),
}


SWIN_PREFIXES = ("swin_", "swinv2_")  # timm SwinTransformer / SwinTransformerV2 names
_OTHER_SWIN = ("swinv2_cr_", "swin_s3_")  # different architectures under similar names


def is_swin_name(model: str | None) -> bool:
    """Whether ``--model`` names a timm SwinTransformer / SwinTransformerV2."""
    return model is not None and model.startswith(SWIN_PREFIXES) and not model.startswith(_OTHER_SWIN)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of exiting (``train.py`` exits 2)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


_SCALARS: dict[Any, Callable[[str], Any]] = {int: int, float: float, str: str}
_SEQUENCES: dict[Any, Callable[[str], Any]] = {int: _ints, float: _floats}


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    meta = dict(f.metadata)
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help") or "default: %(default)s"}
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):  # X | None: the flag takes an X
        hint = next(a for a in args if a is not type(None))
        args = get_args(hint)
    if meta.get("append"):
        parser.add_argument(flag, action="append", default=[], **kw)
    elif hint is bool:
        on = f.default is not True
        parser.add_argument(flag if on else "--no-" + flag[2:], action="store_true" if on else "store_false",
                            default=f.default, **kw)
    elif get_origin(hint) is Literal:
        parser.add_argument(flag, choices=list(args), default=f.default, **kw)
    elif get_origin(hint) is tuple:
        parser.add_argument(flag, type=_SEQUENCES[args[0]], default=f.default, **kw)
    else:
        parser.add_argument(flag, type=_SCALARS[hint], default=f.default, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``examples/train.py`` command line, built from the :class:`TrainConfig` fields.

    Errors raise :class:`ConfigError` (no ``SystemExit``), so in-process callers can catch them.
    """
    parser = _Parser(
        prog="train.py",
        description="Reference trainer for wsss_blocks recipes (CAM / pseudo-mask quality).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        _add_field(parser, f, hints[f.name])
    return parser


def parse_recipe_options(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (typed later by the recipe)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt: expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


#: ``--scene`` keywords of :class:`~wsss_blocks.data.SyntheticScenes` and their types
SCENE_KEYS: dict[str, Callable[[str], Any]] = {
    "num_classes": int, "max_objects": int, "group_size": int, "co_occurrence": float,
    "context_alone": float, "part_fraction": float, "part_hidden": float, "noise": float,
    "min_visible": float, "superclass_layout": str, "val_length": int,
}


def parse_scene_options(items: list[str]) -> dict[str, Any]:
    """``["num_classes=8", "superclass_layout=crossed"]`` -> typed SyntheticScenes keywords.

    ``val_length`` sets the validation split's length (default: ``max(eval_images, vis_images)``).

    Example:
        >>> parse_scene_options(["num_classes=8", "co_occurrence=0.9"])
        {'num_classes': 8, 'co_occurrence': 0.9}
    """
    out: dict[str, Any] = {}
    for key, value in parse_recipe_options(items).items():
        if key not in SCENE_KEYS:
            raise ConfigError(f"--scene: unknown key {key!r}; allowed: {sorted(SCENE_KEYS)}")
        try:
            out[key] = SCENE_KEYS[key](value)
        except ValueError:
            raise ConfigError(f"--scene {key}: expected {SCENE_KEYS[key].__name__}, got {value!r}") from None
    return out


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid flag."""
    def need(cond: bool, flag: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{flag}: {msg}")

    for name in ("iterations", "batch_size", "warmup", "eval_every", "eval_images",
                 "eval_batch_size", "img_size", "log_every"):
        v = getattr(cfg, name)
        lo = 0 if name == "warmup" else 1
        need(v is not None and int(v) == v and v >= lo, "--" + name.replace("_", "-"),
             f"expected an integer >= {lo}, got {v!r}")
    need(cfg.lr is not None and cfg.lr > 0, "--lr", f"expected > 0, got {cfg.lr}")
    need(cfg.head_lr_mult > 0, "--head-lr-mult", f"expected > 0, got {cfg.head_lr_mult}")
    need(cfg.weight_decay >= 0, "--weight-decay", f"expected >= 0, got {cfg.weight_decay}")
    need(0 < cfg.warmup_ratio <= 1, "--warmup-ratio", f"expected in (0, 1], got {cfg.warmup_ratio}")
    need(0 <= cfg.drop_path < 1, "--drop-path", f"expected in [0, 1), got {cfg.drop_path}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, "--clip-grad", f"expected > 0, got {cfg.clip_grad}")
    need(0 <= cfg.low < cfg.high <= 1, "--low/--high",
         f"expected 0 <= low < high <= 1, got low={cfg.low}, high={cfg.high}")
    need(0 <= cfg.seg_warmup < 1, "--seg-warmup", f"expected in [0, 1), got {cfg.seg_warmup}")
    need(cfg.seg or not cfg.seg_crf, "--seg-crf", "evaluates the --seg decoder; add --seg")
    if cfg.seg_crf:
        from wsss_blocks.refine import crf_available

        need(crf_available(), "--seg-crf", "needs the optional crf extra (module pydensecrf): "
             "pip install 'wsss_blocks[crf]' (or pip install pydensecrf2)")
    need(0 <= cfg.cam_threshold <= 1, "--cam-threshold", f"expected in [0, 1], got {cfg.cam_threshold}")
    need(len(cfg.eval_scales) > 0 and all(s > 0 for s in cfg.eval_scales), "--eval-scales",
         f"expected positive factors, got {cfg.eval_scales}")
    need(cfg.dynamic_size or tuple(cfg.eval_scales) == (1.0,), "--eval-scales",
         "multi-scale evaluation needs a dynamic input size (drop --no-dynamic-size)")
    need(cfg.vis_images >= 0, "--vis-images", f"expected >= 0, got {cfg.vis_images}")
    need(cfg.workers is not None and cfg.workers >= 0, "--workers", f"expected >= 0, got {cfg.workers}")
    need(cfg.threads is None or cfg.threads >= 1, "--threads", f"expected >= 1, got {cfg.threads}")
    need(cfg.stop_after is None or cfg.stop_after >= 1, "--stop-after", f"expected >= 1, got {cfg.stop_after}")
    need(cfg.ckpt_every is None or cfg.ckpt_every >= 1, "--ckpt-every", f"expected >= 1, got {cfg.ckpt_every}")
    need(cfg.grad_norms is None or cfg.grad_norms >= 1, "--grad-norms", f"expected >= 1, got {cfg.grad_norms}")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "--device",
         f"expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data != "synthetic":
        need(cfg.data_root is not None, "--data-root", f"--data {cfg.data} needs --data-root DIR")
        need(os.path.isdir(cfg.data_root), "--data-root", f"{cfg.data_root!r} is not a directory")
        need(cfg.eval_batch_size == 1, "--eval-batch-size",
             f"{cfg.data} images have different sizes, so evaluation and pool builds run one "
             f"image at a time; got {cfg.eval_batch_size}")
        need(not cfg.scene, "--scene", "only for --data synthetic")
    else:
        need(cfg.train_length is not None and cfg.train_length >= 1, "--train-length",
             f"expected >= 1, got {cfg.train_length}")
    if cfg.pretrained is not None:
        need(os.path.isfile(cfg.pretrained), "--pretrained",
             f"weights file {cfg.pretrained!r} not found. This trainer never downloads weights: "
             "download them once elsewhere (e.g. the timm model's .safetensors/.npz) and pass the "
             "local file path")
    for name in ("patch_size", "depth", "embed_dim", "window_size"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, "--" + name.replace("_", "-"), f"expected >= 1, got {v}")
    for name in ("depths", "num_heads"):
        v = getattr(cfg, name)
        need(v is None or (len(v) > 0 and min(v) >= 1), "--" + name.replace("_", "-"),
             f"expected integers >= 1, got {v}")
    if is_swin_name(cfg.model):
        need(cfg.depth is None, "--depth", "a Swin model takes per-stage --depths (e.g. --depths 1,1)")
        if cfg.depths is not None and cfg.num_heads is not None:
            need(len(cfg.num_heads) == len(cfg.depths), "--num-heads",
                 f"expected one value per stage ({len(cfg.depths)}), got {len(cfg.num_heads)}")
        if cfg.embed_dim is not None and cfg.num_heads is not None:
            for i, h in enumerate(cfg.num_heads):
                need((cfg.embed_dim << i) % h == 0, "--num-heads",
                     f"stage {i} width {cfg.embed_dim << i} (--embed-dim {cfg.embed_dim} x 2^{i}) is not "
                     f"divisible by {h} heads")
    else:
        for flag, value in (("--depths", cfg.depths), ("--window-size", cfg.window_size)):
            need(value is None, flag, f"only for Swin models (--model swin_...), got --model {cfg.model}")
        if cfg.num_heads is not None:
            need(len(cfg.num_heads) == 1, "--num-heads", f"a ViT takes one value, got {cfg.num_heads}")
            if cfg.embed_dim is not None:
                need(cfg.embed_dim % cfg.num_heads[0] == 0, "--embed-dim",
                     f"{cfg.embed_dim} is not divisible by --num-heads {cfg.num_heads[0]}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv``, fill dataset defaults, validate. Errors raise :class:`ConfigError`."""
    ns = vars(build_parser().parse_args(argv))
    ns["opts"] = parse_recipe_options(ns["opts"])
    ns["scene"] = parse_scene_options(ns["scene"])
    cfg = TrainConfig(**ns)
    defaults = DATASET_DEFAULTS[cfg.data]
    custom_model = cfg.model is not None and cfg.model != defaults["model"]
    for f in fields(cfg):
        if getattr(cfg, f.name) is None and f.name in defaults:
            # tiny-architecture overrides apply only to the dataset's default model
            if custom_model and f.name in ("patch_size", "depth", "embed_dim", "num_heads", "depths",
                                           "window_size"):
                continue
            setattr(cfg, f.name, defaults[f.name])
    for key, value in defaults.get("recipe_opts", {}).get(cfg.recipe, {}).items():
        cfg.opts.setdefault(key, value)
    if cfg.output is None:
        cfg.output = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    cfg.eval_scales = tuple(cfg.eval_scales)
    for name in ("depths", "num_heads"):
        if getattr(cfg, name) is not None:
            setattr(cfg, name, tuple(getattr(cfg, name)))
    validate(cfg)
    return cfg

