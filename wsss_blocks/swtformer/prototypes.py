"""Background-aware prototypes and the refined CAM (R-CAM) on ``F_hie`` (SIPE's IS-CAM, matmul form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import Dims, check_ignore_index, check_range, check_shape, check_size
from wsss_blocks.swtformer._common import allowed_channels, valid_on_grid
from wsss_blocks.tokens import features_as_grid

__all__ = ["seed_prototypes", "refine_cams", "PrototypeRefiner", "rcam_pseudo_mask"]


def _seeds_on(seeds: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Seeds as float weights on ``size`` (nearest, SIPE), flattened to ``(B, K+1, hf*wf)``."""
    r = seeds.to(dtype)
    if tuple(r.shape[-2:]) != size:
        r = F.interpolate(r, size=size, mode="nearest")
    return r.flatten(2)


def seed_prototypes(features: Tensor, seeds: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
    """Image-specific prototypes: the mean of ``features`` over each class's seed (background included).

    ``R = nearest(seeds -> hf x wf)``, ``p_c = sum_i R_ci F_i / max(sum_i R_ci, 1)`` (one
    ``bmm``). An empty seed gives ``p_c = 0``. SIPE takes the global average
    ``sum_i R_ci F_i / (hf wf)``, which differs by a positive factor per class and so gives
    the same cosine R-CAM. The gradient reaches ``features``; seeds are constants.
    Computed in fp32 (fp64 stays fp64) with autocast off.

    Args:
        features: the hierarchical feature ``F_hie``: a map, or tokens with ``size``.
        seeds: hard (bool) or soft seeds on any grid, resized by nearest.
        size: the grid ``(hf, wf)`` of token input (the seeds' grid need not be it; a map
            brings its own, and a ``size`` that disagrees with it is an error).

    Shape:
        - features: ``(B, D, hf, wf)``, or tokens ``(B, hf*wf, D)`` with ``size=(hf, wf)``;
          seeds: ``(B, K+1, h, w)``
        - output: ``(B, K+1, D)``

    Raises:
        ShapeError: a wrong shape; tokens without ``size``; a channels-last map on the
            ``size`` grid says to permute it to NCHW.

    Examples:
        >>> feats = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> seeds = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()[None, :, None]
        >>> seed_prototypes(feats, seeds)[0].tolist()
        [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    """
    dims = Dims()
    features = features_as_grid("features", features, size, dims, grid=("hf", "wf"), dtype="float")
    check_shape("seeds", seeds, ["B", "K1", "h", "w"], dims)
    dtype = compute_dtype(features)
    with no_autocast(features.device.type):
        r = _seeds_on(seeds.detach(), (dims["hf"], dims["wf"]), dtype)
        f = features.to(dtype).flatten(2)  # (B, D, N)
        return torch.bmm(r, f.transpose(1, 2)) / r.sum(dim=-1, keepdim=True).clamp_min(1.0)


def refine_cams(
    features: Tensor, seeds: Tensor, *, size: tuple[int, int] | None = None, eps: float = 1e-5
) -> Tensor:
    """R-CAM: ``relu(cos(F_i, p_c))`` normalised by its spatial max (SIPE's IS-CAM).

    ``p`` are the prototypes of ``seed_prototypes`` (call it for them; it is one
    ``bmm``), ``r = relu(p^ F^)`` (one ``bmm``) with ``x^ = x / max(||x||, 1e-8)`` (torch's
    cosine eps), ``R-CAM = r / (amax_hw r + eps)``. An empty seed (zero prototype) gives an
    all-zero R-CAM, never NaN. Differentiable in ``features`` (through the prototypes too).

    Args:
        features: ``F_hie``: a map, or tokens with ``size``.
        seeds: seeds on any grid (``locate_seeds``).
        size: the grid ``(hf, wf)`` of token input (see ``seed_prototypes``).
        eps: added to the spatial max.

    Shape:
        - features: ``(B, D, hf, wf)``, or tokens ``(B, hf*wf, D)`` with ``size=(hf, wf)``;
          seeds: ``(B, K+1, h, w)``
        - output: ``(B, K+1, hf, wf)`` in ``[0, 1]``

    Raises:
        ShapeError: a wrong shape; tokens without ``size``; a channels-last map on the
            ``size`` grid says to permute it to NCHW.

    Examples:
        >>> feats = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> seeds = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()[None, :, None]
        >>> refine_cams(feats, seeds)[0, :, 0].double().round(decimals=4).tolist()
        [[0.0, 0.0, 1.0, 0.7071], [1.0, 1.0, 0.0, 0.7071], [0.0, 0.0, 0.0, 0.0]]
    """
    check_range("eps", eps, 0.0, low_inclusive=False)
    features = features_as_grid("features", features, size, grid=("hf", "wf"), dtype="float")
    protos = seed_prototypes(features, seeds)
    with no_autocast(features.device.type):
        f = features.to(protos.dtype).flatten(2)  # (B, D, N)
        f_hat = f / f.norm(dim=1, keepdim=True).clamp_min(1e-8)
        p_hat = protos / protos.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        r = torch.bmm(p_hat, f_hat).relu()
        r = r / (r.amax(dim=-1, keepdim=True) + eps)
    return r.unflatten(2, tuple(features.shape[-2:]))


class PrototypeRefiner(nn.Module):
    """Module form of ``refine_cams`` (stores ``eps``; no parameters).

    Args:
        eps: added to the spatial max.

    Shape:
        - same as ``refine_cams``

    Examples:
        >>> feats = torch.randn(2, 8, 6, 4)
        >>> seeds = torch.zeros(2, 3, 3, 2, dtype=torch.bool)
        >>> seeds[:, 0] = True
        >>> PrototypeRefiner()(feats, seeds).shape
        torch.Size([2, 3, 6, 4])
    """

    def __init__(self, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = check_range("eps", eps, 0.0, low_inclusive=False)

    def forward(self, features: Tensor, seeds: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """The R-CAM of ``features`` for ``seeds`` (see ``refine_cams``).

        Args:
            features: ``F_hie``: a map, or tokens with ``size``.
            seeds: seeds on any grid (``locate_seeds``).
            size: the grid ``(hf, wf)`` of token input.

        Shape:
            - features: ``(B, D, hf, wf)``, or tokens ``(B, hf*wf, D)`` with ``size=(hf, wf)``;
              seeds: ``(B, K+1, h, w)``
            - output: ``(B, K+1, hf, wf)`` in ``[0, 1]``

        Returns:
            The R-CAMs; ``seed_prototypes`` gives the prototypes behind them.
        """
        return refine_cams(features, seeds, size=size, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@torch.no_grad()
def rcam_pseudo_mask(
    rcams: Tensor,
    labels: Tensor | None = None,
    *,
    size: tuple[int, int] | None = None,
    valid: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """The seed mask of the paper (§4-3: seed map = R-CAM): argmax over background + present classes, no grad.

    R-CAM -> bilinear (``align_corners=False``) to ``size`` -> absent classes excluded -> argmax over the
    K+1 channels (value = channel: 0 background, ``k + 1`` class ``k``; ties go to the
    first channel, i.e. background) -> ``ignore_index`` outside ``valid``. No threshold.

    Args:
        rcams: R-CAMs (``refine_cams``), or any background-augmented score map.
        labels: multi-hot image labels; ``None`` allows every class.
        size: output size (the image's); ``None`` keeps the grid.
        valid: padding mask at any resolution (``valid_to_grid`` rule at ``size``).
        ignore_index: value of invalid pixels; not a label value ``0..K``.

    Shape:
        - rcams: ``(B, K+1, h, w)``; labels: ``(B, K)``
        - output: ``(B, *size)`` int64

    Examples:
        >>> r = torch.tensor([[0.2, 0.5], [0.9, 0.5], [1.0, 0.1]])[None, :, None]  # (1, 3, 1, 2)
        >>> rcam_pseudo_mask(r, torch.tensor([[1, 0]])).tolist()
        [[[1, 0]]]
    """
    dims = check_shape("rcams", rcams, ["B", "K1", "h", "w"], dtype="float")
    ignore_index = check_ignore_index(ignore_index, dims["K1"])
    out_size = (dims["h"], dims["w"]) if size is None else check_size("size", size)
    allowed = allowed_channels(labels, dims, rcams)
    keep = valid_on_grid(valid, dims, out_size)
    with no_autocast(rcams.device.type):
        r = rcams.to(compute_dtype(rcams))
        if tuple(r.shape[-2:]) != out_size:
            r = F.interpolate(r, size=out_size, mode="bilinear", align_corners=False)
        r = r.masked_fill(~allowed[:, :, None, None], float("-inf"))  # absent classes never win
    out = r.argmax(dim=1)
    if keep is not None:
        out = torch.where(keep, out, torch.full_like(out, ignore_index))
    return out
