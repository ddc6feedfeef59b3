"""CPEWS taps and the two-branch classifier head (ToCo's intermediate + final classifiers)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from wsss_blocks._utils import promote
from wsss_blocks._validate import Dims, ShapeError, check_int, check_option, check_size
from wsss_blocks.tokens import ViTTaps, features_as_tokens, resolve_block_index, vit_taps

__all__ = ["cpews_taps", "CPEWSHead", "CPEWSHeadOutput"]


def cpews_taps(model: nn.Module, images: Tensor, *, mid_layer: int = -3) -> ViTTaps:
    """Intermediate (``mid_layer``) and final patch tokens of a ViT, with gradients.

    A thin wrapper over ``wsss_blocks.tokens.vit_taps``: one forward pass; prefix
    tokens are split off. ``taps.final`` is after the model's final norm;
    ``taps.intermediate`` holds exactly one entry, the residual stream at the output of
    block ``mid_layer`` (absolute index as key, **not** final-normed; ToCo/CPEWS: ``-3``,
    block 9 of 12).

    Args:
        model: a timm VisionTransformer-family model, or a ViT copy such as ToCo's or CPEWS's
            encoder (see ``wsss_blocks.adapters``).
        images: the image batch.
        mid_layer: the intermediate block (negative counts from the end).

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``ViTTaps``, tokens ``(B, N, D)``

    Raises:
        ValueError: ``mid_layer`` outside ``[-L, L)``, or an image size the model cannot take.

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                         depth=4)
        >>> taps = cpews_taps(vit, torch.randn(2, 3, 32, 32))
        >>> (mid,) = taps.intermediate.values()
        >>> list(taps.intermediate), mid.shape, taps.final.shape, taps.size
        ([1], torch.Size([2, 4, 192]), torch.Size([2, 4, 192]), (2, 2))
    """
    layer = check_int("mid_layer", mid_layer)
    try:
        resolve_block_index(model, layer)
    except ValueError as err:
        raise ValueError(f"mid_layer: {err}") from None
    return vit_taps(model, images, layers=(layer,))


class CPEWSHeadOutput(NamedTuple):
    """Output of ``CPEWSHead``: raw logits and raw CAMs, all with gradients.

    Attributes:
        logits_mid: ``(B, K)`` from the intermediate features.
        logits_final: ``(B, K)`` from the final features.
        cams_mid: ``(B, K, h, w)`` raw CAMs, intermediate classifier on intermediate features.
        cams_final: ``(B, K, h, w)`` raw CAMs, final classifier on final features.

    Examples:
        >>> head = CPEWSHead(8, 3)
        >>> out = head(torch.randn(2, 6, 8), torch.randn(2, 6, 8), (2, 3))
        >>> out.logits_final.shape, out.cams_mid.shape
        (torch.Size([2, 3]), torch.Size([2, 3, 2, 3]))
    """

    logits_mid: Tensor
    logits_final: Tensor
    cams_mid: Tensor
    cams_final: Tensor


class CPEWSHead(nn.Module):
    """Two bias-free linear classifiers (intermediate and final features), ToCo/CPEWS style.

    ``CAM_s = einsum("bnd,kd->bkn", x_s, W_s)`` reshaped to the grid. Logits:

    * ``"gmp_feat"`` (default, ToCo/CPEWS code): global max pooling of every feature
      channel, then the classifier, ``z = W max_n x_n``;
    * ``"gmp_cam"``: max of the CAM, ``z_k = max_n CAM_k(n)`` (not equal in general).

    Train each branch with ``multilabel_soft_margin_loss(z_s, labels)`` (done by
    ``CPEWSLoss``).

    Args:
        in_dim: feature dimension ``D``.
        num_classes: ``K`` foreground classes.
        pooling: ``"gmp_feat"`` or ``"gmp_cam"``.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - features_mid, features_final: ``(B, N, D)`` or ``(B, D, h, w)``
        - output: ``CPEWSHeadOutput``

    Examples:
        >>> head = CPEWSHead(8, 3)
        >>> out = head(torch.randn(2, 6, 8), torch.randn(2, 6, 8), (2, 3))
        >>> out.logits_final.shape, out.cams_mid.shape
        (torch.Size([2, 3]), torch.Size([2, 3, 2, 3]))
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        pooling: Literal["gmp_feat", "gmp_cam"] = "gmp_feat",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_dim = check_int("in_dim", in_dim, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        self.pooling = check_option("pooling", pooling, ("gmp_feat", "gmp_cam"))
        kw = {"device": device, "dtype": dtype}
        self.classifier_mid = nn.Linear(in_dim, num_classes, bias=False, **kw)
        self.classifier_final = nn.Linear(in_dim, num_classes, bias=False, **kw)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"

    def _branch(self, name: str, features: Tensor, weight: Tensor, size: tuple[int, int],
                dims: dict[str, int]) -> tuple[Tensor, Tensor]:
        x = features_as_tokens(name, features, size, dims, dtype="float")
        if x.shape[-1] != weight.shape[1]:
            raise ShapeError(
                f"{name}: expected D={weight.shape[1]}, got shape {tuple(features.shape)}"
            )
        x, weight = promote(x, weight)
        cam = torch.einsum("bnd,kd->bkn", x, weight)
        if self.pooling == "gmp_feat":
            logits = torch.nn.functional.linear(x.amax(dim=1), weight)
        else:
            logits = cam.amax(dim=-1)
        return logits, cam.unflatten(2, size)

    def forward(
        self, features_mid: Tensor, features_final: Tensor, size: tuple[int, int]
    ) -> CPEWSHeadOutput:
        """Logits and raw CAMs of both branches.

        Args:
            features_mid: intermediate tokens (e.g. ``cpews_taps(...).intermediate[i]``).
            features_final: final (normed) tokens.
            size: the token grid ``(h, w)``.
        """
        size = check_size("size", size)
        dims = Dims()
        z_mid, cams_mid = self._branch(
            "features_mid", features_mid, self.classifier_mid.weight, size, dims
        )
        z_fin, cams_fin = self._branch(
            "features_final", features_final, self.classifier_final.weight, size, dims
        )
        return CPEWSHeadOutput(z_mid, z_fin, cams_mid, cams_fin)
