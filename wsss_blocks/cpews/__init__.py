"""CPEWS (Contextual Prototype-based End-to-end WSSS, CMC 2025) building blocks.

ToCo without CTC plus:

* **ISM** -- the patch-token contrast of final tokens supervised by pseudo labels from an
  intermediate-layer CAM (``ism_loss``, ToCo PTC parity by default);
* **CPM** -- a per-class pool of positive (k-means) and negative (top-scoring absent
  class regions) prototypes (``PrototypePool``) built from region embeddings
  (``region_embeddings``), or imported (``PrototypePool.load_prototypes``; the official
  code's saved pool through ``prototypes_from_cpews_upload``);
* **PDL** / **SSL** -- the prototype discrimination and superclass suppression losses
  (``pdl_loss``, ``ssl_loss``), SSL differentiable (the official code's is not);
* the two-branch classifier head (``CPEWSHead``, ``cpews_taps``) and the
  combined loss (``CPEWSLoss``, presets ``"paper"`` and ``"official"`` in
  ``PRESETS``; build pool and losses together with ``CPEWSLoss.from_preset``).

Where the paper and the released code differ, the ``"paper"`` preset follows the paper and
``"official"`` the code; the README lists every difference.
"""

from wsss_blocks.cpews.head import CPEWSHead, CPEWSHeadOutput, cpews_taps
from wsss_blocks.cpews.ism import ISMLoss, ism_loss
from wsss_blocks.cpews.loss import CPEWSLoss
from wsss_blocks.cpews.pdl import PDLLoss, pdl_loss
from wsss_blocks.cpews.pool import PoolPrototypes, PrototypePool, prototypes_from_cpews_upload
from wsss_blocks.cpews.regions import RegionEmbeddings, region_embeddings
from wsss_blocks.cpews.ssl import SSLLoss, ssl_loss
from wsss_blocks.cpews.tables import (
    COCO_SUPERCLASSES,
    PRESETS,
    VOC_SUPERCLASSES,
    superclass_index,
)

__all__ = [
    "VOC_SUPERCLASSES",
    "COCO_SUPERCLASSES",
    "PRESETS",
    "superclass_index",
    "cpews_taps",
    "CPEWSHead",
    "CPEWSHeadOutput",
    "ism_loss",
    "ISMLoss",
    "region_embeddings",
    "RegionEmbeddings",
    "PrototypePool",
    "PoolPrototypes",
    "prototypes_from_cpews_upload",
    "pdl_loss",
    "PDLLoss",
    "ssl_loss",
    "SSLLoss",
    "CPEWSLoss",
]
