"""Every functional op and loss of wsss_blocks, importable from one place.

Example:
    >>> import torch
    >>> from wsss_blocks import functional as WF
    >>> WF.normalize_cam(torch.randn(1, 2, 3, 3)).shape
    torch.Size([1, 2, 3, 3])
"""

from wsss_blocks.cam import (
    add_background,
    box_to_valid_mask,
    cam_from_features,
    masked_average_pool,
    multiscale_cam,
    normalize_cam,
    pseudo_labels,
    token_pseudo_labels,
    valid_to_grid,
)
from wsss_blocks.cpews import ism_loss, pdl_loss, region_embeddings, ssl_loss
from wsss_blocks.doei import (
    doei_delta,
    hybrid_attention,
    patch_color_affinity,
    progressive_count,
    select_top_bottom,
)
from wsss_blocks.mct import class_scores
from wsss_blocks.metrics import confusion_matrix, iou_from_confusion
from wsss_blocks.prototypes import kmeans
from wsss_blocks.tokens import features_as_tokens, grid_to_tokens, split_prefix_tokens, tokens_to_grid

__all__ = [
    "add_background",
    "box_to_valid_mask",
    "cam_from_features",
    "class_scores",
    "confusion_matrix",
    "doei_delta",
    "features_as_tokens",
    "grid_to_tokens",
    "hybrid_attention",
    "ism_loss",
    "iou_from_confusion",
    "kmeans",
    "masked_average_pool",
    "multiscale_cam",
    "normalize_cam",
    "patch_color_affinity",
    "pdl_loss",
    "progressive_count",
    "pseudo_labels",
    "region_embeddings",
    "select_top_bottom",
    "split_prefix_tokens",
    "ssl_loss",
    "token_pseudo_labels",
    "tokens_to_grid",
    "valid_to_grid",
]
