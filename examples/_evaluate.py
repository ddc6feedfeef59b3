"""Evaluation of the reference trainer: CAM mIoU, pseudo-mask mIoU and picture panels.

One concept: how good are a recipe's CAMs and the pseudo masks made from them, on validation
images with ground-truth masks, using the ground-truth image labels (the WSSS convention for
CAM / pseudo-label quality).

* CAM: the recipe's raw CAM (multi-scale + flip optional, :func:`wsss_blocks.cam.multiscale_cam`),
  upsampled to the image, ``"max"``-normalised, absent classes zeroed; a pixel is background
  when every class score is ``<= cam_threshold``, else the arg-max class. ``cam_miou`` at the
  configured threshold, and ``cam_miou_best`` / ``best_threshold`` over 0.05 .. 0.95.
* Pseudo masks: the two-threshold rule (:func:`wsss_blocks.cam.pseudo_labels`, ``low`` /
  ``high``); ``pseudo_miou`` is measured on the confident pixels and ``pseudo_coverage`` is
  the fraction of pixels that are confident (not ignored).
* Segmentation (``--seg``, when ``net.decoder`` is set): ``seg_miou`` of the decoder's argmax
  (:func:`seg_probs`: softmax of the logits upsampled to the image, with the CAM's
  ``--eval-scales`` / ``--eval-flip``); with ``--seg-crf`` also ``seg_crf_miou``, the same
  probabilities refined by the dense CRF (``crf`` extra) first. No image labels are used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _backbone import feature_stride, final_feature_map
from torch import Tensor, nn

from wsss_blocks.cam import multiscale_cam, normalize_cam, pseudo_labels
from wsss_blocks.metrics import MeanIoU

__all__ = ["THRESHOLDS", "cam_maps", "evaluate", "save_panels", "seg_prediction", "seg_probs", "vis_batch"]

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _crop_to_input(maps: Tensor, x: Tensor, stride: tuple[int, int]) -> Tensor:
    """Maps at the final feature grid (or finer) of input ``x`` -> ``x``'s pixels.

    A dynamic_img_pad ViT (and a Swin, see _backbone) pads the input bottom/right to whole
    feature cells: the maps are resized to the padded pixels, then the image is cropped back out.
    """
    h, w = x.shape[-2:]
    if tuple(maps.shape[-2:]) == (h, w):
        return maps
    padded = (-(-h // stride[0]) * stride[0], -(-w // stride[1]) * stride[1])
    return F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)[..., :h, :w]


@torch.no_grad()
def cam_maps(net: nn.Module, images: Tensor, labels: Tensor, *, scales: Iterable[float] = (1.0,),
             flip: bool = False) -> Tensor:
    """Normalised CAMs ``(B, K, H, W)`` in ``[0, 1]`` at image resolution, absent classes zeroed."""
    batch = images.shape[0]
    stride = feature_stride(net.backbone)

    def fn(x: Tensor) -> Tensor:
        reps = x.shape[0] // batch
        return _crop_to_input(net.recipe.cam(net.backbone, x, labels.repeat(reps, 1)).float(), x, stride)

    cam = multiscale_cam(fn, images, scales=tuple(scales), flip=flip, fuse="sum")
    cam = normalize_cam(cam, mode="max")
    return cam * labels.to(cam.dtype)[:, :, None, None]


@torch.no_grad()
def seg_probs(net: nn.Module, images: Tensor, *, scales: Iterable[float] = (1.0,),
              flip: bool = False) -> Tensor:
    """The decoder's class probabilities ``(B, K + 1, H, W)`` (background first) at image resolution.

    Per scale (and flipped copy) the logits are upsampled (bilinear) to the input and turned
    into a softmax; a flipped copy is fused with the other by element-wise max
    (:func:`wsss_blocks.cam.multiscale_cam`), the scales by their mean, and each pixel is
    renormalised to sum 1. At one scale without flip its argmax is the argmax of the logits.
    """
    stride = feature_stride(net.backbone)

    def fn(x: Tensor) -> Tensor:
        logits = net.decoder(final_feature_map(net.backbone, x)).float()
        return _crop_to_input(logits, x, stride).softmax(dim=1)

    probs = multiscale_cam(fn, images, scales=tuple(scales), flip=flip, fuse="mean")
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def seg_prediction(net: nn.Module, images: Tensor, *, scales: Iterable[float] = (1.0,), flip: bool = False,
                   crf: bool = False) -> Tensor:
    """The decoder's class map ``(B, H, W)`` (0 = background) at image resolution; with ``crf``
    its probabilities are refined by :func:`wsss_blocks.refine.dense_crf` (the crf extra;
    ``images`` ImageNet-normalised, as every dataset here) first."""
    probs = seg_probs(net, images, scales=scales, flip=flip)
    if crf:
        from wsss_blocks.refine import dense_crf

        probs = dense_crf(images.float(), probs)
    return probs.argmax(dim=1)


def _cam_prediction(cam: Tensor, threshold: float) -> Tensor:
    bg = torch.full_like(cam[:, :1], threshold)
    return torch.cat([bg, cam], dim=1).argmax(dim=1)


@torch.no_grad()
def evaluate(net: nn.Module, loader: Iterable[dict[str, Any]], *, num_classes: int, cfg: Any,
             device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Run the evaluation over ``loader`` (this rank's shard); metrics are summed over ranks.

    Every rank must call it (``MeanIoU.compute`` all-reduces). ``net`` has ``.backbone`` and
    ``.recipe``; its mode is switched to eval and restored.
    """
    was_training = net.training
    net.eval()
    k1 = num_classes + 1
    fixed = MeanIoU(k1).to(device)
    grid = [MeanIoU(k1).to(device) for _ in THRESHOLDS]
    pseudo = MeanIoU(k1).to(device)
    decoder = getattr(net, "decoder", None)
    seg = MeanIoU(k1).to(device) if decoder is not None else None
    seg_crf = MeanIoU(k1).to(device) if decoder is not None and getattr(cfg, "seg_crf", False) else None
    confident = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            images = batch["image"].to(device)
            labels = batch["labels"].to(device)
            mask = batch["mask"].to(device)
            with autocast():
                cam = cam_maps(net, images, labels, scales=cfg.eval_scales, flip=cfg.eval_flip)
            fixed.update(_cam_prediction(cam, cfg.cam_threshold), mask)
            for thr, metric in zip(THRESHOLDS, grid, strict=True):
                metric.update(_cam_prediction(cam, thr), mask)
            pl = pseudo_labels(cam, labels, low=cfg.low, high=cfg.high)
            pseudo.update(pl, mask)
            if seg is not None:
                with autocast():
                    probs = seg_probs(net, images, scales=cfg.eval_scales, flip=cfg.eval_flip)
                seg.update(probs.argmax(dim=1), mask)
                if seg_crf is not None:
                    from wsss_blocks.refine import dense_crf

                    seg_crf.update(dense_crf(images.float(), probs.float()).argmax(dim=1), mask)
            counted = mask != 255
            confident += ((pl != 255) & counted).sum()
            total += counted.sum()
    finally:
        net.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = torch.stack([confident, total])
        torch.distributed.all_reduce(stats)
        confident, total = stats[0], stats[1]
    best = [m.compute().miou for m in grid]
    i_best = max(range(len(best)), key=lambda i: best[i])
    out = {
        "cam_miou": fixed.compute().miou,
        "cam_miou_best": best[i_best],
        "best_threshold": THRESHOLDS[i_best],
        "pseudo_miou": pseudo.compute().miou,
        "pseudo_coverage": float(confident / total.clamp_min(1)),  # sync-ok: evaluation
    }
    if seg is not None:
        out["seg_miou"] = seg.compute().miou
    if seg_crf is not None:
        out["seg_crf_miou"] = seg_crf.compute().miou
    return {k: float(v) for k, v in out.items()}


def vis_batch(dataset: Any, num_images: int, size: int) -> dict[str, Any]:
    """The first ``num_images`` items of ``dataset`` as one batch, resized to ``size`` x ``size``
    where they differ (VOC / COCO validation images): image bilinear, mask nearest."""
    from wsss_blocks.data import collate

    items = []
    for i in range(min(num_images, len(dataset))):
        item = dict(dataset[i])
        if tuple(item["image"].shape[-2:]) != (size, size):
            item["image"] = F.interpolate(item["image"][None], size=(size, size), mode="bilinear",
                                          align_corners=False)[0]
            item["mask"] = F.interpolate(item["mask"][None, None].float(), size=(size, size),
                                         mode="nearest")[0, 0].long()
            item["valid"] = torch.ones(size, size, dtype=torch.bool)
        items.append(item)
    return collate(items)


@torch.no_grad()
def save_panels(path: str, net: nn.Module, batch: dict[str, Any], *, cfg: Any, device: torch.device,
                palette: Any = None, autocast: Callable[[], Any] = contextlib.nullcontext) -> list[str]:
    """Write PNG panels for a fixed batch of validation images; returns the written paths.

    ``<path>_cam.png``: image | ground truth | CAM (max over present classes);
    ``<path>_pseudo.png``: image | pseudo mask (ignore in white) | CAM of the first present class.
    """
    from wsss_blocks.viz import save_grid

    was_training = net.training
    net.eval()
    try:
        images = batch["image"].to(device)
        labels = batch["labels"].to(device)
        with autocast():
            cam = cam_maps(net, images, labels, scales=cfg.eval_scales, flip=cfg.eval_flip)
    finally:
        net.train(was_training)
    pl = pseudo_labels(cam, labels, low=cfg.low, high=cfg.high)
    first = labels.float().argmax(dim=1)
    cam_first = cam[torch.arange(cam.shape[0], device=cam.device), first]
    # colorize_mask paints 255 (ignore) and values outside the palette white
    pal = None if palette is None else np.asarray(palette, dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ncols = min(4, images.shape[0])
    p1, p2 = f"{path}_cam.png", f"{path}_pseudo.png"
    save_grid(p1, images.cpu(), masks=batch["mask"].cpu(), cams=cam.amax(dim=1).cpu(), ncols=ncols, palette=pal)
    save_grid(p2, images.cpu(), masks=pl.cpu(), cams=cam_first.cpu(), ncols=ncols, palette=pal)
    return [p1, p2]

