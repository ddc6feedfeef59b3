"""GSC (SIPE, paper eq. 5) and CCL (paper eq. 6) between the CAM and the R-CAM."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_bool, check_option, check_range, check_shape, check_tensor
from wsss_blocks.swtformer._common import allowed_channels, valid_on_grid

__all__ = ["gsc_loss", "GSCLoss", "ccl_loss", "CCLLoss"]

CCLVariant = Literal["paper", "plain"]


def _pair_on_rcam_grid(
    cams_with_bg: Tensor, rcams: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, MutableMapping[str, int]]:
    """Check both maps; bring the CAM to the R-CAM grid (bilinear); valid on that grid (float)."""
    dims = check_shape("rcams", rcams, ["B", "K1", "hf", "wf"], dtype="float")
    check_shape("cams_with_bg", cams_with_bg, ["B", "K1", "h", "w"], dims, dtype="float")
    dtype = compute_dtype(cams_with_bg, rcams)
    m = cams_with_bg.to(dtype)
    if tuple(m.shape[-2:]) != tuple(rcams.shape[-2:]):
        m = F.interpolate(m, size=tuple(rcams.shape[-2:]), mode="bilinear", align_corners=False)
    keep = valid_on_grid(valid, dims, (dims["hf"], dims["wf"]))
    w = None if keep is None else keep[:, None].to(dtype)
    return m, rcams.to(dtype), w, dims


def gsc_loss(cams_with_bg: Tensor, rcams: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """General-specific consistency (SIPE; paper eq. 5): mean L1 distance between CAM and R-CAM.

    ``L = mean_{b,c,i} |M - R-CAM|``; with ``valid``,
    ``sum valid |.| / ((K+1) sum valid)`` (SIPE also averages over padding). ``M`` is
    bilinearly upsampled to the R-CAM grid when the grids differ (the R-CAM is never
    downsampled). Neither side is detached (SIPE). Computed in fp32 (autocast off); returns
    ``x.sum() * 0`` when no pixel is valid.

    Args:
        cams_with_bg: ``M`` (``cams_with_background``).
        rcams: R-CAMs (``refine_cams``).
        valid: padding mask at any resolution.

    Shape:
        - cams_with_bg: ``(B, K+1, h, w)``; rcams: ``(B, K+1, hf, wf)``
        - output: ``()``

    Examples:
        >>> import torch
        >>> gsc_loss(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).item()
        1.0
    """
    m, r, w, _ = _pair_on_rcam_grid(cams_with_bg, rcams, valid)
    with no_autocast(r.device.type):
        diff = (m - r).abs()
        if w is None:
            return diff.sum() if diff.numel() == 0 else diff.mean()  # an empty batch: a graph-attached 0
        return (diff * w).sum() / (w.sum() * diff.shape[1]).clamp_min(1.0)


class GSCLoss(nn.Module):
    """Module form of ``gsc_loss`` (it has no options).

    Shape:
        - same as ``gsc_loss``

    Examples:
        >>> import torch
        >>> GSCLoss()(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)).item()
        1.0
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, cams_with_bg: Tensor, rcams: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """The GSC loss (see ``gsc_loss``).

        Args:
            cams_with_bg: ``M`` (``cams_with_background``).
            rcams: R-CAMs (``refine_cams``).
            valid: padding mask at any resolution.

        Shape:
            - cams_with_bg: ``(B, K+1, h, w)``; rcams: ``(B, K+1, hf, wf)``
            - output: ``()``

        Returns:
            The mean L1 distance, a 0-d tensor.
        """
        return gsc_loss(cams_with_bg, rcams, valid=valid)


def ccl_loss(
    cams_with_bg: Tensor,
    rcams: Tensor,
    labels: Tensor,
    *,
    variant: CCLVariant = "paper",
    valid: Tensor | None = None,
    detach_rcam: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Class-wise consistency between CAM and R-CAM (paper eq. 6, as printed), per class and image.

    ``s_bc = <m^, r^>``, the cosine of the flattened (valid) maps of class ``c`` with
    ``x^ = x / max(||x||, eps)``;

    * ``"paper"``: ``l = 1/2 [(2/3 s)^2 + (1 - s)^2]``, minimised at ``s = 9/13`` (value
      2/13), 2/9 at ``s = 1``, 1/2 at ``s = 0``;
    * ``"plain"``: ``l = 1 - s``.

    ``L = mean_b (sum_c a_bc l_bc / sum_c a_bc)``, ``a = [1, y]`` (background and present
    classes). Images without a valid pixel are left out; ``x.sum() * 0`` when none is left.
    ``M`` is bilinearly upsampled to the R-CAM grid when the grids differ. Computed in fp32.

    Args:
        cams_with_bg: ``M``.
        rcams: R-CAMs.
        labels: multi-hot image labels.
        variant: ``"paper"`` or ``"plain"``.
        valid: padding mask at any resolution.
        detach_rcam: treat the R-CAM as a fixed target (no gradient into it).
        eps: norm clamp.

    Shape:
        - cams_with_bg: ``(B, K+1, h, w)``; rcams: ``(B, K+1, hf, wf)``; labels: ``(B, K)``
        - output: ``()``

    Examples:
        >>> import torch
        >>> m = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])   # background + one class
        >>> round(ccl_loss(m, m, torch.tensor([[1]])).item(), 6), round(2 / 9, 6)
        (0.222222, 0.222222)
    """
    check_option("variant", variant, ("paper", "plain"))
    check_range("eps", eps, 0.0, low_inclusive=False)
    detach_rcam = check_bool("detach_rcam", detach_rcam)
    m, r, w, dims = _pair_on_rcam_grid(cams_with_bg, rcams, valid)
    check_tensor("labels", labels)
    a = allowed_channels(labels, dims, rcams).to(m.dtype)
    if detach_rcam:
        r = r.detach()
    with no_autocast(r.device.type):
        if w is not None:
            m, r = m * w, r * w
        m = m.flatten(2)
        r = r.flatten(2)
        m_hat = m / m.norm(dim=-1, keepdim=True).clamp_min(eps)
        r_hat = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        s = (m_hat * r_hat).sum(dim=-1)  # (B, K+1)
        if variant == "paper":
            loss = 0.5 * ((2.0 / 3.0 * s) ** 2 + (1.0 - s) ** 2)
        else:
            loss = 1.0 - s
        per_image = (a * loss).sum(dim=1) / a.sum(dim=1)  # background keeps sum(a) >= 1
        if w is None:
            return per_image.sum() if per_image.numel() == 0 else per_image.mean()  # empty batch: 0
        has = (w.flatten(1).sum(dim=1) > 0).to(s.dtype)
        return (has * per_image).sum() / has.sum().clamp_min(1.0)


class CCLLoss(nn.Module):
    """Module form of ``ccl_loss`` (stores ``variant``, ``detach_rcam``, ``eps``).

    Args:
        variant: ``"paper"`` or ``"plain"``.
        detach_rcam: treat the R-CAM as a fixed target (no gradient into it).
        eps: norm clamp.

    Shape:
        - same as ``ccl_loss``

    Examples:
        >>> import torch
        >>> m = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
        >>> CCLLoss(variant="plain")(m, m, torch.tensor([[1]])).abs().item() < 1e-6
        True
    """

    def __init__(self, *, variant: CCLVariant = "paper", detach_rcam: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        self.variant: CCLVariant = check_option("variant", variant, ("paper", "plain"))
        self.detach_rcam = check_bool("detach_rcam", detach_rcam)
        self.eps = check_range("eps", eps, 0.0, low_inclusive=False)

    def forward(
        self, cams_with_bg: Tensor, rcams: Tensor, labels: Tensor, *, valid: Tensor | None = None
    ) -> Tensor:
        """The CCL loss with the stored options (see ``ccl_loss``).

        Args:
            cams_with_bg: ``M``.
            rcams: R-CAMs.
            labels: multi-hot image labels.
            valid: padding mask at any resolution.

        Shape:
            - cams_with_bg: ``(B, K+1, h, w)``; rcams: ``(B, K+1, hf, wf)``; labels: ``(B, K)``
            - output: ``()``

        Returns:
            The class-wise consistency loss, a 0-d tensor.
        """
        return ccl_loss(
            cams_with_bg, rcams, labels, variant=self.variant, valid=valid,
            detach_rcam=self.detach_rcam, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, detach_rcam={self.detach_rcam}, eps={self.eps}"
