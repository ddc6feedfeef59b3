"""CPAL: Context Prototype-Aware Learning (Tang et al., CVPR 2024).

A plug-in branch for any CAM network (a CNN feature map or a ViT's token grid): per-image
class prototypes from the CAM, a per-class bank clustered into context prototypes, and a
prototype-aware CAM that supervises the CAM through an L1 loss. The paper released no code;
``specs/cpal.md`` records every decision taken where the paper is silent.

* :mod:`wsss_blocks.cpal.functional` -- the pure functions (re-exported here and by
  :mod:`wsss_blocks.functional`);
* :class:`CPAL` -- the module: projection head, bank, recluster schedule, context buffers.

Example:
    >>> import torch
    >>> from wsss_blocks.cpal import CPAL
    >>> cpal = CPAL(16, 2, proj_dim=8, capacity=8, num_prototypes=4, top_k=2, recluster_every=10)
    >>> out = cpal(torch.randn(2, 16, 3, 3), torch.rand(2, 2, 3, 3), torch.tensor([[1, 0], [1, 1]]))
    >>> sorted(out)
    ['active', 'cams_with_bg', 'loss_self', 'pacam', 'prototype_valid', 'prototypes']
"""

from wsss_blocks.cpal.functional import (
    Score,
    Weighting,
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
from wsss_blocks.cpal.module import CPAL

__all__ = [
    "CPAL",
    "Score",
    "Weighting",
    "alignment_shift",
    "context_prototypes",
    "cpal_forward",
    "instance_prototypes",
    "neighbor_weights",
    "pacam",
    "positiveness",
    "self_loss",
    "soft_neighbors",
]
