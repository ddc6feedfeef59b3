"""Segmentation-stage blocks: PAR refinement, PAR pseudo labels, the balanced seg loss, the dense CRF.

``par`` / ``PAR`` and ``seg_loss`` / ``SegLoss`` are pure torch. ``dense_crf`` / ``DenseCRF``
use the optional ``crf`` extra (``pydensecrf2``), imported only when a CRF runs.
"""

from wsss_blocks.refine.balanced_loss import SegLoss, seg_loss
from wsss_blocks.refine.crf import DenseCRF, crf_available, dense_crf
from wsss_blocks.refine.labels import combine_levels, par_label_levels, par_pseudo_labels
from wsss_blocks.refine.pixel_adaptive import PAR, par, par_affinity, par_stencil

__all__ = [
    "PAR",
    "par",
    "par_affinity",
    "par_stencil",
    "par_label_levels",
    "par_pseudo_labels",
    "combine_levels",
    "SegLoss",
    "seg_loss",
    "DenseCRF",
    "dense_crf",
    "crf_available",
]
