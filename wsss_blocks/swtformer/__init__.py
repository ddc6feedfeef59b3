"""SWTformer (Ahmadi & Kasaei, MVIP 2024) building blocks: Swin CAMs, HFF, SIPE-style refinement.

* **V1** -- a CAM head on a Swin's last-stage patch tokens (``SwinCAMHead``,
  ``swin_cam``), trained with the multilabel soft-margin loss;
* **V2** -- adds the background map (``cams_with_background``), structure-aware seeds
  with the absolute-cosine similarity (``locate_seeds``), Hierarchical Feature Fusion
  (``HFF``, our wiring: no code was released), background-aware prototypes and R-CAM
  (``seed_prototypes``, ``refine_cams``, SIPE's IS-CAM) and the GSC / CCL losses
  (``gsc_loss``, ``ccl_loss``); ``SWTformer`` wires everything on a timm Swin,
  ``SWTformer.from_preset`` with the paper's or SIPE's settings (``PRESETS``).

The seed/prototype/GSC parts follow SIPE's official code (chenqi1126/SIPE) in matmul form.
"""

from wsss_blocks.swtformer.head import SwinCAMHead, SwinCAMOutput, cams_with_background, swin_cam
from wsss_blocks.swtformer.hff import HFF
from wsss_blocks.swtformer.losses import CCLLoss, GSCLoss, ccl_loss, gsc_loss
from wsss_blocks.swtformer.model import SWTformer, SWTformerHead, SWTformerOutput
from wsss_blocks.swtformer.presets import PRESETS
from wsss_blocks.swtformer.prototypes import PrototypeRefiner, rcam_pseudo_mask, refine_cams, seed_prototypes
from wsss_blocks.swtformer.seeds import SeedLocator, SeedOutput, Similarity, locate_seeds, structure_affinity

__all__ = [
    "swin_cam",
    "SwinCAMHead",
    "SwinCAMOutput",
    "cams_with_background",
    "Similarity",
    "structure_affinity",
    "locate_seeds",
    "SeedLocator",
    "SeedOutput",
    "seed_prototypes",
    "refine_cams",
    "PrototypeRefiner",
    "rcam_pseudo_mask",
    "gsc_loss",
    "GSCLoss",
    "ccl_loss",
    "CCLLoss",
    "HFF",
    "SWTformerHead",
    "SWTformer",
    "SWTformerOutput",
    "PRESETS",
]
