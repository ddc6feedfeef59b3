"""Command line and configuration of the reference trainer: parse, fill per-dataset defaults, validate.

One concept: :class:`TrainConfig`. Every field can be set on the command line; fields left
unset (``None``) are filled from :data:`DATASET_DEFAULTS` for the chosen ``--data`` (values
from ToCo / CPEWS for VOC and COCO, tuned for a 2-core CPU for the synthetic scenes), then
:func:`validate` raises :class:`ConfigError` (a ``ValueError``) naming the bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["TrainConfig", "ConfigError", "DATASET_DEFAULTS", "is_swin_name", "parse_config", "parse_recipe_options"]


class ConfigError(ValueError):
    """A command-line / configuration error; the message names the flag."""


@dataclass
class TrainConfig:
    """The resolved configuration of one run (saved as ``config.json``)."""

    recipe: str = "cpews"
    baseline: str = "auto"  # auto | on | off: also train the baseline recipe and compare
    opts: dict[str, str] = field(default_factory=dict)  # recipe options, --opt key=value
    data: str = "synthetic"
    data_root: str | None = None
    train_length: int | None = None  # synthetic only: items per epoch
    # backbone
    model: str | None = None
    pretrained: str | None = None  # local weights file (.pth/.bin/.safetensors/.npz); never downloads
    img_size: int | None = None  # training crop / input size
    patch_size: int | None = None
    depth: int | None = None  # ViT blocks
    depths: tuple[int, ...] | None = None  # Swin: blocks per stage
    embed_dim: int | None = None
    num_heads: tuple[int, ...] | None = None  # ViT: one value; Swin: one per stage
    window_size: int | None = None  # Swin attention window
    dynamic_size: bool = True
    drop_path: float = 0.0  # stochastic depth rate (timm drop_path_rate)
    # schedule
    iterations: int | None = None
    batch_size: int | None = None  # per process
    lr: float | None = None
    head_lr_mult: float = 10.0
    warmup: int | None = None
    warmup_ratio: float = 1e-6
    power: float = 0.9
    weight_decay: float = 0.01
    clip_grad: float | None = None
    # pseudo labels / CAM evaluation
    low: float | None = None
    high: float | None = None
    cam_threshold: float | None = None
    # evaluation
    eval_every: int | None = None
    eval_images: int | None = None
    eval_batch_size: int | None = None
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False
    vis_images: int = 8
    # runtime
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | off
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int | None = None
    threads: int | None = None
    output: str | None = None
    resume: str | None = None
    ckpt_every: int | None = None
    stop_after: int | None = None  # stop after this many steps of this invocation (resume later)
    log_every: int = 10
    progress: bool = True
    plots: bool = True
    quiet: bool = False

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
        # per-dataset recipe option defaults (--opt overrides them): the attention CAMs of a
        # tiny random-init ViT are diffuse, and MCTformer's patch-affinity refinement
        # (built for pretrained DeiT) washes them out, so use all blocks, unrefined
        recipe_opts={"mct": {"refine": "false", "last_k": "4"},
                     "doei": {"refine": "false", "last_k": "4"}},
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


def build_parser() -> argparse.ArgumentParser:
    """The ``examples/train.py`` command line."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Reference trainer for wsss_blocks recipes (CAM / pseudo-mask quality).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--recipe", default="cpews", help="recipe name (see examples/README.md)")
    a("--baseline", default="auto", choices=["auto", "on", "off"],
      help="also train the baseline recipe and print a comparison (auto: synthetic data only)")
    a("--opt", action="append", default=[], metavar="KEY=VALUE", help="recipe option, repeatable")
    a("--data", default="synthetic", choices=sorted(DATASET_DEFAULTS))
    a("--data-root", default=None, help="dataset root for voc / coco")
    a("--train-length", type=int, default=None, help="synthetic: training items per epoch")
    a("--model", default=None, help="any timm ViT name, or a Swin (swin_*, swinv2_*)")
    a("--pretrained", default=None, metavar="FILE", help="local weights file (no downloads)")
    a("--img-size", type=int, default=None)
    a("--patch-size", type=int, default=None)
    a("--depth", type=int, default=None, help="ViT: number of blocks")
    a("--depths", type=_ints, default=None, help="Swin: blocks per stage, e.g. 1,1")
    a("--embed-dim", type=int, default=None)
    a("--num-heads", type=_ints, default=None, help="ViT: one value; Swin: one per stage, e.g. 2,4")
    a("--window-size", type=int, default=None, help="Swin: attention window (fit it to the small image)")
    a("--no-dynamic-size", dest="dynamic_size", action="store_false",
      help="fixed input size (multi-scale evaluation and VOC/COCO validation need dynamic size)")
    a("--drop-path", type=float, default=0.0, help="stochastic depth rate of the backbone")
    a("--iterations", type=int, default=None)
    a("--batch-size", type=int, default=None, help="per process")
    a("--lr", type=float, default=None, help="backbone learning rate (heads get x head-lr-mult)")
    a("--head-lr-mult", type=float, default=10.0)
    a("--warmup", type=int, default=None)
    a("--warmup-ratio", type=float, default=1e-6)
    a("--power", type=float, default=0.9)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=None, help="max gradient norm (off by default)")
    a("--low", type=float, default=None, help="pseudo-label background threshold")
    a("--high", type=float, default=None, help="pseudo-label foreground threshold")
    a("--cam-threshold", type=float, default=None, help="background score for CAM mIoU")
    a("--eval-every", type=int, default=None)
    a("--eval-images", type=int, default=None)
    a("--eval-batch-size", type=int, default=None)
    a("--eval-scales", type=_floats, default=(1.0,), help="e.g. 1.0,0.5,1.5")
    a("--eval-flip", action="store_true")
    a("--vis-images", type=int, default=8)
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
      help="auto: bf16 on CUDA, off on CPU")
    a("--compile", action="store_true", help="torch.compile the training module")
    a("--seed", type=int, default=0)
    a("--deterministic", action="store_true")
    a("--workers", type=int, default=None, help="data-loader workers")
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--output", default=None, help="run folder (default runs/<timestamp>)")
    a("--resume", default=None, metavar="CKPT", help="checkpoint file, or 'auto' (OUTPUT/last.pt)")
    a("--ckpt-every", type=int, default=None, help="checkpoint period (default: eval period)")
    a("--stop-after", type=int, default=None, metavar="N",
      help="stop after N steps of this invocation (checkpoint saved; continue with --resume auto)")
    a("--log-every", type=int, default=10)
    a("--no-progress", dest="progress", action="store_false")
    a("--no-plots", dest="plots", action="store_false", help="skip PNG overlays and curves")
    a("--quiet", action="store_true", help="print only the final table")
    return p


def parse_recipe_options(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (typed later by the recipe)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt: expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
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
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "--device",
         f"expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data != "synthetic":
        need(cfg.data_root is not None, "--data-root", f"--data {cfg.data} needs --data-root DIR")
        need(os.path.isdir(cfg.data_root), "--data-root", f"{cfg.data_root!r} is not a directory")
        need(cfg.eval_batch_size == 1, "--eval-batch-size",
             f"{cfg.data} images have different sizes, so evaluation and pool builds run one "
             f"image at a time; got {cfg.eval_batch_size}")
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
    parser = build_parser()
    # argparse exits on errors; turn that into an exception for in-process callers
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))  # type: ignore[method-assign]
    ns = vars(parser.parse_args(argv))
    ns["opts"] = parse_recipe_options(ns.pop("opt"))
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

