"""Checkpoints of the reference trainer: exact resume of model, optimiser, schedule and RNG.

One concept. A checkpoint holds the training module's ``state_dict`` (backbone + recipe, so
banks and prototype pools travel in their registered buffers), the optimiser, the LR
scheduler, the AMP grad scaler, the number of completed steps and every RNG state. Data
order needs no state (see ``_data.StepBatchSampler``). Files are written atomically
(temporary file + rename) by rank 0, so a run killed while saving keeps its previous
checkpoint. A file that is not a readable checkpoint, or weights that do not fit the model,
raise :class:`~_config.ConfigError` naming the file and ``--resume``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from _config import ConfigError
from torch import nn

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "read_checkpoint", "load_checkpoint"]

_KEYS = ("format", "step", "model", "optimizer", "scheduler", "rng", "config", "history")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; the torch states may come back on any device (``map_location``)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # RNG states must be CPU ByteTensors
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str, *, net: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, step: int, config: dict[str, Any],
                    history: list[dict[str, Any]]) -> None:
    """Write everything needed to continue after ``step`` completed optimiser steps."""
    payload = {
        "format": 1,
        "step": int(step),
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "config": config,
        "history": history,
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str, *, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The payload of a checkpoint file (``mmap``: map the tensors instead of reading them, to look
    at the configuration cheaply); :class:`ConfigError` names the file when it is missing, cut off,
    empty or not a checkpoint of ``examples/train.py``."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: checkpoint {path!r} not found" + (" (it is a folder)" if os.path.isdir(path)
                                                                         else ""))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # torch / pickle / zip errors of a damaged file
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}); the file is cut off, empty "
                          "or not from train.py: point --resume at another one, or start afresh in a new "
                          "--output folder") from None
    missing = [k for k in _KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ConfigError(f"--resume: {path} is not a checkpoint of train.py (missing {missing})")
    return payload


def load_checkpoint(path: str, *, net: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """Restore model, optimiser, scheduler and scaler in place; returns the payload.

    The RNG states are *not* restored here: the caller passes ``payload["rng"]`` to
    :func:`set_rng_state` right before the first resumed step, after everything that may
    draw from the global generators (data-loader iterators, evaluation) has been set up.
    """
    payload = read_checkpoint(path, map_location=map_location)
    try:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"--resume: the weights in {path} do not fit this model ({detail[:300]}); the flags "
                          "that shape the model and its heads (--model, --depth, --embed-dim, --num-heads, "
                          "--recipe, --opt, --seg, --data) must be those of the checkpoint's run") from None
    return payload
