"""Token sequences, feature grids and the geometry of Vision Transformers.

Everything here takes the grid ``(h, w)`` from the model or from an explicit argument,
never from ``sqrt(N)``, and splits prefix (class, register, distillation) tokens off with
the model's own count. The model is read through its ``wsss_blocks.adapters.ViTAdapter``:
timm's ViT family and the ViT copies WSSS codebases ship work as they are; register an
adapter for another layout.

Hierarchical models (Swin and others with ``forward_intermediates`` and ``feature_info``)
are served by ``stage_info`` and ``stage_taps``: per-stage NCHW maps whatever the
model's internal layout, strides and channels read from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any, NamedTuple

from einops import rearrange
from torch import Tensor, nn

from wsss_blocks._utils import empty_batch, to_model_dtype
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_instance,
    check_int,
    check_shape,
    check_size,
    check_tensor,
)
from wsss_blocks.adapters import ViTAdapter, _check_images, vit_adapter

__all__ = [
    "ViTTaps",
    "tokens_to_grid",
    "grid_to_tokens",
    "SplitTokens",
    "split_prefix_tokens",
    "num_blocks",
    "resolve_block_index",
    "patch_grid",
    "vit_taps",
    "StageInfo",
    "stage_info",
    "check_stage_input",
    "StageTaps",
    "stage_taps",
]


def tokens_to_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """Reshape patch tokens to an NCHW feature map.

    Args:
        tokens: patch tokens in row-major grid order (prefix tokens already removed).
        size: the token grid ``(h, w)``; ``h * w`` must equal ``N``.

    Shape:
        - tokens: ``(B, N, D)``
        - output: ``(B, D, h, w)``

    Examples:
        >>> import torch
        >>> tokens_to_grid(torch.zeros(2, 6, 8), (2, 3)).shape
        torch.Size([2, 8, 2, 3])
    """
    h, w = check_size("size", size)
    check_shape("tokens", tokens, ["B", h * w, "D"])
    return rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)


def grid_to_tokens(features: Tensor) -> Tensor:
    """Flatten an NCHW feature map to row-major tokens.

    Shape:
        - features: ``(B, D, h, w)``
        - output: ``(B, h*w, D)``

    Examples:
        >>> import torch
        >>> x = torch.randn(2, 8, 2, 3)
        >>> torch.equal(tokens_to_grid(grid_to_tokens(x), (2, 3)), x)
        True
    """
    check_shape("features", features, ["B", "D", "h", "w"])
    return rearrange(features, "b d h w -> b (h w) d")


def features_as_tokens(
    name: str,
    features: Tensor,
    size: tuple[int, int],
    dims: MutableMapping[str, int] | None = None,
    *,
    grid_source: str | None = None,
    dtype: str | None = None,
) -> Tensor:
    """Accept features as tokens ``(B, N, D)`` or a map ``(B, D, h, w)``; return tokens.

    The validator behind every public entry point that takes "features" in either layout. The grid always
    comes from ``size`` (usually the CAM's), and the number of tokens must match it.

    Args:
        name: argument name for error messages.
        features: ``(B, N, D)`` tokens or ``(B, D, h, w)`` map.
        size: the grid ``(h, w)``.
        dims: named sizes bound so far (``B`` and ``D`` are bound here).
        grid_source: the argument the grid comes from, named when the features are off it
            (default: the argument that bound ``h`` in ``dims``, else ``size``).
        dtype: dtype kind, see ``wsss_blocks._validate.check_tensor``.

    Shape:
        - output: ``(B, h*w, D)``

    Examples:
        >>> import torch
        >>> features_as_tokens("features", torch.zeros(2, 5, 3, 4), (3, 4)).shape
        torch.Size([2, 12, 5])
        >>> features_as_tokens("features", torch.zeros(2, 12, 5), (3, 4)).shape
        torch.Size([2, 12, 5])
    """
    check_tensor(name, features, dtype=dtype)
    h, w = check_size("size", size)
    if dims is None:
        dims = Dims()
    if grid_source is None:
        grid_source = (dims.sources.get("h") if isinstance(dims, Dims) else None) or "size"
    try:
        if features.dim() == 4:
            check_shape(name, features, ["B", "D", h, w], dims)
            return grid_to_tokens(features)
        if features.dim() == 3:
            check_shape(name, features, ["B", h * w, "D"], dims)
            return features
    except ShapeError as err:
        if grid_source == name:
            raise
        raise ShapeError(f"{err}; the grid {(h, w)} comes from {grid_source}") from None
    raise ShapeError(
        f"{name}: expected (B, N={h * w}, D) tokens or (B, D, {h}, {w}) map, "
        f"got shape {tuple(features.shape)}"
    )


def features_as_grid(
    name: str,
    features: Tensor,
    size: tuple[int, int] | None = None,
    dims: MutableMapping[str, int] | None = None,
    *,
    channels: int | str = "D",
    grid: tuple[str, str] = ("h", "w"),
    input_fmt: str = "NCHW",
    hint: str = "permute it to NCHW with .permute(0, 3, 1, 2)",
    grid_source: str = "size",
    dtype: str | None = None,
) -> Tensor:
    """Accept features as a map ``(B, D, h, w)`` or tokens ``(B, N, D)``; return the NCHW map.

    The validator behind every public entry point that takes "features" in either layout and
    computes on the grid. ``size`` is the grid when the call knows it (its ``size=`` argument,
    or the grid of its CAMs): a map must lie on it and tokens must number ``h * w``. Without
    ``size`` a map brings its own grid and tokens are an error that says to pass
    ``size=(h, w)``; the grid never comes from ``sqrt(N)``. A map is returned as it is (the
    same tensor), tokens as ``tokens_to_grid(features, size)``, so tokens give exactly the
    result of their ``tokens_to_grid`` map.

    With ``input_fmt="NHWC"`` a 4-dim input is read as ``(B, h, w, D)`` and returned permuted
    (a view). With ``"NCHW"``, a 4-dim input that fails the check but looks channels-last
    (its last dim is ``channels`` and dim 1 is not; with ``channels`` unknown, dims 1-2 are
    the grid ``size``) gets an error that ends with ``hint``.

    Args:
        name: argument name for error messages.
        features: ``(B, D, h, w)`` map (``(B, h, w, D)`` for ``"NHWC"``) or ``(B, N, D)`` tokens.
        size: the grid ``(h, w)``, or ``None`` when the call has none (tokens then fail).
        dims: named sizes bound so far (``B``, ``channels`` when a name, and the ``grid``
            names are bound here).
        channels: ``D`` as an int, or the name it is bound to in ``dims``.
        grid: the names of ``h`` and ``w`` in ``dims``.
        input_fmt: ``"NCHW"`` or ``"NHWC"``, the layout of a 4-dim input.
        hint: the fix named for a channels-last map given as NCHW.
        grid_source: where ``size`` comes from (``"size"``, or e.g. ``"cams_with_bg"``),
            named when the features are not on it.
        dtype: dtype kind, see ``wsss_blocks._validate.check_tensor``.

    Shape:
        - output: ``(B, D, h, w)``

    Examples:
        >>> import torch
        >>> x = torch.randn(2, 5, 3, 4)
        >>> features_as_grid("features", x) is x
        True
        >>> torch.equal(features_as_grid("features", grid_to_tokens(x), (3, 4)), x)
        True
        >>> try:
        ...     features_as_grid("features", grid_to_tokens(x))
        ... except ShapeError as err:
        ...     print(err)
        features: token input (B, N, D) needs the grid: pass size=(h, w); got shape (2, 12, 5)
        >>> try:
        ...     features_as_grid("features", x.permute(0, 2, 3, 1), channels=5)
        ... except ShapeError as err:
        ...     print(err)  # doctest: +ELLIPSIS
        features: expected shape (B, 5, h, w), got (2, 3, 4, 5); the map looks channels-last ...
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(features).__name__}")
    if input_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"input_fmt: expected one of ['NCHW', 'NHWC'], got {input_fmt!r}")
    if dims is None:
        dims = Dims()
    hw = None if size is None else check_size("size", size)
    check_shape(name, features, [None] * features.dim(), dtype=dtype)  # the dtype alone
    if features.dim() == 3:
        if hw is None:
            raise ShapeError(
                f"{name}: token input (B, N, D) needs the grid: pass size=(h, w); "
                f"got shape {tuple(features.shape)}"
            )
        try:
            check_shape(name, features, ["B", hw[0] * hw[1], channels], dims)
        except ShapeError as err:
            raise ShapeError(f"{err}; the grid {hw} comes from {grid_source}") from None
        out = tokens_to_grid(features, hw)
    elif features.dim() == 4:
        gh: str | int = grid[0] if hw is None else hw[0]
        gw: str | int = grid[1] if hw is None else hw[1]
        nhwc = input_fmt == "NHWC"
        c = channels if isinstance(channels, int) else dims.get(channels)  # before the check binds it
        try:
            check_shape(name, features, ["B", gh, gw, channels] if nhwc else ["B", channels, gh, gw], dims)
        except ShapeError as err:
            msg = str(err) if hw is None else f"{err}; the grid {hw} comes from {grid_source}"
            if nhwc:
                channels_last = False
            elif c is not None:
                channels_last = features.shape[-1] == c and features.shape[1] != c
            else:
                channels_last = hw is not None and tuple(features.shape[1:3]) == hw
            if channels_last:
                msg += (
                    f"; the map looks channels-last (B, h, w, {features.shape[-1]}), "
                    f"as timm's Swin hands it over: {hint}"
                )
            raise ShapeError(msg) from None
        out = rearrange(features, "b h w c -> b c h w") if nhwc else features
    else:
        grid_text = "size=(h, w)" if hw is None else f"size={hw}"
        raise ShapeError(
            f"{name}: expected a (B, D, h, w) map or (B, N, D) tokens with {grid_text}, "
            f"got shape {tuple(features.shape)}"
        )
    check_shape(name, out, [None, None, grid[0], grid[1]], dims)  # bind the grid names
    return out


class SplitTokens(NamedTuple):
    """A token sequence split by ``split_prefix_tokens``.

    Attributes:
        prefix: the prefix tokens (class, registers, distillation), ``(B, P, D)``.
        tokens: the patch tokens, ``(B, N, D)``.

    Examples:
        >>> import torch
        >>> split_prefix_tokens(torch.zeros(1, 5, 2), 1).tokens.shape
        torch.Size([1, 4, 2])
    """

    prefix: Tensor
    tokens: Tensor


def split_prefix_tokens(tokens: Tensor, num_prefix_tokens: int) -> SplitTokens:
    """Split a full token sequence into prefix tokens and patch tokens.

    Args:
        tokens: the model's full sequence, prefix tokens first.
        num_prefix_tokens: ``P``, usually ``model.num_prefix_tokens`` (class + registers
            + distillation tokens).

    Shape:
        - tokens: ``(B, P + N, D)``
        - output: ``SplitTokens`` ``(prefix (B, P, D), tokens (B, N, D))``

    Examples:
        >>> import torch
        >>> prefix, patches = split_prefix_tokens(torch.zeros(2, 1 + 16, 8), 1)
        >>> prefix.shape, patches.shape
        (torch.Size([2, 1, 8]), torch.Size([2, 16, 8]))
    """
    check_shape("tokens", tokens, ["B", "N", "D"])
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens)
    if not 0 <= num_prefix_tokens <= tokens.shape[1]:
        raise ValueError(
            f"num_prefix_tokens: expected 0..{tokens.shape[1]} (the tokens' N), got {num_prefix_tokens}"
        )
    return SplitTokens(tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:])


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks of a ViT-family model (``len(model.blocks)``).

    Examples:
        >>> import timm
        >>> num_blocks(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3))
        3
    """
    return len(vit_adapter(model).blocks(model))


def resolve_block_index(model: nn.Module, index: int) -> int:
    """Turn a block index (negative counts from the end) into an absolute one.

    Raises:
        ValueError: when the index is outside ``[-L, L)``.

    Examples:
        >>> import timm
        >>> resolve_block_index(timm.create_model("vit_tiny_patch16_224", depth=12), -3)
        9
    """
    depth = num_blocks(model)
    i = check_int("index", index)
    if not -depth <= i < depth:
        raise ValueError(f"block index {index} is out of range for a model with {depth} blocks")
    return i % depth


def block_indices(model: nn.Module, layers: Any, name: str = "layers") -> list[int]:
    """Absolute indices of the blocks ``layers`` names (negative counts from the end), in order.

    Raises:
        TypeError: ``layers`` is not a sequence of ints (naming ``name``).
        ValueError: an index out of range (naming ``name[j]``).
    """
    if isinstance(layers, (str, bytes, Tensor)) or not isinstance(layers, Iterable):
        raise TypeError(f"{name}: expected a sequence of block indices, got {type(layers).__name__} {layers!r}")
    depth = num_blocks(model)
    out = []
    for j, index in enumerate(layers):
        i = check_int(f"{name}[{j}]", index)
        if not -depth <= i < depth:
            raise ValueError(f"{name}[{j}]: block index {i} is out of range for a model with {depth} blocks")
        out.append(i % depth)
    return out


def patch_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid ``(h, w)`` a ViT produces for an image of ``image_size``.

    Uses ``patch_embed.dynamic_feat_size`` for timm's ``dynamic_img_size`` models (it also
    handles ``dynamic_img_pad``), the fixed ``patch_embed.grid_size`` of other timm models,
    and ``(H // p, W // p)`` for ViT copies whose patch embedding has no ``grid_size``.
    Whether the model takes that size is not checked here (``vit_taps`` and the methods
    check it).

    Examples:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                       dynamic_img_size=True, depth=1)
        >>> patch_grid(m, (48, 80))
        (3, 5)
    """
    return vit_adapter(model).grid(model, image_size)


def _sizes_known(adapter: ViTAdapter, model: nn.Module) -> bool:
    """Whether ``check_image_size`` knows the sizes the model takes (timm's patch embeddings do)."""
    try:
        embed = adapter.patch_embed(model)
    except TypeError:
        return True
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False)
    return bool(dynamic) or getattr(embed, "grid_size", None) is not None


def run_model(
    model: nn.Module,
    images: Tensor,
    *,
    adapter: ViTAdapter | None = None,
    hooks: Callable[[], Iterable[Any]] = lambda: (),
    block_indices: Sequence[int] = (),
) -> dict[int, Tensor]:
    """One pass of ``model`` on ``images`` through its adapter's ``run``, with forward hooks.

    Floating images of another dtype than the model's parameters are cast to it first.
    ``hooks`` installs extra hooks and returns their handles (removed afterwards). Returns
    the full token output of each block in ``block_indices`` (a block that returns a tuple,
    as the ViT copies do, gives its first item). For a ViT copy whose patch embedding does not
    say which sizes it takes (no ``grid_size``), an ``AssertionError`` or ``RuntimeError``
    raised before the first block runs, for an image size other than the one the model was
    built for, becomes a ``ValueError`` that names both sizes.
    """
    adapter = adapter if adapter is not None else vit_adapter(model)
    blocks = adapter.blocks(model)
    images = to_model_dtype(model, images)
    outs: dict[int, Tensor] = {}
    started: list[bool] = []

    def first(_m: nn.Module, _args: Any) -> None:
        started.append(True)

    handles: list[Any] = []
    try:
        if len(blocks):
            handles.append(blocks[0].register_forward_pre_hook(first))
        for i in block_indices:

            def keep(_m: nn.Module, _args: Any, out: Any, i: int = i) -> None:
                outs[i] = out[0] if isinstance(out, (tuple, list)) else out

            handles.append(blocks[i].register_forward_hook(keep))
        handles.extend(hooks())
        try:
            adapter.run(model, images)
        except (AssertionError, RuntimeError) as err:
            size = (int(images.shape[-2]), int(images.shape[-1]))
            if started or _sizes_known(adapter, model):
                raise
            native = adapter.native_image_size(model)
            if native is None or size == native:
                raise
            raise ValueError(
                f"images: image size {size}: {type(model).__name__} refused it before its first block "
                f"({type(err).__name__}: {err}); it was built for img_size {native}, pass that size"
            ) from err
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in block_indices if i not in outs]
    if missing:
        raise RuntimeError(
            f"blocks {missing} of {type(model).__name__} did not run during the model's pass; register a "
            "ViTAdapter whose run() passes the images through every block (wsss_blocks.adapters.register_vit_adapter)"
        )
    return outs


class ViTTaps(NamedTuple):
    """Tokens tapped from one forward pass of a ViT.

    Attributes:
        final: patch tokens after the model's final ``norm``, ``(B, N, D)``.
        intermediate: patch tokens at the output of each requested block, keyed by the
            absolute block index, ``(B, N, D)`` each. They are the residual stream,
            **not** normalised by the final norm.
        prefix: prefix tokens (class, registers, distillation) after the final norm,
            ``(B, P, D)``.
        size: the token grid ``(h, w)``, ``h * w == N``.
        logits: the model's classifier output ``(B, K)`` from the same pass (``vit_taps(...,
            head=True)``), else ``None``.

    Examples:
        >>> import torch
        >>> taps = ViTTaps(torch.zeros(1, 4, 8), {0: torch.zeros(1, 4, 8)},
        ...                torch.zeros(1, 1, 8), (2, 2))
        >>> taps.size, taps.logits
        ((2, 2), None)
    """

    final: Tensor
    intermediate: dict[int, Tensor]
    prefix: Tensor
    size: tuple[int, int]
    logits: Tensor | None = None


def vit_taps(
    model: nn.Module, images: Tensor, *, layers: Sequence[int] = (-3, -1), head: bool = False
) -> ViTTaps:
    """Final and intermediate patch tokens of a ViT-family model, from one forward pass.

    Runs the model's own ``forward_features`` (its position embeddings, its blocks) with
    forward hooks on the blocks; the final tokens are the last block's output through the
    model's ``norm``. Works for timm's ViT family (ViT, DeiT, also distilled, register tokens,
    ``dynamic_img_size=True``, non-square input, EVA, BEiT) and for the ViT copies WSSS
    codebases ship (MCTformer, TS-CAM, ToCo, CPEWS, timm 0.4-0.6 layouts), whose blocks may
    return ``(tokens, attention)`` and which have no ``forward_intermediates``; another layout
    needs a ``wsss_blocks.adapters.ViTAdapter``. Gradients flow; the model's train/eval mode
    is left as it is.

    timm's global-pool models (``global_pool="avg"`` and the like, ``fc_norm=True``) keep
    ``norm`` as ``Identity`` and normalise the pooled token with ``fc_norm`` instead: for them
    ``final`` and ``prefix`` are the last block's tokens without any norm, and ``logits`` (with
    ``head=True``) go through ``fc_norm`` as the model's own head does.

    Args:
        model: a ViT-family model (see ``wsss_blocks.adapters``).
        images: the image batch; its size must be one the model takes. Images of another
            floating dtype than the model's parameters are cast to it (the model computes in
            its own dtype).
        layers: block indices to tap (negative counts from the end). Empty: only the
            final tokens.
        head: also run the model's classification head on the final tokens of the same pass
            (``model.forward_head`` for timm models) and return its output as ``logits``;
            no second forward.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``ViTTaps`` with ``final`` ``(B, N, D)``, ``intermediate[i]``
          ``(B, N, D)``, ``prefix`` ``(B, P, D)``, ``logits`` ``(B, K)`` or ``None``.

    Raises:
        ValueError: a block index out of range (naming ``layers``), or an image size the model
            cannot take (naming ``images`` and the sizes that work).
        TypeError: ``model`` is not a module, ``layers`` not a sequence of ints, or
            ``head=True`` on a layout without a head the library can run.

    Examples:
        >>> import torch
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                       depth=4, reg_tokens=2, num_classes=5)
        >>> taps = vit_taps(m, torch.randn(2, 3, 32, 32), layers=(-3, -1), head=True)
        >>> taps.final.shape, sorted(taps.intermediate), taps.prefix.shape, taps.size
        (torch.Size([2, 4, 192]), [1, 3], torch.Size([2, 3, 192]), (2, 2))
        >>> taps.logits.shape
        torch.Size([2, 5])
    """
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    adapter = vit_adapter(model)
    wanted = sorted(set(block_indices(model, layers)))
    head = check_bool("head", head)
    last = num_blocks(model) - 1
    image_size = _check_images(adapter, model, images)
    outs = run_model(model, images, adapter=adapter, block_indices=sorted({*wanted, last}))
    full = adapter.final_norm(model)(outs[last])
    prefix, patches = split_prefix_tokens(full, adapter.num_prefix_tokens(model))
    grid = adapter.grid(model, image_size)
    if grid[0] * grid[1] != patches.shape[1]:
        raise ShapeError(
            f"images: shape {tuple(images.shape)} gives a {grid[0]}x{grid[1]} patch grid, but the last block "
            f"has {patches.shape[1]} patch tokens (patch dropout in training drops tokens)"
        )
    logits = None
    if head:
        logits = adapter.head(model, full)
        if logits is None:
            raise TypeError(
                f"head=True: {type(model).__name__} has no forward_head, so its logits are not defined by the "
                "layout; compute them from the taps, or register a ViTAdapter whose head() does "
                "(wsss_blocks.adapters.register_vit_adapter)"
            )
    p = adapter.num_prefix_tokens(model)
    intermediate = {i: outs[i][:, p:] for i in wanted}
    return ViTTaps(final=patches, intermediate=intermediate, prefix=prefix, size=grid, logits=logits)


class StageInfo(NamedTuple):
    """One stage of a hierarchical timm model, read from its ``feature_info``.

    Attributes:
        channels: the stage's output channels (``num_chs``).
        stride: its reduction relative to the input image (``reduction``).
        module: the stage module's name (``module``), e.g. ``"layers.2"``.

    Examples:
        >>> StageInfo(96, 4, "layers.0").stride
        4
    """

    channels: int
    stride: int
    module: str


def stage_info(model: nn.Module) -> tuple[StageInfo, ...]:
    """Channels, strides and module names of every stage of a hierarchical timm model.

    Read from the model's ``feature_info`` (a list of dicts, or timm's ``FeatureInfo`` of a
    ``features_only`` model), never from a name or a table.

    Raises:
        TypeError: the model has no ``feature_info``.

    Examples:
        >>> import timm
        >>> m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
        ...                       depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
        ...                       img_size=64)
        >>> [(s.channels, s.stride) for s in stage_info(m)]
        [(16, 4), (32, 8), (64, 16), (128, 32)]
    """
    info: Any = getattr(model, "feature_info", None)
    if info is None:
        raise TypeError(
            f"model: {type(model).__name__} has no feature_info; expected a hierarchical timm model "
            "(Swin, ConvNeXt, ...)"
        )
    entries = getattr(info, "info", info)  # timm FeatureInfo wraps the list in .info
    out = tuple(
        StageInfo(int(e["num_chs"]), int(e["reduction"]), str(e.get("module", ""))) for e in entries
    )
    if not out:
        raise TypeError(f"model: {type(model).__name__}.feature_info is empty")
    return out


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


def check_stage_input(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """Check that a hierarchical timm model accepts images of ``image_size``; return it.

    Two rules, both read from the model:

    * a fixed-size model (``patch_embed.strict_img_size``, timm's default unless
      ``dynamic_img_size=True``) takes exactly its ``img_size``;
    * otherwise height and width must be multiples of the patch size. Swin pads its
      windows and merges with padding (``h_{i+1} = ceil(h_i / 2)``), so any such size
      tiles.

    Raises:
        ValueError: naming the size and the sizes that would work.

    Examples:
        >>> import timm
        >>> m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
        ...                       depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
        ...                       img_size=64, dynamic_img_size=True)
        >>> check_stage_input(m, (200, 136))
        (200, 136)
        >>> try:
        ...     check_stage_input(m, (62, 64))
        ... except ValueError as err:
        ...     print(err)
        image_size (62, 64): height 62 is not a multiple of the patch size 4 (try 60 or 64)
    """
    return _check_stage_input(model, image_size, "image_size")


def _check_stage_input(model: nn.Module, image_size: tuple[int, int], name: str) -> tuple[int, int]:
    """``check_stage_input`` whose errors name ``name`` (``"images"`` for a call that takes images)."""
    check_instance("model", model, nn.Module, "an nn.Module (a hierarchical timm model)")
    h, w = check_size("image_size", image_size)
    embed: Any = getattr(model, "patch_embed", None)
    if embed is None:
        return h, w  # a model without a patch embedding: nothing known to check
    if getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None) is not None:
        fixed = _pair(embed.img_size)
        if (h, w) != fixed:
            raise ValueError(
                f"{name} ({h}, {w}): {type(model).__name__} was built for img_size {fixed} "
                f"and accepts only that size; pass {fixed} or build it with dynamic_img_size=True"
            )
        return h, w
    patch = _pair(getattr(embed, "patch_size", 1))
    if getattr(embed, "dynamic_img_pad", False):
        return h, w  # timm pads the input up to the patch grid itself
    for side, n, p in (("height", h, patch[0]), ("width", w, patch[1])):
        if n % p:
            low, high = (n // p) * p, (n // p + 1) * p
            options = f"{low} or {high}" if low > 0 else f"{high}"
            raise ValueError(
                f"{name} ({h}, {w}): {side} {n} is not a multiple of the patch size {p} "
                f"(try {options})"
            )
    return h, w


class StageTaps(NamedTuple):
    """Per-stage feature maps tapped from one forward pass of a hierarchical model.

    Attributes:
        features: one NCHW map ``(B, C_i, h_i, w_i)`` per requested stage, in the order asked.
        stages: the absolute stage index of each map.
        strides: each map's reduction relative to the input image.

    Examples:
        >>> import torch
        >>> taps = StageTaps([torch.zeros(1, 8, 4, 4)], (0,), (4,))
        >>> taps.strides
        (4,)
    """

    features: list[Tensor]
    stages: tuple[int, ...]
    strides: tuple[int, ...]


def stage_taps(
    model: nn.Module,
    images: Tensor,
    *,
    stages: Sequence[int] | None = None,
    final_norm: bool = False,
) -> StageTaps:
    """Per-stage feature maps of a hierarchical timm model (Swin, ...) as NCHW, with gradients.

    One forward pass through timm's public ``forward_intermediates``. Maps come back as
    ``(B, C_i, h_i, w_i)`` whatever the model keeps internally (timm's Swin is NHWC); the
    channels are checked against ``stage_info``. The model's train/eval mode is left as
    it is and it is never moved.

    Args:
        model: a timm model with ``forward_intermediates`` and ``feature_info``.
        images: the image batch; its size is checked by ``check_stage_input``.
        stages: stage indices to return (negative counts from the end), in the order given.
            ``None``: all stages.
        final_norm: apply the model's final norm to the last stage (timm's ``norm=True``;
            Swin's ``forward_features`` output). Earlier stages are the raw residual streams.

    Shape:
        - images: ``(B, 3, H, W)``
        - output: ``StageTaps``; ``features[i]`` is ``(B, C_i, h_i, w_i)``, ``C_i`` and
          ``h_i ~ H / stride_i`` per stage

    Raises:
        TypeError: not a hierarchical timm model.
        ValueError: a stage index out of range, or an image size the model cannot take.

    Examples:
        >>> import torch
        >>> import timm
        >>> m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
        ...                       depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
        ...                       img_size=64, dynamic_img_size=True)
        >>> taps = stage_taps(m, torch.randn(1, 3, 64, 48))
        >>> [tuple(f.shape) for f in taps.features], taps.strides
        ([(1, 16, 16, 12), (1, 32, 8, 6), (1, 64, 4, 3), (1, 128, 2, 2)], (4, 8, 16, 32))
    """
    check_instance("model", model, nn.Module, "an nn.Module (a hierarchical timm model)")
    check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
    final_norm = check_bool("final_norm", final_norm)
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(
            f"model: {type(model).__name__} has no forward_intermediates; expected a timm model (timm>=1.0.9)"
        )
    info = stage_info(model)
    n = len(info)
    if stages is not None and (isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence)):
        raise TypeError(f"stages: expected a sequence of stage indices, got {type(stages).__name__}")
    wanted = list(range(n)) if stages is None else list(stages)
    resolved = []
    for j, i in enumerate(wanted):
        i = check_int(f"stages[{j}]", i)
        if not -n <= i < n:
            raise ValueError(f"stages[{j}]: stage index {i} is out of range for a model with {n} stages")
        resolved.append(i % n)
    if not resolved:
        raise ValueError("stages: expected at least one stage index, got none")
    _check_stage_input(model, (int(images.shape[-2]), int(images.shape[-1])), "images")
    indices = sorted(set(resolved))
    net: Any = model  # a timm model: attributes beyond nn.Module
    images = to_model_dtype(model, images)

    def run(x: Tensor) -> list[Tensor]:
        return net.forward_intermediates(x, indices=indices, norm=final_norm, stop_early=True,
                                         intermediates_only=True)

    maps = run(images) if images.shape[0] else empty_batch(model, run, images)
    by_index: dict[int, Tensor] = {}
    for i, m in zip(indices, maps, strict=True):
        c = info[i].channels
        if m.dim() == 4 and m.shape[1] != c and m.shape[-1] == c:
            m = rearrange(m, "b h w c -> b c h w")  # NHWC output of a model that ignores output_fmt
        if m.dim() != 4 or m.shape[1] != c:
            raise ShapeError(
                f"stage {i}: expected a (B, {c}, h, w) map from forward_intermediates, "
                f"got shape {tuple(m.shape)}"
            )
        by_index[i] = m
    return StageTaps(
        [by_index[i] for i in resolved], tuple(resolved), tuple(info[i].stride for i in resolved)
    )
