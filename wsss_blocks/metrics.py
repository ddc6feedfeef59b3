"""Segmentation metrics: confusion matrix and (streaming) mean IoU with ``ignore_index``.

Metrics are off the training path, so reading values on the host (range checks, the
final ``float``) is allowed here.

Conventions:

* confusion rows are the **target** class, columns the **prediction**;
* pixels whose target **or** prediction equals ``ignore_index`` are counted nowhere
  (a prediction may carry ``ignore_index`` for "undecided", e.g. pseudo labels with an
  uncertain band; those pixels are then left out, not counted as errors);
* any other value outside ``[0, num_classes)`` in target or prediction raises
  ``ShapeError``;
* the IoU of a class absent from both the ground truth and the prediction is ``NaN`` and
  the mean IoU averages only the classes present in the ground truth or the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wsss_blocks._distributed import world_size
from wsss_blocks._validate import ShapeError, check_int, check_tensor

__all__ = ["IoU", "confusion_matrix", "iou_from_confusion", "MeanIoU", "MeanIoUResult"]


def _check_values(name: str, x: Tensor, num_classes: int, ignore_index: int) -> None:
    bad = ((x < 0) | (x >= num_classes)) & (x != ignore_index)
    if bool(bad.any()):  # sync-ok: metrics are off the training path
        value = int(x[bad][0])  # sync-ok
        raise ShapeError(
            f"{name}: expected class indices in [0, {num_classes}) or "
            f"ignore_index={ignore_index}, got {value}"
        )


def confusion_matrix(
    preds: Tensor,
    masks: Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
) -> Tensor:
    """Confusion matrix of integer label maps (one ``bincount``).

    Pixels whose target or prediction is ``ignore_index`` are not counted.

    Args:
        preds: predicted class indices.
        masks: ground-truth class indices, same shape as ``preds``.
        num_classes: ``C``.
        ignore_index: label value to skip.

    Returns:
        ``confusion[t, p]`` = number of pixels with target ``t`` predicted as ``p``.

    Shape:
        - preds, masks: any shape, the same for both (e.g. ``(B, H, W)``), integer dtype.
        - output: ``(C, C)`` int64 on ``preds``' device.

    Raises:
        ShapeError: different shapes, non-integer dtype, or a value outside
            ``[0, C)`` that is not ``ignore_index``.

    Examples:
        >>> preds = torch.tensor([[0, 1], [1, 1]])
        >>> masks = torch.tensor([[0, 1], [0, 255]])
        >>> confusion_matrix(preds, masks, 2)
        tensor([[1, 1],
                [0, 1]])
    """
    c = check_int("num_classes", num_classes, low=1)
    check_tensor("preds", preds, dtype="int")
    check_tensor("masks", masks, dtype="int")
    if preds.shape != masks.shape:
        raise ShapeError(
            f"preds: expected the shape of masks {tuple(masks.shape)}, got {tuple(preds.shape)}"
        )
    masks = masks.to(preds.device)
    _check_values("preds", preds, c, ignore_index)
    _check_values("masks", masks, c, ignore_index)
    p = preds.reshape(-1).long()
    t = masks.reshape(-1).long()
    keep = (t != ignore_index) & (p != ignore_index)
    idx = (t * c + p)[keep]
    return torch.bincount(idx, minlength=c * c).reshape(c, c)


class IoU(NamedTuple):
    """Per-class and mean IoU from ``iou_from_confusion``.

    Attributes:
        per_class: ``(C,)`` float64 IoU, NaN for a class absent from target and prediction.
        miou: the mean over the classes that are not NaN (NaN when there is none).

    Examples:
        >>> iou_from_confusion(torch.tensor([[1, 0], [0, 1]])).miou
        1.0
    """

    per_class: Tensor
    miou: float


def iou_from_confusion(confusion: Tensor) -> IoU:
    """Per-class IoU and mean IoU from a confusion matrix.

    ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)``. A class with neither ground-truth nor
    predicted pixels has ``NaN`` IoU and is left out of the mean; the mean over no class
    at all is ``NaN``.

    Args:
        confusion: confusion matrix, rows = target, columns = prediction.

    Returns:
        ``(per_class_iou, miou)``: a ``(C,)`` float64 tensor and a Python float.

    Shape:
        - confusion: ``(C, C)``; per_class_iou: ``(C,)`` float64.

    Examples:
        >>> confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
        >>> iou, miou = iou_from_confusion(confusion)
        >>> iou
        tensor([0.7500, 0.6667,    nan], dtype=torch.float64)
        >>> round(miou, 4)
        0.7083
    """
    check_tensor("confusion", confusion)
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ShapeError(f"confusion: expected a square (C, C) matrix, got shape {tuple(confusion.shape)}")
    confusion = confusion.double()
    bad = ~torch.isfinite(confusion) | (confusion < 0)
    if bool(bad.any()):  # sync-ok: off the training path
        raise ShapeError(f"confusion: expected non-negative finite counts, got {confusion[bad][0].item()}")
    tp = confusion.diagonal()
    union = confusion.sum(1) + confusion.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1.0), torch.full_like(tp, float("nan")))
    present = union > 0
    if bool(present.any()):  # sync-ok: off the training path
        miou = float(iou[present].mean())  # sync-ok
    else:
        miou = math.nan
    return IoU(iou, miou)



class MeanIoUResult(NamedTuple):
    """What ``MeanIoU.compute`` returns.

    Attributes:
        miou: mean IoU over the classes present in the ground truth or the prediction.
        per_class: ``(C,)`` float64 IoU, NaN for a class absent from both.
        pixel_accuracy: the share of counted pixels predicted right.
        mean_accuracy: mean recall over the classes present in the ground truth.
        confusion: ``(C, C)`` int64, rows = target, columns = prediction (all ranks summed).
        per_class_named: class name -> IoU, when the metric was given ``class_names``.

    Examples:
        >>> m = MeanIoU(2)
        >>> m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
        >>> m.compute().miou
        1.0
    """

    miou: float
    per_class: Tensor
    pixel_accuracy: float
    mean_accuracy: float
    confusion: Tensor
    per_class_named: dict[str, float] | None


class MeanIoU(nn.Module):
    """Streaming mean IoU: accumulate a confusion matrix over batches, then compute.

    The confusion matrix lives in a persistent int64 buffer ``confusion (C, C)`` (so
    ``state_dict`` round-trips it; move the module with ``.to(device)`` to accumulate on
    a device). Under an initialised ``torch.distributed`` with world size > 1,
    ``compute`` sums the confusion matrices of all ranks (every rank must call it);
    the local buffer is left unchanged.

    Args:
        num_classes: ``C``.
        ignore_index: label value to skip (in target or prediction).
        class_names: optional ``C`` names used for the ``per_class_named`` entry.

    Shape:
        - confusion: ``(C, C)`` int64.

    Examples:
        >>> metric = MeanIoU(2, class_names=["bg", "cat"])
        >>> metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
        >>> metric.update(torch.tensor([[1, 1]]), torch.tensor([[0, 255]]))
        >>> out = metric.compute()
        >>> round(out.miou, 4), out.per_class_named
        (0.5, {'bg': 0.5, 'cat': 0.5})
        >>> metric.reset(); int(metric.confusion.sum())
        0
    """

    confusion: Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if class_names is not None:
            class_names = list(class_names)
            if len(class_names) != num_classes:
                raise ValueError(
                    f"class_names: expected {num_classes} names, got {len(class_names)}"
                )
        self.class_names = class_names
        self.register_buffer("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}"

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the confusion matrix.

        Examples:
            >>> m = MeanIoU(2)
            >>> m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
            >>> m.reset(); int(m.confusion.sum())
            0
        """
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, preds: Tensor, masks: Tensor) -> None:
        """Add a batch to the confusion matrix.

        Args:
            preds: integer class indices of ``masks``' shape, or floating scores with a
                class dimension at 1 (``(B, C, H, W)`` for ``(B, H, W)`` targets), which
                are arg-maxed.
            masks: integer ground truth.

        Shape:
            - preds: ``(B, H, W)`` int or ``(B, C, H, W)`` float; masks: ``(B, H, W)``.

        Examples:
            >>> m = MeanIoU(3)
            >>> m.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
            >>> int(m.confusion.sum())
            4
        """
        check_tensor("preds", preds)
        check_tensor("masks", masks)
        if preds.is_floating_point():
            if preds.dim() != masks.dim() + 1 or preds.shape[1] != self.num_classes:
                raise ShapeError(
                    f"preds: expected scores (B, C={self.num_classes}, ...) for masks of "
                    f"shape {tuple(masks.shape)}, got {tuple(preds.shape)}"
                )
            preds = preds.argmax(1)
        confusion = confusion_matrix(preds, masks, self.num_classes, ignore_index=self.ignore_index)
        self.confusion += confusion.to(self.confusion.device)

    @torch.no_grad()
    def compute(self) -> MeanIoUResult:
        """Compute the metrics (summed over ranks under ``torch.distributed``).

        Returns:
            A ``MeanIoUResult``: ``miou`` (float, mean over classes present in GT or
            prediction), ``per_class`` (``(C,)`` float64 IoU, NaN for absent classes),
            ``pixel_accuracy`` (float), ``mean_accuracy`` (float, mean recall over classes
            present in GT), ``confusion`` (``(C, C)`` int64, all ranks summed) and
            ``per_class_named`` (name -> float when ``class_names`` was given, else ``None``).

        Examples:
            >>> m = MeanIoU(2)
            >>> m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
            >>> out = m.compute()
            >>> out.per_class, round(out.pixel_accuracy, 4)
            (tensor([0.5000, 0.5000], dtype=torch.float64), 0.6667)
        """
        confusion = self.confusion.clone()
        if world_size() > 1:
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        per_class, miou = iou_from_confusion(confusion)
        confd = confusion.double()
        total = confd.sum()
        if bool(total > 0):  # sync-ok
            pixel_acc = float(confd.diagonal().sum() / total)  # sync-ok
        else:
            pixel_acc = math.nan
        gt = confd.sum(1)
        has_gt = gt > 0
        if bool(has_gt.any()):  # sync-ok
            mean_acc = float((confd.diagonal()[has_gt] / gt[has_gt]).mean())  # sync-ok
        else:
            mean_acc = math.nan
        named = None
        if self.class_names is not None:
            named = {n: float(v) for n, v in zip(self.class_names, per_class.tolist(), strict=True)}  # sync-ok
        return MeanIoUResult(miou, per_class.cpu(), pixel_acc, mean_acc, confusion, named)  # sync-ok

    def forward(self, preds: Tensor, masks: Tensor) -> None:
        """Same as ``update`` (so the metric can be called like a module).

        Examples:
            >>> m = MeanIoU(2)
            >>> m(torch.tensor([0, 1]), torch.tensor([0, 1]))
            >>> m.compute().miou
            1.0
        """
        self.update(preds, masks)
