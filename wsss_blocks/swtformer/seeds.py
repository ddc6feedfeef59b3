"""Structure-aware seed locating (paper eq. 4; SIPE's ``get_seed`` in matmul form)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_option, check_range, check_shape
from wsss_blocks.swtformer._common import allowed_channels, valid_on_grid
from wsss_blocks.tokens import features_as_grid

__all__ = ["Similarity", "structure_affinity", "SeedOutput", "locate_seeds", "SeedLocator"]

Similarity = Literal["abs_cos", "relu_cos", "cos"]
_SIMILARITIES = ("abs_cos", "relu_cos", "cos")


def structure_affinity(
    features: Tensor,
    *,
    size: tuple[int, int] | None = None,
    similarity: Similarity = "abs_cos",
    eps: float = 1e-5,
) -> Tensor:
    """Cross-token structure map ``S`` of eq. 4: the (absolute) cosine between every token pair.

    ``f^_i = t_i / (||t_i|| + eps)``, ``A = f^T f^``; ``S = |A|`` (``"abs_cos"``, the paper),
    ``relu(A)`` (``"relu_cos"``, SIPE's code) or ``A`` (``"cos"``, experimental: the IoU
    union can then be <= 0). Row ``i`` is token ``i``'s structure map. Differentiable;
    computed in fp32 (fp64 stays fp64) with autocast off.

    Args:
        features: a feature map (``T_out`` as NCHW), or its tokens with ``size``.
        size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
            disagrees with it is an error).
        similarity: ``"abs_cos"``, ``"relu_cos"`` or ``"cos"``.
        eps: added to the token norm (SIPE: 1e-5).

    Shape:
        - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
        - output: ``(B, h*w, h*w)``, symmetric

    Raises:
        ShapeError: a wrong shape; tokens without ``size``; a channels-last map on the
            ``size`` grid says to permute it to NCHW.

    Examples:
        >>> t = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])[None, :, None]  # (1, 2, 1, 3)
        >>> structure_affinity(t, eps=0.0)[0].tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        >>> structure_affinity(t, similarity="relu_cos", eps=0.0)[0, 0].tolist()
        [1.0, 0.0, 0.0]
    """
    features = features_as_grid("features", features, size, dtype="float")
    check_option("similarity", similarity, _SIMILARITIES)
    check_range("eps", eps, 0.0)
    with no_autocast(features.device.type):
        f = features.to(compute_dtype(features)).flatten(2)  # (B, D, HW)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        a = torch.bmm(f.transpose(1, 2), f)
    if similarity == "abs_cos":
        return a.abs()
    if similarity == "relu_cos":
        return a.relu()
    return a


class SeedOutput(NamedTuple):
    """What ``locate_seeds`` returns.

    Attributes:
        seeds: one-hot seeds ``(B, K+1, h, w)`` bool, background at channel 0.
        iou: the soft IoU every class reached at every token ``(B, K+1, h, w)`` (background
            already scaled by ``bg_scale``), fp32 or fp64.
    """

    seeds: Tensor
    iou: Tensor


@torch.no_grad()
def locate_seeds(
    features: Tensor,
    cams_with_bg: Tensor,
    labels: Tensor | None = None,
    *,
    similarity: Similarity = "abs_cos",
    bg_scale: float = 0.5,
    valid: Tensor | None = None,
    eps: float = 1e-5,
) -> SeedOutput:
    """Hard seeds: every token takes the class whose CAM best matches its structure map (eq. 4), no grad.

    With ``S`` from ``structure_affinity`` and ``M`` the background-augmented CAM on the
    same grid:

    * ``inter = M S^T`` (one ``bmm``), ``union = rowsum(S) + sum_j M_c,j - inter``,
      ``IoU = inter / max(union, eps)`` (SIPE's soft IoU; the clamp keeps 0/0 finite);
    * ``IoU_0 *= bg_scale`` (SIPE's hard-coded 0.5);
    * ``seeds = one_hot(argmax_c IoU) & [1, y] & valid``: argmax first, then the label mask
      (SIPE), so a token won by an absent class gets no seed. Ties go to the first maximum,
      i.e. to background.

    Runs under ``torch.no_grad()``; nothing returned requires grad. The IoU is the tensor the
    argmax reads, so returning it costs nothing extra.

    Args:
        features: the features whose affinity defines structure (``T_out``): a map or
            tokens on the grid of ``cams_with_bg``.
        cams_with_bg: ``M``, background at channel 0 (``cams_with_background``); its grid is
            the grid of ``features``.
        labels: multi-hot image labels; ``None`` allows every class.
        similarity: see ``structure_affinity``.
        bg_scale: background IoU factor.
        valid: padding mask at any resolution (``valid_to_grid`` rule).
        eps: token-norm epsilon and IoU union clamp.

    Shape:
        - features: ``(B, D, h, w)`` or tokens ``(B, h*w, D)``; cams_with_bg: ``(B, K+1, h, w)``;
          labels: ``(B, K)``
        - output: seeds ``(B, K+1, h, w)`` bool, iou ``(B, K+1, h, w)`` float

    Returns:
        ``SeedOutput`` ``(seeds, iou)``. Tokens give exactly the result of their
        ``tokens_to_grid`` map.

    Raises:
        ShapeError: a wrong shape; a channels-last map ``(B, h, w, D)`` says to permute it
            to NCHW.

    Note:
        SIPE's code builds the ``(B, K+1, HW, HW)`` product ``S[:, None] * M[:, :, None]``;
        the ``bmm`` gives the same ``inter`` with ``O(B HW^2)`` memory for ``S`` only.

    Examples:
        >>> t = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> cam = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])[None, :, None]
        >>> from wsss_blocks.swtformer import cams_with_background
        >>> m = cams_with_background(cam, torch.tensor([[1, 1]]))
        >>> out = locate_seeds(t, m, torch.tensor([[1, 1]]))
        >>> out.seeds.int().argmax(1).tolist()
        [[[1, 1, 2, 2]]]
        >>> out.iou[0, 1, 0].double().round(decimals=2).tolist()
        [0.5, 0.5, 0.0, 0.0]
    """
    dims = check_shape("cams_with_bg", cams_with_bg, ["B", "K1", "h", "w"], dtype="float")
    features = features_as_grid(
        "features", features, (dims["h"], dims["w"]), dims, grid_source="cams_with_bg", dtype="float"
    )
    check_range("bg_scale", bg_scale, 0.0)
    check_range("eps", eps, 0.0, low_inclusive=False)
    allowed = allowed_channels(labels, dims, cams_with_bg)
    keep = valid_on_grid(valid, dims, (dims["h"], dims["w"]))
    s = structure_affinity(features, similarity=similarity, eps=eps)  # (B, HW, HW), fp32+
    with no_autocast(features.device.type):
        m = cams_with_bg.to(s.dtype).flatten(2)  # (B, K+1, HW)
        inter = torch.bmm(m, s.transpose(1, 2))
        union = s.sum(dim=-1)[:, None, :] + m.sum(dim=-1, keepdim=True) - inter
        iou = inter / union.clamp_min(eps)
        scale = torch.ones(dims["K1"], dtype=iou.dtype, device=iou.device)
        scale[0] = bg_scale
        iou = iou * scale[None, :, None]
    winner = iou.argmax(dim=1)  # first maximum wins: ties -> background
    seeds = F.one_hot(winner, dims["K1"]).transpose(1, 2).bool() & allowed[:, :, None]
    seeds = seeds.unflatten(2, (dims["h"], dims["w"]))
    if keep is not None:
        seeds = seeds & keep[:, None]
    return SeedOutput(seeds, iou.unflatten(2, (dims["h"], dims["w"])))


class SeedLocator(nn.Module):
    """Module form of ``locate_seeds`` (stores ``similarity``, ``bg_scale``, ``eps``).

    Args:
        similarity: see ``structure_affinity``.
        bg_scale: background IoU factor.
        eps: token-norm epsilon and IoU union clamp.

    Shape:
        - same as ``locate_seeds``

    Examples:
        >>> loc = SeedLocator(similarity="relu_cos")
        >>> t = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> cam = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])[None, :, None]
        >>> from wsss_blocks.swtformer import cams_with_background
        >>> m = cams_with_background(cam, torch.tensor([[1, 1]]))
        >>> loc(t, m, torch.tensor([[1, 1]])).seeds.int().argmax(1).tolist()
        [[[1, 0, 2, 2]]]
    """

    def __init__(self, *, similarity: Similarity = "abs_cos", bg_scale: float = 0.5, eps: float = 1e-5) -> None:
        super().__init__()
        self.similarity: Similarity = check_option("similarity", similarity, _SIMILARITIES)
        self.bg_scale = check_range("bg_scale", bg_scale, 0.0)
        self.eps = check_range("eps", eps, 0.0, low_inclusive=False)

    def forward(
        self,
        features: Tensor,
        cams_with_bg: Tensor,
        labels: Tensor | None = None,
        *,
        valid: Tensor | None = None,
    ) -> SeedOutput:
        """Seeds with the stored options (see ``locate_seeds``), no grad.

        Args:
            features: the features whose affinity defines structure (``T_out``): a map or
                tokens on the grid of ``cams_with_bg``.
            cams_with_bg: ``M``, background at channel 0.
            labels: multi-hot image labels; ``None`` allows every class.
            valid: padding mask at any resolution.

        Shape:
            - features: ``(B, D, h, w)`` or tokens ``(B, h*w, D)``; cams_with_bg:
              ``(B, K+1, h, w)``; labels: ``(B, K)``
            - output: seeds ``(B, K+1, h, w)`` bool, iou ``(B, K+1, h, w)`` float

        Returns:
            ``SeedOutput`` ``(seeds, iou)``.
        """
        return locate_seeds(
            features, cams_with_bg, labels, similarity=self.similarity, bg_scale=self.bg_scale,
            valid=valid, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, bg_scale={self.bg_scale}, eps={self.eps}"
