"""HRDA: a context crop and a detail crop through one segmentor, fused by a learnt scale attention.

After Hoyer et al., "HRDA: Context-Aware High-Resolution Domain-Adaptive Semantic
Segmentation" (ECCV 2022). A training crop (the *context* crop, 1024x1024 in HRDA) goes
through the segmentor downscaled by ``context_scale`` (0.5); a *detail* crop inside it
(512x512) goes through the same segmentor at full resolution. A scale-attention decoder on
the context crop's encoder levels predicts ``a = sigmoid(.)`` (one channel per class, or
one for all), set to 0 outside the detail crop; on the full-resolution output grid

    fused = up(a) * detail + up((1 - a) * context),

with ``up`` the bilinear upsampling by ``1 / context_scale`` and ``detail`` the detail
logits placed at the crop (0 elsewhere, where ``up(a)`` is 0 too). Training reads the
fused logits (over the whole context crop) and the detail logits (over the detail crop);
the losses weigh them ``1 - detail_loss_weight`` and ``detail_loss_weight``
(:func:`detail_crop_labels` crops the labels).

Without a detail crop (evaluation, the teacher's labels) the detail branch runs on
overlapping detail-sized windows (stride half a window) over the whole input, their logits
averaged where they overlap, and the unmasked attention fuses them with the context
(HRDA's ``hr_slide_inference``); the input is padded at the bottom and right to whole
cells of both grids first and the outputs cropped back.

Alignment: the crop corners, the crop sizes and the input sides are multiples of
``unit = output_stride / context_scale`` input pixels (8 for MiT at 0.5, 16 for DeepLab-V2), so that every
crop covers whole cells of the context grid (``unit`` pixels a cell) and of the
full-resolution grid (``output_stride`` pixels). The config checks enforce it.

The wrapper adopts the segmentor's own modules (its state dict is the segmentor's plus
``scale_attention.*``), so pretrained weights and checkpoints load by the same names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .output import SegOutput

IGNORE = 255


@dataclass
class HRDAOutput(SegOutput):
    """What :class:`HRDASegmentor` returns for a training crop.

    Attributes:
        logits: (B, K, H/os, W/os) the fused class scores over the whole context crop.
        features: (B, D, H/unit, W/unit) the contrast features of the context crop.
        detail_logits: (B, K, h/os, w/os) the detail crop's own class scores.
        detail_box: (B, 2) int64, the detail crop's top-left corner (row, column) in input pixels.
    """

    detail_logits: Optional[Tensor] = None
    detail_box: Optional[Tensor] = None


def alignment_unit(output_stride: Fraction, context_scale: float) -> Fraction:
    """Input pixels per cell of the context grid: every crop corner and side must be a multiple."""
    return Fraction(output_stride) / Fraction(str(context_scale))


def draw_detail_boxes(u: Tensor, size: tuple[int, int], detail: tuple[int, int], divisible: int) -> Tensor:
    """Top-left corners of detail crops inside a ``size`` crop, from uniform numbers ``u``.

    Per axis, the corner is ``divisible x`` one of ``max(1, (size - detail + 1) // divisible)``
    equally likely positions (HRDA's ``get_crop_bbox``: offsets 0, d, 2d, ... below the margin
    plus one, so the detail crop always lies inside the context crop).

    Shape:
        - u: (B, 2) uniform in [0, 1); output: (B, 2) int64 (row, column)
    """
    n = torch.tensor([max(1, (s - d + 1) // divisible) for s, d in zip(size, detail)], device=u.device)
    idx = (u * n).long().clamp_max(n - 1)  # floor(u * n), and u < 1 keeps it below n anyway
    return idx * divisible


def crop_boxes(x: Tensor, box: Tensor, size: tuple[int, int]) -> Tensor:
    """Each sample's ``size`` window at its own corner ``box`` (one gather, no loop over samples).

    Shape:
        - x: (B, C, H, W) or (B, H, W); box: (B, 2) int64; output: (B, C, h, w) or (B, h, w)
    """
    h, w = size
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    rows = (box[:, 0:1] + torch.arange(h, device=x.device))[:, :, None]  # (B, h, 1)
    cols = (box[:, 1:2] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, w)
    if x.dim() == 3:
        return x[b, rows, cols]
    return x[b, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: (B, h, w, C)


def box_mask(box: Tensor, size: tuple[int, int], extent: tuple[int, int]) -> Tensor:
    """1 inside each sample's ``extent`` window at corner ``box`` of a ``size`` grid, else 0.

    Shape:
        - box: (B, 2) int64 (in cells of this grid); output: (B, 1, H, W) float32
    """
    rows = torch.arange(size[0], device=box.device)
    cols = torch.arange(size[1], device=box.device)
    r = (rows >= box[:, 0:1]) & (rows < box[:, 0:1] + extent[0])  # (B, H)
    c = (cols >= box[:, 1:2]) & (cols < box[:, 1:2] + extent[1])  # (B, W)
    return (r[:, :, None] & c[:, None, :]).float()[:, None]


def place(values: Tensor, box: Tensor, size: tuple[int, int]) -> Tensor:
    """``values`` written into a zero ``size`` grid at each sample's corner ``box`` (differentiable).

    Shape:
        - values: (B, C, h, w); box: (B, 2) int64 (cells); output: (B, C, H, W)
    """
    bsz, ch, h, w = values.shape
    out = values.new_zeros((bsz, ch, *size))
    b = torch.arange(bsz, device=values.device)[:, None, None]
    rows = (box[:, 0:1] + torch.arange(h, device=values.device))[:, :, None]
    cols = (box[:, 1:2] + torch.arange(w, device=values.device))[:, None, :]
    out[b, :, rows, cols] = values.permute(0, 2, 3, 1)
    return out


def fuse(context: Tensor, attention: Tensor, detail: Tensor, ratio: int) -> Tensor:
    """HRDA's fusion on the full-resolution grid: ``up(a) * detail + up((1 - a) * context)``.

    ``attention`` is the sigmoid attention already set to 0 outside the detail region (on the
    context grid), ``detail`` the detail logits already placed on the full-resolution grid
    (0 outside); ``up`` is bilinear upsampling by ``ratio`` (= 1 / context_scale). Computed
    in float32, whatever the autocast dtype of the inputs.

    Shape:
        - context: (B, K, h, w); attention: (B, K or 1, h, w); detail: (B, K, h*ratio, w*ratio)
        - output: (B, K, h*ratio, w*ratio) float32
    """
    size = (context.shape[-2] * ratio, context.shape[-1] * ratio)
    attention = attention.float()
    with torch.autocast(device_type=context.device.type, enabled=False):
        low = F.interpolate((1 - attention) * context.float(), size=size, mode="bilinear", align_corners=False)
        att = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
        return att * detail.float() + low


def detail_crop_labels(labels: Tensor, box: Tensor, detail: tuple[int, int]) -> Tensor:
    """The labels (or per-pixel weights) under each sample's detail crop.

    Shape:
        - labels: (B, H, W); box: (B, 2) int64 (input pixels); output: (B, h, w)
    """
    return crop_boxes(labels, box, detail)


class HRDASegmentor(nn.Module):
    """A segmentor with HRDA's context and detail crops and scale attention (see the module docstring).

    ``base``: a segmentor with ``encode(x, domain) -> levels``, ``decode(levels, size) ->
    SegOutput``, ``attention_head(channels)`` and ``output_stride`` (MiT, DINOv2, DeepLab-V2). Its
    modules become this module's own (same state-dict names), plus ``scale_attention``.

    ``forward(x, domain, detail_box=None, context_only=False)``:
        - ``detail_box`` (B, 2) int64: training; returns :class:`HRDAOutput` (fused logits over
          ``x``, detail logits of the crop at the box, context features);
        - ``context_only``: the context branch alone (logits and features on the context grid);
        - neither: the fused prediction of the whole input (evaluation, teacher labels).
    """

    def __init__(self, base: nn.Module, context_scale: float = 0.5, detail_crop: tuple[int, int] = (512, 512),
                 attention_classwise: bool = True, slide_detail: bool = True):
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        self._base = (base,)  # a tuple: not registered twice, the modules above are its own
        self.context_scale = context_scale
        self.detail_crop = tuple(detail_crop)
        self.slide_detail = slide_detail
        self.num_classes = base.num_classes
        self.output_stride = Fraction(base.output_stride)
        self.unit = alignment_unit(self.output_stride, context_scale)
        ratio = Fraction(1) / Fraction(str(context_scale))
        if ratio.denominator != 1:
            raise ValueError(f"context_scale {context_scale}: 1 / context_scale must be a whole number")
        self.ratio = int(ratio)
        self.scale_attention = base.attention_head(base.num_classes if attention_classwise else 1)
        # Sliding-window evaluation forwards every window of an image in one batch (HRDA's
        # batched_slide): each window is fused alike, the windows only share the forward.
        self.batched_slide = True
        for attr in ("arch", "feature_kind", "feature_dim", "backbone_channels", "target_stem", "concat_domains_ok"):
            setattr(self, attr, getattr(base, attr))

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def sync_target_stem(self) -> None:
        """The segmentor's (DeepLab-V2's target stem; MiT and DINOv2 have none)."""
        self.base.sync_target_stem()

    def backbone_output_module(self) -> nn.Module:
        """The segmentor's deepest encoder level; the context crop is encoded first in every forward."""
        return self.base.backbone_output_module()

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, **kwargs) -> list[dict]:
        """The segmentor's groups, with the scale-attention decoder in the head group (HRDA: a decoder, 10x)."""
        groups = self.base.param_groups(lr, head_lr_mult, **kwargs)
        head = next(g for g in groups if g["name"] == "head")
        head["params"] = head["params"] + [p for p in self.scale_attention.parameters() if p.requires_grad]
        return groups

    def _cells(self, pixels: int | Tensor, stride: Fraction) -> int | Tensor:
        """Input pixels (a multiple of ``stride``'s numerator grid) as whole cells of ``stride``."""
        return pixels * stride.denominator // stride.numerator

    def _context(self, x: Tensor, domain: str) -> tuple[SegOutput, Tensor]:
        """The context branch: logits and features of the downscaled input, and the sigmoid attention."""
        small = F.interpolate(x, scale_factor=self.context_scale, mode="bilinear", align_corners=False,
                              recompute_scale_factor=False) if self.context_scale != 1 else x
        levels = self.base.encode(small, domain)
        out = self.base.decode(levels, tuple(small.shape[-2:]))
        att = self.scale_attention(levels)[0][..., : out.logits.shape[-2], : out.logits.shape[-1]]
        return out, torch.sigmoid(att.float())

    def _detail(self, x: Tensor, domain: str) -> Tensor:
        return self.base.decode(self.base.encode(x, domain), tuple(x.shape[-2:])).logits

    def forward(self, x: Tensor, domain: Literal["source", "target"] = "source", detail_box: Tensor | None = None,
                context_only: bool = False) -> SegOutput:
        """See the class docstring.

        Shape:
            x: (B, 3, H, W); detail_box: (B, 2) int64 or None -> logits (B, K, ceil(H/os), ceil(W/os))
            (context_only: the context grid), features (B, D, ceil(H/unit), ceil(W/unit)).
        """
        if context_only:  # through encode/decode: on the grid of the context branch (DeepLab-V2: H/8 cells)
            small = F.interpolate(x, scale_factor=self.context_scale, mode="bilinear", align_corners=False,
                                  recompute_scale_factor=False)
            return self.base.decode(self.base.encode(small, domain), tuple(small.shape[-2:]))
        if detail_box is not None:
            return self._train_forward(x, domain, detail_box)
        return self._fused_inference(x, domain)

    def _train_forward(self, x: Tensor, domain: str, detail_box: Tensor) -> HRDAOutput:
        ctx, att = self._context(x, domain)  # first: the feature distance reads the context encoder
        detail = self._detail(crop_boxes(x, detail_box, self.detail_crop), domain)
        grid = tuple(s * self.ratio for s in ctx.logits.shape[-2:])
        fine = self._cells(detail_box, self.output_stride)  # the box in full-resolution cells
        coarse = self._cells(detail_box, self.output_stride * self.ratio)  # and in context cells
        extent = tuple(self._cells(d, self.output_stride * self.ratio) for d in self.detail_crop)
        att = att * box_mask(coarse, tuple(ctx.logits.shape[-2:]), extent)
        fused = fuse(ctx.logits, att, place(detail.float(), fine, grid), self.ratio)
        return HRDAOutput(logits=fused, features=ctx.features, detail_logits=detail, detail_box=detail_box)

    def _fused_inference(self, x: Tensor, domain: str) -> SegOutput:
        h, w = x.shape[-2:]
        unit = self.unit.numerator  # unit's denominator is 1 for every supported segmentor
        # Whole cells of both grids, and a context the encoder takes (MiT: 32 pixels a side):
        # zero padding (the normalised mean) at the far sides, cropped off the outputs.
        least = math.ceil(getattr(self.base, "min_input", 1) / self.context_scale)
        ph, pw = (math.ceil(max(s, least) / unit) * unit for s in (h, w))
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        ctx, att = self._context(x, domain)
        grid = tuple(s * self.ratio for s in ctx.logits.shape[-2:])
        detail = self._slide_detail(x, domain, grid) if self.slide_detail else self._detail(x, domain).float()
        fused = fuse(ctx.logits, att, detail, self.ratio)
        oh, ow = (math.ceil(s / self.output_stride) for s in (h, w))
        ch, cw = math.ceil(h / self.unit), math.ceil(w / self.unit)
        return SegOutput(logits=fused[..., :oh, :ow], features=ctx.features[..., :ch, :cw])

    def _slide_detail(self, x: Tensor, domain: str, grid: tuple[int, int]) -> Tensor:
        """Detail logits of overlapping detail-sized windows over ``x``, averaged, on the full-resolution grid.

        Windows of ``min(detail_crop, side)`` at a stride of half a window (rounded down to
        whole alignment units, at least one), the last one flush with the far side, all in one
        batched forward.
        """
        unit = self.unit.numerator
        starts = []
        for side, crop in zip(x.shape[-2:], self.detail_crop):
            crop = min(crop, side)
            stride = max(unit, crop // 2 // unit * unit)
            n = max(side - crop + stride - 1, 0) // stride + 1
            starts.append([min(i * stride, side - crop) for i in range(n)])
        ch, cw = (min(c, s) for c, s in zip(self.detail_crop, x.shape[-2:]))
        corners = [(r, c) for r in starts[0] for c in starts[1]]
        windows = torch.cat([x[:, :, r:r + ch, c:c + cw] for r, c in corners])  # (N * B, 3, ch, cw)
        logits = self._detail(windows, domain).float().split(x.shape[0])
        total = logits[0].new_zeros((x.shape[0], logits[0].shape[1], *grid))
        count = logits[0].new_zeros((1, 1, *grid))
        for (r, c), out in zip(corners, logits):
            r0, c0 = self._cells(r, self.output_stride), self._cells(c, self.output_stride)
            total[:, :, r0:r0 + out.shape[-2], c0:c0 + out.shape[-1]] += out
            count[:, :, r0:r0 + out.shape[-2], c0:c0 + out.shape[-1]] += 1
        return total / count
