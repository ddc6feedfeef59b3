"""CPEWS Prototype Discrimination Loss (PDL, paper eq. 7-9): function and module."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import check_bool, check_instance, check_labels, check_option, check_range, check_shape
from wsss_blocks.cpews._slots import PoolLoss, check_prototypes, class_slots, per_slot, take_slots
from wsss_blocks.cpews.pool import PrototypePool
from wsss_blocks.cpews.regions import region_embeddings
from wsss_blocks.tokens import features_as_tokens

__all__ = ["pdl_loss", "PDLLoss"]


def _distance(diff: Tensor, distance: str) -> Tensor:
    """``l2``: ``sqrt(sum d^2 + 1e-8)``; ``rms``: ``sqrt(mean d^2 + 1e-4)`` (official)."""
    if distance == "l2":
        return (diff.pow(2).sum(-1) + 1e-8).sqrt()
    return (diff.pow(2).mean(-1) + 1e-4).sqrt()


def pdl_loss(
    features: Tensor,
    cams: Tensor,
    labels: Tensor,
    pos: Tensor,
    pos_valid: Tensor,
    neg: Tensor,
    neg_valid: Tensor,
    *,
    temperature: float = 13.0,
    distance: Literal["l2", "rms"] = "l2",
    offset: float = 0.0,
    threshold: float | None = None,
    valid: Tensor | None = None,
    eps: float = 1e-6,
    compact: bool | None = None,
) -> Tensor:
    """Prototype Discrimination Loss (CPEWS eq. 7-9), batched over images and classes.

    For every present class ``c`` of image ``b`` with region embedding ``A_bc``
    (``region_embeddings``, detached CAM weights: the classifier gets no gradient):
    ``C+_c`` = mean of the valid positive prototypes, ``d+ = d(A_bc, C+_c)``,
    ``d- = min_m d(A_bc, P-_cm)`` over valid negatives, ``x+- = d+-/T + offset`` and::

        l = x+ - log(max(1 - exp(-x-), eps))      # = -log R+ - log(1 - R-)

    ``d`` is ``sqrt(sum (a-b)^2 + 1e-8)`` (``"l2"``, paper) or
    ``sqrt(mean (a-b)^2 + 1e-4)`` (``"rms"``, official code, used with ``offset=0.1``).
    The loss averages ``l`` over the eligible (b, c): present, non-empty region, at
    least one valid positive and one valid negative (official skip rule); with none it is
    a graph-attached 0. Gradients reach ``features`` only. fp32.

    Args:
        features: final tokens on the CAMs' grid.
        cams: raw final CAMs (only their detached normalised form is used).
        labels: multi-hot image labels.
        pos: positive prototypes; ``pos_valid`` marks the real ones.
        pos_valid: see ``pos``.
        neg: negative prototypes; ``neg_valid`` marks the real ones.
        neg_valid: see ``neg``.
        temperature: ``T`` (paper: 13).
        distance: ``"l2"`` or ``"rms"``.
        offset: added to ``d/T`` (official: 0.1).
        threshold: binarise the region weights (official: 0.1).
        valid: padding mask at any resolution.
        eps: floor of ``1 - R-`` inside the log.
        compact: ``True`` / ``False`` force the present-classes / all-classes path;
            ``None``: compact for CPU tensors.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``; labels ``(B, K)``
        - pos: ``(K, M, D)``; pos_valid: ``(K, M)``; neg: ``(K, M', D)``; neg_valid ``(K, M')``
        - output: scalar fp32

    Note:
        The nearest negative is picked without grad by ``||n||^2 - 2 a.n`` (no
        ``(B, K, M', D)`` difference), then its distance is computed in the exact form
        above. ``compact`` (see ``ssl_loss``): ``True`` computes the region embeddings
        and distances only for each image's present classes (one host sync; default on
        CPU), ``False`` for all ``K`` classes (no sync; default elsewhere). Same values.

    Examples:
        >>> feats, cams = torch.zeros(1, 1, 2), torch.ones(1, 1, 1, 1)   # A = (0, 0)
        >>> pos = torch.tensor([[[6.0, 0.0], [0.0, 8.0]]])                # mean (3, 4)
        >>> neg = torch.tensor([[[0.0, 13.0], [26.0, 0.0]]])
        >>> ok = torch.ones(1, 2, dtype=torch.bool)
        >>> round(pdl_loss(feats, cams, torch.ones(1, 1), pos, ok, neg, ok).item(), 6)
        0.843291
    """
    dims = check_shape("cams", cams, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    features_as_tokens("features", features, (dims["h"], dims["w"]), dims)
    check_prototypes(dims, pos, pos_valid, neg, neg_valid, "neg_valid")
    check_option("distance", distance, ("l2", "rms"))
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    check_range("offset", offset, 0.0)
    check_range("eps", eps, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    slots = class_slots(labels, compact)
    region, nonempty = region_embeddings(
        features, take_slots(cams, slots), threshold=threshold, valid=valid
    )  # (B, S, D); S = K on the dense path
    present = take_slots(labels, slots) != 0
    dtype = region.dtype
    with no_autocast(region.device.type):
        zero = torch.zeros((), dtype=dtype, device=region.device)
        posf = torch.where(pos_valid[:, :, None], pos.to(dtype), zero)  # invalid rows: junk
        centre = posf.sum(1) / pos_valid.sum(1).clamp_min(1)[:, None].to(dtype)  # (K, D)
        negf = torch.where(neg_valid[:, :, None], neg.to(dtype), zero)  # (K, M', D)
        centre, negf, nv = (per_slot(t, slots) for t in (centre, negf, neg_valid))
        d_pos = _distance(region - centre, distance)  # (B, S)
        with torch.no_grad():  # nearest valid negative: argmin of ||n||^2 - 2 a.n
            score = negf.pow(2).sum(-1) - 2.0 * torch.einsum("...md,...d->...m", negf, region)
            inf = torch.full((), float("inf"), dtype=dtype, device=region.device)
            near = torch.where(nv, score, inf).argmin(-1)[..., None, None]  # (B, S, 1, 1)
        nearest = torch.take_along_dim(negf.expand(*near.shape[:2], -1, -1), near, dim=-2)
        d_neg = _distance(region - nearest.squeeze(-2), distance)  # exact form, one negative
        eligible = present & nonempty & per_slot(pos_valid.any(1), slots) & nv.any(-1)
        x_pos = d_pos / temperature + offset
        x_neg = d_neg / temperature + offset
        ell = x_pos - torch.log(torch.clamp(-torch.expm1(-x_neg), min=eps))
        total = torch.where(eligible, ell, torch.zeros_like(ell)).sum()
        return total / eligible.sum().clamp_min(1).to(dtype)


class PDLLoss(PoolLoss):
    """Module form of ``pdl_loss``; reads the prototypes from a ``PrototypePool``.

    ``forward`` takes the pool instead of the four prototype tensors of ``pdl_loss``:
    the pool is trained state that changes at every rebuild, so it is passed per call (the
    module stores only hyperparameters), and it cannot drift out of sync with them. While
    ``pool.is_built`` is false the loss is a graph-attached 0; ``warn_unbuilt=True`` warns
    once per instance (pass ``False`` when the pool is built after a warm-up on purpose).

    Args:
        temperature: see ``pdl_loss``.
        distance: see ``pdl_loss``.
        offset: see ``pdl_loss``.
        threshold: see ``pdl_loss``.
        eps: see ``pdl_loss``.
        compact: see ``pdl_loss`` (``None``: compact on CPU, dense elsewhere).
        warn_unbuilt: warn once when called before the pool is built.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``; labels ``(B, K)``
        - output: scalar

    Examples:
        >>> pool = PrototypePool(2, 1, num_prototypes=2)
        >>> _ = pool.pos.copy_(torch.tensor([[[6.0, 0.0], [0.0, 8.0]]]))
        >>> _ = pool.pos_valid.fill_(True)
        >>> _ = pool.neg.copy_(torch.tensor([[[0.0, 13.0], [26.0, 0.0]]]))
        >>> _ = pool.neg_valid.fill_(True)
        >>> loss = PDLLoss()(torch.zeros(1, 1, 2), torch.ones(1, 1, 1, 1), torch.ones(1, 1), pool)
        >>> round(loss.item(), 6)
        0.843291
    """

    def __init__(
        self,
        *,
        temperature: float = 13.0,
        distance: Literal["l2", "rms"] = "l2",
        offset: float = 0.0,
        threshold: float | None = None,
        eps: float = 1e-6,
        compact: bool | None = None,
        warn_unbuilt: bool = True,
    ) -> None:
        super().__init__(warn_unbuilt=warn_unbuilt)
        self.temperature = float(check_range("temperature", temperature, 0.0, low_inclusive=False))
        self.distance = check_option("distance", distance, ("l2", "rms"))
        self.offset = float(check_range("offset", offset, 0.0))
        if threshold is not None:
            check_range("threshold", threshold, 0.0, 1.0, high_inclusive=False)
        self.threshold = threshold
        self.eps = float(check_range("eps", eps, 0.0, 1.0, low_inclusive=False, high_inclusive=False))
        self.compact = None if compact is None else check_bool("compact", compact)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, distance={self.distance!r}, offset={self.offset},"
            f" threshold={self.threshold}, compact={self.compact}, warn_unbuilt={self.warn_unbuilt}"
        )

    def forward(
        self, features: Tensor, cams: Tensor, labels: Tensor, pool: PrototypePool, *,
        valid: Tensor | None = None,
    ) -> Tensor:
        """PDL of ``features`` against the pool's prototypes (see ``pdl_loss``).

        Args:
            features: final tokens on the CAMs' grid.
            cams: raw final CAMs.
            labels: multi-hot image labels.
            pool: the prototype pool (a graph-attached 0 while it is unbuilt).
            valid: padding mask at any resolution.
        """
        check_instance("pool", pool, PrototypePool)
        if not pool.is_built:
            return self._unbuilt_zero(features, cams)
        return pdl_loss(
            features, cams, labels, pool.pos, pool.pos_valid, pool.neg, pool.neg_valid,
            temperature=self.temperature, distance=self.distance,
            offset=self.offset, threshold=self.threshold, valid=valid, eps=self.eps,
            compact=self.compact,
        )
