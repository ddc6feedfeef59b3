"""CPEWS prototype losses (PDL, SSL) and the combined loss (cpews.md §3.6-3.8)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import (
    ShapeError,
    check_labels,
    check_option,
    check_range,
    check_shape,
)
from wsss_blocks.cam import normalize_cam, valid_to_grid
from wsss_blocks.cpews.ism import ISMLoss
from wsss_blocks.cpews.pool import PrototypePool, region_embeddings
from wsss_blocks.cpews.tables import CPEWS_PRESETS
from wsss_blocks.tokens import features_as_tokens

__all__ = ["pdl_loss", "PDLLoss", "ssl_loss", "SSLLoss", "CPEWSLoss"]


def _check_prototypes(
    dims: dict[str, int], pos: Tensor, pos_valid: Tensor, neg: Tensor, neg_mask: Tensor,
    neg_mask_name: str,
) -> None:
    check_shape("pos", pos, ["K", "M", "D"], dims, dtype="float")
    check_shape("pos_valid", pos_valid, ["K", "M"], dims, dtype="bool")
    check_shape("neg", neg, ["K", "M_neg", "D"], dims, dtype="float")
    check_shape(neg_mask_name, neg_mask, ["K", "M_neg"], dims, dtype="bool")


def _distance(diff: Tensor, distance: str) -> Tensor:
    """``l2``: ``sqrt(sum d^2 + 1e-8)``; ``rms``: ``sqrt(mean d^2 + 1e-4)`` (official)."""
    if distance == "l2":
        return (diff.pow(2).sum(-1) + 1e-8).sqrt()
    return (diff.pow(2).mean(-1) + 1e-4).sqrt()


def _class_slots(labels: Tensor, compact: bool | None) -> Tensor | None:
    """Which class each (image, slot) evaluates: ``None`` = dense (slot ``k`` is class ``k``).

    Only present (image, class) pairs contribute to PDL and SSL. The compact path gives
    every image ``S`` slots, ``S`` = the largest number of present classes in an image,
    holding its present classes (then absent ones as padding): ``K/S`` times less work.
    ``S`` is read on the host: one sync, free on CPU but a stall on an accelerator, so
    ``compact=None`` picks compact for CPU tensors and dense (never syncs) otherwise.
    """
    if compact is None:
        compact = labels.device.type == "cpu"
    if not compact:
        return None
    present = labels != 0
    count = present.sum(1)
    # sync-ok: CPU fast path, dense path on accelerators
    num_slots = int(count.amax()) if count.numel() else 0
    return present.float().topk(num_slots, dim=1).indices  # (B, S), all present classes


def _take_slots(x: Tensor, slots: Tensor | None) -> Tensor:
    """Per-image, per-class ``(B, K, ...)`` -> per slot ``(B, S, ...)`` (differentiable)."""
    if slots is None:
        return x
    return x[torch.arange(x.shape[0], device=x.device)[:, None], slots]


def _per_slot(x: Tensor, slots: Tensor | None) -> Tensor:
    """Per-class ``(K, ...)`` -> per slot: shared ``(K, ...)`` (dense) or ``(B, S, ...)``."""
    return x if slots is None else x[slots]


def pdl_loss(
    features: Tensor,
    cam: Tensor,
    labels: Tensor,
    pos: Tensor,
    pos_valid: Tensor,
    neg: Tensor,
    neg_valid: Tensor,
    *,
    temperature: float = 13.0,
    distance: Literal["l2", "rms"] = "l2",
    offset: float = 0.0,
    mask_threshold: float | None = None,
    valid: Tensor | None = None,
    eps: float = 1e-6,
    compact: bool | None = None,
) -> Tensor:
    """Prototype Discrimination Loss (CPEWS eq. 7-9), batched over images and classes.

    For every present class ``c`` of image ``b`` with region embedding ``A_bc``
    (:func:`region_embeddings`, detached CAM weights: the classifier gets no gradient):
    ``C+_c`` = mean of the valid positive prototypes, ``d+ = d(A_bc, C+_c)``,
    ``d- = min_m d(A_bc, P-_cm)`` over valid negatives, ``x+- = d+-/T + offset`` and::

        l = x+ - log(max(1 - exp(-x-), eps))      # = -log R+ - log(1 - R-)

    ``d`` is ``sqrt(sum (a-b)^2 + 1e-8)`` (``"l2"``, paper) or
    ``sqrt(mean (a-b)^2 + 1e-4)`` (``"rms"``, official code, used with ``offset=0.1``).
    The loss averages ``l`` over the eligible (b, c): present, non-empty region, at
    least one valid positive and one valid negative (official skip rule); with none it is
    a graph-attached 0. Gradients reach ``features`` only. fp32. The nearest negative is
    picked without grad by ``||n||^2 - 2 a.n`` (no ``(B, K, M', D)`` difference), then its
    distance is computed in the exact form above.

    ``compact`` (see :func:`ssl_loss`): ``True`` computes the region embeddings and
    distances only for each image's present classes (one host sync; default on CPU),
    ``False`` for all ``K`` classes (no sync; default elsewhere). Same values.

    Args:
        features: final tokens on the CAM's grid.
        cam: raw final CAM (only its detached normalised form is used).
        labels: multi-hot image labels.
        pos: positive prototypes; ``pos_valid`` marks the real ones.
        pos_valid: see ``pos``.
        neg: negative prototypes; ``neg_valid`` marks the real ones.
        neg_valid: see ``neg``.
        temperature: ``T`` (paper: 13).
        distance: ``"l2"`` or ``"rms"``.
        offset: added to ``d/T`` (official: 0.1).
        mask_threshold: binarise the region weights (official: 0.1).
        valid: padding mask at any resolution.
        eps: floor of ``1 - R-`` inside the log.
        compact: ``True`` / ``False`` force the present-classes / all-classes path;
            ``None``: compact for CPU tensors.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cam: ``(B, K, h, w)``; labels ``(B, K)``
        - pos: ``(K, M, D)``; pos_valid: ``(K, M)``; neg: ``(K, M', D)``; neg_valid ``(K, M')``
        - output: scalar fp32

    Example:
        >>> feats, cam = torch.zeros(1, 1, 2), torch.ones(1, 1, 1, 1)    # A = (0, 0)
        >>> pos = torch.tensor([[[6.0, 0.0], [0.0, 8.0]]])                # mean (3, 4)
        >>> neg = torch.tensor([[[0.0, 13.0], [26.0, 0.0]]])
        >>> ok = torch.ones(1, 2, dtype=torch.bool)
        >>> round(pdl_loss(feats, cam, torch.ones(1, 1), pos, ok, neg, ok).item(), 6)
        0.843291
    """
    dims = check_shape("cam", cam, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    features_as_tokens("features", features, (dims["h"], dims["w"]), dims)
    _check_prototypes(dims, pos, pos_valid, neg, neg_valid, "neg_valid")
    check_option("distance", distance, ("l2", "rms"))
    check_range("temperature", temperature, 0.0, low_inclusive=False)
    check_range("offset", offset, 0.0)
    check_range("eps", eps, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    slots = _class_slots(labels, compact)
    region, nonempty = region_embeddings(
        features, _take_slots(cam, slots), mask_threshold=mask_threshold, valid=valid
    )  # (B, S, D); S = K on the dense path
    present = _take_slots(labels, slots) != 0
    dtype = region.dtype
    with no_autocast(region.device.type):
        zero = torch.zeros((), dtype=dtype, device=region.device)
        posf = torch.where(pos_valid[:, :, None], pos.to(dtype), zero)  # invalid rows: junk
        centre = posf.sum(1) / pos_valid.sum(1).clamp_min(1)[:, None].to(dtype)  # (K, D)
        negf = torch.where(neg_valid[:, :, None], neg.to(dtype), zero)  # (K, M', D)
        centre, negf, nv = (_per_slot(t, slots) for t in (centre, negf, neg_valid))
        d_pos = _distance(region - centre, distance)  # (B, S)
        with torch.no_grad():  # nearest valid negative: argmin of ||n||^2 - 2 a.n
            score = negf.pow(2).sum(-1) - 2.0 * torch.einsum("...md,...d->...m", negf, region)
            inf = torch.full((), float("inf"), dtype=dtype, device=region.device)
            near = torch.where(nv, score, inf).argmin(-1)[..., None, None]  # (B, S, 1, 1)
        nearest = torch.take_along_dim(negf.expand(*near.shape[:2], -1, -1), near, dim=-2)
        d_neg = _distance(region - nearest.squeeze(-2), distance)  # exact form, one negative
        eligible = present & nonempty & _per_slot(pos_valid.any(1), slots) & nv.any(-1)
        x_pos = d_pos / temperature + offset
        x_neg = d_neg / temperature + offset
        ell = x_pos - torch.log(torch.clamp(-torch.expm1(-x_neg), min=eps))
        total = torch.where(eligible, ell, torch.zeros_like(ell)).sum()
        return total / eligible.sum().clamp_min(1).to(dtype)


def _closer_to_negative(tokens: Tensor, protos: Tensor, ok: Tensor, num_pos: int) -> Tensor:
    """``D- < D+`` of every token against ``S`` groups of ``Q`` prototypes (no grad).

    A group holds ``num_pos`` positives, then negatives; ``ok`` marks the usable ones
    (none usable -> distance +inf, so "no kept negative" and ties give False). The groups
    are shared by all images, ``protos (S, Q, D)`` -> one matmul ``(B*N, D) x (D, S*Q)``,
    or per image, ``protos (B, S, Q, D)`` -> one ``bmm``. Squared distances
    ``||f||^2 + ||p||^2 - 2 f.p`` clamped at 0, in fp32 (fp64 for fp64 tokens).

    Shape:
        - tokens: ``(B, N, D)``; protos: ``(S, Q, D)`` or ``(B, S, Q, D)``; ok: ``(S, Q)`` or
          ``(B, S, Q)``
        - output: ``(B, S, N)`` bool
    """
    b, n, _ = tokens.shape
    s, q = ok.shape[-2:]
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    f = tokens.detach().to(dtype)
    p = protos.detach().to(dtype).flatten(-3, -2)  # (S*Q, D) or (B, S*Q, D)
    sq = torch.matmul(f, p.mT).mul_(-2.0).add_(p.pow(2).sum(-1).unsqueeze(-2))
    f_sq = torch.linalg.vector_norm(f, dim=-1, keepdim=True).square()  # no (B, N, D) temporary
    sq = sq.add_(f_sq).clamp_min_(0.0).view(b, n, s, q)
    ok = ok.unsqueeze(-3)  # broadcast over tokens
    inf = torch.full((), float("inf"), dtype=dtype, device=f.device)
    d_pos = torch.where(ok[..., :num_pos], sq[..., :num_pos], inf).amin(-1)
    d_neg = torch.where(ok[..., num_pos:], sq[..., num_pos:], inf).amin(-1)
    return (d_neg < d_pos).transpose(1, 2)


@torch.no_grad()
def _suppression_set(
    tokens: Tensor, cam: Tensor, present: Tensor, slots: Tensor | None, pos: Tensor,
    pos_valid: Tensor, neg: Tensor, neg_keep: Tensor, act_threshold: float | None,
    valid: Tensor | None,
) -> Tensor:
    """``Phi (B, S, N)`` bool of SSL (no grad) for the slots' CAMs ``(B, S, h, w)``."""
    protos = torch.cat([_per_slot(pos, slots), _per_slot(neg, slots)], -2)  # (K | B S, M+M', D)
    ok = torch.cat([_per_slot(pos_valid, slots), _per_slot(neg_keep, slots)], -1)
    with no_autocast(tokens.device.type):
        phi = _closer_to_negative(tokens, protos, ok, pos_valid.shape[1])
        phi = phi & (present & _per_slot(pos_valid.any(1), slots))[..., None]
        if act_threshold is not None:
            phi = phi & (normalize_cam(cam.detach(), mode="max").flatten(2) > act_threshold)
        if valid is not None:
            phi = phi & valid_to_grid(valid, tuple(cam.shape[-2:])).flatten(1)[:, None]
    return phi


def ssl_loss(
    features: Tensor,
    cam: Tensor,
    labels: Tensor,
    pos: Tensor,
    pos_valid: Tensor,
    neg: Tensor,
    neg_keep: Tensor,
    *,
    act_threshold: float | None = 0.1,
    cam_activation: Literal["relu", "none"] = "relu",
    valid: Tensor | None = None,
    compact: bool | None = None,
) -> Tensor:
    """Superclass Suppression Loss (CPEWS eq. 10-12), differentiable into the CAM.

    Under ``no_grad``: squared distances of every token to the prototypes
    (``||f||^2 + ||p||^2 - 2 f.p``, fp32); ``D+`` = min over the class's valid positives,
    ``D-`` = min over its kept negatives (``neg_keep``, e.g.
    :meth:`PrototypePool.suppression_mask`; none kept -> never suppressed). The set
    ``Phi = present & activated & valid & (D- < D+)``, with "activated" =
    ``relu(cam)/max > act_threshold`` (``None``: every token) and classes without a
    valid positive prototype left out. Then ``L = sum_Phi g(cam) / max(|Phi|, 1)``,
    ``g = relu`` or identity. Unlike the official code (which detaches the CAM, so its
    SSL trains nothing) the gradient reaches the classifier that made ``cam`` and the
    tokens. Note: the paper's weight 0.2 on raw CAM logits is ~1300x the official 1.5e-4.

    Two paths, same values and gradients (up to float rounding): **dense** measures every
    token against the prototypes of all ``K`` classes with one matmul
    ``(B*N, D) x (D, K*(M+M'))`` and never syncs the host (right on accelerators);
    **compact** reads the largest number ``S`` of present classes per image on the host
    (one sync: free on CPU) and measures each image's tokens against the prototypes of
    its present classes only, one ``bmm`` ``(B, N, D) x (B, D, S*(M+M'))``: ``K/S`` times
    fewer FLOPs (~10x VOC, ~40x COCO). ``compact=None`` picks compact for CPU tensors.

    Args:
        features: final tokens on the CAM's grid (only used, detached, for ``Phi``).
        cam: the live final CAM (raw logits, with grad).
        labels: multi-hot image labels.
        pos: positive prototypes.
        pos_valid: valid positives.
        neg: negative prototypes.
        neg_keep: negatives used for suppression.
        act_threshold: activation threshold on the max-normalised CAM (official 0.1).
        cam_activation: ``"relu"`` or ``"none"`` (equal unless ``act_threshold=None``).
        valid: padding mask at any resolution.
        compact: ``True`` / ``False`` force the compact / dense path; ``None`` (default)
            picks compact for CPU tensors and dense otherwise.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cam: ``(B, K, h, w)``; labels ``(B, K)``
        - pos: ``(K, M, D)``; pos_valid: ``(K, M)``; neg: ``(K, M', D)``; neg_keep: ``(K, M')``
        - output: scalar fp32

    Example:
        >>> feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
        >>> cam = torch.tensor([[[[2.0, 1.0, 0.1]]]], requires_grad=True)
        >>> ok = torch.ones(1, 1, dtype=torch.bool)
        >>> loss = ssl_loss(feats, cam, torch.ones(1, 1), torch.tensor([[[1.0, 0.0]]]), ok,
        ...                 torch.tensor([[[0.0, 1.0]]]), ok)
        >>> loss.backward(); loss.item(), cam.grad.flatten().tolist()
        (2.0, [1.0, 0.0, 0.0])
    """
    dims = check_shape("cam", cam, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    size = (dims["h"], dims["w"])
    tokens = features_as_tokens("features", features, size, dims)
    _check_prototypes(dims, pos, pos_valid, neg, neg_keep, "neg_keep")
    check_option("cam_activation", cam_activation, ("relu", "none"))
    if act_threshold is not None:
        check_range("act_threshold", act_threshold, 0.0, 1.0, high_inclusive=False)
    if valid is not None:
        check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
    slots = _class_slots(labels, compact)
    cam = _take_slots(cam, slots)  # (B, S, h, w), live
    present = _take_slots(labels, slots) != 0
    phi = _suppression_set(
        tokens, cam, present, slots, pos, pos_valid, neg, neg_keep, act_threshold, valid
    )
    with no_autocast(cam.device.type):
        g = cam.flatten(2).to(torch.promote_types(cam.dtype, torch.float32))
        if cam_activation == "relu":
            g = g.relu()
        phif = phi.to(g.dtype)
        return (phif * g).sum() / phif.sum().clamp_min(1.0)


class PDLLoss(nn.Module):
    """Module form of :func:`pdl_loss`; reads the prototypes from a :class:`PrototypePool`.

    Args:
        temperature: see :func:`pdl_loss`.
        distance: see :func:`pdl_loss`.
        offset: see :func:`pdl_loss`.
        mask_threshold: see :func:`pdl_loss`.
        eps: see :func:`pdl_loss`.
        compact: see :func:`pdl_loss` (``None``: compact on CPU, dense elsewhere).

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cam: ``(B, K, h, w)``; labels ``(B, K)``
        - output: scalar

    Example:
        >>> pool = PrototypePool(1, 2, num_prototypes=2)
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
        mask_threshold: float | None = None,
        eps: float = 1e-6,
        compact: bool | None = None,
    ) -> None:
        super().__init__()
        self.temperature = float(check_range("temperature", temperature, 0.0, low_inclusive=False))
        self.distance = check_option("distance", distance, ("l2", "rms"))
        self.offset = float(check_range("offset", offset, 0.0))
        if mask_threshold is not None:
            check_range("mask_threshold", mask_threshold, 0.0, 1.0, high_inclusive=False)
        self.mask_threshold = mask_threshold
        self.eps = float(check_range("eps", eps, 0.0, 1.0, low_inclusive=False, high_inclusive=False))
        self.compact = compact

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, distance={self.distance!r}, offset={self.offset},"
            f" mask_threshold={self.mask_threshold}, compact={self.compact}"
        )

    def forward(
        self, features: Tensor, cam: Tensor, labels: Tensor, pool: PrototypePool,
        valid: Tensor | None = None,
    ) -> Tensor:
        """See :func:`pdl_loss`."""
        return pdl_loss(
            features, cam, labels, pool.pos, pool.pos_valid, pool.neg, pool.neg_valid,
            temperature=self.temperature, distance=self.distance,  # type: ignore[arg-type]
            offset=self.offset, mask_threshold=self.mask_threshold, valid=valid, eps=self.eps,
            compact=self.compact,
        )


class SSLLoss(nn.Module):
    """Module form of :func:`ssl_loss` with the pool's superclass filter.

    Args:
        suppress_singletons: passed to :meth:`PrototypePool.suppression_mask` (paper:
            ``True``; official: ``False``, person never suppressed).
        act_threshold: see :func:`ssl_loss`.
        cam_activation: see :func:`ssl_loss`.
        compact: see :func:`ssl_loss` (``None``: compact on CPU, dense elsewhere).

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cam: ``(B, K, h, w)``; labels ``(B, K)``
        - output: scalar

    Example:
        >>> pool = PrototypePool(1, 2, num_prototypes=1)
        >>> _ = pool.pos.copy_(torch.tensor([[[1.0, 0.0]]])), pool.pos_valid.fill_(True)
        >>> _ = pool.neg.copy_(torch.tensor([[[0.0, 1.0]]])), pool.neg_valid.fill_(True)
        >>> feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
        >>> cam = torch.tensor([[[[2.0, 1.0, 0.1]]]])
        >>> SSLLoss()(feats, cam, torch.ones(1, 1), pool).item()
        2.0
    """

    def __init__(
        self,
        *,
        suppress_singletons: bool = True,
        act_threshold: float | None = 0.1,
        cam_activation: Literal["relu", "none"] = "relu",
        compact: bool | None = None,
    ) -> None:
        super().__init__()
        self.suppress_singletons = bool(suppress_singletons)
        self.compact = compact
        if act_threshold is not None:
            check_range("act_threshold", act_threshold, 0.0, 1.0, high_inclusive=False)
        self.act_threshold = act_threshold
        self.cam_activation = check_option("cam_activation", cam_activation, ("relu", "none"))

    def extra_repr(self) -> str:
        return (
            f"suppress_singletons={self.suppress_singletons}, act_threshold={self.act_threshold},"
            f" cam_activation={self.cam_activation!r}, compact={self.compact}"
        )

    def forward(
        self, features: Tensor, cam: Tensor, labels: Tensor, pool: PrototypePool,
        valid: Tensor | None = None,
    ) -> Tensor:
        """See :func:`ssl_loss`."""
        return ssl_loss(
            features, cam, labels, pool.pos, pool.pos_valid, pool.neg,
            pool.suppression_mask(self.suppress_singletons),
            act_threshold=self.act_threshold,
            cam_activation=self.cam_activation,  # type: ignore[arg-type]
            valid=valid,
            compact=self.compact,
        )


class CPEWSLoss(nn.Module):
    """All CPEWS training losses: ``cls_mid + cls_final + l1 ISM + l2 PDL + l3 SSL``.

    ``cls_*`` is ``multilabel_soft_margin_loss`` of each head branch. ``weights`` is a
    preset name (``"paper"``: 0.12 / 1.5e-4 / 0.2; ``"official"``: 0.2 / 0.12 / 1.5e-4)
    or a mapping with keys ``ism``, ``pdl``, ``ssl``. A preset name also configures the
    sub-losses that are not passed explicitly (:data:`CPEWS_PRESETS`); build the pool
    with the matching ``CPEWS_PRESETS[name]["pool"]``. A weight of 0 skips its term
    (reported as a detached 0). While ``pool.is_built`` is false, PDL and SSL are a
    graph-attached 0 and one warning is issued. The pool is a registered submodule, so
    its prototypes are in this module's ``state_dict``.

    Args:
        pool: the prototype pool.
        weights: ``"paper"``, ``"official"`` or ``{"ism": l1, "pdl": l2, "ssl": l3}``.
        ism: ISM module (default ``ISMLoss()``).
        pdl: PDL module (default from the preset).
        ssl: SSL module (default from the preset).

    Shape:
        - logits_mid, logits_final, labels: ``(B, K)``; tokens_final: ``(B, N, D)`` or
          ``(B, D, h, w)``; cam_final: ``(B, K, h, w)``; token_labels: ``(B, h, w)``
        - output: dict of scalars ``cls_mid, cls_final, ism, pdl, ssl`` (unweighted),
          ``total``

    Example:
        >>> import warnings
        >>> crit = CPEWSLoss(PrototypePool(3, 8))
        >>> b, k, h, w = 2, 3, 2, 2
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     out = crit(logits_mid=torch.randn(b, k), logits_final=torch.randn(b, k),
        ...                tokens_final=torch.randn(b, h * w, 8), cam_final=torch.randn(b, k, h, w),
        ...                token_labels=torch.zeros(b, h, w, dtype=torch.long),
        ...                labels=torch.tensor([[1, 0, 0], [0, 1, 1]]))
        >>> sorted(out), out["pdl"].item()
        (['cls_final', 'cls_mid', 'ism', 'pdl', 'ssl', 'total'], 0.0)
    """

    def __init__(
        self,
        pool: PrototypePool,
        *,
        weights: Literal["paper", "official"] | Mapping[str, float] = "paper",
        ism: ISMLoss | None = None,
        pdl: PDLLoss | None = None,
        ssl: SSLLoss | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pool, PrototypePool):
            raise TypeError(f"pool: expected a PrototypePool, got {type(pool).__name__}")
        preset = CPEWS_PRESETS["paper"]
        if isinstance(weights, str):
            check_option("weights", weights, tuple(CPEWS_PRESETS))
            preset = CPEWS_PRESETS[weights]
            weights = preset["loss"]
        if set(weights) != {"ism", "pdl", "ssl"}:
            raise ValueError(f"weights: expected keys ['ism', 'pdl', 'ssl'], got {sorted(weights)}")
        self.weights = {
            k: float(check_range(f"weights[{k!r}]", v, 0.0)) for k, v in weights.items()
        }
        self.pool = pool
        self.ism = ism if ism is not None else ISMLoss()
        self.pdl = pdl if pdl is not None else PDLLoss(**preset["pdl"])
        self.ssl = ssl if ssl is not None else SSLLoss(**preset["ssl"])
        self._warned = False

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def forward(
        self,
        *,
        logits_mid: Tensor,
        logits_final: Tensor,
        tokens_final: Tensor,
        cam_final: Tensor,
        token_labels: Tensor,
        labels: Tensor,
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute every term and the weighted total (keyword arguments only).

        Args:
            logits_mid: intermediate-branch logits (:class:`CPEWSHead`).
            logits_final: final-branch logits.
            tokens_final: final tokens (ISM, PDL and the SSL distances).
            cam_final: the live final CAM (PDL regions, SSL values).
            token_labels: ISM pseudo labels on the token grid (padding already ignored).
            labels: multi-hot image labels.
            valid: padding mask for PDL and SSL, any resolution.
        """
        dims = check_shape("cam_final", cam_final, ["B", "K", "h", "w"], dtype="float")
        check_shape("logits_mid", logits_mid, ["B", "K"], dims, dtype="float")
        check_shape("logits_final", logits_final, ["B", "K"], dims, dtype="float")
        check_labels("labels", labels, dims)
        if dims["K"] != self.pool.num_classes:
            raise ShapeError(
                f"cam_final: K={dims['K']} does not match the pool's "
                f"{self.pool.num_classes} classes"
            )
        target = labels.float()
        out: dict[str, Tensor] = {
            "cls_mid": F.multilabel_soft_margin_loss(logits_mid.float(), target),
            "cls_final": F.multilabel_soft_margin_loss(logits_final.float(), target),
        }
        detached_zero = torch.zeros((), device=cam_final.device)
        w = self.weights
        out["ism"] = self.ism(tokens_final, token_labels) if w["ism"] else detached_zero
        if self.pool.is_built:
            out["pdl"] = (
                self.pdl(tokens_final, cam_final, labels, self.pool, valid=valid)
                if w["pdl"] else detached_zero
            )
            out["ssl"] = (
                self.ssl(tokens_final, cam_final, labels, self.pool, valid=valid)
                if w["ssl"] else detached_zero
            )
        else:
            if not self._warned and (w["pdl"] or w["ssl"]):
                warnings.warn(
                    "CPEWSLoss: the prototype pool is not built yet; PDL and SSL are 0 "
                    "(call pool.build(...) after the warm-up)",
                    stacklevel=2,
                )
                self._warned = True
            graph_zero = (cam_final.float().sum() + tokens_final.float().sum()) * 0.0 + 0.0
            out["pdl"] = graph_zero if w["pdl"] else detached_zero
            out["ssl"] = graph_zero if w["ssl"] else detached_zero
        out["total"] = (
            out["cls_mid"] + out["cls_final"]
            + w["ism"] * out["ism"] + w["pdl"] * out["pdl"] + w["ssl"] * out["ssl"]
        )
        return out
