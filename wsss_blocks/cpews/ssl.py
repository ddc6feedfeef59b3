"""CPEWS Superclass Suppression Loss (SSL, paper eq. 10-12): function and module."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from wsss_blocks._utils import compute_dtype, no_autocast
from wsss_blocks._validate import check_bool, check_instance, check_labels, check_option, check_range, check_shape
from wsss_blocks.cam import normalize_cam, valid_to_grid
from wsss_blocks.cpews._slots import PoolLoss, check_prototypes, class_slots, per_slot, take_slots
from wsss_blocks.cpews.pool import PrototypePool
from wsss_blocks.tokens import features_as_tokens

__all__ = ["ssl_loss", "SSLLoss"]


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
    dtype = compute_dtype(tokens)
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
    tokens: Tensor, cams: Tensor, present: Tensor, slots: Tensor | None, pos: Tensor,
    pos_valid: Tensor, neg: Tensor, neg_keep: Tensor, act_threshold: float | None,
    valid: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``(Phi, gate)`` ``(B, S, N)`` bool of SSL (no grad) for the slots' CAMs ``(B, S, h, w)``:
    ``gate`` = present (with a valid positive) & activated & valid, ``Phi`` = ``gate & (D- < D+)``."""
    protos = torch.cat([per_slot(pos, slots), per_slot(neg, slots)], -2)  # (K | B S, M+M', D)
    ok = torch.cat([per_slot(pos_valid, slots), per_slot(neg_keep, slots)], -1)
    with no_autocast(tokens.device.type):
        closer = _closer_to_negative(tokens, protos, ok, pos_valid.shape[1])
        gate = (present & per_slot(pos_valid.any(1), slots))[..., None].expand_as(closer)
        if act_threshold is not None:
            gate = gate & (normalize_cam(cams.detach(), mode="max").flatten(2) > act_threshold)
        if valid is not None:
            gate = gate & valid_to_grid(valid, (cams.shape[-2], cams.shape[-1])).flatten(1)[:, None]
    return closer & gate, gate


def ssl_loss(
    features: Tensor,
    cams: Tensor,
    labels: Tensor,
    pos: Tensor,
    pos_valid: Tensor,
    neg: Tensor,
    neg_keep: Tensor,
    *,
    act_threshold: float | None = 0.1,
    cam_activation: Literal["relu", "none"] = "relu",
    cam_scale: Literal["raw", "max"] = "raw",
    denominator: Literal["phi", "gate"] = "phi",
    valid: Tensor | None = None,
    compact: bool | None = None,
) -> Tensor:
    """Superclass Suppression Loss (CPEWS eq. 10-12), differentiable into the CAM.

    Under ``no_grad``: squared distances of every token to the prototypes
    (``||f||^2 + ||p||^2 - 2 f.p``, fp32); ``D+`` = min over the class's valid positives,
    ``D-`` = min over its kept negatives (``neg_keep``, e.g.
    ``PrototypePool.suppression_mask``; none kept -> never suppressed). The set
    ``Phi = present & activated & valid & (D- < D+)``, with "activated" =
    ``relu(cams)/max > act_threshold`` (``None``: every token) and classes without a
    valid positive prototype left out (the official code differs: there ``D+`` is a large
    constant, so every activated token of a present class without positives is in ``Phi``
    as soon as the class has a kept negative). Then ``L = sum_Phi g(cams) / max(|Phi|, 1)``,
    ``g = relu`` or identity. Unlike the official code (which detaches the CAM, so its
    SSL trains nothing) the gradient reaches the classifier that made ``cams`` and the
    tokens. Note: the paper's weight 0.2 on raw CAM logits is ~1300x the official 1.5e-4.

    The defaults here are the paper's form. Measured failure of that form
    (``benchmarks/ssl_mechanism.py``): when classes that share appearance sit in different
    superclasses, the kept negatives of a class are its look-alike partner's body, ``Phi``
    takes in the class's *own* object (19 % of its activated object tokens, vs 0.3 % when the
    table follows appearance), and the ``1 / |Phi|`` mean pushes each remaining token harder
    as ``Phi`` shrinks (SSL's gradient is 2-5x the classification term's at the pool build),
    so CAMs collapse to the discriminative parts. Scaling (``cam_scale="max"``, a smaller
    weight) only slows this; ``denominator="gate"`` bounds the push, and
    ``PrototypePool.suppression_mask`` with ``source_share`` (via ``SSLLoss``) drops
    the look-alike negatives. The ``cpews`` trainer recipe uses both by default.

    Args:
        features: final tokens on the CAMs' grid (only used, detached, for ``Phi``).
        cams: the live final raw CAMs (with grad).
        labels: multi-hot image labels.
        pos: positive prototypes.
        pos_valid: valid positives.
        neg: negative prototypes.
        neg_keep: negatives used for suppression.
        act_threshold: activation threshold on the max-normalised CAM (official 0.1).
        cam_activation: ``"relu"`` or ``"none"`` (equal unless ``act_threshold=None``).
        cam_scale: ``"raw"`` (paper, eq. 12: the CAM logits) or ``"max"``: ``g(cams)`` divided
            by the **detached** per-(image, class) maximum of ``relu(cams)`` (+1e-5), so every
            suppressed value is in ``[0, 1]`` and the gradient no longer grows with the
            CAM's scale (the same direction, ``1 / max`` times the raw gradient).
        denominator: the count that divides the sum: ``"phi"`` (paper, eq. 12: ``|Phi|``) or
            ``"gate"``: the number of tokens that pass every condition but the distance test
            (present class with a positive, activated, valid). With ``"phi"`` the push on each
            suppressed token grows as ``Phi`` shrinks (``1 / |Phi|``), so the loss keeps its full
            strength until no token is left; with ``"gate"`` it is proportional to the share
            of activated tokens that look like a negative.
        valid: padding mask at any resolution.
        compact: ``True`` / ``False`` force the compact / dense path; ``None`` (default)
            picks compact for CPU tensors and dense otherwise.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``; labels ``(B, K)``
        - pos: ``(K, M, D)``; pos_valid: ``(K, M)``; neg: ``(K, M', D)``; neg_keep: ``(K, M')``
        - output: scalar fp32

    Note:
        Two paths, same values and gradients (up to float rounding): **dense** measures every
        token against the prototypes of all ``K`` classes with one matmul
        ``(B*N, D) x (D, K*(M+M'))`` and never syncs the host (right on accelerators);
        **compact** reads the largest number ``S`` of present classes per image on the host
        (one sync: free on CPU) and measures each image's tokens against the prototypes of
        its present classes only, one ``bmm`` ``(B, N, D) x (B, D, S*(M+M'))``: ``K/S`` times
        fewer FLOPs (~10x VOC, ~40x COCO). ``compact=None`` picks compact for CPU tensors.

    Examples:
        >>> feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
        >>> cams = torch.tensor([[[[2.0, 1.0, 0.1]]]], requires_grad=True)
        >>> ok = torch.ones(1, 1, dtype=torch.bool)
        >>> loss = ssl_loss(feats, cams, torch.ones(1, 1), torch.tensor([[[1.0, 0.0]]]), ok,
        ...                 torch.tensor([[[0.0, 1.0]]]), ok)
        >>> loss.backward(); loss.item(), cams.grad.flatten().tolist()
        (2.0, [1.0, 0.0, 0.0])
    """
    dims = check_shape("cams", cams, ["B", "K", "h", "w"], dtype="float")
    check_labels("labels", labels, dims)
    size = (dims["h"], dims["w"])
    tokens = features_as_tokens("features", features, size, dims)
    check_prototypes(dims, pos, pos_valid, neg, neg_keep, "neg_keep")
    check_option("cam_activation", cam_activation, ("relu", "none"))
    check_option("cam_scale", cam_scale, ("raw", "max"))
    check_option("denominator", denominator, ("phi", "gate"))
    if act_threshold is not None:
        check_range("act_threshold", act_threshold, 0.0, 1.0, high_inclusive=False)
    if valid is not None:
        check_shape("valid", valid, ["B", "H_valid", "W_valid"], dims, dtype="bool")
    slots = class_slots(labels, compact)
    cams = take_slots(cams, slots)  # (B, S, h, w), live
    present = take_slots(labels, slots) != 0
    phi, gate = _suppression_set(
        tokens, cams, present, slots, pos, pos_valid, neg, neg_keep, act_threshold, valid
    )
    with no_autocast(cams.device.type):
        g = cams.flatten(2).to(compute_dtype(cams))
        if cam_scale == "max":
            peak = g.detach().relu().amax(-1, keepdim=True)
        if cam_activation == "relu":
            g = g.relu()
        if cam_scale == "max":
            g = g / (peak + 1e-5)
        phif = phi.to(g.dtype)
        count = phif.sum() if denominator == "phi" else gate.sum().to(g.dtype)
        return (phif * g).sum() / count.clamp_min(1.0)


class SSLLoss(PoolLoss):
    """Module form of ``ssl_loss`` with the pool's superclass filter.

    ``forward`` takes the pool instead of the prototype tensors of ``ssl_loss``: it reads
    the prototypes and builds ``neg_keep`` with ``PrototypePool.suppression_mask``
    (which needs the pool's negative labels and superclass table) at every call. While
    ``pool.is_built`` is false the loss is a graph-attached 0; ``warn_unbuilt=True`` warns
    once per instance.

    Args:
        suppress_singletons: passed to ``PrototypePool.suppression_mask`` (paper:
            ``True``; official: ``False``, person never suppressed).
        act_threshold: see ``ssl_loss``.
        cam_activation: see ``ssl_loss``.
        cam_scale: see ``ssl_loss`` (``"raw"``: the paper's form).
        denominator: see ``ssl_loss`` (``"phi"``: the paper's form).
        source_share: passed to ``PrototypePool.suppression_mask`` (``None``: the
            superclass table only, the paper's form).
        compact: see ``ssl_loss`` (``None``: compact on CPU, dense elsewhere).
        warn_unbuilt: warn once when called before the pool is built.

    Shape:
        - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``; labels ``(B, K)``
        - output: scalar

    Examples:
        >>> pool = PrototypePool(2, 1, num_prototypes=1)
        >>> _ = pool.pos.copy_(torch.tensor([[[1.0, 0.0]]])), pool.pos_valid.fill_(True)
        >>> _ = pool.neg.copy_(torch.tensor([[[0.0, 1.0]]])), pool.neg_valid.fill_(True)
        >>> feats = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [0.0, 3.0]]])
        >>> cams = torch.tensor([[[[2.0, 1.0, 0.1]]]])
        >>> SSLLoss()(feats, cams, torch.ones(1, 1), pool).item()
        2.0
    """

    def __init__(
        self,
        *,
        suppress_singletons: bool = True,
        act_threshold: float | None = 0.1,
        cam_activation: Literal["relu", "none"] = "relu",
        cam_scale: Literal["raw", "max"] = "raw",
        denominator: Literal["phi", "gate"] = "phi",
        source_share: float | None = None,
        compact: bool | None = None,
        warn_unbuilt: bool = True,
    ) -> None:
        super().__init__(warn_unbuilt=warn_unbuilt)
        self.suppress_singletons = check_bool("suppress_singletons", suppress_singletons)
        self.compact = None if compact is None else check_bool("compact", compact)
        if act_threshold is not None:
            check_range("act_threshold", act_threshold, 0.0, 1.0, high_inclusive=False)
        self.act_threshold = act_threshold
        self.cam_activation = check_option("cam_activation", cam_activation, ("relu", "none"))
        self.cam_scale = check_option("cam_scale", cam_scale, ("raw", "max"))
        self.denominator = check_option("denominator", denominator, ("phi", "gate"))
        if source_share is not None:
            check_range("source_share", source_share, 0.0, 1.0, low_inclusive=False)
        self.source_share = source_share

    def extra_repr(self) -> str:
        return (
            f"suppress_singletons={self.suppress_singletons}, act_threshold={self.act_threshold},"
            f" cam_activation={self.cam_activation!r}, cam_scale={self.cam_scale!r},"
            f" denominator={self.denominator!r}, source_share={self.source_share},"
            f" compact={self.compact}, warn_unbuilt={self.warn_unbuilt}"
        )

    def forward(
        self, features: Tensor, cams: Tensor, labels: Tensor, pool: PrototypePool, *,
        valid: Tensor | None = None,
    ) -> Tensor:
        """SSL of the live ``cams`` with the pool's filtered negatives (see ``ssl_loss``).

        Args:
            features: final tokens on the CAMs' grid.
            cams: the live final raw CAMs.
            labels: multi-hot image labels.
            pool: the prototype pool (a graph-attached 0 while it is unbuilt).
            valid: padding mask at any resolution.
        """
        check_instance("pool", pool, PrototypePool)
        if not pool.is_built:
            return self._unbuilt_zero(features, cams)
        neg_keep = pool.suppression_mask(
            suppress_singletons=self.suppress_singletons, source_share=self.source_share
        )
        return ssl_loss(
            features, cams, labels, pool.pos, pool.pos_valid, pool.neg, neg_keep,
            act_threshold=self.act_threshold,
            cam_activation=self.cam_activation,
            cam_scale=self.cam_scale,
            denominator=self.denominator,
            valid=valid,
            compact=self.compact,
        )
