"""ViT-PCM (Max Pooling with Vision Transformers reconciles class and shape in WSSS, ECCV 2022).

* ``PatchClassifier`` -- linear patch classifier over ``K + 1`` classes (background 0),
  per-patch softmax and global max pooling (``patch_class_probs``);
* ``mce_loss`` -- multi-label BCE on the pooled probabilities (Keras clipping);
* ``HVBiLSTM`` -- parallel row / column BiLSTMs over the patch grid;
* the equivariance branch: ``dihedral_transform`` / ``dihedral_inverse``,
  ``mosaic`` / ``unmosaic`` with a ``MosaicRecord``, ``teacher_to_tiles``,
  ``masked_renormalize`` and ``et_loss``;
* ``pseudo_mask`` -- the baseline pseudo mask (arg-max, background channel 0);
* ``ViTPCM`` -- the whole model on a timm ViT with the official training step, and
  ``PRESETS`` for ``ViTPCM.from_preset`` (the paper's or the official code's values).

Where the paper and the official TensorFlow code differ, the defaults follow the code.
"""

from wsss_blocks.pcm._common import Background
from wsss_blocks.pcm.classifier import PatchClassifier, PatchProbs, PCMOutput, patch_class_probs
from wsss_blocks.pcm.dihedral import dihedral_inverse, dihedral_transform, random_dihedral_codes
from wsss_blocks.pcm.equivariance import ETLoss, et_loss
from wsss_blocks.pcm.hv_bilstm import HVBiLSTM
from wsss_blocks.pcm.masks import masked_renormalize, pseudo_mask
from wsss_blocks.pcm.mce import MCELoss, mce_loss
from wsss_blocks.pcm.model import ViTPCM
from wsss_blocks.pcm.presets import PRESETS
from wsss_blocks.pcm.tiling import MosaicOutput, MosaicRecord, mosaic, teacher_to_tiles, unmosaic

__all__ = [
    "Background",
    "PCMOutput",
    "PatchProbs",
    "patch_class_probs",
    "PatchClassifier",
    "HVBiLSTM",
    "mce_loss",
    "MCELoss",
    "random_dihedral_codes",
    "dihedral_transform",
    "dihedral_inverse",
    "MosaicRecord",
    "MosaicOutput",
    "mosaic",
    "unmosaic",
    "teacher_to_tiles",
    "masked_renormalize",
    "et_loss",
    "ETLoss",
    "pseudo_mask",
    "ViTPCM",
    "PRESETS",
]
