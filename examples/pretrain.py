#!/usr/bin/env python
"""Formula-driven pretraining without downloads: classify procedural IFS fractals (FractalDB-style).

    python examples/pretrain.py --output runs/fractal                       # tiny synthetic ViT, CPU
    python examples/train.py --pretrained runs/fractal/weights.pth         # use it in the trainer
    torchrun --nproc_per_node 2 examples/pretrain.py --output runs/fractal # DDP (gloo / nccl)
    python examples/pretrain.py --model vit_small_patch16_224 --img-size 224 --patch-size 16 \\
        --depth 12 --embed-dim 384 --num-heads 6 --classes 1000 --iterations 20000 --batch-size 128

Every class is an iterated function system (Kataoka et al., ACCV 2020): 2-4 contractive affine
maps of the plane with probabilities proportional to their area scaling, drawn from the class's
own seed and kept only when its attractor covers enough of the canvas. An image is rendered on
the fly by the chaos game, batched in torch (every image's point cloud advances one map per
step), normalised to the canvas, randomly rotated, flipped, scaled and shifted, and drawn as a
density in a random colour on a random background with noise. Nothing of the WSSS scenes
appears (no masks, no object shapes, no textures of the synthetic scenes), so nothing leaks
into their evaluation. By default the shapes are grey on a dark background (``--colour`` for
random colours): on a 2-core CPU budget colour is a nuisance the tiny ViT does not get past
(chance accuracy after 200 steps with random colours; above 40 % on 10 classes after 120 steps
in grey).

Training: single-label cross-entropy on a linear head over the mean of the final patch tokens,
AdamW with the trainer's warm-up + poly schedule (``_optim``), AMP, DDP, exact ``--resume``
(``_checkpoint``; the batch of step ``t`` is a function of ``seed`` and ``t``), tqdm, a
``metrics.jsonl``. ``OUTPUT/weights.pth`` is the backbone's ``state_dict`` without the head,
loadable with ``examples/train.py --pretrained`` (timm's local-file loader).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _checkpoint import load_checkpoint, save_checkpoint, set_rng_state  # noqa: E402
from _config import DATASET_DEFAULTS  # noqa: E402
from _optim import build_optimizer, build_scheduler  # noqa: E402
from _process import exit_process  # noqa: E402
from _report import JsonlWriter  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

__all__ = ["fractal_systems", "render_fractals", "PretrainNet", "linear_probe", "main"]


# ----------------------------------------------------------------------------- fractals
def _random_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """2-4 contractive affine maps ``[A | t]`` (rotation . diag(s) . rotation, s in [0.25, 0.85],
    random reflection) and probabilities proportional to ``|det A|``."""
    n = int(rng.integers(2, 5))
    maps = np.zeros((n, 2, 3))
    for i in range(n):
        a, b = rng.uniform(0, 2 * math.pi, size=2)
        rot = lambda t: np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])  # noqa: E731
        scale = np.diag(rng.uniform(0.25, 0.85, size=2) * np.array([1.0, rng.choice([-1.0, 1.0])]))
        maps[i, :, :2] = rot(a) @ scale @ rot(b)
        maps[i, :, 2] = rng.uniform(-1, 1, size=2)
    det = np.abs(np.linalg.det(maps[:, :, :2])) + 1e-3
    return maps, det / det.sum()


def _coverage(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator, grid: int = 32) -> float:
    """Fraction of a ``grid x grid`` canvas the attractor covers (200 chaos-game chains, 20 kept steps)."""
    x = rng.uniform(-1, 1, size=(200, 2))
    pts = []
    for step in range(30):
        m = maps[rng.choice(len(probs), size=200, p=probs)]  # (200, 2, 3)
        x = np.einsum("pij,pj->pi", m[:, :, :2], x) + m[:, :, 2]
        if step >= 10:
            pts.append(x)
    p = np.concatenate(pts)
    p = (p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-9)
    cells = np.unique(np.minimum((p * grid).astype(int), grid - 1), axis=0)
    return len(cells) / grid**2


def fractal_systems(num_classes: int, *, seed: int = 0, min_coverage: float = 0.1, max_coverage: float = 0.45,
                    max_maps: int = 4) -> tuple[Tensor, Tensor]:
    """``num_classes`` IFS classes, deterministic in ``seed``: maps ``(N, max_maps, 2, 3)`` and
    probabilities ``(N, max_maps)`` (unused slots have probability 0).

    A drawn system is kept when its attractor covers between ``min_coverage`` and
    ``max_coverage`` of a 32x32 canvas (FractalDB's filling-rate filter; the upper bound drops
    solid blobs, which all look alike), otherwise the class draws again.

    Example:
        >>> maps, probs = fractal_systems(3, seed=0)
        >>> maps.shape, probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(3, dtype=torch.float64)))
        (torch.Size([3, 4, 2, 3]), torch.Size([3, 4]), True)
    """
    all_maps = np.zeros((num_classes, max_maps, 2, 3))
    all_probs = np.zeros((num_classes, max_maps))
    for c in range(num_classes):
        rng = np.random.default_rng([seed, c])
        while True:
            maps, probs = _random_system(rng)
            if min_coverage <= _coverage(maps, probs, rng) <= max_coverage:
                break
        all_maps[c, : len(probs)] = maps
        all_probs[c, : len(probs)] = probs
    return torch.from_numpy(all_maps), torch.from_numpy(all_probs)


def render_fractals(maps: Tensor, probs: Tensor, labels: Tensor, *, size: int, generator: torch.Generator,
                    points: int = 768, steps: int = 40, burn_in: int = 8, max_rotation: float = 15.0,
                    colour: bool = True) -> Tensor:
    """ImageNet-normalised images ``(B, 3, size, size)`` of the classes ``labels`` (chaos game, batched).

    Every image runs ``points`` independent chains for ``steps`` map applications; the points
    after ``burn_in`` are normalised to the canvas (min-max over the image's points), rotated by
    up to ``max_rotation`` degrees, flipped left-right, scaled by 0.6-1.0 and shifted, and
    accumulated into a density (divided by its 98th percentile) that is drawn in a random colour
    on a random background (``colour``) or light grey on dark grey, plus Gaussian noise.

    Example:
        >>> maps, probs = fractal_systems(2, seed=0)
        >>> g = torch.Generator().manual_seed(0)
        >>> render_fractals(maps, probs, torch.tensor([0, 1, 1]), size=32, generator=g).shape
        torch.Size([3, 3, 32, 32])
    """
    dev = labels.device
    b = labels.shape[0]
    m = maps.to(dev, torch.float32)[labels].flatten(2)  # (B, maps, 6)
    p = probs.to(dev, torch.float32)[labels]  # (B, maps)
    x = torch.rand(b, points, 2, generator=generator, device=dev) * 2 - 1
    kept = []
    for step in range(steps):
        pick = torch.multinomial(p, points, replacement=True, generator=generator)  # (B, points)
        aff = m.gather(1, pick[:, :, None].expand(b, points, 6))  # (B, points, 6)
        x = torch.stack([aff[..., 0] * x[..., 0] + aff[..., 1] * x[..., 1] + aff[..., 2],
                         aff[..., 3] * x[..., 0] + aff[..., 4] * x[..., 1] + aff[..., 5]], dim=-1)
        if step >= burn_in:
            kept.append(x)
    pts = torch.cat(kept, dim=1)  # (B, P, 2)
    lo, hi = pts.amin(1, keepdim=True), pts.amax(1, keepdim=True)
    pts = (pts - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1  # [-1, 1]
    angle = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * math.radians(max_rotation)
    cos, sin = angle.cos(), angle.sin()
    flip = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    scale = 0.6 + 0.4 * torch.rand(b, generator=generator, device=dev)
    rot = torch.stack([torch.stack([cos * flip, -sin * flip], -1), torch.stack([sin, cos], -1)], -2)
    pts = torch.einsum("bij,bpj->bpi", rot * scale[:, None, None] / math.sqrt(2), pts)
    pts = pts + (torch.rand(b, 1, 2, generator=generator, device=dev) * 2 - 1) * (1 - scale[:, None, None] * 0.7)
    cell = ((pts + 1) / 2 * size).long()
    inside = ((cell >= 0) & (cell < size)).all(-1)
    flat = (cell[..., 1].clamp(0, size - 1) * size + cell[..., 0].clamp(0, size - 1))
    density = torch.zeros(b, size * size, device=dev).scatter_add_(1, flat, inside.float())
    density = density.view(b, 1, size, size)
    density = (density / density.flatten(1).quantile(0.98, dim=1).clamp_min(1.0).view(b, 1, 1, 1)).clamp(max=1.0)
    if colour:
        fg = torch.rand(b, 3, 1, 1, generator=generator, device=dev)
        bg = torch.rand(b, 3, 1, 1, generator=generator, device=dev)
    else:  # light shape on a dark background, random grey levels
        fg = (0.6 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator, device=dev)).expand(b, 3, 1, 1)
        bg = (0.3 * torch.rand(b, 1, 1, 1, generator=generator, device=dev)).expand(b, 3, 1, 1)
    img = bg + (fg - bg) * density
    img = img + 0.03 * torch.randn(img.shape, generator=generator, device=dev)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return (img.clamp(0, 1) - mean) / std


# ----------------------------------------------------------------------------- evaluation
def _average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean over classes (with a positive) of the average precision of ``scores (N, K)``."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)[:, None]
    positives = hits.sum(0)
    ap = (precision * hits).sum(0) / positives.clamp_min(1)
    return ap[positives > 0].mean()


@torch.no_grad()
def _tokens(backbone: nn.Module, images: Tensor, batch: int = 128) -> Tensor:
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    return torch.cat([backbone.forward_features(images[i:i + batch])[:, prefix:]
                      for i in range(0, len(images), batch)])


def linear_probe(backbone: nn.Module, *, level: str = "patch", train_images: int = 256, val_images: int = 128,
                 steps: int = 300, seed: int = 0) -> float:
    """How much the frozen features say about the synthetic scenes: a linear probe's validation score.

    * ``level="patch"``: every final patch token predicts the ground-truth label at its patch
      centre (background + K classes; softmax regression); the score is the mIoU on the patch
      grid. This is what WSSS needs from a backbone: local features that separate classes.
    * ``level="image"``: the mean of the patch tokens predicts the image labels (multi-label
      logistic regression); the score is the mean average precision.

    Features are standardised with the training statistics; Adam, full batch, ``steps`` steps.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1)
        >>> 0.0 <= linear_probe(vit, train_images=8, val_images=8, steps=5) <= 1.0
        True
    """
    from wsss_blocks.data import SyntheticScenes
    from wsss_blocks.metrics import MeanIoU

    if level not in ("patch", "image"):
        raise ValueError(f"level: expected 'patch' or 'image', got {level!r}")
    was_training = backbone.training
    backbone.eval()
    size = int(getattr(getattr(backbone, "patch_embed", None), "img_size", (64, 64))[0])
    patch = int(getattr(getattr(backbone, "patch_embed", None), "patch_size", (8, 8))[0])
    data = {}
    for split, n in (("train", train_images), ("val", val_images)):
        ds = SyntheticScenes(split=split, length=n, image_size=size, seed=seed)
        items = [ds[i] for i in range(n)]
        tokens = _tokens(backbone, torch.stack([it["image"] for it in items]))
        if level == "image":
            data[split] = (tokens.mean(1), torch.stack([it["labels"] for it in items]).float())
        else:
            centre = torch.stack([it["mask"] for it in items])[:, patch // 2::patch, patch // 2::patch]
            data[split] = (tokens.flatten(0, 1), centre.flatten())
    backbone.train(was_training)
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    num_classes = ds.num_classes
    if level == "patch":
        keep = ytr != 255
        xtr, ytr = xtr[keep], ytr[keep]
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    outputs = num_classes if level == "image" else num_classes + 1
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(xtr.shape[1], outputs, generator=gen)).requires_grad_(True)
    bias = torch.zeros(outputs, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.01, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logits = xtr @ weight + bias
            loss = (F.binary_cross_entropy_with_logits(logits, ytr) if level == "image"
                    else F.cross_entropy(logits, ytr))
            loss.backward()
            opt.step()
    scores = (xva @ weight + bias).detach()
    if level == "image":
        return float(_average_precision(scores, yva))
    miou = MeanIoU(num_classes + 1)
    miou.update(scores.argmax(1)[None], yva[None])
    return float(miou.compute().miou)


# ----------------------------------------------------------------------------- model
class PretrainNet(nn.Module):
    """A timm ViT (``num_classes=0``) + a linear head on the mean of its final patch tokens."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(getattr(backbone, "num_features")), num_classes)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(images)[:, int(getattr(self.backbone, "num_prefix_tokens", 0)):]
        return self.head(tokens.mean(1))


def build_vit(args: argparse.Namespace) -> nn.Module:
    import timm

    return timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size,
                             patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                             num_heads=args.num_heads, dynamic_img_size=True, dynamic_img_pad=True)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    syn = DATASET_DEFAULTS["synthetic"]  # the trainer's default backbone is the default here too
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=syn["model"], help="a timm ViT name")
    p.add_argument("--img-size", type=int, default=syn["img_size"])
    p.add_argument("--patch-size", type=int, default=syn["patch_size"])
    p.add_argument("--depth", type=int, default=syn["depth"])
    p.add_argument("--embed-dim", type=int, default=syn["embed_dim"])
    p.add_argument("--num-heads", type=int, default=syn["num_heads"][0])
    p.add_argument("--classes", type=int, default=50, help="number of fractal classes")
    p.add_argument("--colour", action="store_true", help="random colours (default: grey shapes; colour "
                   "is a strong nuisance that slows learning on a short CPU budget)")
    p.add_argument("--points", type=int, default=768, help="chaos-game chains per image")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="seed of the classes, the data order and the init")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None, help="run folder (default runs/pretrain-<timestamp>)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="checkpoint file, or 'auto' (OUTPUT/last.pt)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this invocation")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    for name in ("classes", "points", "iterations", "batch_size", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    return args


def _batch(args: argparse.Namespace, maps: Tensor, probs: Tensor, step: int, rank: int, world: int,
           device: torch.device) -> tuple[Tensor, Tensor]:
    """The batch of global step ``step`` on ``rank``: a function of (seed, step, rank) only."""
    g = torch.Generator(device=device)
    g.manual_seed(args.seed * 1_000_003 + step * world + rank)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=g, device=device)
    images = render_fractals(maps, probs, labels, size=args.img_size, generator=g, points=args.points,
                             colour=args.colour)
    return images, labels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import train  # the trainer's runtime helpers: distributed setup, device, autocast, seeding

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = train._setup_distributed(args.device)
    device = train._resolve_device(args.device, dist)
    autocast, amp = train._autocast_factory(args.amp, device)
    train._seed_everything(args.seed, False)
    out = args.output or os.path.join("runs", time.strftime("pretrain-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)

    maps, probs = fractal_systems(args.classes, seed=args.seed)
    net = PretrainNet(build_vit(args), args.classes).to(device)
    optimizer = build_optimizer(net.backbone, net.head, lr=args.lr, head_lr_mult=1.0,
                                weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=args.warmup, max_steps=args.iterations)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    config = {k: v for k, v in vars(args).items()} | {"amp": amp, "world_size": dist.world}
    start, rng = 0, None
    ckpt = os.path.join(out, "last.pt")
    if args.resume:
        payload = load_checkpoint(ckpt if args.resume == "auto" else args.resume, net=net, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler, map_location=device)
        start, rng = int(payload["step"]), payload["rng"]
    model: nn.Module = net
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log = JsonlWriter(os.path.join(out, "metrics.jsonl")) if dist.is_main else None
    if rng is not None:
        set_rng_state(rng)
    pbar = None
    if args.progress and dist.is_main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=args.iterations, initial=start, desc="pretrain", dynamic_ncols=True)
    end = args.iterations if args.stop_after is None else min(args.iterations, start + args.stop_after)
    t0, run_loss, run_acc, seen = time.time(), torch.zeros((), device=device), torch.zeros((), device=device), 0
    step = start
    for step in range(start + 1, end + 1):
        images, labels = _batch(args, maps, probs, step - 1, dist.rank, dist.world, device)
        with autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        run_loss += loss.detach()
        run_acc += (logits.argmax(1) == labels).float().mean()
        seen += 1
        if step % args.log_every == 0 or step == end:
            stats = torch.stack([run_loss, run_acc]) / seen
            if dist.world > 1:
                torch.distributed.all_reduce(stats)
                stats /= dist.world
            rec = {"kind": "train", "step": step, "loss": float(stats[0]), "accuracy": float(stats[1]),
                   "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - t0}
            if log is not None:
                log.write(rec)
            if pbar is not None:
                pbar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['accuracy']:.2f}")
            run_loss.zero_()
            run_acc.zero_()
            seen = 0
        if pbar is not None:
            pbar.update(1)
        if dist.is_main and (step % args.ckpt_every == 0 or step == end):
            save_checkpoint(ckpt, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step,
                            config=config, history=[])
    if pbar is not None:
        pbar.close()
    summary = {"steps": step, "finished": step >= args.iterations, "config": config,
               "train_time_s": time.time() - t0, "weights": None}
    if dist.is_main and summary["finished"]:
        weights = os.path.join(out, "weights.pth")
        tmp = weights + ".tmp"
        torch.save({k: v.detach().cpu() for k, v in net.backbone.state_dict().items()}, tmp)
        os.replace(tmp, weights)
        summary["weights"] = weights
    if dist.is_main:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    dist.barrier()
    if dist.initialized_here:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
    exit_process(0)
