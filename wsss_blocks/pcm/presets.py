"""ViT-PCM presets: the paper's values and the official TensorFlow code's, for ``ViTPCM.from_preset``."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

#: Keyword arguments of ``ViTPCM`` per preset. The two differ where the paper states a
#: value that the official code does not use; where the paper is silent both take the code's.
#:
#: * ``init_std``: the paper initialises the classifier with a "standard Gaussian" (std 1), the
#:   code with N(0, 0.05²).
#: * ``l2``: the paper's L2 coefficient is 0.1, the code's Keras regulariser 0.01.
#: * ``align_corners``: the code resizes tiles and teacher maps with TF1's
#:   ``align_corners=True`` (both presets; the class default is ``False``).
#: * ``background``: the code's MCE background target comes from the ground-truth mask, which
#:   image-level supervision does not have; both presets use ``"always_one"`` (override with
#:   ``"from_labels"`` and ``(B, K+1)`` labels to feed it).
#:
#: Not module options, so not here: the schedule (paper: 2 frozen epochs, then the last 4
#: blocks, ``set_backbone_trainable(num_blocks=4)``; code: 1 frozen epoch, then the last 5
#: blocks and the final norm, ``num_blocks=5``, with a new Adam at 1e-4) and the backbone.
#: Without a preset, ``ViTPCM`` takes the code's values except ``align_corners=False``.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "hv_lstm": True,
        "hidden_dim": None,
        "dropout": 0.2,
        "keras_init": True,
        "bias": False,
        "init_std": 1.0,
        "l2": 0.1,
        "background": "always_one",
        "target_norm": "tile",
        "crop_prob": 0.3,
        "crop": 128,
        "scale": 0.5,
        "align_corners": True,
    },
    "official": {
        "hv_lstm": True,
        "hidden_dim": None,
        "dropout": 0.2,
        "keras_init": True,
        "bias": False,
        "init_std": 0.05,
        "l2": 0.01,
        "background": "always_one",
        "target_norm": "tile",
        "crop_prob": 0.3,
        "crop": 128,
        "scale": 0.5,
        "align_corners": True,
    },
}
