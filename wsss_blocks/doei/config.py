"""DOEI hyperparameters (``DOEIConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from wsss_blocks._validate import check_floats, check_int, check_range

__all__ = ["DOEIConfig"]


@dataclass(frozen=True, kw_only=True)
class DOEIConfig:
    """Hyperparameters of DOEI (frozen, keyword-only; build a new one to change a value).

    DOEI has no official code, so there is no ``from_preset``: ``alpha`` is the paper's value,
    every other default is ours (the README's DOEI section lists each choice).

    Args:
        alpha: HFA mixing weight in ``[0, 1]``: ``W <- (1 - alpha) W + alpha G`` (paper: 0.35).
        rgb_sigma: width (> 0) of the Gaussian colour kernel, colours on ``[0, 1]`` (ours).
        st_p2c: PPDO step in ``[0, 1]``: ``t = floor(n (L - 1 - i) st)`` patches (ours).
        af_p2c: PPDO amplification factor, ``>= 0`` (ours).
        sf_p2c: PPDO suppression factor, ``>= 0`` (ours).
        st_c2c: CPDO step in ``[0, 1]`` (ours).
        af_c2c: CPDO amplification factor, ``>= 0`` (ours).
        sf_c2c: CPDO suppression factor, ``>= 0`` (ours).
        use_ppdo: enable the class<->patch branch.
        use_cpdo: enable the class<->class branch.
        use_hfa: mix the RGB / embedding affinity into the scores.
        restrict_to_labels: only rows of present classes are modulated (needs
            ``DOEIHandle.set_labels``).
        head_mean: score on the head-mean attention and add to the attention output;
            ``False`` scores every head and adds to the per-head outputs.
        image_mean: colour mean used to de-normalise the image for HFA's colour affinity.
            ``None`` takes the model's ``pretrained_cfg`` mean, else ImageNet's. Warning:
            for timm ``vit_*`` models ``pretrained_cfg`` says ``(0.5, 0.5, 0.5)``, while
            every dataset of this library normalises with ImageNet statistics: pass the
            statistics your images were normalised with, e.g.
            ``image_mean=wsss_blocks.constants.IMAGENET_MEAN``.
        image_std: colour std, as ``image_mean`` (same warning).
        chunk_rows: query rows per chunk of the fused-mode softmax normaliser, ``>= 1``.

    Examples:
        >>> DOEIConfig(alpha=0.5).alpha
        0.5
        >>> try:
        ...     DOEIConfig(alpha=2.0)
        ... except ValueError as err:
        ...     print(err)
        alpha: expected a value in [0.0, 1.0], got 2.0
    """

    alpha: float = 0.35
    rgb_sigma: float = 0.1
    st_p2c: float = 0.02
    af_p2c: float = 1.0
    sf_p2c: float = 1.0
    st_c2c: float = 0.02
    af_c2c: float = 1.0
    sf_c2c: float = 1.0
    use_ppdo: bool = True
    use_cpdo: bool = True
    use_hfa: bool = True
    restrict_to_labels: bool = False
    head_mean: bool = True
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    chunk_rows: int = 256

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("rgb_sigma", self.rgb_sigma, 0.0, low_inclusive=False)
        for name in ("st_p2c", "st_c2c"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("af_p2c", "sf_p2c", "af_c2c", "sf_c2c"):
            check_range(name, getattr(self, name), 0.0)
        for name in ("use_ppdo", "use_cpdo", "use_hfa", "restrict_to_labels", "head_mean"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if v is None:
                continue
            low = 0.0 if name == "image_std" else None
            object.__setattr__(self, name, check_floats(name, v, length=3, low=low, low_inclusive=False))
        check_int("chunk_rows", self.chunk_rows, low=1)

