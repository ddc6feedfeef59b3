"""The paper and the official-code defaults of SWTformer (``PRESETS``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Literal

from wsss_blocks._validate import check_option

__all__ = ["PRESETS", "Preset"]

Preset = Literal["paper", "official"]

#: Keyword options of ``SWTformerHead`` / ``SWTformer`` in the two configurations.
#: SWTformer released no code, so ``"official"`` is the released code of SIPE (chenqi1126/SIPE)
#: for the parts SWTformer takes from it: the ReLU-cosine structure map of the seeds, and the
#: CLS + GSC objective with weights 1, 1 (SIPE has no CCL, so its weight is 0). ``"paper"``
#: is eq. 4 (absolute cosine) and eq. 7 (CLS + GSC + CCL, weights 1, 1, 1); it equals the
#: constructors' defaults. Every other option is the same in both: the background IoU factor
#: 0.5, the channel-normalised, detached HFF inputs (SIPE's values; the paper states none)
#: and the 1x1 bias-free CAM head.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"similarity": "abs_cos", "loss_weights": {"gsc": 1.0, "ccl": 1.0}},
    "official": {"similarity": "relu_cos", "loss_weights": {"gsc": 1.0, "ccl": 0.0}},
}


def preset_options(preset: str, overrides: Mapping[str, Any], allowed: Collection[str]) -> dict[str, Any]:
    """The keyword options of ``preset`` with ``overrides`` on top (``loss_weights`` merged by key).

    Raises:
        ValueError: an unknown preset, or an override that is not one of ``allowed``.
    """
    config = PRESETS[check_option("preset", preset, tuple(PRESETS))]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"from_preset: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    out = {**config, **overrides}
    weights = overrides.get("loss_weights")
    if isinstance(weights, Mapping):
        out["loss_weights"] = {**config["loss_weights"], **weights}
    return out
