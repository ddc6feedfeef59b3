"""Every functional op and loss of wsss_blocks, importable from one place.

Examples:
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
from wsss_blocks.cpal import (
    alignment_shift,
    context_prototypes,
    cpal_forward,
    instance_prototypes,
    neighbor_weights,
    pacam,
    positiveness,
    self_loss,
    soft_neighbors,
)
from wsss_blocks.cpews import ism_loss, pdl_loss, region_embeddings, ssl_loss
from wsss_blocks.doei import (
    doei_delta,
    hybrid_attention,
    patch_color_affinity,
    progressive_count,
    select_top_bottom,
)
from wsss_blocks.mct import class_scores, fused_cam, patch_cam
from wsss_blocks.metrics import confusion_matrix, iou_from_confusion
from wsss_blocks.pcm import (
    dihedral_inverse,
    dihedral_transform,
    et_loss,
    masked_renormalize,
    mce_loss,
    mosaic,
    patch_class_probs,
    pseudo_mask,
    random_dihedral_codes,
    teacher_to_tiles,
    unmosaic,
)
from wsss_blocks.prototypes import kmeans
from wsss_blocks.refine import dense_crf, par, par_affinity, par_label_levels, par_pseudo_labels, seg_loss
from wsss_blocks.swtformer import (
    cams_with_background,
    ccl_loss,
    gsc_loss,
    locate_seeds,
    rcam_pseudo_mask,
    refine_cams,
    seed_prototypes,
    structure_affinity,
    swin_cam,
)
from wsss_blocks.tokens import (
    grid_to_tokens,
    split_prefix_tokens,
    stage_taps,
    tokens_to_grid,
    vit_taps,
)

__all__ = [
    "add_background",
    "alignment_shift",
    "box_to_valid_mask",
    "cam_from_features",
    "cams_with_background",
    "ccl_loss",
    "class_scores",
    "confusion_matrix",
    "context_prototypes",
    "cpal_forward",
    "dense_crf",
    "dihedral_inverse",
    "dihedral_transform",
    "doei_delta",
    "et_loss",
    "fused_cam",
    "grid_to_tokens",
    "gsc_loss",
    "hybrid_attention",
    "instance_prototypes",
    "iou_from_confusion",
    "ism_loss",
    "kmeans",
    "locate_seeds",
    "masked_average_pool",
    "masked_renormalize",
    "mce_loss",
    "mosaic",
    "multiscale_cam",
    "neighbor_weights",
    "normalize_cam",
    "pacam",
    "par",
    "par_affinity",
    "par_label_levels",
    "par_pseudo_labels",
    "patch_cam",
    "patch_class_probs",
    "patch_color_affinity",
    "pdl_loss",
    "positiveness",
    "progressive_count",
    "pseudo_labels",
    "pseudo_mask",
    "random_dihedral_codes",
    "rcam_pseudo_mask",
    "refine_cams",
    "region_embeddings",
    "seed_prototypes",
    "seg_loss",
    "select_top_bottom",
    "self_loss",
    "soft_neighbors",
    "split_prefix_tokens",
    "ssl_loss",
    "stage_taps",
    "structure_affinity",
    "swin_cam",
    "teacher_to_tiles",
    "token_pseudo_labels",
    "tokens_to_grid",
    "unmosaic",
    "valid_to_grid",
    "vit_taps",
]
