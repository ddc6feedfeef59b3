"""The ViT-PCM model: timm ViT backbone -> [HV-BiLSTM] -> GMP patch classifier, and its training step."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from wsss_blocks._utils import empty_batch, to_model_dtype
from wsss_blocks._validate import ShapeError, check_bool, check_int, check_option, check_range, check_shape
from wsss_blocks.adapters import vit_adapter
from wsss_blocks.outputs import LossOutput, weighted_total
from wsss_blocks.pcm._common import BACKGROUNDS, Background
from wsss_blocks.pcm.classifier import PatchClassifier, PCMOutput
from wsss_blocks.pcm.dihedral import dihedral_transform, random_dihedral_codes
from wsss_blocks.pcm.equivariance import TargetNorm, et_loss
from wsss_blocks.pcm.hv_bilstm import HVBiLSTM
from wsss_blocks.pcm.mce import mce_loss
from wsss_blocks.pcm.presets import PRESETS
from wsss_blocks.pcm.tiling import mosaic, unmosaic
from wsss_blocks.tokens import features_as_grid, tokens_to_grid, vit_taps
from wsss_blocks.utils import eval_mode

__all__ = ["ViTPCM"]

#: The weight of each term of ``ViTPCM.training_losses`` (official: all 1).
LOSS_WEIGHTS = {"mce": 1.0, "et": 1.0, "l2": 1.0}


def _backbone_dim(backbone: Any) -> int:
    """``D`` of a timm ViT: its ``num_features`` (else ``embed_dim``)."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone: expected an nn.Module (a timm ViT), got {type(backbone).__name__}")
    if not callable(getattr(backbone, "forward_features", None)):
        raise TypeError(f"backbone: expected a timm ViT with forward_features, got {type(backbone).__name__}")
    try:  # a ViT: token taps read its blocks (a Swin or a CNN has none; use PatchClassifier on its map)
        vit_adapter(backbone).blocks(backbone)
    except TypeError as err:
        raise TypeError(
            f"backbone: {str(err).removeprefix('model: ')}; on another backbone compose HVBiLSTM and "
            "PatchClassifier on its feature map"
        ) from None
    for name in ("num_features", "embed_dim"):
        dim = getattr(backbone, name, None)
        if isinstance(dim, int) and not isinstance(dim, bool):
            return check_int(f"backbone.{name}", dim, low=1)
    raise ValueError(f"backbone: {type(backbone).__name__} has no integer num_features or embed_dim")


def _check_crop(crop: Any) -> int | tuple[int, int]:
    if isinstance(crop, Sequence) and not isinstance(crop, str):
        if len(crop) != 2:
            raise ValueError(f"crop: expected an int or a pair (ch, cw), got {crop!r}")
        return check_int("crop[0]", crop[0], low=1), check_int("crop[1]", crop[1], low=1)
    return check_int("crop", crop, low=1)


class ViTPCM(nn.Module):
    """ViT-PCM (ECCV 2022): patch-class mapping on top of a ViT, trained with MCE + ET + L2.

    ``features`` (final-norm patch tokens as a grid) -> optional ``HVBiLSTM`` ->
    ``PatchClassifier`` over ``K + 1`` classes (background 0) with per-patch softmax and
    global max pooling. ``training_losses`` runs the official training step.
    ``from_preset`` builds it with the paper's or the official code's values
    (``PRESETS``); without a preset the defaults are the code's except
    ``align_corners=False``. For a loop that owns the backbone, compose ``HVBiLSTM`` and
    ``PatchClassifier`` on its features instead.

    Args:
        backbone: a ViT read through ``wsss_blocks.adapters`` (a timm ViT, or a copy of its
            layout: ``forward_features``, ``patch_embed``, ``blocks``, ``norm``);
            ``D`` is read from its ``num_features`` (or ``embed_dim``). Build it with
            ``num_classes=0`` and ``dynamic_img_size=True`` to run at any multiple of the patch
            size (official: train at 384, infer at 960).
        num_classes: foreground classes ``K``.
        hv_lstm: use the HV-BiLSTM (paper: on).
        hidden_dim: HV-BiLSTM hidden size (``None``: ``D // 4``).
        dropout: HV-BiLSTM and classifier dropout (official 0.2).
        keras_init: Keras initialisation of the LSTMs.
        with_background: the classifier's background channel 0.
        bias: classifier bias.
        init_std: classifier init std.
        l2: classifier L2 coefficient.
        background: ``training_losses``'s default background policy (see ``mce_loss``).
        target_norm: the ET target normalisation of ``training_losses`` (see ``et_loss``).
        crop_prob: ``training_losses``'s default crop probability (see ``mosaic``).
        crop: ``training_losses``'s default crop size in pixels.
        scale: ``training_losses``'s default tile scale.
        align_corners: the resize convention of the mosaic and the teacher warp in
            ``training_losses`` (official ``True``).
        device: device of the heads' parameters (the backbone stays where it is).
        dtype: dtype of the heads' parameters.

    Shape:
        - images: ``(B, 3, H, W)`` with ``H, W`` multiples of the patch size ``p``
        - output: ``PCMOutput`` on the ``(H/p, W/p)`` grid with ``C = K + 1``

    Examples:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1,
        ...                         dynamic_img_size=True)
        >>> model = ViTPCM(vit, 2).eval()
        >>> model(torch.randn(2, 3, 48, 32)).probs.shape
        torch.Size([2, 3, 3, 2])
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, hv_lstm: bool = True, hidden_dim: int | None = None,
                 dropout: float = 0.2, keras_init: bool = True, with_background: bool = True, bias: bool = False,
                 init_std: float | None = 0.05, l2: float = 0.01, background: Background = "always_one",
                 target_norm: TargetNorm = "tile", crop_prob: float = 0.3, crop: int | tuple[int, int] = 128,
                 scale: float = 0.5, align_corners: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = _backbone_dim(backbone)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.background: Background = check_option("background", background, BACKGROUNDS)
        self.target_norm: TargetNorm = check_option("target_norm", target_norm, ("tile", "image"))
        self.crop_prob = float(check_range("crop_prob", crop_prob, 0.0, 1.0))
        self.crop = _check_crop(crop)
        self.scale = float(check_range("scale", scale, 0.0, low_inclusive=False))
        self.align_corners = check_bool("align_corners", align_corners)
        check_bool("keras_init", keras_init)
        self.backbone = backbone
        self.hv: HVBiLSTM | None = None
        dim = self.in_dim
        if check_bool("hv_lstm", hv_lstm):
            self.hv = HVBiLSTM(self.in_dim, hidden_dim=hidden_dim, dropout=dropout, keras_init=keras_init,
                               device=device, dtype=dtype)
            dim = self.hv.out_dim
        self.classifier = PatchClassifier(dim, self.num_classes, with_background=with_background, bias=bias,
                                          dropout=dropout, init_std=init_std, l2=l2, device=device, dtype=dtype)

    @classmethod
    def from_preset(cls, backbone: nn.Module, num_classes: int, *, preset: Literal["paper", "official"],
                    **overrides: Any) -> ViTPCM:
        """Build with the paper's or the official code's values (``PRESETS``), single values overridden.

        Args:
            backbone: see the class.
            num_classes: see the class.
            preset: ``"paper"`` or ``"official"``.
            **overrides: keyword arguments of the class that replace the preset's (e.g.
                ``crop=16``, ``hv_lstm=False``, ``device=...``).

        Raises:
            ValueError: an unknown preset, or an override that is not a keyword of the class.

        Examples:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1,
            ...                         dynamic_img_size=True)
            >>> m = ViTPCM.from_preset(vit, 2, preset="paper", crop=16)
            >>> m.classifier.l2, m.classifier.init_std, m.crop, m.align_corners
            (0.1, 1.0, 16, True)
        """
        config = PRESETS[check_option("preset", preset, tuple(PRESETS))]
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"overrides: unknown option(s) {unknown} for ViTPCM.from_preset; "
                             f"expected keywords of ViTPCM: {sorted(_OPTIONS)}")
        return cls(backbone, num_classes, **{**config, **overrides})

    @property
    def patch_size(self) -> int:
        """The backbone's (square) patch size ``p``."""
        p = getattr(self.backbone, "patch_embed").patch_size
        p = p if isinstance(p, int) else p[0]
        return int(p)

    def features(self, images: Tensor) -> Tensor:
        """Final-norm patch tokens of the backbone as a grid ``(B, D, H/p, W/p)`` (prefix tokens dropped).

        Args:
            images: ``(B, 3, H, W)``, ``H`` and ``W`` multiples of the patch size (exactly the
                backbone's ``img_size`` unless it was built with ``dynamic_img_size=True``);
                cast to the backbone's dtype.
        """
        bb: Any = self.backbone
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        images = to_model_dtype(bb, images)

        def run(x: Tensor) -> Tensor:
            taps = vit_taps(bb, x, layers=())
            return tokens_to_grid(taps.final, taps.size)

        return run(images) if dims["B"] else empty_batch(bb, run, images)

    def head(self, features: Tensor, *, size: tuple[int, int] | None = None) -> PCMOutput:
        """[HV-BiLSTM] then the patch classifier on a feature map, or on tokens with ``size``.

        Args:
            features: a feature map (``features``), or the backbone's patch tokens (prefix
                tokens removed) with ``size``.
            size: the grid ``(h, w)`` of token input, e.g. ``tokens.patch_grid`` (a map brings
                its own; a ``size`` that disagrees with it is an error).

        Shape:
            - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
            - output: ``PCMOutput`` on the ``(h, w)`` grid

        Returns:
            ``PCMOutput``; tokens give exactly the result of their ``tokens_to_grid`` map.

        Raises:
            ShapeError: a wrong shape, or tokens without ``size``.
        """
        x = features_as_grid("features", features, size, channels=self.in_dim, dtype="float")
        if self.hv is not None:
            x = self.hv(x)
        return self.classifier(x)

    def forward(self, images: Tensor) -> PCMOutput:
        """Patch logits, probabilities and GMP probabilities of images ``(B, 3, H, W)``."""
        return self.head(self.features(images))

    def teacher(self, images: Tensor) -> PCMOutput:
        """The ET teacher: ``forward`` without gradient and without any dropout.

        Every submodule's ``training`` flag is saved, set to eval and restored afterwards
        (``wsss_blocks.utils.eval_mode``), so a partly frozen model keeps its mixed modes.

        Args:
            images: ``(B, 3, H, W)``.
        """
        with eval_mode(self), torch.no_grad():
            return self(images)

    def l2_penalty(self) -> Tensor:
        """The classifier's ``l2 · ΣW²``."""
        return self.classifier.l2_penalty()

    def set_backbone_trainable(self, *, num_blocks: int) -> list[nn.Parameter]:
        """Freeze the backbone except its last ``num_blocks`` blocks and final norm.

        ``0``: backbone frozen (official warm-up); ``n > 0``: last ``n`` blocks + final norm
        (official phase 2: 5; the paper: 4); ``-1``: everything. The heads stay trainable.

        Args:
            num_blocks: how many of the last blocks train (``-1``: all of the backbone).

        Returns:
            the trainable parameters (for a fresh optimiser, as the official phase change).

        Examples:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
            >>> m = ViTPCM(vit, 2)
            >>> n = len(m.set_backbone_trainable(num_blocks=0))
            >>> n == len(list(m.hv.parameters())) + len(list(m.classifier.parameters()))
            True
        """
        bb: Any = self.backbone
        blocks = list(bb.blocks)
        n = check_int("num_blocks", num_blocks, low=-1, high=len(blocks))
        for p in bb.parameters():
            p.requires_grad_(n == -1)
        if n > 0:
            for block in blocks[len(blocks) - n:]:
                block.requires_grad_(True)
            norm = getattr(bb, "norm", None)
            if isinstance(norm, nn.Module):
                norm.requires_grad_(True)
        for m in (self.hv, self.classifier):
            if m is not None:
                m.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def training_losses(self, images: Tensor, labels: Tensor, *, images_et: Tensor | None = None,
                        background: Background | None = None, use_et: bool = True, crop_prob: float | None = None,
                        crop: int | tuple[int, int] | None = None, scale: float | None = None,
                        generator: torch.Generator | None = None, shared_teacher: bool = False) -> LossOutput:
        """One official ViT-PCM training step's losses: terms ``mce``, ``et``, ``l2``, weights 1.

        Random codes ``c1``; ``x1 = dihedral_transform(images, c1)``; teacher =
        ``teacher`` on ``x1`` (no grad, no dropout); MCE on ``self(x1)`` (dropout on);
        mosaic of ``images_et`` (or ``images``, un-flipped, own codes and crops) -> student
        -> ``et_loss`` against the teacher (with the module's ``target_norm`` and
        ``align_corners``). Weights 1 (official). ``None`` options take the module's values.

        The teacher and the MCE branch see the same ``x1``. With ``shared_teacher=True`` the
        backbone runs once: the teacher is ``head`` in eval mode, without gradient, on the
        MCE branch's detached features. That is the same teacher (and the same losses and
        gradients) as the separate pass exactly when the backbone computes the same in train and
        eval mode (no active dropout, drop path or batch norm), and saves one backbone forward
        per step (about a fifth of the step). The default is the separate pass (official).

        Args:
            images: branch-1 images.
            labels: image labels (see ``mce_loss``).
            images_et: branch-2 images (e.g. with their own colour jitter); default ``images``.
            background: see ``mce_loss``; ``None``: the module's ``background``.
            use_et: add the equivariance loss (needs ``B`` divisible by 4); without it the
                ``et`` term is a detached 0.
            crop_prob: see ``mosaic``; ``None``: the module's.
            crop: see ``mosaic``; ``None``: the module's.
            scale: see ``mosaic``; ``None``: the module's.
            generator: random generator on the images' device.
            shared_teacher: reuse the MCE branch's backbone pass for the teacher (see above).

        Shape:
            - images: ``(B, 3, H, W)``; labels: ``(B, K)`` (``(B, K+1)`` for ``"from_labels"``)
            - output: ``LossOutput`` of scalars

        Examples:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1)
            >>> m = ViTPCM(vit, 2, crop=16)
            >>> out = m.training_losses(torch.randn(4, 3, 32, 32), torch.tensor([[1, 0]] * 4))
            >>> list(out.terms), out.weights["et"]
            (['mce', 'et', 'l2'], 1.0)
        """
        background = self.background if background is None else background
        crop_prob = self.crop_prob if crop_prob is None else crop_prob
        crop = self.crop if crop is None else crop
        scale = self.scale if scale is None else scale
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        use_et = check_bool("use_et", use_et)
        shared_teacher = check_bool("shared_teacher", shared_teacher)
        if use_et and dims["B"] % 4:
            raise ShapeError(f"images: batch must be divisible by 4 for the ET mosaic, got B={dims['B']}")
        if images_et is not None:
            check_shape("images_et", images_et, ["B", 3, "H", "W"], dims, dtype="float")
        codes = random_dihedral_codes(batch_size=dims["B"], square=dims["H"] == dims["W"], device=images.device,
                                      generator=generator)
        x1 = dihedral_transform(images, codes)
        teacher: PCMOutput | None = None
        if shared_teacher:
            feats = self.features(x1)
            if use_et:
                with eval_mode(self), torch.no_grad():
                    teacher = self.head(feats.detach())
            out = self.head(feats)
        else:
            teacher = self.teacher(x1) if use_et else None
            out = self(x1)
        mce = mce_loss(out.pooled_probs, labels, background=background)
        if teacher is not None:
            tiles, record = mosaic(images if images_et is None else images_et, crop_prob=crop_prob, crop=crop,
                                   scale=scale, patch_size=self.patch_size, align_corners=self.align_corners,
                                   generator=generator)
            student = unmosaic(self(tiles).probs)
            et = et_loss(student, teacher.probs, labels, record, teacher_codes=codes, background=background,
                         target_norm=self.target_norm)
        else:
            et = mce.new_zeros(())
        return weighted_total({"mce": mce, "et": et, "l2": self.l2_penalty()}, loss_weights=LOSS_WEIGHTS)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, background={self.background!r}, "
                f"target_norm={self.target_norm!r}, crop_prob={self.crop_prob}, crop={self.crop}, "
                f"scale={self.scale}, align_corners={self.align_corners}")


#: The keywords ``ViTPCM.from_preset`` accepts as overrides.
_OPTIONS = tuple(p.name for p in inspect.signature(ViTPCM.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY)
