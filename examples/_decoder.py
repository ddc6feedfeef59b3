"""Light LargeFOV segmentation decoder for ``--seg`` (after ToCo's ``LargeFOV`` head).

ToCo puts DeepLab's LargeFOV head on the final ViT feature map: a dilated 3x3 convolution
(dilation 5) and a 1x1 convolution, each followed by ReLU, then a 1x1 classifier to ``K + 1``
channels (background first). ToCo's hidden width is 512 for ViT-B (768 wide); here the hidden
width scales with the backbone (``max(16, dim * 2 // 3)``) so the tiny synthetic ViT gets a
tiny decoder.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LargeFOV", "decoder_width"]


def decoder_width(dim: int) -> int:
    """Hidden width for a backbone of feature width ``dim`` (512 for ViT-B's 768)."""
    return max(16, dim * 2 // 3)


class LargeFOV(nn.Module):
    """``(B, C, h, w)`` features -> ``(B, K + 1, h, w)`` segmentation logits."""

    def __init__(self, in_dim: int, num_classes: int, *, dilation: int = 5) -> None:
        super().__init__()
        hidden = decoder_width(in_dim)
        self.conv6 = nn.Conv2d(in_dim, hidden, 3, padding=dilation, dilation=dilation)
        self.conv7 = nn.Conv2d(hidden, hidden, 1)
        self.classifier = nn.Conv2d(hidden, num_classes + 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, features: Tensor) -> Tensor:
        x = self.relu(self.conv6(features))
        x = self.relu(self.conv7(x))
        return self.classifier(x)
