"""Structure-aware seed locating (paper eq. 4; SIPE's ``get_seed`` in matmul form)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import check_option, check_range, check_shape
from wsss_blocks.swtformer._common import allowed_channels, compute_dtype, valid_on_grid

__all__ = ["Affinity", "structure_affinity", "locate_seeds", "SeedLocator"]

Affinity = Literal["abs_cos", "relu_cos", "cos"]
_AFFINITIES = ("abs_cos", "relu_cos", "cos")


def structure_affinity(tokens: Tensor, affinity: Affinity = "abs_cos", eps: float = 1e-5) -> Tensor:
    """Cross-token structure map ``S`` of eq. 4: the (absolute) cosine between every token pair.

    ``f^_i = t_i / (||t_i|| + eps)``, ``A = f^T f^``; ``S = |A|`` (``"abs_cos"``, the paper),
    ``relu(A)`` (``"relu_cos"``, SIPE's code) or ``A`` (``"cos"``, experimental: the IoU
    union can then be <= 0). Row ``i`` is token ``i``'s structure map. Differentiable;
    computed in ``promote_types(dtype, float32)`` with autocast off.

    Args:
        tokens: a feature map (``T_out`` as NCHW).
        affinity: ``"abs_cos"``, ``"relu_cos"`` or ``"cos"``.
        eps: added to the token norm (SIPE: 1e-5).

    Shape:
        - tokens: ``(B, D, h, w)``
        - output: ``(B, h*w, h*w)``, symmetric

    Example:
        >>> t = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])[None, :, None]  # (1, 2, 1, 3)
        >>> structure_affinity(t, eps=0.0)[0].tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        >>> structure_affinity(t, "relu_cos", eps=0.0)[0, 0].tolist()
        [1.0, 0.0, 0.0]
    """
    check_shape("tokens", tokens, ["B", "D", "h", "w"], dtype="float")
    check_option("affinity", affinity, _AFFINITIES)
    check_range("eps", eps, 0.0)
    with no_autocast(tokens.device.type):
        f = tokens.to(compute_dtype(tokens)).flatten(2)  # (B, D, HW)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        a = torch.bmm(f.transpose(1, 2), f)
    if affinity == "abs_cos":
        return a.abs()
    if affinity == "relu_cos":
        return a.relu()
    return a


@torch.no_grad()
def locate_seeds(
    tokens_map: Tensor,
    cams_with_bg: Tensor,
    labels: Tensor | None = None,
    *,
    affinity: Affinity = "abs_cos",
    bg_scale: float = 0.5,
    valid: Tensor | None = None,
    eps: float = 1e-5,
    return_iou: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Hard seeds: every token takes the class whose CAM best matches its structure map (eq. 4), no grad.

    With ``S`` from :func:`structure_affinity` and ``M`` the background-augmented CAM on the
    same grid:

    * ``inter = M S^T`` (one ``bmm``), ``union = rowsum(S) + sum_j M_c,j - inter``,
      ``IoU = inter / max(union, eps)`` (SIPE's soft IoU; the clamp keeps 0/0 finite);
    * ``IoU_0 *= bg_scale`` (SIPE's hard-coded 0.5);
    * ``seeds = one_hot(argmax_c IoU) & [1, y] & valid``: argmax first, then the label mask
      (SIPE), so a token won by an absent class gets no seed. Ties go to the first maximum,
      i.e. to background.

    Runs under ``torch.no_grad()``; the result never requires grad.

    Args:
        tokens_map: the features whose affinity defines structure (``T_out``).
        cams_with_bg: ``M``, background at channel 0 (:func:`cams_with_background`).
        labels: multi-hot image labels; ``None`` allows every class.
        affinity: see :func:`structure_affinity`.
        bg_scale: background IoU factor.
        valid: padding mask at any resolution (``valid_to_grid`` rule).
        eps: token-norm epsilon and IoU union clamp.
        return_iou: also return the (scaled) IoU.

    Shape:
        - tokens_map: ``(B, D, h, w)``; cams_with_bg: ``(B, K+1, h, w)``; labels: ``(B, K)``
        - output: seeds ``(B, K+1, h, w)`` bool (+ IoU ``(B, K+1, h, w)`` float)

    Note:
        SIPE's code builds the ``(B, K+1, HW, HW)`` product ``S[:, None] * M[:, :, None]``;
        the ``bmm`` gives the same ``inter`` with ``O(B HW^2)`` memory for ``S`` only.

    Example:
        >>> t = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> cam = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])[None, :, None]
        >>> from wsss_blocks.swtformer import cams_with_background
        >>> m = cams_with_background(cam, torch.tensor([[1, 1]]))
        >>> locate_seeds(t, m, torch.tensor([[1, 1]])).int().argmax(1).tolist()
        [[[1, 1, 2, 2]]]
    """
    dims = check_shape("tokens_map", tokens_map, ["B", "D", "h", "w"], dtype="float")
    check_shape("cams_with_bg", cams_with_bg, ["B", "K1", "h", "w"], dims, dtype="float")
    check_range("bg_scale", bg_scale, 0.0)
    check_range("eps", eps, 0.0, low_inclusive=False)
    allowed = allowed_channels(labels, dims, cams_with_bg)
    keep = valid_on_grid(valid, dims, (dims["h"], dims["w"]))
    s = structure_affinity(tokens_map, affinity, eps)  # (B, HW, HW), fp32+
    with no_autocast(tokens_map.device.type):
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
    if return_iou:
        return seeds, iou.unflatten(2, (dims["h"], dims["w"]))
    return seeds


class SeedLocator(nn.Module):
    """Module form of :func:`locate_seeds` (stores ``affinity``, ``bg_scale``, ``eps``).

    Shape:
        - same as :func:`locate_seeds`

    Example:
        >>> loc = SeedLocator(affinity="relu_cos")
        >>> t = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])[None, :, None]
        >>> cam = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])[None, :, None]
        >>> from wsss_blocks.swtformer import cams_with_background
        >>> m = cams_with_background(cam, torch.tensor([[1, 1]]))
        >>> loc(t, m, torch.tensor([[1, 1]])).int().argmax(1).tolist()
        [[[1, 0, 2, 2]]]
    """

    def __init__(self, *, affinity: Affinity = "abs_cos", bg_scale: float = 0.5, eps: float = 1e-5) -> None:
        super().__init__()
        self.affinity: Affinity = check_option("affinity", affinity, _AFFINITIES)
        self.bg_scale = check_range("bg_scale", bg_scale, 0.0)
        self.eps = check_range("eps", eps, 0.0, low_inclusive=False)

    def forward(
        self,
        tokens_map: Tensor,
        cams_with_bg: Tensor,
        labels: Tensor | None = None,
        *,
        valid: Tensor | None = None,
        return_iou: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        return locate_seeds(
            tokens_map, cams_with_bg, labels, affinity=self.affinity, bg_scale=self.bg_scale,
            valid=valid, eps=self.eps, return_iou=return_iou,
        )

    def extra_repr(self) -> str:
        return f"affinity={self.affinity!r}, bg_scale={self.bg_scale}, eps={self.eps}"
