"""What every segmentor returns, whatever its backbone."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass
class SegOutput:
    """What the network returns.

    Attributes:
        logits: (B, K, h, w) class scores at the segmentor's output stride (8 for
            DeepLab-V2, 4 for MiT). Losses upsample them to the label size.
        features: (B, D, h, w) the feature map the method contrasts (``method.feature``),
            at the same size as the logits.
    """

    logits: Tensor
    features: Tensor


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, K, h, w) scores to ``size`` (align_corners=False)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
