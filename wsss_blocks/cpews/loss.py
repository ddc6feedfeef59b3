"""The combined CPEWS training loss: classification + ISM + PDL + SSL."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_blocks._utils import compute_dtype
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_instance,
    check_labels,
    check_mapping,
    check_option,
    check_range,
    check_shape,
)
from wsss_blocks.cpews.ism import ISMLoss, _ism_inputs
from wsss_blocks.cpews.pdl import PDLLoss
from wsss_blocks.cpews.pool import PrototypePool
from wsss_blocks.cpews.ssl import SSLLoss
from wsss_blocks.cpews.tables import PRESETS
from wsss_blocks.outputs import LossOutput, weighted_total
from wsss_blocks.tokens import features_as_tokens

__all__ = ["CPEWSLoss"]


#: the terms whose weights a preset sets (and ``loss_weights`` overrides)
WEIGHTED = ("ism", "pdl", "ssl")


def _build(name: str, kind: type[nn.Module], overrides: Mapping[str, Any] | None, **base: Any) -> Any:
    """``kind(**base)`` with the keyword ``overrides``; an error about an override names the mapping."""
    if overrides is not None:
        check_mapping(name, overrides)
    try:
        return kind(**{**base, **(overrides or {})})
    except (TypeError, ValueError) as err:
        if not overrides:
            raise
        raise type(err)(f"{name}: {err}") from None


class CPEWSLoss(nn.Module):
    """All CPEWS training losses: ``cls_mid + cls_final + l1 ISM + l2 PDL + l3 SSL``.

    ``cls_*`` is ``multilabel_soft_margin_loss`` of each head branch (ToCo's and CPEWS's
    classification loss), computed in the logits' precision (fp32 under bf16 autocast,
    fp64 for fp64 inputs). ``preset`` picks the weights and the PDL / SSL settings of one
    of the two CPEWS configurations (``PRESETS``): ``"paper"`` (the paper's weights
    0.12 / 1.5e-4 / 0.2, soft region weights, L2 distance) or ``"official"`` (the released
    code: 0.2 / 0.12 / 1.5e-4, RMS distance with offset 0.1, 0.1 region mask, person never
    suppressed). ``loss_weights`` overrides some or all of the preset's weights and nothing
    else; ``ism`` / ``pdl`` / ``ssl`` replace a sub-loss module. To build the pool with the
    preset's settings too, use ``from_preset``.

    ``forward`` returns a ``LossOutput``: ``loss`` (the
    weighted total), ``terms`` (``cls_mid``, ``cls_final``, ``ism``, ``pdl``, ``ssl``,
    unweighted) and ``weights`` (the weight of each; 1 for both classification terms).
    A weight of 0 skips its term (reported as a detached 0). While ``pool.is_built`` is
    false, PDL and SSL are a graph-attached 0; with ``warn_unbuilt=True`` exactly one
    warning per instance says so, whichever term reads the pool (pass ``False`` when the
    pool is built after a warm-up on purpose). The pool is a registered submodule, so its
    prototypes are in this module's ``state_dict``.

    Args:
        pool: the prototype pool.
        preset: ``"paper"`` or ``"official"``.
        loss_weights: overrides of the preset's weights, keys among ``ism``, ``pdl``, ``ssl``.
        ism: ISM module (default ``ISMLoss()``).
        pdl: PDL module (default: the preset's settings).
        ssl: SSL module (default: the preset's settings).
        warn_unbuilt: warn once when the loss is called before the pool is built.

    Shape:
        - logits_mid, logits_final, labels: ``(B, K)``; features_final: ``(B, N, D)`` or
          ``(B, D, h, w)``; cams_final: ``(B, K, h, w)``; masks_mid: ``(B, h, w)``
        - output: ``LossOutput`` of scalars

    Examples:
        >>> crit = CPEWSLoss(PrototypePool(8, 3), loss_weights={"ssl": 0.1}, warn_unbuilt=False)
        >>> b, k, h, w = 2, 3, 2, 2
        >>> out = crit(logits_mid=torch.randn(b, k), logits_final=torch.randn(b, k),
        ...            features_final=torch.randn(b, h * w, 8), cams_final=torch.randn(b, k, h, w),
        ...            masks_mid=torch.zeros(b, h, w, dtype=torch.long),
        ...            labels=torch.tensor([[1, 0, 0], [0, 1, 1]]))
        >>> list(out.terms), out.terms["pdl"].item()
        (['cls_mid', 'cls_final', 'ism', 'pdl', 'ssl'], 0.0)
        >>> out.weights
        {'cls_mid': 1.0, 'cls_final': 1.0, 'ism': 0.12, 'pdl': 0.00015, 'ssl': 0.1}
    """

    def __init__(
        self,
        pool: PrototypePool,
        *,
        preset: Literal["paper", "official"] = "paper",
        loss_weights: Mapping[str, float] | None = None,
        ism: ISMLoss | None = None,
        pdl: PDLLoss | None = None,
        ssl: SSLLoss | None = None,
        warn_unbuilt: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(pool, PrototypePool):
            raise TypeError(f"pool: expected a PrototypePool, got {type(pool).__name__}")
        config = PRESETS[check_option("preset", preset, tuple(PRESETS))]
        if isinstance(loss_weights, str) or (
            loss_weights is not None and not isinstance(loss_weights, Mapping)
        ):
            raise ValueError(
                f"loss_weights: expected None or a mapping with keys among {list(WEIGHTED)}, "
                f"got {loss_weights!r} (choose the configuration with preset=...)"
            )
        unknown = sorted(set(loss_weights or {}) - set(WEIGHTED))
        if unknown:
            raise ValueError(f"loss_weights: unknown keys {unknown}; allowed: {list(WEIGHTED)}")
        merged = {**config["loss_weights"], **(loss_weights or {})}
        self.preset = preset
        self.loss_weights = {
            k: float(check_range(f"loss_weights[{k!r}]", merged[k], 0.0)) for k in WEIGHTED
        }
        self.pool = pool
        self.warn_unbuilt = check_bool("warn_unbuilt", warn_unbuilt)
        for name, value, kind in (("ism", ism, ISMLoss), ("pdl", pdl, PDLLoss), ("ssl", ssl, SSLLoss)):
            if value is not None:
                check_instance(name, value, kind)
        self.ism = ism if ism is not None else ISMLoss()
        self.pdl = pdl if pdl is not None else PDLLoss(**config["pdl"], warn_unbuilt=self.warn_unbuilt)
        self.ssl = ssl if ssl is not None else SSLLoss(**config["ssl"], warn_unbuilt=self.warn_unbuilt)
        self._warned = False

    @classmethod
    def from_preset(
        cls,
        in_dim: int,
        num_classes: int,
        *,
        preset: Literal["paper", "official"],
        loss_weights: Mapping[str, float] | None = None,
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
            in_dim: token dimension ``D``.
            num_classes: ``K``.
            preset: ``"paper"`` or ``"official"``.
            loss_weights: overrides of the preset's loss weights.
            superclasses: the pool's superclass table (``"voc"``, ``"coco"``, a partition
                or ``None``).
            pool: overrides of ``PrototypePool`` keywords (e.g. ``num_prototypes``).
            pdl: overrides of ``PDLLoss`` keywords.
            ssl: overrides of ``SSLLoss`` keywords.
            ism: ``ISMLoss`` keywords.
            warn_unbuilt: see the class; also passed to the PDL and SSL modules.
            device: the pool's buffer device.

        Examples:
            >>> crit = CPEWSLoss.from_preset(16, 20, preset="official", superclasses="voc",
            ...                              pool={"num_prototypes": 4}, ssl={"act_threshold": 0.2})
            >>> crit.loss_weights, crit.pool.num_prototypes, crit.pdl.distance, crit.ssl.act_threshold
            ({'ism': 0.2, 'pdl': 0.12, 'ssl': 0.00015}, 4, 'rms', 0.2)
        """
        config = PRESETS[check_option("preset", preset, tuple(PRESETS))]
        warn_unbuilt = check_bool("warn_unbuilt", warn_unbuilt)
        built = _build("pool", PrototypePool, pool, in_dim=in_dim, num_classes=num_classes,
                       superclasses=superclasses, device=device, **config["pool"])
        return cls(
            built, preset=preset, loss_weights=loss_weights, ism=_build("ism", ISMLoss, ism),
            pdl=_build("pdl", PDLLoss, pdl, **config["pdl"], warn_unbuilt=warn_unbuilt),
            ssl=_build("ssl", SSLLoss, ssl, **config["ssl"], warn_unbuilt=warn_unbuilt),
            warn_unbuilt=warn_unbuilt,
        )

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, loss_weights={self.loss_weights}"

    def forward(
        self,
        *,
        logits_mid: Tensor,
        logits_final: Tensor,
        features_final: Tensor,
        cams_final: Tensor,
        masks_mid: Tensor,
        labels: Tensor,
        valid: Tensor | None = None,
    ) -> LossOutput:
        """Every term and the weighted total (keyword arguments only).

        Args:
            logits_mid: intermediate-branch logits (``CPEWSHead``).
            logits_final: final-branch logits.
            features_final: final tokens (ISM, PDL and the SSL distances).
            cams_final: the live final raw CAMs (PDL regions, SSL values).
            masks_mid: ISM pseudo label maps on the token grid, from the intermediate CAMs
                (padding already ignored).
            labels: multi-hot image labels.
            valid: padding mask for PDL and SSL, any resolution.
        """
        dims = check_shape("cams_final", cams_final, ["B", "K", "h", "w"], dtype="float")
        check_shape("logits_mid", logits_mid, ["B", "K"], dims, dtype="float")
        check_shape("logits_final", logits_final, ["B", "K"], dims, dtype="float")
        check_labels("labels", labels, dims)
        if dims["K"] != self.pool.num_classes:
            raise ShapeError(
                f"cams_final: K={dims['K']} does not match the pool's "
                f"{self.pool.num_classes} classes"
            )
        grid = Dims(dims, sources=getattr(dims, "sources", {}))
        grid["D"], grid.sources["D"] = self.pool.in_dim, "the pool (in_dim)"
        features_as_tokens("features_final", features_final, (dims["h"], dims["w"]), grid, dtype="float")
        _ism_inputs(features_final, masks_mid, self.ism.ignore_index, names=("features_final", "masks_mid"),
                    num_values=dims["K"] + 1)
        dtype = compute_dtype(logits_final)
        target = labels.to(dtype)
        if dims["B"] == 0:  # an empty batch: graph-attached zeros, not the NaN of a mean over nothing
            terms: dict[str, Tensor] = {
                "cls_mid": logits_mid.to(dtype).sum() * 0.0,
                "cls_final": logits_final.to(dtype).sum() * 0.0,
            }
        else:
            terms = {
                "cls_mid": F.multilabel_soft_margin_loss(logits_mid.to(dtype), target),
                "cls_final": F.multilabel_soft_margin_loss(logits_final.to(dtype), target),
            }
        detached_zero = torch.zeros((), dtype=dtype, device=cams_final.device)
        w = self.loss_weights
        terms["ism"] = self.ism(features_final, masks_mid) if w["ism"] else detached_zero
        if self.pool.is_built:
            terms["pdl"] = (
                self.pdl(features_final, cams_final, labels, self.pool, valid=valid)
                if w["pdl"] else detached_zero
            )
            terms["ssl"] = (
                self.ssl(features_final, cams_final, labels, self.pool, valid=valid)
                if w["ssl"] else detached_zero
            )
        else:  # one warning for the whole loss: the sub-losses are not called
            if self.warn_unbuilt and not self._warned and (w["pdl"] or w["ssl"]):
                warnings.warn(
                    "CPEWSLoss: the prototype pool is not built yet; PDL and SSL are 0 "
                    "(call pool.build(...) after the warm-up, or pass warn_unbuilt=False)",
                    stacklevel=2,
                )
                self._warned = True
            graph_zero = (  # + 0.0: no -0.0
                cams_final.to(dtype).sum() + features_final.to(dtype).sum()
            ) * 0.0 + 0.0
            terms["pdl"] = graph_zero if w["pdl"] else detached_zero
            terms["ssl"] = graph_zero if w["ssl"] else detached_zero
        return weighted_total(terms, loss_weights={"cls_mid": 1.0, "cls_final": 1.0, **w})
