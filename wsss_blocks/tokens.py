"""Token sequences, feature grids and the geometry of timm Vision Transformers.

Everything here takes the grid ``(h, w)`` from the model or from an explicit argument,
never from ``sqrt(N)``, and splits prefix (class, register, distillation) tokens off
with the model's own ``num_prefix_tokens``.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._validate import ShapeError, check_int, check_shape, check_size

__all__ = [
    "ViTTaps",
    "tokens_to_grid",
    "grid_to_tokens",
    "features_as_tokens",
    "split_prefix_tokens",
    "num_blocks",
    "resolve_block_index",
    "patch_grid",
    "vit_taps",
]


def tokens_to_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Reshape patch tokens to an NCHW feature map.

    Args:
        tokens: patch tokens in row-major grid order (prefix tokens already removed).
        size: the token grid ``(h, w)``; ``h * w`` must equal ``N``.

    Shape:
        - tokens: ``(B, N, D)``
        - output: ``(B, D, h, w)``

    Example:
        >>> import torch
        >>> tokens_to_grid(torch.zeros(2, 6, 8), (2, 3)).shape
        torch.Size([2, 8, 2, 3])
    """
    h, w = check_size("size", size)
    check_shape("tokens", tokens, ["B", h * w, "D"])
    return rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)


def grid_to_tokens(grid: Tensor) -> Tensor:
    """Flatten an NCHW feature map to row-major tokens.

    Shape:
        - grid: ``(B, D, h, w)``
        - output: ``(B, h*w, D)``

    Example:
        >>> import torch
        >>> x = torch.randn(2, 8, 2, 3)
        >>> torch.equal(tokens_to_grid(grid_to_tokens(x), (2, 3)), x)
        True
    """
    check_shape("grid", grid, ["B", "D", "h", "w"])
    return rearrange(grid, "b d h w -> b (h w) d")


def features_as_tokens(
    name: str,
    features: Tensor,
    size: tuple[int, int],
    dims: MutableMapping[str, int] | None = None,
) -> Tensor:
    """Accept features as tokens ``(B, N, D)`` or a map ``(B, D, h, w)``; return tokens.

    For use at public entry points that take "features" in either layout. The grid always
    comes from ``size`` (usually the CAM's), and the number of tokens must match it.

    Args:
        name: argument name for error messages.
        features: ``(B, N, D)`` tokens or ``(B, D, h, w)`` map.
        size: the grid ``(h, w)``.
        dims: named sizes bound so far (``B`` and ``D`` are bound here).

    Shape:
        - output: ``(B, h*w, D)``

    Example:
        >>> import torch
        >>> features_as_tokens("features", torch.zeros(2, 5, 3, 4), (3, 4)).shape
        torch.Size([2, 12, 5])
        >>> features_as_tokens("features", torch.zeros(2, 12, 5), (3, 4)).shape
        torch.Size([2, 12, 5])
    """
    h, w = check_size("size", size)
    if features.dim() == 4:
        check_shape(name, features, ["B", "D", h, w], dims)
        return grid_to_tokens(features)
    if features.dim() == 3:
        check_shape(name, features, ["B", h * w, "D"], dims)
        return features
    raise ShapeError(
        f"{name}: expected (B, N={h * w}, D) tokens or (B, D, {h}, {w}) map, "
        f"got shape {tuple(features.shape)}"
    )


def split_prefix_tokens(tokens: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """Split a full token sequence into prefix tokens and patch tokens.

    Args:
        tokens: the model's full sequence, prefix tokens first.
        num_prefix_tokens: ``P``, usually ``model.num_prefix_tokens`` (class + registers
            + distillation tokens).

    Shape:
        - tokens: ``(B, P + N, D)``
        - output: ``((B, P, D), (B, N, D))``

    Example:
        >>> import torch
        >>> prefix, patches = split_prefix_tokens(torch.zeros(2, 1 + 16, 8), 1)
        >>> prefix.shape, patches.shape
        (torch.Size([2, 1, 8]), torch.Size([2, 16, 8]))
    """
    check_shape("tokens", tokens, ["B", "N", "D"])
    if not 0 <= num_prefix_tokens <= tokens.shape[1]:
        raise ValueError(
            f"num_prefix_tokens: expected 0..{tokens.shape[1]}, got {num_prefix_tokens}"
        )
    return tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks of a timm ViT-family model (``len(model.blocks)``).

    Example:
        >>> import timm
        >>> num_blocks(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3))
        3
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(
            f"{type(model).__name__} has no .blocks; expected a timm VisionTransformer-family model"
        )
    return len(blocks)


def resolve_block_index(model: nn.Module, index: int) -> int:
    """Turn a block index (negative counts from the end) into an absolute one.

    Raises:
        ValueError: when the index is outside ``[-L, L)``.

    Example:
        >>> import timm
        >>> resolve_block_index(timm.create_model("vit_tiny_patch16_224", depth=12), -3)
        9
    """
    depth = num_blocks(model)
    i = check_int("index", index)
    if not -depth <= i < depth:
        raise ValueError(f"block index {index} is out of range for a model with {depth} blocks")
    return i % depth


def patch_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` a timm ViT produces for an image of ``image_size``.

    Uses ``patch_embed.dynamic_feat_size`` for ``dynamic_img_size`` models (it also
    handles ``dynamic_img_pad``), else the fixed ``patch_embed.grid_size``.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                       dynamic_img_size=True, depth=1)
        >>> patch_grid(m, (48, 80))
        (3, 5)
    """
    size = check_size("image_size", image_size)
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        raise TypeError(f"{type(model).__name__} has no .patch_embed; expected a timm ViT")
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False)
    if dynamic and hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size(size)
    else:
        h, w = embed.grid_size
    return int(h), int(w)


@dataclass
class ViTTaps:
    """Tokens tapped from one forward pass of a timm ViT.

    Attributes:
        final: patch tokens after the model's final ``norm``, ``(B, N, D)``.
        intermediate: patch tokens at the output of each requested block, keyed by the
            absolute block index, ``(B, N, D)`` each. They are the residual stream,
            **not** normalised by the final norm.
        prefix: prefix tokens (class, registers, distillation) after the final norm,
            ``(B, P, D)``.
        grid: the token grid ``(h, w)``, ``h * w == N``.

    Example:
        >>> import torch
        >>> taps = ViTTaps(torch.zeros(1, 4, 8), {0: torch.zeros(1, 4, 8)},
        ...                torch.zeros(1, 1, 8), (2, 2))
        >>> taps.grid
        (2, 2)
    """

    final: Tensor
    intermediate: dict[int, Tensor]
    prefix: Tensor
    grid: tuple[int, int]


def vit_taps(model: nn.Module, images: Tensor, layers: Sequence[int] = (-3, -1)) -> ViTTaps:
    """Final and intermediate patch tokens of any timm VisionTransformer-family model.

    One forward pass through timm's public ``forward_intermediates``. Works for ViT, DeiT
    (also distilled), register tokens, ``dynamic_img_size=True`` and non-square input.
    Gradients flow; the model's train/eval mode is left as it is.

    Args:
        model: a timm model with ``forward_intermediates``, ``blocks`` and
            ``num_prefix_tokens``.
        images: the image batch.
        layers: block indices to tap (negative counts from the end). Empty: only the
            final tokens.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: :class:`ViTTaps` with ``final`` ``(B, N, D)``, ``intermediate[i]``
          ``(B, N, D)``, ``prefix`` ``(B, P, D)``.

    Example:
        >>> import torch
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                       depth=4, reg_tokens=2)
        >>> taps = vit_taps(m, torch.randn(2, 3, 32, 32), layers=(-3, -1))
        >>> taps.final.shape, sorted(taps.intermediate), taps.prefix.shape, taps.grid
        (torch.Size([2, 4, 192]), [1, 3], torch.Size([2, 3, 192]), (2, 2))
    """
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(
            f"{type(model).__name__} has no forward_intermediates; expected a timm ViT (timm>=1.0.9)"
        )
    wanted = sorted({resolve_block_index(model, i) for i in layers})
    indices = wanted if wanted else [num_blocks(model) - 1]
    vit: Any = model  # a timm ViT: attributes beyond nn.Module
    final, inter = vit.forward_intermediates(
        images, indices=indices, return_prefix_tokens=True, norm=False, output_fmt="NCHW"
    )
    prefix, patches = split_prefix_tokens(final, int(vit.num_prefix_tokens))
    maps = [m for m, _ in inter]
    grid = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
    intermediate = {i: grid_to_tokens(m) for i, m in zip(indices, maps, strict=True) if i in wanted}
    return ViTTaps(final=patches, intermediate=intermediate, prefix=prefix, grid=grid)
