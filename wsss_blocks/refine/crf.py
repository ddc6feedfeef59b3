"""Fully connected CRF (Kraehenbuehl & Koltun 2011) through the optional ``crf`` extra.

``pydensecrf`` (the ``pydensecrf2`` distribution) is imported lazily, the first time a CRF
runs, so ``import wsss_blocks`` never needs it. It runs on the CPU, one image at a time;
a batch is mapped over images, optionally in worker processes.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsss_blocks._validate import ShapeError, check_floats, check_int, check_range, check_shape
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["dense_crf", "DenseCRF", "crf_available"]

_EXTRA_HINT = (
    "dense_crf needs the optional dependency pydensecrf2 (module 'pydensecrf'): "
    "install it with `pip install wsss_blocks[crf]` (or `pip install pydensecrf2`; it "
    "compiles a C++ extension, so a compiler and Python headers are required)"
)


def _densecrf_module() -> Any:
    try:
        return importlib.import_module("pydensecrf.densecrf")
    except ImportError as err:
        raise ImportError(_EXTRA_HINT) from err


def crf_available() -> bool:
    """Whether the ``crf`` extra (``pydensecrf``) can be imported.

    Examples:
        >>> isinstance(crf_available(), bool)
        True
    """
    try:
        _densecrf_module()
    except ImportError:
        return False
    return True


def _crf_one(args: tuple[np.ndarray, np.ndarray, int, float, float, float, float, float]) -> np.ndarray:
    """One image: ``rgb (H, W, 3) uint8``, ``prob (C, H, W) float32`` -> ``Q (C, H, W)``."""
    rgb, prob, n_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w = args
    dcrf = _densecrf_module()
    n_cls, h, w = prob.shape
    crf = dcrf.DenseCRF2D(w, h, n_cls)
    unary = -np.log(np.clip(prob, 1e-5, None)).reshape(n_cls, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=rgb, compat=bi_w)
    q = np.asarray(crf.inference(n_iter), dtype=np.float32)
    return q.reshape(n_cls, h, w)


def _to_rgb_uint8(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(B, 3, H, W)`` uint8, or float ImageNet-normalised -> ``(B, H, W, 3)`` uint8 numpy."""
    if images.dtype == torch.uint8:
        rgb = images
    else:
        m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
        s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
        x = images.detach().float().cpu() * s + m  # sync-ok: the CRF runs on the host
        rgb = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(rgb.detach().cpu().permute(0, 2, 3, 1).numpy())  # sync-ok


@torch.no_grad()
def dense_crf(
    images: Tensor,
    probs: Tensor,
    *,
    num_iters: int = 10,
    pos_xy_std: float = 1.0,
    pos_w: float = 1.0,
    bi_xy_std: float = 121.0,
    bi_rgb_std: float = 5.0,
    bi_w: float = 4.0,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    workers: int = 0,
) -> Tensor:
    """Refine class probabilities with a fully connected CRF (mean-field inference), no grad.

    Per image: unary ``-log(max(p, 1e-5))``, a Gaussian (smoothness) kernel with
    ``pos_xy_std``/``pos_w`` and a bilateral (appearance) kernel with
    ``bi_xy_std``/``bi_rgb_std``/``bi_w``, ``num_iters`` mean-field steps. The defaults are
    the settings of ToCo's segmentation inference (10 steps; 1, 1; 121, 5, 4), the
    DeepLab-style values most WSSS papers report. Runs on the CPU through the ``crf``
    extra (``pydensecrf2``); the result returns to ``probs``' device.

    Args:
        images: ``uint8`` RGB images in ``[0, 255]``, or float images normalised with
            ``mean``/``std`` (undone before the CRF).
        probs: per-pixel class probabilities (e.g. a softmax over background + classes),
            at the images' size.
        num_iters: mean-field iterations.
        pos_xy_std: spatial std of the Gaussian kernel, in pixels.
        pos_w: weight of the Gaussian kernel (Potts compatibility).
        bi_xy_std: spatial std of the bilateral kernel, in pixels.
        bi_rgb_std: colour std of the bilateral kernel, in 0-255 intensity units.
        bi_w: weight of the bilateral kernel.
        mean: per-channel mean used to normalise float images.
        std: per-channel std used to normalise float images.
        workers: 0 runs the images one after another in this process; ``n > 0`` maps
            them over ``n`` worker processes (threads gave no speed-up in a measurement:
            the extension appears to keep the GIL).

    Shape:
        - images: ``(B, 3, H, W)`` uint8 or float
        - probs: ``(B, C, H, W)`` float
        - output: ``(B, C, H, W)`` fp32 on ``probs``' device, each pixel summing to 1

    Raises:
        ImportError: naming the ``crf`` extra when ``pydensecrf`` is not installed.

    Examples:
        >>> images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
        >>> probs = torch.full((1, 2, 8, 8), 0.5)
        >>> out = dense_crf(images, probs) if crf_available() else probs  # needs the extra
        >>> out.shape, bool(torch.allclose(out.sum(1), torch.ones(1, 8, 8), atol=1e-4))
        (torch.Size([1, 2, 8, 8]), True)
    """
    dims = check_shape("images", images, ["B", 3, "H", "W"])
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ShapeError(f"images: expected a uint8 or float tensor, got dtype {images.dtype}")
    check_shape("probs", probs, ["B", "C", "H", "W"], dims, dtype="float")
    n_iter = check_int("num_iters", num_iters, low=1)
    n_workers = check_int("workers", workers, low=0)
    for name, value in (
        ("pos_xy_std", pos_xy_std),
        ("bi_xy_std", bi_xy_std),
        ("bi_rgb_std", bi_rgb_std),
    ):
        check_range(name, value, 0.0, low_inclusive=False)
    check_range("pos_w", pos_w, 0.0)
    check_range("bi_w", bi_w, 0.0)
    stats = (check_floats("mean", mean, length=3), check_floats("std", std, length=3, low=0.0, low_inclusive=False))
    _densecrf_module()  # fail early with the extra's name
    if dims["B"] == 0:
        return torch.zeros(probs.shape, dtype=torch.float32, device=probs.device)
    rgb = _to_rgb_uint8(images, *stats)
    prob = np.ascontiguousarray(probs.detach().float().cpu().numpy())  # sync-ok: host CRF
    jobs = [
        (
            rgb[i],
            prob[i],
            n_iter,
            float(pos_xy_std),
            float(pos_w),
            float(bi_xy_std),
            float(bi_rgb_std),
            float(bi_w),
        )
        for i in range(prob.shape[0])
    ]
    if n_workers == 0 or len(jobs) <= 1:
        out = [_crf_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(n_workers, len(jobs))) as pool:
            out = list(pool.map(_crf_one, jobs))
    return torch.from_numpy(np.stack(out)).to(probs.device)


class DenseCRF(nn.Module):
    """Module form of ``dense_crf`` (stores the keyword arguments; no parameters).

    Args:
        num_iters: see ``dense_crf``.
        pos_xy_std: see ``dense_crf``.
        pos_w: see ``dense_crf``.
        bi_xy_std: see ``dense_crf``.
        bi_rgb_std: see ``dense_crf``.
        bi_w: see ``dense_crf``.
        mean: see ``dense_crf``.
        std: see ``dense_crf``.
        workers: see ``dense_crf``.

    Shape:
        - images: ``(B, 3, H, W)``; probs: ``(B, C, H, W)``
        - output: ``(B, C, H, W)`` fp32

    Examples:
        >>> DenseCRF(workers=2)
        DenseCRF(num_iters=10, pos_xy_std=1.0, pos_w=1.0, bi_xy_std=121.0, bi_rgb_std=5.0, bi_w=4.0, workers=2)
    """

    def __init__(
        self,
        *,
        num_iters: int = 10,
        pos_xy_std: float = 1.0,
        pos_w: float = 1.0,
        bi_xy_std: float = 121.0,
        bi_rgb_std: float = 5.0,
        bi_w: float = 4.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        workers: int = 0,
    ) -> None:
        super().__init__()
        self.num_iters = check_int("num_iters", num_iters, low=1)
        self.pos_xy_std = float(check_range("pos_xy_std", pos_xy_std, 0.0, low_inclusive=False))
        self.pos_w = float(check_range("pos_w", pos_w, 0.0))
        self.bi_xy_std = float(check_range("bi_xy_std", bi_xy_std, 0.0, low_inclusive=False))
        self.bi_rgb_std = float(check_range("bi_rgb_std", bi_rgb_std, 0.0, low_inclusive=False))
        self.bi_w = float(check_range("bi_w", bi_w, 0.0))
        m = check_floats("mean", mean, length=3)
        sd = check_floats("std", std, length=3, low=0.0, low_inclusive=False)
        self.mean: tuple[float, float, float] = (m[0], m[1], m[2])
        self.std: tuple[float, float, float] = (sd[0], sd[1], sd[2])
        self.workers = check_int("workers", workers, low=0)

    def extra_repr(self) -> str:
        return (
            f"num_iters={self.num_iters}, pos_xy_std={self.pos_xy_std}, pos_w={self.pos_w}, "
            f"bi_xy_std={self.bi_xy_std}, bi_rgb_std={self.bi_rgb_std}, bi_w={self.bi_w}, "
            f"workers={self.workers}"
        )

    def forward(self, images: Tensor, probs: Tensor) -> Tensor:
        """See ``dense_crf``."""
        return dense_crf(
            images,
            probs,
            num_iters=self.num_iters,
            pos_xy_std=self.pos_xy_std,
            pos_w=self.pos_w,
            bi_xy_std=self.bi_xy_std,
            bi_rgb_std=self.bi_rgb_std,
            bi_w=self.bi_w,
            mean=self.mean,
            std=self.std,
            workers=self.workers,
        )
