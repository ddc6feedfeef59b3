"""The ViT-PCM model: timm ViT backbone -> [HV-BiLSTM] -> GMP patch classifier, and its training step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsss_blocks._validate import ShapeError, check_int, check_shape
from wsss_blocks.pcm.geometry import dihedral_transform, mosaic, random_dihedral_codes, unmosaic
from wsss_blocks.pcm.head import HVBiLSTM, PatchClassifier, PCMOutput
from wsss_blocks.pcm.losses import Background, et_loss, mce_loss
from wsss_blocks.tokens import patch_grid, split_prefix_tokens, tokens_to_grid
from wsss_blocks.utils import eval_mode

__all__ = ["ViTPCM"]


class ViTPCM(nn.Module):
    """ViT-PCM (ECCV 2022): patch-class mapping on top of a ViT, trained with MCE + ET + L2.

    ``features`` (final-norm patch tokens as a grid) -> optional :class:`HVBiLSTM` ->
    :class:`PatchClassifier` over ``K + 1`` classes (background 0) with per-patch softmax and
    global max pooling. :meth:`training_losses` runs the official training step.

    Args:
        in_dim: backbone embedding dim ``D``.
        num_classes: foreground classes ``K``.
        backbone: an owned timm ViT (``forward`` then takes images), or ``None`` (``forward``
            takes feature maps).
        hv_lstm: use the HV-BiLSTM (paper: on).
        hidden: HV-BiLSTM hidden size (``None``: ``D // 4``).
        dropout: HV-BiLSTM and classifier dropout (official 0.2).
        keras_init: Keras initialisation of the LSTMs.
        background: classifier background channel.
        bias: classifier bias.
        init_std: classifier init std.
        l2: classifier L2 coefficient.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: ``(B, 3, H, W)`` images (owned backbone) or ``(B, D, h, w)`` features
        - output: :class:`PCMOutput` with ``C = K + 1``

    Example:
        >>> model = ViTPCM(8, 2).eval()
        >>> model(torch.randn(2, 8, 3, 4)).probs.shape
        torch.Size([2, 3, 3, 4])
    """

    def __init__(self, in_dim: int, num_classes: int, *, backbone: nn.Module | None = None, hv_lstm: bool = True,
                 hidden: int | None = None, dropout: float = 0.2, keras_init: bool = True,
                 background: bool = True, bias: bool = False, init_std: float | None = 0.05, l2: float = 0.01,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.backbone = backbone
        self.hv: HVBiLSTM | None = None
        dim = self.in_dim
        if hv_lstm:
            self.hv = HVBiLSTM(self.in_dim, hidden, dropout, keras_init=keras_init, device=device, dtype=dtype)
            dim = self.hv.out_dim
        self.classifier = PatchClassifier(dim, self.num_classes, background, bias, dropout=dropout,
                                          init_std=init_std, l2=l2, device=device, dtype=dtype)

    @classmethod
    def from_timm(cls, model_name: str, num_classes: int, *, pretrained: bool = False, img_size: int = 384,
                  timm_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> ViTPCM:
        """Build with an owned timm ViT (``num_classes=0``, ``dynamic_img_size=True``).

        Train at ``img_size`` (official 384, a 24×24 grid); any other multiple of the patch
        size works at inference (official 960, timm resamples the position embeddings).

        Example:
            >>> m = ViTPCM.from_timm("vit_tiny_patch16_224", 3, img_size=32, timm_kwargs={"depth": 1})
            >>> m.eval()(torch.randn(1, 3, 48, 32)).probs.shape
            torch.Size([1, 4, 3, 2])
        """
        import timm

        backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, img_size=img_size,
                                     dynamic_img_size=True, **(timm_kwargs or {}))
        dim: Any = backbone.embed_dim
        return cls(int(dim), num_classes, backbone=backbone, **kwargs)

    @property
    def patch_size(self) -> int:
        """The backbone's (square) patch size ``p``."""
        p = self._backbone().patch_embed.patch_size
        p = p if isinstance(p, int) else p[0]
        return int(p)

    def _backbone(self) -> Any:
        if self.backbone is None:
            raise ValueError("this ViTPCM owns no backbone; pass feature maps to forward/head")
        return self.backbone

    def features(self, images: Tensor) -> Tensor:
        """Final-norm patch tokens of the backbone as a grid ``(B, D, H/p, W/p)`` (prefix tokens dropped)."""
        bb = self._backbone()
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        tokens = bb.forward_features(images)
        _, patches = split_prefix_tokens(tokens, int(getattr(bb, "num_prefix_tokens", 1)))
        return tokens_to_grid(patches, patch_grid(bb, (dims["H"], dims["W"])))

    def head(self, feats: Tensor) -> PCMOutput:
        """[HV-BiLSTM] then the patch classifier on a feature map ``(B, D, h, w)``."""
        x = feats if self.hv is None else self.hv(feats)
        return self.classifier(x)

    def forward(self, x: Tensor) -> PCMOutput:
        """Images through the owned backbone, else a feature map straight to :meth:`head`."""
        return self.head(self.features(x) if self.backbone is not None else x)

    def teacher(self, x: Tensor) -> PCMOutput:
        """The ET teacher: ``forward`` without gradient and without any dropout.

        Every submodule's ``training`` flag is saved, set to eval and restored afterwards
        (:func:`wsss_blocks.utils.eval_mode`), so a partly frozen model keeps its mixed modes.
        """
        with eval_mode(self), torch.no_grad():
            return self(x)

    def l2_penalty(self) -> Tensor:
        """The classifier's ``l2 · ΣW²``."""
        return self.classifier.l2_penalty()

    def set_backbone_trainable(self, num_blocks: int) -> list[nn.Parameter]:
        """Freeze the backbone except its last ``num_blocks`` blocks and final norm.

        ``0``: backbone frozen (official warm-up); ``n > 0``: last ``n`` blocks + final norm
        (official phase 2: 5); ``-1``: everything. The heads stay trainable.

        Returns:
            the trainable parameters (for a fresh optimiser, as the official phase change).

        Example:
            >>> m = ViTPCM.from_timm("vit_tiny_patch16_224", 2, img_size=32, timm_kwargs={"depth": 2})
            >>> n = len(m.set_backbone_trainable(0))
            >>> n == len(list(m.hv.parameters())) + len(list(m.classifier.parameters()))
            True
        """
        bb = self._backbone()
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
                        background: Background = "always_one", use_et: bool = True, crop_prob: float = 0.3,
                        crop: int | tuple[int, int] = 128, scale: float = 0.5,
                        generator: torch.Generator | None = None,
                        shared_teacher: bool = False) -> dict[str, Tensor]:
        """One official ViT-PCM training step's losses: ``mce``, ``et``, ``l2`` and ``loss`` (their sum).

        Random codes ``c1``; ``x1 = dihedral_transform(images, c1)``; teacher =
        :meth:`teacher` on ``x1`` (no grad, no dropout); MCE on ``self(x1)`` (dropout on);
        mosaic of ``images_et`` (or ``images``, un-flipped, own codes and crops) -> student
        -> :func:`et_loss` against the teacher. Weights 1 (official).

        The teacher and the MCE branch see the same ``x1``. With ``shared_teacher=True`` the
        backbone runs once: the teacher is :meth:`head` in eval mode, without gradient, on the
        MCE branch's detached features. That is the same teacher (and the same losses and
        gradients) as the separate pass exactly when the backbone computes the same in train and
        eval mode (no active dropout, drop path or batch norm), and saves one backbone forward
        per step (about a fifth of the step). The default is the separate pass (official).

        Args:
            images: branch-1 images.
            labels: image labels (see :func:`mce_loss`).
            images_et: branch-2 images (e.g. with their own colour jitter); default ``images``.
            background: see :func:`mce_loss`.
            use_et: add the equivariance loss (needs ``B`` divisible by 4).
            crop_prob: see :func:`mosaic`.
            crop: see :func:`mosaic`.
            scale: see :func:`mosaic`.
            generator: random generator on the images' device.
            shared_teacher: reuse the MCE branch's backbone pass for the teacher (see above).

        Shape:
            - images: ``(B, 3, H, W)``; labels: ``(B, K)`` (``(B, K+1)`` for ``"from_labels"``)
            - output: dict of scalars

        Example:
            >>> m = ViTPCM.from_timm("vit_tiny_patch16_224", 2, img_size=32, timm_kwargs={"depth": 1})
            >>> out = m.training_losses(torch.randn(4, 3, 32, 32), torch.tensor([[1, 0]] * 4), crop=16)
            >>> sorted(out)
            ['et', 'l2', 'loss', 'mce']
        """
        dims = check_shape("images", images, ["B", 3, "H", "W"], dtype="float")
        if use_et and dims["B"] % 4:
            raise ShapeError(f"images: batch must be divisible by 4 for the ET mosaic, got B={dims['B']}")
        if images_et is not None:
            check_shape("images_et", images_et, ["B", 3, "H", "W"], dims, dtype="float")
        codes = random_dihedral_codes(dims["B"], square=dims["H"] == dims["W"], device=images.device,
                                      generator=generator)
        x1 = dihedral_transform(images, codes)
        teacher: PCMOutput | None = None
        if shared_teacher and self.backbone is not None:
            feats = self.features(x1)
            if use_et:
                with eval_mode(self), torch.no_grad():
                    teacher = self.head(feats.detach())
            out = self.head(feats)
        else:
            teacher = self.teacher(x1) if use_et else None
            out = self(x1)
        losses = {"mce": mce_loss(out.pooled, labels, background)}
        if teacher is not None:
            tiles, record = mosaic(images if images_et is None else images_et, crop_prob=crop_prob, crop=crop,
                                   scale=scale, patch_size=self.patch_size, generator=generator)
            student = unmosaic(self(tiles).probs)
            losses["et"] = et_loss(student, teacher.probs, labels, record, codes, background=background)
        else:
            losses["et"] = losses["mce"].new_zeros(())
        losses["l2"] = self.l2_penalty()
        losses["loss"] = losses["mce"] + losses["et"] + losses["l2"].to(losses["mce"].dtype)
        return losses
