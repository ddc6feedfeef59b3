"""Command line and configuration of the reference trainer: parse, layer the settings, validate.

One concept: :class:`TrainConfig`, the one source of every flag: each field's type, default
and ``metadata`` (help text, flag name, metavar, whether it alters the run) build the command
line in :func:`build_parser` (``--field-name``; a ``bool`` that defaults to ``True`` is switched
off with ``--no-field-name``, one that defaults to ``False`` on with ``--field-name``; a
``Literal`` type gives the choices).

A configuration is four layers, each overriding the one before: the field defaults; the
dataset's settings (:data:`DATASET_DEFAULTS` for the synthetic scenes, tuned for a 2-core CPU;
for VOC / COCO the recipe's paper settings, ``examples/configs/<recipe>_<data>.json``, plus the
runtime values of :data:`DATASET_DEFAULTS`); a ``--config FILE``; the flags given on the command
line. :func:`validate` then raises :class:`ConfigError` (a ``ValueError``) naming the bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

__all__ = ["TrainConfig", "ConfigError", "DATASET_DEFAULTS", "CONFIG_DIR", "PAPER_KEYS", "RUN_FACTS", "build_parser",
           "check_scales", "config_changes", "is_swin_name", "load_config_file", "paper_config_path",
           "parse_config", "parse_recipe_options", "validate"]


class ConfigError(ValueError):
    """A command-line / configuration error; the message names the flag."""


def _arg(default: Any = None, help: str = "", *, alters_run: bool = True, saved: bool = True, **cli: Any) -> Any:
    """A :class:`TrainConfig` field: ``default`` plus the command-line metadata (``help``, and
    ``flag`` / ``metavar`` / ``append`` overrides). For a ``bool`` defaulting to ``True`` the help
    describes the ``--no-...`` flag. ``alters_run=False``: the flag may differ when a run is
    resumed (it changes what is shown or where, not what is trained); ``saved=False``: the flag
    belongs to one invocation and is not part of the run's ``config.json``."""
    meta = {"help": help, "alters_run": alters_run, "saved": saved, **cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The resolved configuration of one run (saved as ``config.json``)."""

    config: str | None = _arg(None, "JSON file of settings: a run's config.json, or any subset of these flags "
                              "by field name (e.g. {\"lr\": 1e-4, \"opts\": {\"pool_step\": \"2\"}}); flags "
                              "given on the command line override it", metavar="FILE", alters_run=False,
                              saved=False)
    recipe: str = _arg("cpews", "recipe name (see examples/README.md)")
    baseline: Literal["auto", "on", "off"] = _arg(
        "auto", "also train the baseline recipe and print a comparison (auto: synthetic data only)",
        alters_run=False)
    opts: dict[str, str] = _arg({}, "recipe option, repeatable", flag="--opt", metavar="KEY=VALUE", append=True)
    data: Literal["synthetic", "voc", "coco"] = _arg("synthetic")
    data_root: str | None = _arg(None, "dataset root for voc / coco", alters_run=False)
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
    drop_path: float = _arg(0.0, "stochastic depth rate of the backbone (timm drop_path_rate), in [0, 1)")
    # schedule
    iterations: int | None = _arg()
    batch_size: int | None = _arg(None, "per process")
    lr: float | None = _arg(None, "backbone learning rate (heads get x head-lr-mult)")
    head_lr_mult: float = _arg(10.0)
    warmup: int | None = _arg()
    warmup_ratio: float = _arg(1e-6, "learning rate at step 0 as a fraction of --lr, in (0, 1]")
    power: float = _arg(0.9, "poly decay exponent (0: constant after the warm-up)")
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
    eval_scales: tuple[float, ...] = _arg((1.0,), "e.g. 1.0,0.5,1.5 (each in (0, 4])")
    eval_flip: bool = _arg(False)
    vis_images: int = _arg(8, alters_run=False)
    # runtime
    device: str = _arg("auto", "auto | cpu | cuda | cuda:N")
    amp: Literal["auto", "bf16", "fp16", "off"] = _arg("auto", "auto: bf16 on CUDA, off on CPU")
    compile: bool = _arg(False, "torch.compile the training module")
    seed: int = _arg(0, "in 0 .. 2**32 - 1")
    deterministic: bool = _arg(False)
    workers: int | None = _arg(None, "data-loader workers", alters_run=False)
    threads: int | None = _arg(None, "torch CPU threads", alters_run=False)
    output: str | None = _arg(None, "run folder (default runs/<timestamp>); a folder that holds files is "
                              "refused unless --resume continues the run in it", alters_run=False)
    resume: str | None = _arg(None, "checkpoint file, or 'auto' (OUTPUT/last.pt; a fresh start when the folder "
                              "is empty)", metavar="CKPT", alters_run=False, saved=False)
    allow_config_change: bool = _arg(False, "--resume: continue although flags that alter the run differ from "
                                     "the checkpoint's (each change is printed and logged in metrics.jsonl)",
                                     alters_run=False, saved=False)
    ckpt_every: int | None = _arg(None, "checkpoint period (default: eval period)", alters_run=False)
    stop_after: int | None = _arg(None, "stop after N steps of this invocation (checkpoint saved; continue "
                                  "with --resume auto)", metavar="N", alters_run=False, saved=False)
    log_every: int = _arg(10, alters_run=False)
    grad_norms: int | None = _arg(None, "every N steps log the gradient norm each weighted loss term sends to "
                                  "the backbone and to the heads (metrics.jsonl kind 'grad', curves.png); "
                                  "costs one extra backward per term on those steps only", metavar="N",
                                  alters_run=False)
    progress: bool = _arg(True, "off: no tqdm progress bar", alters_run=False)
    plots: bool = _arg(True, "off: skip PNG overlays and curves", alters_run=False)
    quiet: bool = _arg(False, "print only the final table", alters_run=False)

    def to_json(self) -> dict[str, Any]:
        """The run's settings (every field but the per-invocation ones: ``config``, ``resume``,
        ``allow_config_change``, ``stop_after``)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.metadata["saved"]}


def _plain(value: Any) -> Any:
    """A copy without shared mutable state (``dataclasses.asdict`` semantics for one value)."""
    return dict(value) if isinstance(value, dict) else value


def flag_name(name: str) -> str:
    """The command-line flag of field ``name`` (``lr`` -> ``--lr``, ``opts`` -> ``--opt``)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


#: where the recipes' paper settings live: ``<recipe>_<data>.json`` for ``--data voc|coco``
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Per-dataset settings that are not a paper's: synthetic: a tiny random-init ViT that trains
# baseline + one recipe in well under three minutes on two CPU cores; VOC / COCO: evaluation
# and loader values (the schedule, model and thresholds come from the recipe's paper file).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": dict(
        model="vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, embed_dim=96,
        num_heads=(3,), iterations=300, batch_size=16, lr=1e-3, warmup=30, low=0.25, high=0.7,
        cam_threshold=0.3, eval_every=150, eval_images=128, eval_batch_size=32, workers=0,
        train_length=2000,
        # no per-dataset recipe options: mct / doei choose refine / last_k by whether
        # --pretrained weights were given (recipes/mct.py), not by the dataset's name
    ),
    "voc": dict(eval_every=2000, eval_images=1449, eval_batch_size=1, workers=4),
    "coco": dict(eval_every=4000, eval_images=5000, eval_batch_size=1, workers=4),
}
#: what every paper file sets (they are unset in the field defaults)
PAPER_KEYS = ("model", "img_size", "iterations", "batch_size", "lr", "warmup", "low", "high", "cam_threshold")
#: architecture values that apply only to the dataset's own model
_ARCHITECTURE = ("patch_size", "depth", "embed_dim", "num_heads", "depths", "window_size")
#: keys a run adds to its config.json about itself; a config file may hold them (they are not used)
RUN_FACTS = ("recipe_options", "num_classes", "world_size")


def paper_config_path(recipe: str, data: str) -> Path:
    """The paper settings of ``recipe`` on ``data`` (``voc`` / ``coco``); a recipe without its own
    file takes the baseline's (ToCo's schedule)."""
    own = CONFIG_DIR / f"{recipe}_{data}.json"
    return own if own.is_file() else CONFIG_DIR / f"baseline_{data}.json"


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


def _inner(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``."""
    if get_origin(hint) in (Union, types.UnionType):
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    """One flag; it has no default of its own (``argparse.SUPPRESS``), so the namespace holds
    exactly the flags given, and the help states the field's default."""
    meta = dict(f.metadata)
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    by_data = f.name in PAPER_KEYS or any(f.name in layer for layer in DATASET_DEFAULTS.values())
    plain = f.default_factory is dataclasses.MISSING and f.default is not None
    default = "set by --data" if by_data else f.default if plain else "none"
    text = meta.get("help") or ""
    if "default" not in text:  # a help text that states its default keeps it
        text = f"{text} (default: {default})" if text else f"default: {default}"
    kw: dict[str, Any] = {"dest": f.name, "help": text}
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    hint = _inner(hint)
    args = get_args(hint)
    if meta.get("append"):
        parser.add_argument(flag, action="append", **kw)
    elif hint is bool:
        on = f.default is not True
        kw["help"] = meta.get("help") or f"default: {'off' if on else 'on'}"
        parser.add_argument(flag if on else "--no-" + flag[2:], action="store_true" if on else "store_false", **kw)
    elif get_origin(hint) is Literal:
        parser.add_argument(flag, choices=list(args), **kw)
    elif get_origin(hint) is tuple:
        parser.add_argument(flag, type=_SEQUENCES[args[0]], **kw)
    else:
        parser.add_argument(flag, type=_SCALARS[hint], **kw)


def build_parser() -> argparse.ArgumentParser:
    """The ``examples/train.py`` command line, built from the :class:`TrainConfig` fields.

    The namespace it returns holds only the flags given (so they can override a config file).
    Errors raise :class:`ConfigError` (no ``SystemExit``), so in-process callers can catch them.
    """
    parser = _Parser(
        prog="train.py",
        description="Reference trainer for wsss_blocks recipes (CAM / pseudo-mask quality). Settings come in "
                    "layers: field defaults < the dataset's (synthetic: a CPU-sized run; voc / coco: the "
                    "recipe's paper settings, examples/configs/<recipe>_<data>.json) < --config FILE < the "
                    "flags given here.",
        argument_default=argparse.SUPPRESS,
    )
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        _add_field(parser, f, hints[f.name])
    return parser


def _option_text(value: Any) -> str:
    """A config-file option value as ``--opt`` text (``true``, ``none``, ``0.5``, ...)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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


# ----------------------------------------------------------------------------- config files
def _file_value(key: str, value: Any, hint: Any) -> Any:
    """A JSON value as the field type ``hint``; ``ValueError`` says what was expected."""
    if value is None and get_origin(hint) in (Union, types.UnionType):
        return None
    hint = _inner(hint)
    origin, args = get_origin(hint), get_args(hint)
    if key == "opts":
        if not isinstance(value, dict):
            raise ValueError("expected an object of recipe options")
        return {str(k): _option_text(v) for k, v in value.items()}
    if key == "scene":
        if not isinstance(value, dict):
            raise ValueError("expected an object of SyntheticScenes keywords")
        return parse_scene_options([f"{k}={v}" for k, v in value.items()])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of {args[0].__name__}s")
        return tuple(_file_value(key, v, args[0]) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def load_config_file(path: str | os.PathLike[str], *, flag: str = "--config") -> dict[str, Any]:
    """The settings of a JSON config file, typed as the :class:`TrainConfig` fields.

    The keys are field names (``lr``, ``batch_size``, ``opts``, ...). ``notes`` (a string or a
    list of strings) describes the file and is not used; the :data:`RUN_FACTS` a run adds to its
    ``config.json`` are accepted and not used either (``opts`` holds the recipe options as they
    were given). Any other key, or a value of the wrong type, raises :class:`ConfigError`
    naming the key and the file.
    """
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{flag}: {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag}: cannot read {path} ({err})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag}: {path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag}: {path} must hold a JSON object of settings, got {type(raw).__name__}")
    hints = get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "notes":
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise ConfigError(f"{flag}: {path}: key 'notes': expected a string or a list of strings")
            continue
        if key in RUN_FACTS:
            continue
        if key not in names or key == "config":
            raise ConfigError(f"{flag}: {path}: unknown key {key!r} (the keys are the trainer's settings by "
                              "field name, e.g. 'lr', 'batch_size', 'opts'; see train.py --help)")
        try:
            out[key] = _file_value(key, value, hints[key])
        except (ValueError, ConfigError) as err:
            raise ConfigError(f"{flag}: {path}: key {key!r}: {err}, got {value!r}") from None
    return out


def _dataset_layer(data: str, recipe: str) -> dict[str, Any]:
    """The dataset's settings: the synthetic CPU run, or the recipe's paper file + runtime values."""
    layer = dict(DATASET_DEFAULTS[data])
    if data != "synthetic":
        paper = load_config_file(paper_config_path(recipe, data), flag="--data")
        layer |= {k: v for k, v in paper.items() if k not in ("recipe", "data")}
    return layer


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv``, layer the settings (field defaults < dataset < ``--config`` < flags) and
    validate. Errors raise :class:`ConfigError`."""
    given = vars(build_parser().parse_args(argv))
    given_opts = parse_recipe_options(given.pop("opts", []))
    given_scene = parse_scene_options(given.pop("scene", []))
    from_file = load_config_file(given["config"]) if "config" in given else {}
    values = {f.name: _plain(f.default) if f.default_factory is dataclasses.MISSING else f.default_factory()
              for f in fields(TrainConfig)}

    def chosen(name: str, fallback: Any) -> Any:
        return given.get(name, from_file.get(name, fallback))

    layer = _dataset_layer(chosen("data", values["data"]), chosen("recipe", values["recipe"]))
    if chosen("model", layer.get("model")) != layer.get("model"):
        layer = {k: v for k, v in layer.items() if k not in _ARCHITECTURE}  # the layer's model only
    for source in (layer, from_file, given):
        values |= {k: v for k, v in source.items() if k not in ("opts", "scene")}
    values["opts"] = {**layer.get("opts", {}), **from_file.get("opts", {}), **given_opts}
    values["scene"] = {**from_file.get("scene", {}), **given_scene}
    cfg = TrainConfig(**values)
    if cfg.output is None:
        cfg.output = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation
def check_scales(scales: Sequence[float], flag: str) -> tuple[float, ...]:
    """Evaluation / export scale factors: at least one, each finite and in (0, 4]."""
    values = tuple(float(s) for s in scales)
    if not values or not all(math.isfinite(s) and 0 < s <= 4 for s in values):
        raise ConfigError(f"{flag}: expected factors in (0, 4], got {','.join(map(str, scales)) or 'none'}")
    return values


def _between(value: Any, low: float | None, high: float | None, *, low_open: bool = False,
             high_open: bool = False) -> bool:
    """A finite number inside the bounds (``None``: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return ((low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


#: float flags: (low, high, low open, high open)
_FLOAT_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "lr": (0, None, True, False), "head_lr_mult": (0, None, True, False), "weight_decay": (0, None, False, False),
    "warmup_ratio": (0, 1, True, False), "power": (0, None, False, False), "drop_path": (0, 1, False, True),
    "clip_grad": (0, None, True, False), "low": (0, 1, False, False), "high": (0, 1, False, False),
    "cam_threshold": (0, 1, False, False), "seg_warmup": (0, 1, False, True),
}
#: integer flags: lowest value (None: the flag may be unset)
_INT_MINIMUMS: dict[str, int] = {
    "iterations": 1, "batch_size": 1, "warmup": 0, "eval_every": 1, "eval_images": 1, "eval_batch_size": 1,
    "img_size": 1, "log_every": 1, "vis_images": 0, "workers": 0, "seed": 0,
}
_OPTIONAL_INT_MINIMUMS: dict[str, int] = {
    "threads": 1, "stop_after": 1, "ckpt_every": 1, "grad_norms": 1, "patch_size": 1, "depth": 1,
    "embed_dim": 1, "window_size": 1, "train_length": 1,
}
_SEED_LIMIT = 2 ** 32  # numpy's seed range


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid flag: every number finite and in range,
    and the flags consistent with each other."""
    def need(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{name if name.startswith('-') else flag_name(name)}: {msg}")

    for name, (lo, hi, lo_open, hi_open) in _FLOAT_RANGES.items():
        v = getattr(cfg, name)
        if v is not None or name != "clip_grad":
            need(_between(v, lo, hi, low_open=lo_open, high_open=hi_open), name,
                 f"expected {_interval(lo, hi, lo_open, hi_open)}, got {v!r}")
    for name, lo in _INT_MINIMUMS.items():
        v = getattr(cfg, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name,
             f"expected an integer >= {lo}, got {v!r}")
    for name, lo in _OPTIONAL_INT_MINIMUMS.items():
        v = getattr(cfg, name)
        need(v is None or (isinstance(v, int) and v >= lo), name, f"expected an integer >= {lo}, got {v!r}")
    need(cfg.seed < _SEED_LIMIT, "seed", f"expected an integer < 2**32, got {cfg.seed}")
    need(cfg.low < cfg.high, "--low/--high", f"expected 0 <= low < high <= 1, got low={cfg.low}, high={cfg.high}")
    need(cfg.seg or not cfg.seg_crf, "seg_crf", "evaluates the --seg decoder; add --seg")
    if cfg.seg_crf:
        from wsss_blocks.refine import crf_available

        need(crf_available(), "seg_crf", "needs the optional crf extra (module pydensecrf): "
             "pip install 'wsss_blocks[crf]' (or pip install pydensecrf2)")
    check_scales(cfg.eval_scales, "--eval-scales")
    need(cfg.dynamic_size or tuple(cfg.eval_scales) == (1.0,), "eval_scales",
         "multi-scale evaluation needs a dynamic input size (drop --no-dynamic-size)")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
         f"expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data != "synthetic":
        need(cfg.data_root is not None, "data_root", f"--data {cfg.data} needs --data-root DIR")
        need(os.path.isdir(str(cfg.data_root)), "data_root", f"{cfg.data_root!r} is not a directory")
        need(cfg.eval_batch_size == 1, "eval_batch_size",
             f"{cfg.data} images have different sizes, so evaluation and pool builds run one "
             f"image at a time; got {cfg.eval_batch_size}")
        need(not cfg.scene, "scene", "only for --data synthetic")
    else:
        need(cfg.train_length is not None, "train_length", f"expected an integer >= 1, got {cfg.train_length}")
    if cfg.pretrained is not None:
        need(os.path.isfile(cfg.pretrained), "pretrained",
             f"weights file {cfg.pretrained!r} not found. This trainer never downloads weights: "
             "download them once elsewhere (e.g. the timm model's .safetensors/.npz) and pass the "
             "local file path")
    for name in ("depths", "num_heads"):
        v = getattr(cfg, name)
        need(v is None or (len(v) > 0 and min(v) >= 1), name, f"expected integers >= 1, got {v}")
    if is_swin_name(cfg.model):
        need(cfg.depth is None, "depth", "a Swin model takes per-stage --depths (e.g. --depths 1,1)")
        if cfg.depths is not None and cfg.num_heads is not None:
            need(len(cfg.num_heads) == len(cfg.depths), "num_heads",
                 f"expected one value per stage ({len(cfg.depths)}), got {len(cfg.num_heads)}")
        if cfg.embed_dim is not None and cfg.num_heads is not None:
            for i, h in enumerate(cfg.num_heads):
                need((cfg.embed_dim << i) % h == 0, "num_heads",
                     f"stage {i} width {cfg.embed_dim << i} (--embed-dim {cfg.embed_dim} x 2^{i}) is not "
                     f"divisible by {h} heads")
    else:
        for name in ("depths", "window_size"):
            need(getattr(cfg, name) is None, name, f"only for Swin models (--model swin_...), got --model {cfg.model}")
        if cfg.num_heads is not None:
            need(len(cfg.num_heads) == 1, "num_heads", f"a ViT takes one value, got {cfg.num_heads}")
            if cfg.embed_dim is not None:
                need(cfg.embed_dim % cfg.num_heads[0] == 0, "embed_dim",
                     f"{cfg.embed_dim} is not divisible by --num-heads {cfg.num_heads[0]}")


# ----------------------------------------------------------------------------- resume check
def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(flag, saved value, current value)`` for every setting that alters the run and differs
    between a checkpoint's configuration and the current one (both as :meth:`TrainConfig.to_json`
    dicts, ``opts`` already typed by the recipe). A setting missing from ``saved`` (an older
    checkpoint) counts as its default.

    Example:
        >>> config_changes({"seed": 0, "workers": 0}, {"seed": 1, "workers": 4})
        [('--seed', 0, 1)]
    """
    defaults = TrainConfig().to_json()
    out = []
    for f in fields(TrainConfig):
        if not f.metadata["alters_run"] or f.name not in current:
            continue
        old, new = saved.get(f.name, defaults[f.name]), current[f.name]
        if isinstance(old, list):
            old = tuple(old)
        if f.name == "opts":
            out += [(f"--opt {k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
        elif old != new:
            out.append((flag_name(f.name), old, new))
    return out
