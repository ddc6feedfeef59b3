"""The combined CPEWS training loss: classification + ISM + PDL + SSL."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._validate import ShapeError, check_labels, check_option, check_range, check_shape
from wsss_blocks.cpews.ism import ISMLoss
from wsss_blocks.cpews.pdl import PDLLoss
from wsss_blocks.cpews.pool import PrototypePool
from wsss_blocks.cpews.ssl import SSLLoss
from wsss_blocks.cpews.tables import CPEWS_PRESETS

__all__ = ["CPEWSLoss"]


TERMS = ("ism", "pdl", "ssl")


class CPEWSLoss(nn.Module):
    """All CPEWS training losses: ``cls_mid + cls_final + l1 ISM + l2 PDL + l3 SSL``.

    ``cls_*`` is ``multilabel_soft_margin_loss`` of each head branch (ToCo's and CPEWS's
    classification loss), computed in the logits' precision (fp32 under bf16 autocast,
    fp64 for fp64 inputs). ``preset`` picks the weights and the PDL / SSL settings of one
    of the two CPEWS configurations (:data:`CPEWS_PRESETS`): ``"paper"`` (the paper's
    weights 0.12 / 1.5e-4 / 0.2, soft region weights, L2 distance) or ``"official"`` (the
    released code: 0.2 / 0.12 / 1.5e-4, RMS distance with offset 0.1, 0.1 region mask,
    person never suppressed). ``weights`` overrides some or all of the preset's weights and
    nothing else; ``ism`` / ``pdl`` / ``ssl`` replace a sub-loss module. To build the pool
    with the preset's settings too, use :meth:`from_preset`.

    A weight of 0 skips its term (reported as a detached 0). While ``pool.is_built`` is
    false, PDL and SSL are a graph-attached 0; with ``warn_unbuilt=True`` one warning per
    instance says so (pass ``False`` when the pool is built after a warm-up on purpose).
    The pool is a registered submodule, so its prototypes are in this module's
    ``state_dict``. :meth:`weighted_terms` pairs every term with the weight used.

    Args:
        pool: the prototype pool.
        preset: ``"paper"`` or ``"official"``.
        weights: overrides of the preset's weights, keys among ``ism``, ``pdl``, ``ssl``.
        ism: ISM module (default ``ISMLoss()``).
        pdl: PDL module (default: the preset's settings).
        ssl: SSL module (default: the preset's settings).
        warn_unbuilt: warn once when the loss is called before the pool is built.

    Shape:
        - logits_mid, logits_final, labels: ``(B, K)``; tokens_final: ``(B, N, D)`` or
          ``(B, D, h, w)``; cam_final: ``(B, K, h, w)``; token_labels: ``(B, h, w)``
        - output: dict of scalars ``cls_mid, cls_final, ism, pdl, ssl`` (unweighted),
          ``total``

    Example:
        >>> crit = CPEWSLoss(PrototypePool(3, 8), weights={"ssl": 0.1}, warn_unbuilt=False)
        >>> b, k, h, w = 2, 3, 2, 2
        >>> out = crit(logits_mid=torch.randn(b, k), logits_final=torch.randn(b, k),
        ...            tokens_final=torch.randn(b, h * w, 8), cam_final=torch.randn(b, k, h, w),
        ...            token_labels=torch.zeros(b, h, w, dtype=torch.long),
        ...            labels=torch.tensor([[1, 0, 0], [0, 1, 1]]))
        >>> sorted(out), out["pdl"].item()
        (['cls_final', 'cls_mid', 'ism', 'pdl', 'ssl', 'total'], 0.0)
        >>> crit.weights
        {'ism': 0.12, 'pdl': 0.00015, 'ssl': 0.1}
    """

    def __init__(
        self,
        pool: PrototypePool,
        *,
        preset: Literal["paper", "official"] = "paper",
        weights: Mapping[str, float] | None = None,
        ism: ISMLoss | None = None,
        pdl: PDLLoss | None = None,
        ssl: SSLLoss | None = None,
        warn_unbuilt: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(pool, PrototypePool):
            raise TypeError(f"pool: expected a PrototypePool, got {type(pool).__name__}")
        config = CPEWS_PRESETS[check_option("preset", preset, tuple(CPEWS_PRESETS))]
        if isinstance(weights, str) or (weights is not None and not isinstance(weights, Mapping)):
            raise ValueError(
                f"weights: expected None or a mapping with keys among {list(TERMS)}, got {weights!r}"
                " (choose the configuration with preset=...)"
            )
        unknown = sorted(set(weights or {}) - set(TERMS))
        if unknown:
            raise ValueError(f"weights: unknown keys {unknown}; allowed: {list(TERMS)}")
        merged = {**config["loss"], **(weights or {})}
        self.preset = preset
        self.weights = {k: float(check_range(f"weights[{k!r}]", merged[k], 0.0)) for k in TERMS}
        self.pool = pool
        self.ism = ism if ism is not None else ISMLoss()
        self.pdl = pdl if pdl is not None else PDLLoss(**config["pdl"])
        self.ssl = ssl if ssl is not None else SSLLoss(**config["ssl"])
        self.warn_unbuilt = bool(warn_unbuilt)
        self._warned = False

    @classmethod
    def from_preset(
        cls,
        num_classes: int,
        dim: int,
        *,
        preset: Literal["paper", "official"] = "paper",
        weights: Mapping[str, float] | None = None,
        superclasses: Literal["voc", "coco"] | Mapping[str, Sequence[int]] | None = None,
        pool: Mapping[str, Any] | None = None,
        pdl: Mapping[str, Any] | None = None,
        ssl: Mapping[str, Any] | None = None,
        ism: Mapping[str, Any] | None = None,
        warn_unbuilt: bool = True,
        device: torch.device | str | None = None,
    ) -> CPEWSLoss:
        """Build the pool and every sub-loss from a preset, with keyword overrides.

        Args:
            num_classes: ``K``.
            dim: token dimension ``D``.
            preset: ``"paper"`` or ``"official"``.
            weights: overrides of the preset's loss weights.
            superclasses: the pool's superclass table (``"voc"``, ``"coco"``, a partition
                or ``None``).
            pool: overrides of :class:`PrototypePool` keywords (e.g. ``num_prototypes``).
            pdl: overrides of :class:`PDLLoss` keywords.
            ssl: overrides of :class:`SSLLoss` keywords.
            ism: :class:`ISMLoss` keywords.
            warn_unbuilt: see the class.
            device: the pool's buffer device.

        Example:
            >>> crit = CPEWSLoss.from_preset(20, 16, preset="official", superclasses="voc",
            ...                              pool={"num_prototypes": 4}, ssl={"act_threshold": 0.2})
            >>> crit.weights, crit.pool.num_prototypes, crit.pdl.distance, crit.ssl.act_threshold
            ({'ism': 0.2, 'pdl': 0.12, 'ssl': 0.00015}, 4, 'rms', 0.2)
        """
        config = CPEWS_PRESETS[check_option("preset", preset, tuple(CPEWS_PRESETS))]
        built = PrototypePool(num_classes, dim, superclasses=superclasses, device=device,
                              **{**config["pool"], **(pool or {})})
        return cls(
            built, preset=preset, weights=weights, ism=ISMLoss(**(ism or {})),
            pdl=PDLLoss(**{**config["pdl"], **(pdl or {})}),
            ssl=SSLLoss(**{**config["ssl"], **(ssl or {})}),
            warn_unbuilt=warn_unbuilt,
        )

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, weights={self.weights}"

    def weighted_terms(self, out: Mapping[str, Tensor]) -> dict[str, tuple[float, Tensor]]:
        """Each term of a :meth:`forward` output beside the weight it enters ``total`` with.

        Example:
            >>> crit = CPEWSLoss(PrototypePool(1, 2), preset="official")
            >>> out = {k: torch.tensor(1.0) for k in ("cls_mid", "cls_final", "ism", "pdl", "ssl")}
            >>> {k: w for k, (w, _) in crit.weighted_terms(out).items()}
            {'cls_mid': 1.0, 'cls_final': 1.0, 'ism': 0.2, 'pdl': 0.12, 'ssl': 0.00015}
        """
        weights = {"cls_mid": 1.0, "cls_final": 1.0, **self.weights}
        return {k: (w, out[k]) for k, w in weights.items()}

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
        dtype = torch.promote_types(logits_final.dtype, torch.float32)
        target = labels.to(dtype)
        out: dict[str, Tensor] = {
            "cls_mid": F.multilabel_soft_margin_loss(logits_mid.to(dtype), target),
            "cls_final": F.multilabel_soft_margin_loss(logits_final.to(dtype), target),
        }
        detached_zero = torch.zeros((), dtype=dtype, device=cam_final.device)
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
            if self.warn_unbuilt and not self._warned and (w["pdl"] or w["ssl"]):
                warnings.warn(
                    "CPEWSLoss: the prototype pool is not built yet; PDL and SSL are 0 "
                    "(call pool.build(...) after the warm-up)",
                    stacklevel=2,
                )
                self._warned = True
            graph_zero = (cam_final.to(dtype).sum() + tokens_final.to(dtype).sum()) * 0.0 + 0.0  # no -0.0
            out["pdl"] = graph_zero if w["pdl"] else detached_zero
            out["ssl"] = graph_zero if w["ssl"] else detached_zero
        out["total"] = sum(
            (weight * value for weight, value in self.weighted_terms(out).values()),
            torch.zeros((), dtype=dtype, device=cam_final.device),
        )
        return out
