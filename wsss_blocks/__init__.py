"""wsss_blocks: composable building blocks from weakly supervised semantic segmentation papers.

``import wsss_blocks`` imports only torch, einops, numpy and opt_einsum; timm is imported by
the functions that need a timm model, and the optional extras (matplotlib, tqdm,
pydensecrf2, pycocotools, Pillow) only by the parts that use them.
"""

from wsss_blocks._validate import ShapeError
from wsss_blocks._version import __version__

__all__ = ["ShapeError", "__version__"]
