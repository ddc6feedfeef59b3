"""ViT-PCM (Max Pooling with Vision Transformers reconciles class and shape in WSSS, ECCV 2022).

* :class:`PatchClassifier` -- linear patch classifier over ``K + 1`` classes (background 0),
  per-patch softmax and global max pooling (:func:`patch_class_probs`);
* :func:`mce_loss` -- multi-label BCE on the pooled probabilities (Keras clipping);
* :class:`HVBiLSTM` -- parallel row / column BiLSTMs over the patch grid;
* the equivariance branch: :func:`dihedral_transform` / :func:`dihedral_inverse`,
  :func:`mosaic` / :func:`unmosaic` with a :class:`MosaicRecord`, :func:`teacher_to_tiles`,
  :func:`masked_renormalize` and :func:`et_loss`;
* :func:`pseudo_mask` -- the baseline pseudo mask (arg-max, background channel 0);
* :class:`ViTPCM` -- the whole model on a timm ViT with the official training step.

Where the paper and the official TensorFlow code differ, the defaults follow the code.
"""

from wsss_blocks.pcm.geometry import (
    MosaicRecord,
    dihedral_inverse,
    dihedral_transform,
    mosaic,
    random_dihedral_codes,
    teacher_to_tiles,
    unmosaic,
)
from wsss_blocks.pcm.head import HVBiLSTM, PatchClassifier, PCMOutput, patch_class_probs
from wsss_blocks.pcm.losses import (
    Background,
    ETLoss,
    MCELoss,
    et_loss,
    masked_renormalize,
    mce_loss,
    pseudo_mask,
)
from wsss_blocks.pcm.model import ViTPCM

__all__ = [
    "Background",
    "PCMOutput",
    "patch_class_probs",
    "PatchClassifier",
    "HVBiLSTM",
    "mce_loss",
    "MCELoss",
    "random_dihedral_codes",
    "dihedral_transform",
    "dihedral_inverse",
    "MosaicRecord",
    "mosaic",
    "unmosaic",
    "teacher_to_tiles",
    "masked_renormalize",
    "et_loss",
    "ETLoss",
    "pseudo_mask",
    "ViTPCM",
]
