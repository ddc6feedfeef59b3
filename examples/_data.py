"""Data for the reference trainer: datasets per ``--data``, a resumable step sampler, loaders.

One concept: every training batch is a pure function of ``(seed, step, rank)``. The
:class:`StepBatchSampler` draws epoch permutations from ``seed`` and hands step ``t`` the
``t``-th global batch (rank ``r`` takes its slice), and each item's augmentation is seeded
from ``(seed, step, slot)``. Resuming at step ``t`` therefore continues exactly, without
saving loader state, with any number of workers.

A file that cannot be used (:class:`~wsss_blocks.data.DataFileError`) never stops a run half
way: a training item is replaced by the next readable one of the list (a function of the
index, so resume stays exact), an evaluation item by an all-ignored placeholder that adds
nothing to the metrics. Every item carries ``faults``, the messages of the files it stands in
for, which the loop counts and reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from _config import ConfigError
from torch.utils.data import DataLoader, Dataset

from wsss_blocks.data import DataFileError, collate

__all__ = ["build_datasets", "StepBatchSampler", "train_loader", "eval_loader", "to_device"]


class _Augmented(Dataset):
    """Training view: items are fetched by ``(index, item_seed)``; augmentation seeded per item.

    An item whose files cannot be used is replaced by the next readable index (its message goes
    to the item's ``faults``).
    """

    def __init__(self, base: Dataset, kind: str) -> None:
        self.base, self.kind = base, kind

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, item_seed = key
        faults: list[str] = []
        for attempt in range(len(self)):
            gen = torch.Generator().manual_seed(int(item_seed))
            transform = getattr(self.base, "transform", None)
            if transform is not None and hasattr(transform, "generator"):
                transform.generator = gen  # VOC / COCO TrainTransform: crop, scale, flip
            try:
                item = dict(self.base[(index + attempt) % len(self)])
            except DataFileError as err:
                faults.append(str(err))
                continue
            if self.kind == "synthetic" and bool(torch.rand((), generator=gen) < 0.5):
                for key_ in ("image", "mask", "valid"):
                    item[key_] = item[key_].flip(-1)
            return item | {"faults": tuple(faults)}
        raise DataFileError(type(self.base).__name__, f"none of the {len(self)} training items can be read; "
                            f"the first: {faults[0]}")


class _Checked(Dataset):
    """Evaluation view: an item whose files cannot be used becomes a ``size`` x ``size``
    placeholder whose mask is all ignored (no metric counts it) and whose labels are empty."""

    def __init__(self, base: Dataset, size: int) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # num_classes, names, ... of the dataset
        if name == "base":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return dict(self.base[index]) | {"faults": ()}
        except DataFileError as err:
            s = self.size
            return {"image": torch.zeros(3, s, s), "labels": torch.zeros(int(self.base.num_classes)),
                    "mask": torch.full((s, s), 255, dtype=torch.int64), "valid": torch.ones(s, s, dtype=torch.bool),
                    "index": int(index), "name": self.base.names[index], "faults": (str(err),)}


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """``(train, val, info)`` for ``cfg.data``.

    ``info`` holds num_classes, class_names (background first), palette, superclasses and
    ``train_plain`` (the training images without augmentation). A dataset that cannot be built,
    or an empty training or validation set, is a :class:`ConfigError` (exit status 2).
    """
    if cfg.data == "synthetic":
        from wsss_blocks.data import SyntheticScenes

        scene = dict(getattr(cfg, "scene", None) or {})
        val_length = scene.pop("val_length", max(cfg.eval_images, cfg.vis_images))
        try:
            train = SyntheticScenes(split="train", length=cfg.train_length, image_size=cfg.img_size,
                                    seed=cfg.seed, **scene)
            val = SyntheticScenes(split="val", length=val_length, image_size=cfg.img_size, seed=cfg.seed, **scene)
        except ValueError as err:
            raise ConfigError(f"--scene: {err}") from err
        plain = train
    elif cfg.data in ("voc", "coco"):
        from wsss_blocks.data import COCO, VOC, EvalTransform, TrainTransform

        t = TrainTransform(crop_size=cfg.img_size)
        cls, (train_split, val_split) = (VOC, ("train_aug", "val")) if cfg.data == "voc" else (COCO, ("train", "val"))
        try:
            train = cls(cfg.data_root, split=train_split, transform=t)
            plain = cls(cfg.data_root, split=train_split, transform=EvalTransform())
            val = cls(cfg.data_root, split=val_split, transform=EvalTransform())
        except (OSError, ValueError) as err:  # missing folders, broken lists, annotation files, ...
            raise ConfigError(f"--data-root: {err}") from None
    else:  # validated earlier
        raise ValueError(f"--data: unknown dataset {cfg.data!r}")
    for split, ds in (("training", train), ("validation", val)):
        if len(ds) == 0:
            raise ConfigError(f"--data {cfg.data}: the {split} set is empty ({ds!r})")
    info = {
        "num_classes": int(train.num_classes),
        "class_names": ["background", *train.class_names],
        "palette": getattr(train, "palette", None),
        "superclasses": getattr(train, "superclasses", None),
        "train_plain": _Checked(plain, cfg.img_size),  # training images without augmentation (pool builds)
    }
    return _Augmented(train, cfg.data), _Checked(val, cfg.img_size), info


class StepBatchSampler:
    """Yields, for steps ``start, start+1, ...``, this rank's list of ``(index, item_seed)``.

    Epoch ``e`` is ``randperm(n)`` from ``seed * 1_000_003 + e``; the global batch of step
    ``t`` (0-based) is items ``t*B*W .. (t+1)*B*W - 1`` of the concatenated epochs, and rank
    ``r`` takes ``B`` consecutive ones.

    Example:
        >>> s = StepBatchSampler(10, 2, seed=0, start_step=0, steps=3)
        >>> len(list(s)), len(next(iter(s)))
        (3, 2)
        >>> list(StepBatchSampler(10, 2, seed=0, start_step=2, steps=3)) == list(s)[2:]
        True
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, start_step: int, steps: int,
                 rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.b, self.seed = n, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}
        return self._cache[epoch]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gb = self.b * self.world
        for t in range(self.start, self.steps):
            out = []
            for j in range(self.b):
                pos = t * gb + self.rank * self.b + j
                idx = int(self._perm(pos // self.n)[pos % self.n])
                out.append((idx, (self.seed * 7_919 + t) * 65_537 + self.rank * self.b + j))
            yield out


def train_loader(ds: Dataset, cfg: Any, *, start_step: int, end_step: int, rank: int,
                 world: int) -> DataLoader:
    """Batches of steps ``start_step + 1 .. end_step`` for this rank."""
    sampler = StepBatchSampler(len(ds), cfg.batch_size, seed=cfg.seed, start_step=start_step,  # type: ignore[arg-type]
                               steps=end_step, rank=rank, world=world)
    # an own generator: creating the iterator must not draw from the global torch RNG
    # (that would shift dropout / drop-path draws after an exact resume)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    return DataLoader(ds, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                      persistent_workers=False, pin_memory=False, generator=gen)


def eval_loader(ds: Dataset, num_images: int, batch_size: int, *, rank: int, world: int,
                workers: int = 0) -> DataLoader:
    """The first ``num_images`` items of ``ds``, sharded round-robin over ranks, in order."""
    n = min(num_images, len(ds))  # type: ignore[arg-type]
    indices = list(range(rank, n, world))
    return DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(rank))  # leaves the global RNG alone


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}
