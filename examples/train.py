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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _backbone import backbone_kind, build_backbone  # noqa: E402
from _checkpoint import load_checkpoint, save_checkpoint, set_rng_state  # noqa: E402
from _config import DATASET_DEFAULTS, ConfigError, TrainConfig, parse_config  # noqa: E402
from _data import build_datasets, eval_loader, to_device, train_loader  # noqa: E402
from _evaluate import evaluate, save_panels  # noqa: E402
from _evaluate import vis_batch as make_vis_batch  # noqa: E402
from _optim import build_optimizer, build_scheduler  # noqa: E402
from _report import JsonlWriter, format_table, plot_curves, read_jsonl  # noqa: E402
from recipes import LoopServices, Recipe, get_recipe, parse_options  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["main", "TrainNet", "build_backbone"]


class TrainNet(nn.Module):
    """Backbone + recipe in one module (what DDP / ``torch.compile`` wrap and checkpoints hold)."""

    def __init__(self, backbone: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.backbone = backbone
        self.recipe = recipe

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        return self.recipe(self.backbone, batch, step)


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
    return dict(zip(keys, vec.cpu().tolist()))  # sync-ok: logging interval only


# ----------------------------------------------------------------------------- one run
def _train_one(cfg: TrainConfig, out_dir: str, dist: _Dist) -> dict[str, Any]:
    t_start = time.time()
    say = (lambda msg: print(msg, flush=True)) if dist.is_main and not cfg.quiet else (lambda msg: None)
    device = _resolve_device(cfg.device, dist)
    autocast, amp = _autocast_factory(cfg.amp, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed, cfg.deterministic)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()

    train_ds, val_ds, info = build_datasets(cfg)
    k = info["num_classes"]
    backbone = build_backbone(cfg)
    recipe_cls = get_recipe(cfg.recipe)
    kind = backbone_kind(backbone)
    if kind not in recipe_cls.backbones:
        raise ConfigError(f"--recipe {cfg.recipe}: supports {'/'.join(sorted(recipe_cls.backbones))} "
                          f"backbones, --model {cfg.model} is a {kind}")
    try:
        options = parse_options(recipe_cls, cfg.opts)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        recipe = recipe_cls(backbone, k, cfg, options, dict(info, data=cfg.data))
    except (ValueError, TypeError) as err:  # option checks against the model / data
        raise ConfigError(f"--recipe {cfg.recipe}: {err}") from err
    net = TrainNet(backbone, recipe).to(device)
    optimizer = build_optimizer(net.backbone, net.recipe, lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                                weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=cfg.warmup, max_steps=cfg.iterations,
                                warmup_ratio=cfg.warmup_ratio, power=cfg.power)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    resolved = cfg.to_json() | {"recipe_options": dataclasses.asdict(options), "amp": amp,
                                "device": str(device), "world_size": dist.world,
                                "num_classes": k, "output": out_dir}
    ckpt_path = os.path.join(out_dir, "last.pt")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    start_step, history, rng = 0, [], None
    resume = cfg.resume
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    if resume is not None:
        payload = load_checkpoint(resume, net=net, optimizer=optimizer, scheduler=scheduler,
                                  scaler=scaler, map_location=device)
        start_step, history = int(payload["step"]), list(payload["history"])
        rng = payload["rng"]  # restored right before the first resumed step
        say(f"[{cfg.recipe}] resumed from {resume} at step {start_step}")
    if dist.is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump(resolved, fh, indent=2)
        # keep the log consistent with the checkpoint: drop records after start_step
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= start_step]
        with open(metrics_path, "w") as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    say(f"[{cfg.recipe}] config: " + json.dumps({k_: v for k_, v in resolved.items()
                                                 if v not in (None, {}, [])}, default=str))
    writer = JsonlWriter(metrics_path if dist.is_main else None)

    model: nn.Module = net
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
    if cfg.compile:
        model = torch.compile(model)

    def plain_loader(n: int):
        # equal item (hence batch) counts on every rank: pool updates all-gather per batch
        n = min(n, len(info["train_plain"]))
        n -= n % dist.world
        bs = cfg.eval_batch_size
        for b in eval_loader(info["train_plain"], n, bs, rank=dist.rank, world=dist.world):
            yield to_device(b, device)

    services = LoopServices(backbone=net.backbone, config=cfg, device=device,
                            train_eval_loader=plain_loader, autocast=autocast, log=say)
    vis_batch = None
    if dist.is_main and cfg.plots and cfg.vis_images > 0:
        vis_batch = make_vis_batch(val_ds, cfg.vis_images, cfg.img_size)
    pictures: list[str] = []

    def run_eval(step: int) -> dict[str, float]:
        nonlocal pictures
        t = time.time()
        loader = eval_loader(val_ds, cfg.eval_images, cfg.eval_batch_size, rank=dist.rank,
                             world=dist.world, workers=min(cfg.workers, 2))
        metrics = evaluate(net, loader, num_classes=k, cfg=cfg, device=device, autocast=autocast)
        record = {"kind": "eval", "step": step, **metrics, "eval_time_s": time.time() - t}
        writer.write(record)
        history.append(record)
        if vis_batch is not None:
            pictures = save_panels(os.path.join(out_dir, "vis", f"step{step:06d}"), net, vis_batch,
                                   cfg=cfg, device=device, palette=info["palette"], autocast=autocast)
        say(f"[{cfg.recipe}] step {step}: " + ", ".join(f"{k_} {v:.3f}" for k_, v in metrics.items()))
        return metrics

    pbar = None
    if dist.is_main and cfg.progress and not cfg.quiet:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.iterations, initial=start_step, desc=cfg.recipe, dynamic_ncols=True,
                    leave=False)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    extra: dict[str, float] = {}  # recipe values (pool statistics) for the next log line
    t_train = time.time()
    eval_time = 0.0
    net.train()
    end_step = cfg.iterations
    if cfg.stop_after is not None:
        end_step = min(end_step, start_step + cfg.stop_after)
    loader = train_loader(train_ds, cfg, start_step=start_step, end_step=end_step, rank=dist.rank,
                          world=dist.world)
    step = start_step
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    batches = iter(loader)
    if rng is not None:
        set_rng_state(rng)  # after everything above that may draw from the global RNGs
    for step, batch in enumerate(batches, start=start_step + 1):
        batch = to_device(batch, device)
        with autocast():
            terms = model(batch, step)
        total = sum(t.weight * t.value.float() for t in terms.values() if t.weight != 0)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
        else:
            total.backward()
        if cfg.clip_grad is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        extra.update(recipe.after_step(step, services) or {})
        for name, term in terms.items():
            sums[name] = sums.get(name, 0) + term.value.detach().float()
        sums["total"] = sums.get("total", 0) + total.detach()
        count += 1
        if step % cfg.log_every == 0 or step == end_step:  # end_step: also a --stop-after stop
            means = _all_mean({n: v / count for n, v in sums.items()}, dist)
            record = {"kind": "train", "step": step, "lr": lr,
                      **{f"loss/{n}": v for n, v in means.items()}, **extra,
                      "time_s": time.time() - t_train}
            writer.write(record)
            if pbar is not None:
                pbar.set_postfix({n: f"{v:.3g}" for n, v in means.items()}, refresh=False)
            sums, count, extra = {}, 0, {}
        if pbar is not None:
            pbar.update(1)
        if step % cfg.eval_every == 0 and step != cfg.iterations:  # the final one runs below
            t = time.time()
            run_eval(step)
            eval_time += time.time() - t
        if (step % ckpt_every == 0 or step == end_step) and dist.is_main:
            save_checkpoint(ckpt_path, net=net, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, step=step, config=resolved, history=history)
    if pbar is not None:
        pbar.close()
    train_time = time.time() - t_train - eval_time
    t = time.time()
    finished = step >= cfg.iterations
    if not finished:
        final = dict(history[-1]) if history else {}
        say(f"[{cfg.recipe}] stopped after step {step} of {cfg.iterations}; "
            f"continue with --resume auto --output {cfg.output}")
    elif not history or history[-1]["step"] != step:
        final = run_eval(step)
    else:
        final = {m: history[-1][m] for m in ("cam_miou", "cam_miou_best", "best_threshold",
                                              "pseudo_miou", "pseudo_coverage")}
    eval_time += time.time() - t
    in_sync = _states_in_sync(net, dist, device)
    curves = None
    if dist.is_main and cfg.plots:
        curves = plot_curves(metrics_path, os.path.join(out_dir, "curves.png"),
                             title=f"{cfg.recipe} on {cfg.data}")
    summary = {
        "recipe": cfg.recipe,
        "recipe_options": dataclasses.asdict(options),
        "data": cfg.data,
        "model": cfg.model,
        "steps": step,
        "start_step": start_step,
        "finished": finished,
        "final": final,
        "history": history,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "total_time_s": time.time() - t_start,
        "device": str(device),
        "amp": amp,
        "world_size": dist.world,
        "ddp_state_in_sync": in_sync,
        "output": out_dir,
        "checkpoint": ckpt_path,
        "pictures": pictures,
        "curves": curves,
        "config": resolved,
    }
    if dist.is_main:
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    dist.barrier()
    return summary


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the trainer with command-line ``argv``; returns the summary of the chosen recipe.

    With a comparison (``--baseline on``, or ``auto`` on synthetic data) the baseline and the
    recipe are trained one after the other into ``OUTPUT/baseline`` and ``OUTPUT/<recipe>``,
    a table is printed and written to ``OUTPUT/comparison.md`` / ``comparison.json``, and the
    returned summary has a ``comparison`` entry.
    """
    cfg = parse_config(argv)
    try:  # unknown recipes and bad --opt values fail before anything starts
        parse_options(get_recipe(cfg.recipe), cfg.opts)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    compare = cfg.recipe != "baseline" and (
        cfg.baseline == "on" or (cfg.baseline == "auto" and cfg.data == "synthetic"))
    if compare and cfg.resume not in (None, "auto"):
        raise ConfigError("--resume: with a baseline comparison use --resume auto "
                          "(or --baseline off to resume one run from a file)")
    dist = _setup_distributed(cfg.device)
    try:
        if not compare:
            summary = _train_one(cfg, cfg.output, dist)
            if dist.is_main:
                print(format_table([(cfg.recipe, summary["final"], summary["total_time_s"])]),
                      flush=True)
            return summary
        runs: dict[str, dict[str, Any]] = {}
        for name in ("baseline", cfg.recipe):
            opts = cfg.opts if name == cfg.recipe else dict(
                DATASET_DEFAULTS[cfg.data].get("recipe_opts", {}).get(name, {}))
            sub = dataclasses.replace(cfg, recipe=name, opts=opts)
            runs[name] = _train_one(sub, os.path.join(cfg.output, name), dist)
        table = format_table([(n, s["final"], s["total_time_s"]) for n, s in runs.items()])
        summary = dict(runs[cfg.recipe])
        summary["comparison"] = {n: s["final"] | {"total_time_s": s["total_time_s"]}
                                 for n, s in runs.items()}
        summary["comparison_table"] = table
        if dist.is_main:
            print(table, flush=True)
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
        sys.exit(2)
