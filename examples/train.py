#!/usr/bin/env python
"""Reference trainer for wsss_blocks: train a weakly supervised CAM model with a recipe, report.

    python examples/train.py                       # synthetic scenes, tiny ViT, CPU: baseline vs cpews
    python examples/train.py --recipe doei         # another recipe (see examples/README.md)
    python examples/train.py --data voc --data-root /data/VOC2012 --model vit_base_patch16_224 \
        --pretrained /weights/vit_base.npz --recipe cpews
    torchrun --nproc_per_node 2 examples/train.py --baseline off   # DDP (gloo on CPU, nccl on CUDA)

One loop for every method: a *recipe* (``examples/recipes/``) turns a batch into named,
weighted loss terms and updates its own state (banks, pools) after each step; the loop does
the optimisation (AdamW, warm-up + poly, 10x lr on the recipe's heads), mixed precision,
DDP, checkpoints / exact resume, evaluation (CAM and pseudo-mask mIoU), pictures and the
summary. ``main(argv) -> dict`` runs in-process and returns the summary.

A run never destroys another: an output folder that holds files is refused unless
``--resume`` continues the run in it, a resume whose flags would change the run is refused
unless ``--allow-config-change`` says so, and the folder is checked writable before anything
trains. Configuration problems exit with status 2 (:class:`ConfigError`), a run that cannot go
on (a diverged loss, no readable training item) with status 1 (:class:`RunError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _backbone import backbone_kind, build_backbone, feature_dim, final_feature_map  # noqa: E402
from _checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, set_rng_state  # noqa: E402
from _config import ConfigError, TrainConfig, config_changes, parse_config  # noqa: E402
from _data import build_datasets, eval_loader, to_device, train_loader  # noqa: E402
from _decoder import LargeFOV  # noqa: E402
from _evaluate import evaluate, save_panels  # noqa: E402
from _evaluate import vis_batch as make_vis_batch  # noqa: E402
from _optim import build_optimizer, build_scheduler  # noqa: E402
from _process import exit_process  # noqa: E402
from _report import JsonlWriter, format_table, plot_curves, read_jsonl  # noqa: E402
from recipes import LoopServices, Recipe, get_recipe, parse_options  # noqa: E402
from recipes.base import LossTerm  # noqa: E402
from torch import nn  # noqa: E402

from wsss_blocks.cam import normalize_cam  # noqa: E402
from wsss_blocks.data import DataFileError  # noqa: E402
from wsss_blocks.refine import par_pseudo_labels, seg_loss  # noqa: E402

__all__ = ["main", "TrainNet", "RunError", "build_backbone", "grad_norms", "recipe_options"]


class RunError(RuntimeError):
    """A run that cannot go on (the loss diverged, no training item can be read); the message
    says why and what is kept. ``train.py`` exits with status 1."""


def recipe_options(recipe_cls: type[Recipe], raw: dict[str, str]) -> Any:
    """``recipe_cls.Options`` from ``--opt`` strings, typed and checked by
    :func:`recipes.base.parse_options` (types, finite numbers, declared bounds, then the class's
    ``validate()``). Errors are :class:`ConfigError` naming ``--opt``."""
    try:
        return parse_options(recipe_cls, raw)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class TrainNet(nn.Module):
    """Backbone + recipe (+ the ``--seg`` decoder) in one module (what DDP / ``torch.compile``
    wrap and checkpoints hold)."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, decoder: nn.Module | None = None, *,
                 seg_start: int = 0, low: float = 0.25, high: float = 0.7) -> None:
        super().__init__()
        self.backbone = backbone
        self.recipe = recipe
        self.decoder = decoder
        self.seg_start, self.low, self.high = seg_start, low, high

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        terms = self.recipe(self.backbone, batch, step)
        if self.decoder is not None and step > self.seg_start:
            terms["seg"] = self.seg_step(batch)
        return terms

    def seg_step(self, batch: dict[str, Any]) -> LossTerm:
        """``--seg``: the decoder on the final feature map, ``seg_loss`` on PAR pseudo labels made
        (without gradient) from the recipe's CAM, PAR at half resolution as ToCo."""
        images, labels = batch["image"], batch["labels"]
        with torch.no_grad():
            cam = normalize_cam(self.recipe.cam(self.backbone, images, labels).float(), mode="max")
            half = F.interpolate(images.float(), scale_factor=0.5, mode="bilinear", align_corners=False)
            target = par_pseudo_labels(half, cam, labels, low=self.low, high=self.high,
                                       valid=batch.get("valid"), size=tuple(images.shape[-2:]))
        assert self.decoder is not None
        logits = self.decoder(final_feature_map(self.backbone, images))
        return LossTerm(1.0, seg_loss(logits.float(), target))


# ----------------------------------------------------------------------------- runtime
@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _setup_distributed(device_flag: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        return _Dist(rank, world, local, True)
    return _Dist(rank, world, local, False)


def _resolve_device(flag: str, dist: _Dist) -> torch.device:
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {flag!r} requested but CUDA is not available")
        if flag == "cuda":
            flag = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(torch.device(flag))
    return torch.device(flag)


def _autocast_factory(amp: str, device: torch.device) -> tuple[Any, str]:
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "off"
    if amp == "off":
        return contextlib.nullcontext, amp
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp: fp16 needs CUDA; use bf16 or off on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), amp


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _state_checksum(net: nn.Module, device: torch.device) -> torch.Tensor:
    vals = [t.detach().double().sum() for t in net.state_dict().values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    vals += [t.detach().double().sum() for t in net.state_dict().values()
             if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    return torch.stack(vals).to(device) if vals else torch.zeros(1, device=device)


def _states_in_sync(net: nn.Module, dist: _Dist, device: torch.device) -> bool | None:
    """All ranks hold the same parameters and buffers (banks, pools)?"""
    if dist.world <= 1:
        return None
    local = _state_checksum(net, device)
    gathered = [torch.empty_like(local) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _all_mean(values: dict[str, torch.Tensor], dist: _Dist) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    vec = torch.stack([values[k].detach().float() for k in keys])
    if dist.world > 1:
        torch.distributed.all_reduce(vec)
        vec = vec / dist.world
    return dict(zip(keys, vec.cpu().tolist(), strict=True))  # sync-ok: logging interval only


# ----------------------------------------------------------------------------- before a run
#: what a run writes into its folder (each must be a file where it exists)
_RUN_FILES = ("last.pt", "metrics.jsonl", "config.json", "summary.json", "curves.png")
_COMPARISON_FILES = ("comparison.md", "comparison.json")


@dataclasses.dataclass
class _Start:
    """How a run starts: fresh (``checkpoint`` None) or from a checkpoint, with the setting
    changes accepted by ``--allow-config-change`` as ``(flag, old, new)``."""

    checkpoint: str | None = None
    changes: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)


def _fresh_folder(folder: Path) -> Path:
    k = 2
    while Path(f"{folder}-{k}").exists():
        k += 1
    return Path(f"{folder}-{k}")


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _check_folder(folder: Path, *, resuming: bool, files: tuple[str, ...]) -> None:
    """The folder can take the run: not a file, empty unless resuming, ``files`` not folders, writable."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output: {folder} is a file, not a folder")
    entries = _entries(folder)
    if entries and not resuming:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"--output: {folder} already holds files ({shown}); continue that run with --resume auto, "
                          f"or start this one in a fresh folder (e.g. --output {_fresh_folder(folder)})")
    for name in files:
        if (folder / name).is_dir():
            raise ConfigError(f"--output: {folder / name} is a folder, but the run writes a file there; move it away")
    if (folder / "vis").exists() and not (folder / "vis").is_dir():
        raise ConfigError(f"--output: {folder / 'vis'} is a file, but the run writes pictures into a folder there")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except OSError as err:
        raise ConfigError(f"--output: cannot write to {folder} ({err.strerror or err})") from None
    finally:  # the run creates its folder when it starts; a check leaves nothing behind
        for p in created:
            if p.is_dir():
                p.rmdir()


def _checkpoint_to_resume(folder: Path, resume: str | None) -> str | None:
    """The checkpoint ``--resume`` continues from (None: a fresh start)."""
    if resume is None:
        return None
    own = folder / "last.pt"
    if resume == "auto":
        if own.exists():
            return str(own)
        if _entries(folder):
            raise ConfigError(f"--resume auto: {folder} holds files but no checkpoint (last.pt), so there is no run "
                              f"to continue; remove them, or start in a fresh folder (e.g. --output "
                              f"{_fresh_folder(folder)})")
        return None
    if _entries(folder) and not (own.is_file() and os.path.isfile(resume) and os.path.samefile(own, resume)):
        raise ConfigError(f"--output: {folder} holds another run; continue {resume} into an empty folder or into "
                          "the checkpoint's own folder")
    return resume


def _device_type(flag: str) -> str:
    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(flag).type


def _typed_opts(recipe: str, opts: dict[str, str]) -> dict[str, Any]:
    """Every option of ``recipe`` with its value (defaults included), so ``1`` and ``1.0`` compare
    equal; the raw strings when the recipe or a value no longer parses."""
    try:
        return dataclasses.asdict(recipe_options(get_recipe(recipe), opts))
    except (ValueError, ConfigError):
        return dict(opts)


def _resume_changes(cfg: TrainConfig, checkpoint: str, dist: _Dist) -> list[tuple[str, Any, Any]]:
    """The settings that alter the run and differ from the checkpoint's; refused unless
    ``--allow-config-change``."""
    saved = dict(read_checkpoint(checkpoint, mmap=True)["config"])
    device = _device_type(cfg.device)
    current = cfg.to_json() | {"device": device, "amp": _autocast_factory(cfg.amp, torch.device(device))[1]}
    current["opts"] = _typed_opts(cfg.recipe, cfg.opts)
    saved["opts"] = _typed_opts(str(saved.get("recipe", cfg.recipe)), dict(saved.get("opts", {})))
    saved["device"] = _device_type(str(saved.get("device", device)))
    changes = config_changes(saved, current)
    if saved.get("world_size", 1) != dist.world:
        changes.append(("processes (torchrun --nproc_per_node)", saved.get("world_size", 1), dist.world))
    if changes and not cfg.allow_config_change:
        listed = "; ".join(f"{flag} {old!r} -> {new!r}" for flag, old, new in changes)
        raise ConfigError(f"--resume: {checkpoint} was trained with other settings: {listed}. Continuing would give a "
                          "run that is neither the old one nor a new one: repeat the run's flags (or pass --config "
                          f"{Path(checkpoint).parent / 'config.json'}), start a fresh run in another folder, or pass "
                          "--allow-config-change to continue with the new values")
    return changes


def _plan_start(cfg: TrainConfig, out_dir: str, dist: _Dist) -> _Start:
    folder = Path(out_dir)
    _check_folder(folder, resuming=cfg.resume is not None, files=_RUN_FILES)
    checkpoint = _checkpoint_to_resume(folder, cfg.resume)
    return _Start(checkpoint, _resume_changes(cfg, checkpoint, dist) if checkpoint else [])


def _preflight(cfg: TrainConfig, plan: list[tuple[str, TrainConfig, str]], dist: _Dist) -> list[_Start]:
    """Check every run folder and checkpoint before anything trains (rank 0; the verdict is
    broadcast so every rank stops alike)."""
    result: list[_Start] | str = ""
    if dist.is_main:
        try:
            if len(plan) > 1:
                _check_folder(Path(cfg.output), resuming=cfg.resume is not None, files=_COMPARISON_FILES)
            result = [_plan_start(sub, out_dir, dist) for _, sub, out_dir in plan]
        except ConfigError as err:
            result = str(err)
    if dist.world > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, str):
        raise ConfigError(result)
    return result


# ----------------------------------------------------------------------------- one run
@dataclasses.dataclass
class _Run:
    """Everything one training run holds: built by :func:`_setup`, advanced by :func:`_resume`
    and :func:`_train_loop`, read by :func:`_summarize`."""

    cfg: TrainConfig
    out_dir: str
    dist: _Dist
    device: torch.device
    amp: str
    autocast: Callable[[], Any]
    say: Callable[[str], None]
    info: dict[str, Any]
    train_ds: Any
    val_ds: Any
    net: TrainNet
    options: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless --amp fp16
    resolved: dict[str, Any]
    writer: JsonlWriter  # metrics.jsonl on rank 0 (appends; _resume cuts it back first)
    start: _Start = dataclasses.field(default_factory=_Start)
    start_step: int = 0
    saved_step: int = 0  # step of the latest checkpoint
    faults: dict[str, None] = dataclasses.field(default_factory=dict)  # unusable files met, in order
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rng: Any = None  # RNG states of a resumed checkpoint, restored right before its first step
    vis_batch: dict[str, Any] | None = None
    pictures: list[str] = dataclasses.field(default_factory=list)
    eval_time: float = 0.0

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out_dir, "last.pt")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, "metrics.jsonl")

    @property
    def checkpoint_scaler(self) -> torch.amp.GradScaler | None:
        return self.scaler if self.scaler.is_enabled() else None


def _build_net(cfg: TrainConfig, info: dict[str, Any]) -> tuple[TrainNet, Any]:
    """Backbone + recipe (with its parsed options); option and model mismatches are ConfigErrors."""
    backbone = build_backbone(cfg)
    recipe_cls = get_recipe(cfg.recipe)
    kind = backbone_kind(backbone)
    if kind not in recipe_cls.backbones:
        raise ConfigError(f"--recipe {cfg.recipe}: supports {'/'.join(sorted(recipe_cls.backbones))} "
                          f"backbones, --model {cfg.model} is a {kind}")
    options = recipe_options(recipe_cls, cfg.opts)
    try:
        recipe = recipe_cls(backbone, info["num_classes"], cfg, options, dict(info, data=cfg.data))
    except (ValueError, TypeError) as err:  # option checks against the model / data
        raise ConfigError(f"--recipe {cfg.recipe}: {err}") from err
    decoder = LargeFOV(feature_dim(backbone), info["num_classes"]) if cfg.seg else None
    return TrainNet(backbone, recipe, decoder, seg_start=int(cfg.seg_warmup * cfg.iterations),
                    low=cfg.low, high=cfg.high), options


def _setup(cfg: TrainConfig, out_dir: str, dist: _Dist, start: _Start) -> _Run:
    """Runtime (device, precision, threads, seeds), data, model, optimiser and schedule."""
    say = (lambda msg: print(msg, flush=True)) if dist.is_main and not cfg.quiet else (lambda msg: None)
    device = _resolve_device(cfg.device, dist)
    autocast, amp = _autocast_factory(cfg.amp, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed, cfg.deterministic)

    train_ds, val_ds, info = build_datasets(cfg)
    net, options = _build_net(cfg, info)
    net = net.to(device)
    heads = net.recipe if net.decoder is None else nn.ModuleList([net.recipe, net.decoder])
    optimizer = build_optimizer(net.backbone, heads, lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                                weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=cfg.warmup, max_steps=cfg.iterations,
                                warmup_ratio=cfg.warmup_ratio, power=cfg.power)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if dist.is_main:  # the data and the model are there: the run starts writing
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    resolved = cfg.to_json() | {"recipe_options": dataclasses.asdict(options), "amp": amp,
                                "device": str(device), "world_size": dist.world,
                                "num_classes": info["num_classes"], "output": out_dir}
    return _Run(cfg=cfg, out_dir=out_dir, dist=dist, device=device, amp=amp, autocast=autocast, say=say,
                info=info, train_ds=train_ds, val_ds=val_ds, net=net, options=options, optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, resolved=resolved, start=start,
                writer=JsonlWriter(os.path.join(out_dir, "metrics.jsonl") if dist.is_main else None))


def _resume(run: _Run) -> None:
    """Load the checkpoint (``--resume``), write ``config.json`` and cut the metrics log back to
    the checkpoint's step (recording accepted setting changes there)."""
    cfg, dist, resume = run.cfg, run.dist, run.start.checkpoint
    if resume is not None:
        payload = load_checkpoint(resume, net=run.net, optimizer=run.optimizer, scheduler=run.scheduler,
                                  scaler=run.checkpoint_scaler, map_location=run.device)
        run.start_step, run.history = int(payload["step"]), list(payload["history"])
        run.saved_step, run.rng = run.start_step, payload["rng"]
        run.say(f"[{cfg.recipe}] resumed from {resume} at step {run.start_step}")
        if dist.is_main:
            for flag, old, new in run.start.changes:
                print(f"[{cfg.recipe}] warning: --allow-config-change: {flag} {old!r} -> {new!r} from step "
                      f"{run.start_step + 1}", file=sys.stderr, flush=True)
    if dist.is_main:
        with open(os.path.join(run.out_dir, "config.json"), "w") as fh:
            json.dump(run.resolved, fh, indent=2)
        try:
            records = read_jsonl(run.metrics_path)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
        kept = [r for r in records if r.get("step", 0) <= run.start_step]
        with open(run.metrics_path, "w") as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        if run.start.changes:
            run.writer.write({"kind": "config_change", "step": run.start_step,
                              "changes": {flag: [old, new] for flag, old, new in run.start.changes}})
    run.say(f"[{cfg.recipe}] config: " + json.dumps({k: v for k, v in run.resolved.items()
                                                     if v not in (None, {}, [])}, default=str))


def _wrap(run: _Run) -> nn.Module:
    """The module the loop calls: DDP over ranks, then ``torch.compile`` when asked."""
    model: nn.Module = run.net
    if run.dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
    if run.cfg.compile:
        model = torch.compile(model)
    return model


def _take_faults(run: _Run, batch: dict[str, Any]) -> dict[str, Any]:
    """Remove the batch's ``faults`` (messages of unusable files its items stand in for); warn
    once per file (on the rank that met it) and remember them for the summary."""
    for group in batch.pop("faults", ()):
        for message in group:
            if message not in run.faults:
                run.faults[message] = None
                rank = f" (rank {run.dist.rank})" if run.dist.world > 1 else ""
                print(f"[{run.cfg.recipe}] warning{rank}: skipped an unusable file ({len(run.faults)} so far): "
                      f"{message}", file=sys.stderr, flush=True)
    return batch


def _fault_free(run: _Run, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield _take_faults(run, batch)


def _services(run: _Run) -> LoopServices:
    """What :meth:`Recipe.after_step` may use (un-augmented training batches, autocast, log)."""
    dist, plain = run.dist, run.info["train_plain"]

    def plain_loader(n: int) -> Iterator[dict[str, Any]]:
        # equal item (hence batch) counts on every rank: pool updates all-gather per batch
        n = min(n, len(plain))
        n -= n % dist.world
        for b in _fault_free(run, eval_loader(plain, n, run.cfg.eval_batch_size, rank=dist.rank, world=dist.world)):
            yield to_device(b, run.device)

    return LoopServices(backbone=run.net.backbone, config=run.cfg, device=run.device,
                        train_eval_loader=plain_loader, autocast=run.autocast, log=run.say)


def _run_eval(run: _Run, step: int) -> dict[str, float]:
    """Evaluate, log, append to the history and draw the panels; the time counts as evaluation."""
    cfg, dist = run.cfg, run.dist
    t = time.time()
    loader = eval_loader(run.val_ds, cfg.eval_images, cfg.eval_batch_size, rank=dist.rank, world=dist.world,
                         workers=min(cfg.workers, 2))
    metrics = evaluate(run.net, _fault_free(run, loader), num_classes=run.info["num_classes"], cfg=cfg,
                       device=run.device, autocast=run.autocast)
    record = {"kind": "eval", "step": step, **metrics, "eval_time_s": time.time() - t}
    run.writer.write(record)
    run.history.append(record)
    if run.vis_batch is not None:
        run.pictures = save_panels(os.path.join(run.out_dir, "vis", f"step{step:06d}"), run.net, run.vis_batch,
                                   cfg=cfg, device=run.device, palette=run.info["palette"],
                                   autocast=run.autocast)
    run.say(f"[{cfg.recipe}] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    run.eval_time += time.time() - t
    return metrics


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    params: Iterable[nn.Parameter], clip_grad: float | None) -> None:
    """Backward, optional gradient clipping and the optimiser step, for every AMP mode.

    ``scaler`` is a disabled (pass-through) ``GradScaler`` except under fp16, so the same calls
    serve off / bf16 / fp16; gradients are unscaled before they are clipped.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def grad_norms(terms: dict[str, LossTerm], groups: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient each weighted term (and their sum, ``total``) sends to each
    parameter group: ``{"grad/<term>/<group>": norm}``.

    One ``torch.autograd.grad`` per term with ``retain_graph=True``; ``.grad`` is untouched,
    so the optimiser step that follows is unchanged. A term with weight 0, or with no graph
    (e.g. a term reported as a detached 0), gives exactly 0; a group the term does not reach
    gives 0.
    """
    out: dict[str, torch.Tensor] = {}
    params = [p for ps in groups.values() for p in ps]
    live = {n: t.weight * t.value.float() for n, t in terms.items() if t.weight != 0 and t.value.requires_grad}
    if live:
        live["total"] = sum(live.values())  # type: ignore[assignment]
    for name in [*terms, "total"]:
        loss = live.get(name)
        if loss is None:
            grads: tuple[torch.Tensor | None, ...] = (None,) * len(params)
        else:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        i = 0
        for group, ps in groups.items():
            sq = [g.detach().float().pow(2).sum() for g in grads[i:i + len(ps)] if g is not None]
            out[f"grad/{name}/{group}"] = torch.stack(sq).sum().sqrt() if sq else torch.zeros(())
            i += len(ps)
    return out


def _grad_groups(net: TrainNet) -> dict[str, list[nn.Parameter]]:
    heads = [p for m in (net.recipe, net.decoder) if m is not None for p in m.parameters() if p.requires_grad]
    return {"backbone": [p for p in net.backbone.parameters() if p.requires_grad], "heads": heads}


class _LossLog:
    """Running means of the loss terms between log lines, plus the recipe's latest values."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.extra: dict[str, float] = {}

    def add(self, terms: dict[str, Any], total: torch.Tensor, extra: dict[str, float] | None) -> None:
        for name, term in terms.items():
            self.sums[name] = self.sums.get(name, 0) + term.value.detach().float()
        self.sums["total"] = self.sums.get("total", 0) + total.detach()
        self.count += 1
        self.extra.update(extra or {})

    def flush(self, dist: _Dist) -> tuple[dict[str, float], dict[str, float]]:
        """``(loss means over the ranks, recipe values)`` since the last flush; resets."""
        means = _all_mean({n: v / self.count for n, v in self.sums.items()}, dist)
        extra = self.extra
        self.sums, self.count, self.extra = {}, 0, {}
        return means, extra


def _check_finite(run: _Run, step: int, means: dict[str, float]) -> None:
    """Stop a diverged run (a NaN / inf mean loss) instead of training on; fp16 is exempt, where
    the grad scaler skips overflowing steps by design."""
    if run.amp == "fp16" or math.isfinite(means["total"]):
        return
    bad = ", ".join(f"{n} {v}" for n, v in means.items() if not math.isfinite(v))
    kept = (f"the checkpoint {run.ckpt_path} of step {run.saved_step} is kept" if run.saved_step
            else "no checkpoint was saved")
    raise RunError(f"[{run.cfg.recipe}] step {step}: the loss is not finite ({bad}), so training diverged; "
                   f"{kept}. Lower --lr / --head-lr-mult or check the --opt values")


def _train_loop(run: _Run, model: nn.Module, services: LoopServices) -> tuple[int, float]:
    """Steps ``start_step + 1 .. end_step``: forward, optimiser step, recipe update, log, periodic
    evaluation and checkpoint. Returns ``(last step, training seconds without evaluation)``."""
    cfg, dist, net = run.cfg, run.dist, run.net
    pbar = None
    if dist.is_main and cfg.progress and not cfg.quiet:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.iterations, initial=run.start_step, desc=cfg.recipe, dynamic_ncols=True,
                    leave=False)
    log = _LossLog()
    t_train, eval_before = time.time(), run.eval_time
    net.train()
    end_step = cfg.iterations
    if cfg.stop_after is not None:
        end_step = min(end_step, run.start_step + cfg.stop_after)
    loader = train_loader(run.train_ds, cfg, start_step=run.start_step, end_step=end_step, rank=dist.rank,
                          world=dist.world)
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    batches = iter(loader)
    if run.rng is not None:
        set_rng_state(run.rng)  # after everything above that may draw from the global RNGs
    step = run.start_step
    for step, batch in enumerate(batches, start=run.start_step + 1):
        batch = _take_faults(run, batch)
        with run.autocast():
            terms = model(to_device(batch, run.device), step)
        total = sum(t.weight * t.value.float() for t in terms.values() if t.weight != 0)
        if cfg.grad_norms and step % cfg.grad_norms == 0:  # before the backward frees the graph
            norms = grad_norms(terms, _grad_groups(net))
            run.writer.write({"kind": "grad", "step": step,
                              **{k: float(v) for k, v in norms.items()}})  # sync-ok: --grad-norms steps only
        _optimizer_step(total, run.optimizer, run.scaler, net.parameters(), cfg.clip_grad)
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        log.add(terms, total, net.recipe.after_step(step, services))
        save = (step % ckpt_every == 0 or step == end_step) and dist.is_main
        # end_step: also a --stop-after stop; a checkpoint step logs too, so no diverged state is saved
        if step % cfg.log_every == 0 or step == end_step or step % ckpt_every == 0:
            means, extra = log.flush(dist)
            _check_finite(run, step, means)
            run.writer.write({"kind": "train", "step": step, "lr": lr, **{f"loss/{n}": v for n, v in means.items()},
                              **extra, "time_s": time.time() - t_train})
            if pbar is not None:
                pbar.set_postfix({n: f"{v:.3g}" for n, v in means.items()}, refresh=False)
        if pbar is not None:
            pbar.update(1)
        if step % cfg.eval_every == 0 and step != cfg.iterations:  # the final one runs in _summarize
            _run_eval(run, step)
        if save:
            save_checkpoint(run.ckpt_path, net=net, optimizer=run.optimizer, scheduler=run.scheduler,
                            scaler=run.checkpoint_scaler, step=step, config=run.resolved, history=run.history)
            run.saved_step = step
    if pbar is not None:
        pbar.close()
    return step, time.time() - t_train - (run.eval_time - eval_before)


def _final_metrics(run: _Run, step: int) -> dict[str, Any]:
    """The last evaluation: run it unless this step was just evaluated; a stopped run reports the
    latest one it has."""
    cfg = run.cfg
    if step < cfg.iterations:
        run.say(f"[{cfg.recipe}] stopped after step {step} of {cfg.iterations}; "
                f"continue with --resume auto --output {cfg.output}")
        return dict(run.history[-1]) if run.history else {}
    if not run.history or run.history[-1]["step"] != step:
        return _run_eval(run, step)
    return {m: run.history[-1][m] for m in ("cam_miou", "cam_miou_best", "best_threshold", "pseudo_miou",
                                            "pseudo_coverage", "seg_miou", "seg_crf_miou")
            if m in run.history[-1]}


def _summarize(run: _Run, step: int, train_time: float, t_start: float) -> dict[str, Any]:
    """Final evaluation, DDP state check, curves and ``summary.json``."""
    cfg, dist = run.cfg, run.dist
    final = _final_metrics(run, step)
    in_sync = _states_in_sync(run.net, dist, run.device)
    skipped = list(run.faults)
    if dist.world > 1:
        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, skipped)
        skipped = list(dict.fromkeys(m for part in gathered for m in part))
    if skipped:
        run.say(f"[{cfg.recipe}] {len(skipped)} unusable file(s) skipped (listed in summary.json, skipped_files)")
    curves = None
    if dist.is_main and cfg.plots:
        curves = plot_curves(run.metrics_path, os.path.join(run.out_dir, "curves.png"),
                             title=f"{cfg.recipe} on {cfg.data}")
    summary = {
        "recipe": cfg.recipe,
        "recipe_options": dataclasses.asdict(run.options),
        "data": cfg.data,
        "model": cfg.model,
        "steps": step,
        "start_step": run.start_step,
        "finished": step >= cfg.iterations,
        "final": final,
        "history": run.history,
        "train_time_s": train_time,
        "eval_time_s": run.eval_time,
        "total_time_s": time.time() - t_start,
        "device": str(run.device),
        "amp": run.amp,
        "world_size": dist.world,
        "ddp_state_in_sync": in_sync,
        "output": run.out_dir,
        "checkpoint": run.ckpt_path,
        "pictures": run.pictures,
        "curves": curves,
        "skipped_files": skipped,
        "config": run.resolved,
    }
    if dist.is_main:
        with open(os.path.join(run.out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    dist.barrier()
    return summary


def _train_one(cfg: TrainConfig, out_dir: str, dist: _Dist, start: _Start) -> dict[str, Any]:
    """Train one recipe into ``out_dir`` and return its summary."""
    t_start = time.time()
    run = _setup(cfg, out_dir, dist, start)
    _resume(run)
    model = _wrap(run)
    services = _services(run)
    if dist.is_main and cfg.plots and cfg.vis_images > 0:
        run.vis_batch = _take_faults(run, make_vis_batch(run.val_ds, cfg.vis_images, cfg.img_size))
    step, train_time = _train_loop(run, model, services)
    return _summarize(run, step, train_time, t_start)


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the trainer with command-line ``argv``; returns the summary of the chosen recipe.

    With a comparison (``--baseline on``, or ``auto`` on synthetic data) the baseline and the
    recipe are trained one after the other into ``OUTPUT/baseline`` and ``OUTPUT/<recipe>``,
    a table is printed and written to ``OUTPUT/comparison.md`` / ``comparison.json``, and the
    returned summary has a ``comparison`` entry. Every run folder and checkpoint is checked
    before the first step.
    """
    cfg = parse_config(argv)
    try:  # unknown recipes and bad --opt values fail before anything starts
        recipe_options(get_recipe(cfg.recipe), cfg.opts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    compare = cfg.recipe != "baseline" and (
        cfg.baseline == "on" or (cfg.baseline == "auto" and cfg.data == "synthetic"))
    if compare and cfg.resume not in (None, "auto"):
        raise ConfigError("--resume: with a baseline comparison use --resume auto "
                          "(or --baseline off to resume one run from a file)")
    assert cfg.output is not None  # parse_config sets it
    plan = [(cfg.recipe, cfg, cfg.output)]
    if compare:  # each part is one run: its config.json replays it alone
        plan = [(name, dataclasses.replace(cfg, recipe=name, opts=cfg.opts if name == cfg.recipe else {},
                                           baseline="off", output=os.path.join(cfg.output, name)),
                 os.path.join(cfg.output, name)) for name in ("baseline", cfg.recipe)]
    dist = _setup_distributed(cfg.device)
    try:
        if cfg.grad_norms and dist.world > 1:
            raise ConfigError("--grad-norms: single process only (per-term torch.autograd.grad bypasses DDP's "
                              "gradient reduction)")
        starts = _preflight(cfg, plan, dist)
        runs = {name: _train_one(sub, out_dir, dist, start)
                for (name, sub, out_dir), start in zip(plan, starts, strict=True)}
        table = format_table([(n, s["final"], s["total_time_s"]) for n, s in runs.items()])
        summary = dict(runs[cfg.recipe])
        if dist.is_main:
            print(table, flush=True)
        if not compare:
            return summary
        summary["comparison"] = {n: s["final"] | {"total_time_s": s["total_time_s"]}
                                 for n, s in runs.items()}
        summary["comparison_table"] = table
        if dist.is_main:
            with open(os.path.join(cfg.output, "comparison.md"), "w") as fh:
                fh.write(table + "\n")
            with open(os.path.join(cfg.output, "comparison.json"), "w") as fh:
                json.dump(summary["comparison"], fh, indent=2)
        return summary
    finally:
        if dist.initialized_here:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        exit_process(2)
    except (RunError, DataFileError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        exit_process(1)
    exit_process(0)
