"""CPAL: Context Prototype-Aware Learning (Tang et al., CVPR 2024).

A plug-in branch for any CAM network (a CNN feature map or a ViT's token grid): per-image
class prototypes from the CAM, a per-class bank clustered into context prototypes, and a
prototype-aware CAM that supervises the CAM through an L1 loss. The paper released no code;
the choices taken where it is silent are documented on ``CPAL`` and in the README.

One concept per module (the functions are re-exported here and by
``wsss_blocks.functional``):

* ``prototypes`` -- ``instance_prototypes`` (eq. 4) and
  ``context_prototypes`` (eq. 5);
* ``alignment`` -- ``alignment_shift`` (eqs. 9-12);
* ``neighbors`` -- ``positiveness`` (eq. 7), ``soft_neighbors``
  (eq. 6) and ``neighbor_weights`` (Claim 1);
* ``prototype_cam`` -- ``pacam`` (eq. 13);
* ``loss`` -- ``self_loss`` (eq. 14);
* ``branch`` -- ``cpal_forward``, one step without state, and its
  ``CPALOutput``;
* ``module`` -- ``CPAL``: projection head, bank, recluster schedule,
  context buffers (``forward`` computes, ``update`` / ``recluster`` / ``reset`` change state).

Examples:
    >>> import torch
    >>> from wsss_blocks.cpal import CPAL
    >>> cpal = CPAL(16, 2, proj_dim=8, capacity=8, num_prototypes=4, top_k=2, recluster_every=10,
    ...             warn_unbuilt=False)
    >>> out = cpal(torch.randn(2, 16, 3, 3), torch.rand(2, 2, 3, 3), torch.tensor([[1, 0], [1, 1]]))
    >>> out._fields
    ('pacam', 'cams_with_bg', 'prototypes', 'prototype_valid', 'active', 'loss', 'terms')
    >>> cpal.update(out.prototypes, out.prototype_valid)
"""

from wsss_blocks.cpal.alignment import alignment_shift
from wsss_blocks.cpal.branch import CPALOutput, cpal_forward
from wsss_blocks.cpal.loss import self_loss
from wsss_blocks.cpal.module import CPAL
from wsss_blocks.cpal.neighbors import (
    Similarity,
    SoftNeighbors,
    Weighting,
    neighbor_weights,
    positiveness,
    soft_neighbors,
)
from wsss_blocks.cpal.prototype_cam import pacam
from wsss_blocks.cpal.prototypes import (
    ContextPrototypes,
    InstancePrototypes,
    context_prototypes,
    instance_prototypes,
)

__all__ = [
    "CPAL",
    "CPALOutput",
    "ContextPrototypes",
    "InstancePrototypes",
    "Similarity",
    "SoftNeighbors",
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
