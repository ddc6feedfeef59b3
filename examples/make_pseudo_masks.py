#!/usr/bin/env python
"""Write a pseudo mask for every training image from a trainer checkpoint (VOC-palette PNGs).

    python examples/train.py --recipe cpews --baseline off --output runs/cpews           # train first
    python examples/make_pseudo_masks.py --checkpoint runs/cpews --output masks/cpews      # synthetic
    python examples/make_pseudo_masks.py --checkpoint runs/voc/last.pt --data-root /data/VOCdevkit \\
        --output /data/pseudo/cpews --scales 1.0,0.5,1.5 --flip --refine par+crf
    torchrun --nproc_per_node 4 examples/make_pseudo_masks.py --checkpoint ... --output ...  # rank r: items r::4

One concept: checkpoint -> masks. The network, recipe and data come from the checkpoint that
``examples/train.py`` writes (``last.pt`` holds the resolved configuration and the weights);
every training image (``train_aug`` on VOC, the ``--train-length`` training scenes on
synthetic data) gets ``<output>/<name>.png`` at the image's own size: a palette PNG with the
VOC colour map whose pixel values are the labels (0 background, ``c + 1`` class ``c``, 255
unsure). The CAM is the trainer's evaluation CAM (:func:`_evaluate.cam_maps`: multi-scale + flip,
``"max"``-normalised, ground-truth image labels), turned into labels by ToCo's two background
levels (``--low`` / ``--high``) with an optional refinement (``--refine``):

* ``none``: the plain two-threshold rule (:func:`wsss_blocks.cam.pseudo_labels`), as the
  trainer's ``pseudo_miou``;
* ``par``: :func:`wsss_blocks.refine.par_label_levels` (PAR at ``--par-scale`` of the image,
  ToCo's 0.5), as the ``--seg`` training targets;
* ``crf`` / ``par+crf``: each level's label map (without / with PAR) is refined by the dense
  CRF (:func:`wsss_blocks.refine.dense_crf`, ToCo's settings; the ``crf`` extra) from a unary
  that gives ``--crf-gt-prob`` to the map's label and spreads the rest over background and
  the image's classes (IRN's ``crf_inference_label`` form), then the levels are combined
  (:func:`wsss_blocks.refine.combine_levels`).

Resumable: an existing ``<name>.png`` that decodes at the image's size with label values
(``0..K`` and 255) is kept (and scored); one that does not decode (e.g. cut off) or holds
other values is written again, with a warning naming it; one of another size stops the run
(it belongs to other data: remove it or pass ``--overwrite``). Writes are atomic (a
temporary file in the same folder, then ``os.replace``). A training image or mask that
cannot be read (:class:`~wsss_blocks.data.DataFileError`) gets no mask: it is skipped with a
warning naming the file, counted and listed in the summary. Under ``torchrun`` (or with
``--rank/--world``) rank ``r`` handles items ``r::world``; with a process group the mIoU is
summed over ranks. The mIoU of the masks against the ground truth (where the dataset has it),
on their confident pixels, and their coverage go to ``<output>/pseudo_masks.json``
(``pseudo_masks.rank{r}of{w}.json`` per shard without a process group). The folder loads
with ``wsss_blocks.data.VOC(root, "train_aug", mask_dir=<output>)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _config import ConfigError, TrainConfig, check_scales  # noqa: E402
from _config import _Parser as _ConfigParser  # noqa: E402
from _data import build_datasets  # noqa: E402
from _evaluate import cam_maps  # noqa: E402
from _process import exit_process  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from wsss_blocks.cam import pseudo_labels  # noqa: E402
from wsss_blocks.constants import VOC_PALETTE  # noqa: E402
from wsss_blocks.metrics import MeanIoU  # noqa: E402
from wsss_blocks.refine import combine_levels, crf_available, dense_crf, par_label_levels  # noqa: E402

__all__ = ["main", "load_checkpoint_net", "make_masks", "write_mask", "existing_mask", "ExistingMask", "MaskError"]

REFINES = ("none", "par", "crf", "par+crf")
SUMMARY = "pseudo_masks.json"


class MaskError(ValueError):
    """An existing mask that cannot be kept (another size than its image); names the file."""


# ----------------------------------------------------------------------------- checkpoint
def load_checkpoint_net(checkpoint: str | os.PathLike[str], *, data: str | None = None,
                        data_root: str | None = None, recipe: str | None = None,
                        device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig, Any]:
    """``(net, cfg, training images)`` from a run folder or ``last.pt`` of ``examples/train.py``.

    ``data`` / ``data_root`` override the dataset of the checkpoint's configuration (e.g. the
    same data on another machine); ``recipe`` is the recipe the caller expects. A checkpoint of
    another recipe or class count, or weights that do not fit, raise :class:`ConfigError`.
    """
    import train  # the trainer's model builder: the same backbone, recipe and decoder

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--checkpoint: {path} not found (expected a run folder holding last.pt, or the "
                          ".pt file examples/train.py wrote)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch / pickle / zip errors of a damaged file
        raise ConfigError(f"--checkpoint: {path} is not a readable checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise ConfigError(f"--checkpoint: {path} is not a checkpoint of examples/train.py (no config / model)")
    resolved = payload["config"]
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in resolved.items() if k in names}
    cfg = TrainConfig(**values)
    cfg.pretrained = None  # the checkpoint holds every weight; the file may not exist here
    if recipe is not None and recipe != cfg.recipe:
        raise ConfigError(f"--recipe: checkpoint {path} was trained with recipe {cfg.recipe!r}, not {recipe!r}")
    if data is not None and data != cfg.data:
        cfg.data = data
        cfg.data_root = data_root
    elif data_root is not None:
        cfg.data_root = data_root
    if cfg.data != "synthetic" and (cfg.data_root is None or not os.path.isdir(cfg.data_root)):
        raise ConfigError(f"--data-root: --data {cfg.data} needs the dataset folder, got {cfg.data_root!r}")
    _, _, info = build_datasets(cfg)
    trained = int(resolved.get("num_classes", info["num_classes"]))
    if trained != info["num_classes"]:
        raise ConfigError(f"--checkpoint: {path} was trained with {trained} classes (--data "
                          f"{resolved.get('data')}), but --data {cfg.data} has {info['num_classes']} classes")
    net, _ = train._build_net(cfg, info)
    try:
        missing, unexpected = net.load_state_dict(payload["model"], strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"--checkpoint: the weights in {path} do not fit recipe {cfg.recipe!r} with "
                          f"{trained} classes: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConfigError(f"--checkpoint: the weights in {path} do not fit recipe {cfg.recipe!r} "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return net.to(device).eval(), cfg, info["train_plain"]


# ----------------------------------------------------------------------------- masks
def _crf_levels(images: Tensor, y: Tensor, labels: Tensor, gt_prob: float) -> Tensor:
    """Dense CRF on each level map ``y (B, L, H, W)`` from a label unary (``gt_prob`` on the label,
    the rest spread over background + the present classes; absent classes 0)."""
    b, n_levels, h, w = y.shape
    k1 = labels.shape[1] + 1
    allowed = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).to(torch.float32)  # (B, K+1)
    allowed = allowed[:, None, :, None, None]  # (B, 1, K+1, 1, 1)
    n_allowed = allowed.sum(dim=2, keepdim=True)
    known = y != 255
    hot = F.one_hot(torch.where(known, y, torch.zeros_like(y)), k1).permute(0, 1, 4, 2, 3).float()
    rest = (1.0 - gt_prob) / (n_allowed - 1).clamp_min(1)
    probs = torch.where(hot > 0, torch.full_like(hot, gt_prob), rest.expand_as(hot)) * allowed
    probs = torch.where(known[:, :, None], probs, allowed / n_allowed)  # unknown: uniform
    probs = probs / probs.sum(dim=2, keepdim=True)
    q = dense_crf(images.repeat_interleave(n_levels, dim=0), probs.reshape(b * n_levels, k1, h, w))
    return q.argmax(dim=1).reshape(b, n_levels, h, w)


@torch.no_grad()
def make_masks(net: nn.Module, images: Tensor, labels: Tensor, *, scales: tuple[float, ...] = (1.0,),
               flip: bool = False, low: float = 0.25, high: float = 0.7, refine: str = "par",
               par_scale: float = 0.5, crf_gt_prob: float = 0.7) -> Tensor:
    """Pseudo masks ``(B, H, W)`` int64 (0 background, ``c + 1`` class ``c``, 255 unsure) at the
    images' size, from the trainer's evaluation CAM (see the module docstring for ``refine``)."""
    if refine not in REFINES:
        raise ValueError(f"refine: expected one of {REFINES}, got {refine!r}")
    cam = cam_maps(net, images, labels, scales=scales, flip=flip)
    if refine == "none":
        return pseudo_labels(cam, labels, low=low, high=high)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    use_par = refine.startswith("par")
    small = images.float()
    if use_par and par_scale != 1.0:
        small = F.interpolate(small, scale_factor=par_scale, mode="bilinear", align_corners=False)
    y = par_label_levels(small, cam, labels, low=low, high=high, size=size, num_iters=10 if use_par else 0)
    if refine.endswith("crf"):
        y = _crf_levels(images, y, labels, crf_gt_prob)
    return combine_levels(y[:, 0], y[:, 1])


# ----------------------------------------------------------------------------- files
class ExistingMask(NamedTuple):
    """What :func:`existing_mask` found: ``state`` is ``"missing"``, ``"broken"`` (write it again,
    ``reason`` says why) or ``"complete"`` (``mask`` holds its labels)."""

    state: str
    mask: Tensor | None = None
    reason: str = ""


def existing_mask(path: Path, size: tuple[int, int], *, num_classes: int) -> ExistingMask:
    """The mask already at ``path`` for an image of ``size`` with ``num_classes`` classes.

    A file that does not decode, or holds values other than ``0..num_classes`` and 255, is
    ``"broken"``; a mask of another size or a non-label PNG is not ours to replace and raises
    :class:`MaskError` naming it.
    """
    from PIL import Image

    if not path.exists():
        return ExistingMask("missing")
    try:
        with Image.open(path) as im:
            im.load()
            got, mode = (im.height, im.width), im.mode
            values = np.asarray(im).astype(np.int64) if mode in ("P", "L") else None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / not a PNG
        return ExistingMask("broken", reason=f"does not decode ({type(err).__name__}: {err})")
    if got != size:
        raise MaskError(f"{path}: the existing mask is {got[0]}x{got[1]} (HxW) but its image is "
                        f"{size[0]}x{size[1]}; it belongs to other data: remove it or pass --overwrite")
    if values is None:
        raise MaskError(f"{path}: the existing file is a {mode!r} image, not a label PNG (P or L): remove it "
                        "or pass --overwrite")
    bad = sorted(set(np.unique(values).tolist()) - set(range(num_classes + 1)) - {255})
    if bad:
        return ExistingMask("broken", reason=f"holds values {bad[:5]} outside 0..{num_classes} and 255")
    return ExistingMask("complete", torch.from_numpy(values))


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write ``mask`` (H, W) uint8 as a VOC-palette PNG, atomically (temporary file + rename)."""
    from PIL import Image

    h, w = mask.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    im.putpalette(VOC_PALETTE.tobytes())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            im.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as err:
        raise ConfigError(f"--output: cannot write to {out} ({type(err).__name__}: "
                          f"{err.strerror or err})") from None


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = _ConfigParser(prog="make_pseudo_masks.py", description=__doc__.split("\n\n")[0] if __doc__ else None,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (with last.pt) or checkpoint file")
    p.add_argument("--output", required=True, help="mask folder (created)")
    p.add_argument("--data", choices=["synthetic", "voc"], default=None, help="default: the checkpoint's")
    p.add_argument("--data-root", default=None, help="dataset root (default: the checkpoint's)")
    p.add_argument("--recipe", default=None, help="expected recipe (an error if the checkpoint's differs)")
    p.add_argument("--scales", default=None, help="CAM scales, each in (0, 4], e.g. 1.0,0.5,1.5 (default: the "
                   "checkpoint's --eval-scales)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip CAMs (default: the checkpoint's --eval-flip)")
    p.add_argument("--low", type=float, default=None, help="background level (default: the checkpoint's)")
    p.add_argument("--high", type=float, default=None, help="foreground level (default: the checkpoint's)")
    p.add_argument("--refine", choices=REFINES, default="par")
    p.add_argument("--par-scale", type=float, default=0.5, help="PAR resolution as a fraction of the image")
    p.add_argument("--crf-gt-prob", type=float, default=0.7, help="CRF unary: probability of the map's label")
    p.add_argument("--batch-size", type=int, default=None, help=">= 1; default: 8 (synthetic), 1 (voc: sizes differ)")
    p.add_argument("--limit", type=int, default=None, help="only the first N training images")
    p.add_argument("--overwrite", action="store_true", help="write every mask again")
    p.add_argument("--rank", type=int, default=None, help="shard index (default: $RANK or 0)")
    p.add_argument("--world", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quiet", action="store_true")
    return p


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    return check_scales(vals, flag)


def _device(flag: str, local_rank: int) -> torch.device:
    if flag == "auto":
        flag = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {flag!r} requested but CUDA is not available")
    return torch.device(flag)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write the masks of this rank's shard; returns the summary (also written as JSON)."""
    args = build_parser().parse_args(argv)
    if args.refine.endswith("crf") and not crf_available():
        raise ImportError(f"--refine {args.refine} needs the optional crf extra (module pydensecrf): "
                          "pip install 'wsss_blocks[crf]' (or pip install pydensecrf2)")
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"--rank/--world: expected 0 <= rank < world, got rank={rank}, world={world}")
    if not 0 < args.par_scale <= 1:
        raise ConfigError(f"--par-scale: expected in (0, 1], got {args.par_scale}")
    if not 0 < args.crf_gt_prob < 1:
        raise ConfigError(f"--crf-gt-prob: expected in (0, 1), got {args.crf_gt_prob}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected >= 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    if args.scales is not None:
        _floats(args.scales, "--scales")  # before the checkpoint is read
    out = Path(args.output)
    _check_writable(out)
    device = _device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    group = False
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        group = True
    try:
        summary = _export(args, out, device, rank, world)
        if group:  # nobody tears gloo down while a peer still uses it (an abort at exit otherwise)
            torch.distributed.barrier()
        return summary
    finally:
        if group:
            torch.distributed.destroy_process_group()


def _export(args: argparse.Namespace, out: Path, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    from wsss_blocks.data import collate

    net, cfg, dataset = load_checkpoint_net(args.checkpoint, data=args.data, data_root=args.data_root,
                                            recipe=args.recipe, device=device)
    scales = _floats(args.scales, "--scales") if args.scales is not None else tuple(cfg.eval_scales)
    flip = cfg.eval_flip if args.flip is None else args.flip
    low = cfg.low if args.low is None else args.low
    high = cfg.high if args.high is None else args.high
    if not 0 <= low < high <= 1:
        raise ConfigError(f"--low/--high: expected 0 <= low < high <= 1, got low={low}, high={high}")
    batch_size = args.batch_size if args.batch_size is not None else 8 if cfg.data == "synthetic" else 1
    if cfg.data != "synthetic" and batch_size != 1:
        raise ConfigError(f"--batch-size: {cfg.data} images have different sizes; use 1, got {batch_size}")
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    indices = list(range(rank, n, world))
    k1 = int(dataset.num_classes) + 1
    metric = MeanIoU(k1)
    counts = torch.zeros(2, dtype=torch.float64)  # confident GT pixels, GT pixels
    stats = {"written": 0, "kept": 0, "rewritten_broken": 0, "skipped": 0}
    notes: dict[str, list[str]] = {"skipped_files": [], "rewritten_files": []}

    def warn(kind: str, message: str) -> None:
        notes[kind].append(message)
        print(f"make_pseudo_masks.py: warning: {message}", file=sys.stderr, flush=True)

    has_gt = False
    say = print if rank == 0 and not args.quiet else (lambda *a, **k: None)
    bar = None
    if rank == 0 and args.progress and not args.quiet:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(indices), desc="pseudo masks", dynamic_ncols=True)
        except ImportError:  # tqdm is in the [train] extra
            bar = None
    t0 = time.time()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate, num_workers=0)
    for batch in loader:
        names = list(batch["name"])
        sizes = [tuple(int(s) for s in batch["image"].shape[-2:])] * len(names)
        paths = [out / f"{name}.png" for name in names]
        usable = [i for i, faults in enumerate(batch["faults"]) if not faults]
        for faults in batch["faults"]:
            for message in faults:
                warn("skipped_files", f"skipped (no mask written): {message}")
        stats["skipped"] += len(names) - len(usable)
        found = {i: ExistingMask("missing") if args.overwrite else existing_mask(paths[i], sizes[i], num_classes=k1 - 1)
                 for i in usable}
        todo = [i for i, e in found.items() if e.state != "complete"]
        masks = {i: e.mask for i, e in found.items() if e.mask is not None}
        stats["kept"] += len(masks)
        if todo:
            images = batch["image"][todo].to(device)
            labels = batch["labels"][todo].to(device)
            made = make_masks(net, images, labels, scales=scales, flip=flip, low=low, high=high,
                              refine=args.refine, par_scale=args.par_scale, crf_gt_prob=args.crf_gt_prob).cpu()
            for j, i in enumerate(todo):
                if tuple(made[j].shape) != sizes[i]:  # a guard: the CAM pipeline resizes to the image
                    raise MaskError(f"{names[i]}: the mask is {tuple(made[j].shape)} but its image is {sizes[i]}")
                write_mask(paths[i], made[j].numpy().astype(np.uint8))
                masks[i] = made[j]
                if found[i].state == "broken":
                    warn("rewritten_files", f"{paths[i]}: {found[i].reason}; written again")
                stats["rewritten_broken" if found[i].state == "broken" else "written"] += 1
        for i, m in masks.items():
            gt = batch["mask"][i]
            if (gt != 255).any():
                has_gt = True
                metric.update(m[None], gt[None])
                counted = gt != 255
                counts += torch.stack([((m != 255) & counted).sum(), counted.sum()]).double()
        if bar is not None:
            bar.update(len(names))
    if bar is not None:
        bar.close()
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group:  # totals over the ranks (gloo / nccl: on the device of the group's backend)
        keys = sorted(stats)
        vec = torch.tensor([*counts.tolist(), float(has_gt), *(float(stats[k]) for k in keys)],
                           dtype=torch.float64, device=device)
        torch.distributed.all_reduce(vec)
        vec = vec.cpu()
        counts, has_gt = vec[:2], bool(vec[2] > 0)
        stats = {k: int(v) for k, v in zip(keys, vec[3:].tolist(), strict=True)}
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, notes)
        notes = {kind: [m for part in parts for m in part[kind]] for kind in notes}
    scores = metric.compute()  # all-reduced over the process group when there is one
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "recipe": cfg.recipe, "data": cfg.data, "output": str(out),
        "total_items": n, "rank": rank, "world": world, "shard_items": len(indices),
        "scored_over": "all shards" if group or world == 1 else "this shard",
        **stats, **notes, "scales": list(scales), "flip": flip, "low": low, "high": high, "refine": args.refine,
        "par_scale": args.par_scale, "crf_gt_prob": args.crf_gt_prob,
        "miou": float(scores.miou) if has_gt else None,
        "per_class_iou": [float(v) for v in scores.per_class.tolist()] if has_gt else None,
        "coverage": float(counts[0] / counts[1].clamp_min(1)) if has_gt else None,
        "time_s": time.time() - t0,
    }
    name = SUMMARY if world == 1 or group else f"pseudo_masks.rank{rank}of{world}.json"
    if rank == 0 or not group:
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / name)
    miou = "n/a (no ground truth)" if not has_gt else f"{100 * summary['miou']:.1f}"
    cov = "" if not has_gt else f", coverage {100 * summary['coverage']:.1f}%"
    say(f"pseudo masks ({args.refine}): {stats['written']} written, {stats['kept']} kept, "
        f"{stats['rewritten_broken']} rewritten (broken), {stats['skipped']} skipped (unreadable) in {out}; "
        f"mIoU {miou}{cov}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, MaskError, ImportError) as err:
        print(f"make_pseudo_masks.py: error: {err}", file=sys.stderr)
        exit_process(2)
    exit_process(0)
