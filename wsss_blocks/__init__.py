"""wsss_blocks: composable building blocks from weakly supervised semantic segmentation papers.

``import wsss_blocks`` imports only torch, einops, numpy and opt_einsum; timm is imported by
the functions that need a timm model, and the optional extras (matplotlib, tqdm,
pydensecrf2, pycocotools, Pillow) only by the parts that use them.

Examples:
    >>> import wsss_blocks
    >>> from wsss_blocks import cam, tokens, functional
    >>> isinstance(wsss_blocks.__version__, str)
    True
"""

from wsss_blocks import (
    adapters,
    cam,
    constants,
    cpal,
    cpews,
    data,
    doei,
    functional,
    mct,
    metrics,
    outputs,
    pcm,
    prototypes,
    refine,
    swtformer,
    tokens,
    utils,
)
from wsss_blocks._validate import ShapeError
from wsss_blocks._version import __version__
from wsss_blocks.metrics import MeanIoU
from wsss_blocks.outputs import LossOutput
from wsss_blocks.prototypes import ClassBank, kmeans
from wsss_blocks.tokens import StageInfo, StageTaps, ViTTaps, stage_taps, vit_taps
from wsss_blocks.utils import eval_mode

__all__ = [
    "ClassBank",
    "LossOutput",
    "MeanIoU",
    "ShapeError",
    "StageInfo",
    "StageTaps",
    "ViTTaps",
    "__version__",
    "adapters",
    "cam",
    "constants",
    "cpal",
    "cpews",
    "data",
    "doei",
    "eval_mode",
    "functional",
    "kmeans",
    "mct",
    "metrics",
    "outputs",
    "pcm",
    "prototypes",
    "refine",
    "stage_taps",
    "swtformer",
    "tokens",
    "utils",
    "vit_taps",
]
