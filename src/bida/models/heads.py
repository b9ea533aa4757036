"""Decoders that turn the four MiT feature levels into class scores at 1/4 resolution.

Both return ``(logits, fused)``: ``fused`` is the decoder feature that the classifier
reads (before its dropout), which the segmentor passes through the contrast projection
head. Convolutions with a norm have no bias; every conv + BN is followed by ReLU, as in
mmsegmentation's ``ConvModule``.

- :class:`SegFormerHead` (SegFormer, NeurIPS 2021): a linear embedding of each level to
  ``embed_dim`` channels, upsampled to the first level's size, concatenated (deepest level
  first), fused by a 1x1 conv + BN + ReLU; dropout and a 1x1 classifier.
- :class:`DAFormerHead` (DAFormer, CVPR 2022, context-aware fusion): the same per-level
  embeddings, concatenated (shallowest level first) and fused by an ASPP-like module of
  parallel branches: a 1x1 conv for dilation 1 and depthwise-separable 3x3 convs for
  dilations 6, 12 and 18, each with BN + ReLU; their concatenation goes through a 3x3
  bottleneck conv + BN + ReLU; dropout and a 1x1 classifier. As in DAFormer's published
  head, there is no image-pooling branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DAFORMER_DILATIONS = (1, 6, 12, 18)
DROPOUT = 0.1  # SegFormer and DAFormer: Dropout2d(0.1) before the classifier


class LinearEmbed(nn.Module):
    """A per-pixel linear map of a feature level to ``out_dim`` channels.

    Shape:
        (B, C, h, w) -> (B, out_dim, h, w)
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1, groups: int = 1):
        padding = dilation * (kernel // 2)
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 (dilated) conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int):
        super().__init__()
        self.depthwise = ConvBNReLU(in_ch, in_ch, 3, dilation=dilation, groups=in_ch)
        self.pointwise = ConvBNReLU(in_ch, out_ch, 1)


class ContextFusion(nn.Module):
    """DAFormer's fusion: parallel dilated (separable) branches, concatenated, then a 3x3 bottleneck.

    Shape:
        (B, in_ch, h, w) -> (B, out_ch, h, w)
    """

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int] = DAFORMER_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(
            ConvBNReLU(in_ch, out_ch, 1) if d == 1 else SeparableConv(in_ch, out_ch, d) for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * out_ch, out_ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], 1))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _Head(nn.Module):
    """Per-level embeddings, a fusion, dropout and a 1x1 classifier (the shared skeleton)."""

    deepest_first: bool = False

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, fuse: nn.Module):
        super().__init__()
        self.embed = nn.ModuleList(LinearEmbed(c, embed_dim) for c in in_channels)
        self.fuse = fuse
        self.dropout = nn.Dropout2d(DROPOUT)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        self.embed_dim = embed_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, levels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Logits and the fused feature, both at the first level's size (1/4 of the input).

        Shape:
            levels: (B, C_i, h_i, w_i), i = 1..4 -> logits (B, K, h_1, w_1), fused (B, E, h_1, w_1)
        """
        size = tuple(levels[0].shape[-2:])
        embedded = [_resize(embed(x), size) for embed, x in zip(self.embed, levels)]
        if self.deepest_first:
            embedded = embedded[::-1]
        fused = self.fuse(torch.cat(embedded, 1))
        return self.classifier(self.dropout(fused)), fused


class SegFormerHead(_Head):
    """SegFormer's all-MLP decoder (see the module docstring)."""

    deepest_first = True  # SegFormer concatenates c4, c3, c2, c1

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int):
        super().__init__(in_channels, embed_dim, num_classes, ConvBNReLU(len(in_channels) * embed_dim, embed_dim, 1))


class DAFormerHead(_Head):
    """DAFormer's context-aware fusion decoder (see the module docstring)."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int,
                 dilations: Sequence[int] = DAFORMER_DILATIONS):
        super().__init__(in_channels, embed_dim, num_classes,
                         ContextFusion(len(in_channels) * embed_dim, embed_dim, dilations))


class AttentionHead(_Head):
    """HRDA's scale-attention decoder: the same per-level embeddings as the segmentation
    decoder, fused by a 1x1 conv + BN + ReLU (HRDA swaps DAFormer's context fusion for one),
    and a 1x1 conv to the attention's channels (K, or 1 for one attention for all classes).
    Its output is the attention's logit; :mod:`bida.models.hrda` applies the sigmoid."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int, out_channels: int):
        super().__init__(in_channels, embed_dim, out_channels, ConvBNReLU(len(in_channels) * embed_dim, embed_dim, 1))


HEADS: dict[str, type[_Head]] = {"segformer": SegFormerHead, "daformer": DAFormerHead}
