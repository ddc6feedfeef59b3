"""Multi-class-token ViTs (MCTformer style): one class token per class, attention CAMs.

* ``add_class_tokens`` gives a ViT ``C`` leading class tokens in place;
* ``final_tokens`` + ``class_scores`` give the class logits (the mean of each final class
  token over ``D``, no final norm);
* ``attention_cams`` gives the class-to-patch attention maps of the last blocks, optionally
  refined by the patch-to-patch attention, as in MCTformer's released code;
* ``load_mctformer`` loads a released MCTformer V1 / V2 / MCTformer+ checkpoint into a timm
  ViT in that form (and returns V2's PatchCAM head);
* ``patch_cam`` / ``PatchCAM`` give MCTformer-V2's patch-token CAM and ``fused_cam`` /
  ``FusedCAM`` its fusion with the attention maps.

Examples:
    >>> import timm, torch
    >>> from wsss_blocks import mct
    >>> vit = mct.add_class_tokens(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2,
    ...                                              embed_dim=32, num_heads=2), 3)
    >>> mct.attention_cams(vit, torch.randn(1, 3, 32, 32), last_k=2).shape
    torch.Size([1, 3, 2, 2])
"""

from wsss_blocks.mct.checkpoints import LoadResult, load_mctformer
from wsss_blocks.mct.class_tokens import FinalTokens, add_class_tokens, attention_cams, class_scores, final_tokens
from wsss_blocks.mct.patch_head import FusedCAM, PatchCAM, fused_cam, patch_cam

__all__ = [
    "FinalTokens",
    "add_class_tokens",
    "final_tokens",
    "class_scores",
    "attention_cams",
    "LoadResult",
    "load_mctformer",
    "patch_cam",
    "PatchCAM",
    "fused_cam",
    "FusedCAM",
]
