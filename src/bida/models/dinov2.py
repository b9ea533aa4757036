"""DINOv2 vision transformers (ViT-S/B/L/g, patch 14) and the segmentor built on them.

The encoder follows DINOv2's definition (Oquab et al., 2023; ``dinov2/models/vision_transformer.py``):

- a 14x14 patch embedding (a conv of stride 14), a class token and, for the ``_reg``
  variants, 4 register tokens (Darcet et al., 2024), in the order [cls, registers, patches];
- learned position embeddings for the pretraining grid of 37x37 patches (518 pixels) plus
  the class token; the registers have none. For any other grid the patch part is resampled
  on the fly, bicubically, as DINOv2's own models do (``interpolate_pos_encoding``
  with the hub's settings, ``dinov2/hub/backbones.py``): the variants without registers
  with ``scale_factor = ((gh + 0.1) / 37, (gw + 0.1) / 37)`` and no antialiasing
  (``interpolate_offset=0.1``, a legacy offset their released models were trained and are
  served with); the ``_reg`` variants to the grid size, antialiased (``interpolate_offset=0``,
  ``interpolate_antialias=True``). Hugging Face's ``Dinov2WithRegistersModel`` interpolates
  as the latter; its ``Dinov2Model`` resamples to the grid size, so for the variants without
  registers it differs from the hub model (by up to about 2e-2 on a 37 -> 74 grid);
- pre-norm blocks ``x + ls1 * attn(norm1 x)``, ``x + ls2 * mlp(norm2 x)`` with LayerScale
  (``ls1.gamma``, ``ls2.gamma``), multi-head attention through one ``qkv`` layer (queries,
  keys, values stacked), a GELU MLP of 4x the width or, for ViT-g, SwiGLU
  (``w12`` = gate and value stacked, ``w3``; hidden width 2/3 x 4x the width rounded up to a
  multiple of 8: 4096 for ViT-g); LayerNorms with eps 1e-6; a final LayerNorm ``norm``.

Parameter names are those of the public release files (``dinov2_vits14_pretrain.pth``...),
so those load without renaming; :func:`from_hf_dinov2` (at the end of this module)
maps the Hugging Face ``dinov2`` layout onto them. The release's ``mask_token`` (iBOT's masked-patch token) is only used in
pretraining and is not a parameter here, unless ``mask_token=True`` (``model.mask_token``):
then it is loaded and trained, and ``forward(x, token_keep=...)`` replaces the patch tokens
not kept by it before the position embeddings are added (DINOv2's ``prepare_tokens_with_masks``;
VFM-UDA's token masking).

Inputs whose sides are not multiples of 14 are padded with zeros (the mean colour of the
normalised input) at the bottom and right up to the next multiple, as DINOv2's segmentation
code pads (it centres the padding; bottom/right keeps the patch grid anchored at the
image's top-left corner, so outputs need no shift). :class:`DINOv2Segmentor` crops its
outputs back to the input's extent.
"""

from __future__ import annotations

import re
from fractions import Fraction

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError
from .grad_checkpoint import checkpointed, checkpointing
from .heads import HEADS, AttentionHead
from .mit import DropPath
from .output import SegOutput

PATCH = 14
PRETRAIN_GRID = 37  # 518 / 14: the grid the released position embeddings were trained at
# DINOv2's interpolate_offset of the variants without registers (dinov2/hub/backbones.py):
# the position embeddings are resampled by the scale (grid + 0.1) / 37, not to the grid size.
POS_INTERPOLATE_OFFSET = 0.1
NUM_REGISTERS = 4
NORM_EPS = 1e-6
MLP_RATIO = 4
LAYERSCALE_INIT = 1e-5  # DINOv2's training value; pretrained files overwrite it
# The final LayerNorm is the last "layer" of layer-wise LR decay; the head comes after it.
EMBED_PARAMS = ("patch_embed.", "cls_token", "pos_embed", "register_tokens", "mask_token")


@dataclass(frozen=True)
class ViTSpec:
    """One DINOv2 size: width, depth, heads, FFN kind and the blocks the segmentor reads.

    ``levels``: 0-based indices of the four blocks whose (normed) outputs feed the feature
    pyramid: a third, a half, two thirds and all of the depth (blocks 4/6/8/12 of 12,
    8/12/16/24 of 24, 14/20/27/40 of 40, counted from 1).
    """

    dim: int
    depth: int
    heads: int
    levels: tuple[int, int, int, int]
    swiglu: bool = False
    registers: int = 0


_SIZES = {
    "vits14": ViTSpec(384, 12, 6, (3, 5, 7, 11)),
    "vitb14": ViTSpec(768, 12, 12, (3, 5, 7, 11)),
    "vitl14": ViTSpec(1024, 24, 16, (7, 11, 15, 23)),
    "vitg14": ViTSpec(1536, 40, 24, (13, 19, 26, 39), swiglu=True),
}
ARCHS: dict[str, ViTSpec] = {
    **{f"dinov2_{name}": spec for name, spec in _SIZES.items()},
    **{f"dinov2_{name}_reg": ViTSpec(spec.dim, spec.depth, spec.heads, spec.levels, spec.swiglu, NUM_REGISTERS)
       for name, spec in _SIZES.items()},
}


def bicubic_matrix(out: int, size: int, scale: float, device: torch.device) -> Tensor:
    """The (out, size) float64 matrix of bicubic resampling (A = -0.75, ``align_corners=False``,
    border taps clamped) whose source coordinates follow ``scale`` rather than ``out / size``:
    ``F.interpolate(x.double(), scale_factor=scale, mode="bicubic")`` along one axis, as a product.

    DINOv2's hub models resample their position embeddings with ``scale_factor = (n + 0.1) / g``;
    a matrix product keeps that exact in an exported graph, where a traced scale factor would
    be frozen at the example's grid. In float64 because float32 source coordinates are off by
    up to about 1e-6 of a grid step at a 74-patch grid (PyTorch's float32 kernel is).

    Shape:
        -> (out, size)
    """
    a = -0.75  # PyTorch's (and OpenCV's) bicubic constant
    dst = torch.arange(out, device=device, dtype=torch.float64)
    src = (dst + 0.5) * (1.0 / scale) - 0.5
    base = torch.floor(src)
    t = src - base

    def near(d: Tensor) -> Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    taps = torch.arange(size, device=device)
    matrix = torch.zeros(out, size, device=device, dtype=torch.float64)
    for k, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
        index = (base + k).clamp(0, size - 1).long()
        matrix = matrix + (index[:, None] == taps[None, :]).double() * w[:, None]
    return matrix


def scaled_dim(spec: ViTSpec, width: float) -> int:
    """The width times ``width``, rounded to a multiple of the heads (at least one channel per head)."""
    return max(spec.heads, int(round(spec.dim * width / spec.heads)) * spec.heads)


def swiglu_hidden(dim: int) -> int:
    """DINOv2's SwiGLU hidden width: 2/3 of the 4x MLP, rounded up to a multiple of 8.

    Examples:
        >>> swiglu_hidden(1536)
        4096
    """
    return (int(dim * MLP_RATIO * 2 / 3) + 7) // 8 * 8


def padded_size(size: int) -> int:
    """``size`` rounded up to a multiple of the patch (14)."""
    # Non-negative integer arithmetic only: an exported graph (ONNX) computes it for any
    # input size, and ONNX's integer division truncates where Python's floors.
    return (size + PATCH - 1) // PATCH * PATCH


class PatchEmbed(nn.Module):
    """Non-overlapping 14x14 patches, each mapped linearly to ``dim`` channels.

    Shape:
        (B, 3, H, W), H and W multiples of 14 -> (B, dim, H/14, W/14)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` stacks queries, keys and values (each ``dim`` rows).

    Shape:
        (B, N, C) -> (B, N, C)
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (ViT-S/B/L)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` split in halves (ViT-g)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch by ``gamma``."""

    def __init__(self, dim: int, init: float = LAYERSCALE_INIT):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block with LayerScale: x + drop(ls1(attn(norm1 x))), then + drop(ls2(mlp(norm2 x)))."""

    def __init__(self, dim: int, heads: int, swiglu: bool, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim)) if swiglu else Mlp(dim, MLP_RATIO * dim)
        self.ls2 = LayerScale(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """The DINOv2 encoder (see the module docstring).

    Args:
        arch: a key of :data:`ARCHS` (``dinov2_vits14`` ... ``dinov2_vitg14_reg``).
        width: width multiplier (1.0 = the released widths; < 1 for CPU tests), rounded to a
            multiple of the heads.
        drop_path: stochastic-depth rate of the last block (0 at the first, linear between).
        grad_checkpoint: recompute each block's activations in the backward (training with
            grad only; same results, less memory, see :mod:`bida.models.grad_checkpoint`).
        pos_grid: side of the square patch grid of the position embeddings (37 for every
            released model; smaller for reference tests).
        mask_token: keep DINOv2's mask token (``(1, C)``, zeros until loaded) as a parameter,
            for token masking (``token_keep``).

    Shape:
        (B, 3, H, W) -> four (B, C, ceil(H/14), ceil(W/14)) maps: the outputs of the blocks
        ``levels``, each through the final LayerNorm, without the class and register tokens.
    """

    def __init__(self, arch: str = "dinov2_vits14", width: float = 1.0, drop_path: float = 0.0,
                 grad_checkpoint: bool = False, pos_grid: int = PRETRAIN_GRID, mask_token: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown DINOv2 variant {arch!r}; choose from {sorted(ARCHS)}")
        spec = ARCHS[arch]
        self.spec = spec
        self.dim = scaled_dim(spec, width)
        self.depth = spec.depth
        self.levels = spec.levels
        self.num_prefix = 1 + spec.registers  # class token and registers, ahead of the patches
        self.pos_grid = pos_grid
        # DINOv2's hub settings: the register models resample to the grid size with antialiasing,
        # the others by a scale factor with the legacy offset and without (see position_embedding).
        self.antialias = spec.registers > 0
        self.interpolate_offset = 0.0 if spec.registers else POS_INTERPOLATE_OFFSET
        self.grad_checkpoint = grad_checkpoint
        self.patch_embed = PatchEmbed(self.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, self.dim))
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, self.dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, self.dim))  # DINOv2 starts it at zero
        rates = [drop_path * i / max(1, spec.depth - 1) for i in range(spec.depth)]
        self.blocks = nn.ModuleList(Block(self.dim, spec.heads, spec.swiglu, r) for r in rates)
        self.norm = nn.LayerNorm(self.dim, eps=NORM_EPS)
        self.last_level = nn.Identity()  # names the deepest level for forward hooks (feature distance)
        self._init_weights()

    def _init_weights(self) -> None:
        """DINOv2's initialisation: truncated normal (0.02) linear layers and position
        embeddings, near-zero class/register tokens, unit LayerNorms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if hasattr(self, "register_tokens"):
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, gh: int, gw: int) -> Tensor:
        """The class token's embedding and the patch embeddings resampled to a gh x gw grid.

        Bicubic (``align_corners=False``; float64 with the offset, float32 without), cast back
        to the parameter's dtype; unchanged at the pretraining grid. As DINOv2's ``interpolate_pos_encoding``: without
        registers by ``scale_factor = ((gh + 0.1) / g, (gw + 0.1) / g)`` (the output is still
        gh x gw, but the source coordinates of the resampling follow the slightly larger
        scale), without antialiasing; with registers to the size gh x gw, antialiased.

        Shape:
            -> (1, 1 + gh*gw, C)
        """
        pos = self.pos_embed
        if (gh, gw) == (self.pos_grid, self.pos_grid):
            return pos
        g, c = self.pos_grid, pos.shape[-1]
        patch = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        if self.interpolate_offset:  # as two resampling matrices: the graph stays exportable at any grid
            off = self.interpolate_offset
            rows, cols = (bicubic_matrix(n, g, (n + off) / g, pos.device) for n in (gh, gw))
            with torch.autocast(pos.device.type, enabled=False):  # float64 throughout, never bf16
                patch = (rows @ patch.double() @ cols.T).to(pos.dtype)
        else:
            patch = F.interpolate(patch.float(), size=(gh, gw), mode="bicubic", align_corners=False,
                                  antialias=self.antialias).to(pos.dtype)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], 1)

    def tokens(self, x: Tensor, blocks: tuple[int, ...],
               token_keep: Tensor | None = None) -> tuple[list[Tensor], int, int]:
        """The raw outputs (before the final norm) of the given blocks, and the patch grid.

        ``x`` is padded at the bottom and right to multiples of 14 (zeros) when needed.
        ``token_keep``: patch tokens where it is False become the mask token (needs
        ``mask_token=True``), before the position embeddings are added.

        Shape:
            x: (B, 3, H, W), token_keep: (B, gh, gw) bool or None -> [(B, 1 + R + gh*gw, C)],
            gh = ceil(H/14), gw = ceil(W/14), tokens ordered [cls, R registers, patches row by row].
        """
        h, w = x.shape[-2:]
        pad_h, pad_w = padded_size(h) - h, padded_size(w) - w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        patches = self.patch_embed(x)  # (B, C, gh, gw)
        b, _, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        if token_keep is not None:
            if token_keep.shape != (b, gh, gw):
                raise ValueError(f"token_keep has shape {tuple(token_keep.shape)}, the patch grid is {(b, gh, gw)}")
            patches = torch.where(token_keep.reshape(b, gh * gw, 1), patches, self.mask_token.to(patches.dtype)[None])
        t = torch.cat([self.cls_token.expand(b, -1, -1), patches], 1)
        t = t + self.position_embedding(gh, gw)
        if hasattr(self, "register_tokens"):
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], 1)
        wanted, out = set(blocks), []
        recompute = checkpointing(self, self.grad_checkpoint)
        for i, block in enumerate(self.blocks[: max(blocks) + 1]):
            t = checkpointed(block, t) if recompute else block(t)
            if i in wanted:
                out.append(t)
        return out, gh, gw

    def forward(self, x: Tensor, token_keep: Tensor | None = None) -> list[Tensor]:
        outs, gh, gw = self.tokens(x, self.levels, token_keep)
        levels = [self.norm(t)[:, self.num_prefix:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw) for t in outs]
        levels[-1] = self.last_level(levels[-1])
        return levels


class SimplePyramid(nn.Module):
    """A single-scale ViT map to four levels (ViTDet's simple feature pyramid, in the form of
    mmsegmentation's ``Feature2Pyramid`` for BEiT/MAE): x4 by two 2x2 transposed convs with
    BatchNorm + GELU between, x2 by one, the map itself, and a 2x2 max-pool (ceil, so a grid
    of 1 keeps 1). Widths stay the encoder's.

    Shape:
        4 x (B, C, gh, gw) -> (B, C, 4gh, 4gw), (B, C, 2gh, 2gw), (B, C, gh, gw), (B, C, ceil(gh/2), ceil(gw/2))
    """

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        return [self.up4(levels[0]), self.up2(levels[1]), levels[2], self.down2(levels[3])]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (eps 1e-6, timm's ``LayerNorm2d``)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LightHead(nn.Module):
    """VFM-UDA's light head on the last block's (normed) patch tokens alone, no pyramid:
    a 2x2 transposed conv to C/2 channels, LayerNorm, GELU, a 2x2 transposed conv to C/4,
    LayerNorm, a 3x3 conv, LayerNorm (the fused feature), and a 1x1 classifier; no biases,
    the classifier initialised N(0, 0.1), the rest PyTorch's defaults. Stride 14 / 4 = 3.5,
    as the pyramid's first level.

    Shape:
        [..., (B, C, gh, gw)] -> logits (B, K, 4gh, 4gw), fused (B, C/4, 4gh, 4gw)
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.upscale = nn.Sequential(
            nn.ConvTranspose2d(dim, half, 2, 2, bias=False), LayerNorm2d(half), nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, 2, bias=False), LayerNorm2d(quarter),
            nn.Conv2d(quarter, quarter, 3, padding=1, bias=False), LayerNorm2d(quarter))
        self.classifier = nn.Conv2d(quarter, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, 0.0, 0.1)
        self.embed_dim = quarter

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        fused = self.upscale(levels[-1])
        return self.classifier(fused), fused


DECODERS = ("segformer", "daformer", "light")


class DINOv2Segmentor(nn.Module):
    """A DINOv2 encoder, a simple feature pyramid and a SegFormer or DAFormer decoder, or
    VFM-UDA's light head on the last block alone (``decoder="light"``, :class:`LightHead`:
    no pyramid; ``decoder_dim`` unused, the fused feature has a quarter of the encoder's width).

    The four levels come from blocks ``spec.levels`` (normed), at patch stride 14 of the
    padded input; the pyramid brings them to strides 3.5, 7, 14 and 28, the ViT's
    counterparts of MiT's 4/8/16/32, and the decoder fuses them at the first. Logits and
    features are cropped to the cells that cover the input: ceil(2H/7) x ceil(2W/7) of an
    H x W input (the losses upsample them to the label size, as MiT's ceil(H/4)).

    The contrast reads the fused decoder feature through a projection head
    (``method.feature = decoder``), as :class:`~bida.models.mit.MiTSegmentor` does. The only
    BatchNorms are in the randomly initialised pyramid and decoder, trained; source and
    target may share one forward (``concat_domains_ok``).

    Args:
        num_classes: K.
        backbone: a key of :data:`ARCHS`.
        decoder: ``segformer`` or ``daformer``.
        decoder_dim: channels of the decoder's embeddings and fused feature.
        width: encoder width multiplier.
        drop_path: stochastic-depth rate of the last encoder block.
        proj_dim: contrast feature channels.
        grad_checkpoint: activation checkpointing of the encoder blocks (``model.grad_checkpoint``).
        pos_grid: the position embeddings' grid (37 for the released weights).
        input_scale: ``model.input_scale``: 1.0 pads the input to multiples of 14; otherwise it
            is resized to H' = floor(H x input_scale / 14) x 14 (likewise W'), as VFM-UDA (1.1).
        mask_token: ``model.mask_token``: the encoder keeps DINOv2's mask token, and
            ``forward(x, domain, token_keep)`` masks patch tokens with it (VFM-UDA's masking).

    Shape:
        input (B, 3, H, W) -> logits and features (B, ., ceil(2H/7), ceil(2W/7)), or
        (B, ., 2H'/7, 2W'/7) with an input scale.
    """

    target_stem = None
    concat_domains_ok = True

    def __init__(self, num_classes: int, backbone: str = "dinov2_vits14",
                 decoder: Literal["segformer", "daformer", "light"] = "daformer", decoder_dim: int = 256,
                 width: float = 1.0, drop_path: float = 0.0, proj_dim: int = 256, grad_checkpoint: bool = False,
                 pos_grid: int = PRETRAIN_GRID, input_scale: float = 1.0, mask_token: bool = False):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {sorted(DECODERS)}")
        if input_scale <= 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.arch = backbone
        self.width = width  # channel multiplier: named when a weight file of another width does not fit
        self.num_classes = num_classes
        self.feature_kind = "decoder"
        self.input_scale = input_scale
        # As an exact fraction of the decimal it was written as (1.1 -> 11/10): the resized side
        # is then integer arithmetic, which an exported graph keeps symbolic for any input size
        # (a float product truncated by int() is frozen at the traced example's size).
        scale = Fraction(repr(float(input_scale)))
        self._scale_num, self._scale_den = scale.numerator, scale.denominator
        self.backbone = VisionTransformer(backbone, width, drop_path, grad_checkpoint, pos_grid, mask_token)
        dim = self.backbone.dim
        if decoder == "light":
            self.backbone.levels = (self.backbone.depth - 1,)  # the head reads the last block alone
            self.neck = nn.Identity()
            self.decode_head = LightHead(dim, num_classes)
            decoder_dim = self.decode_head.embed_dim
        else:
            self.neck = SimplePyramid(dim)
            self.decode_head = HEADS[decoder]([dim] * 4, decoder_dim, num_classes)
        self.proj = nn.Sequential(nn.Conv2d(decoder_dim, decoder_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(decoder_dim, proj_dim, 1))
        for m in [*self.neck.modules(), *self.proj.modules()]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.feature_dim = proj_dim
        self.backbone_channels = dim

    def sync_target_stem(self) -> None:
        """Nothing to copy: there is no target stem (the trainer calls this after source steps)."""

    def backbone_output_module(self) -> nn.Module:
        """The module whose output is the deepest encoder level (read by the feature distance)."""
        return self.backbone.last_level

    def layer_id(self, name: str) -> int:
        """The layer of an encoder parameter for layer-wise LR decay: 0 for the patch and
        position embeddings and the class/register tokens, i + 1 for block i, depth + 1 for
        the final LayerNorm."""
        if name.startswith(EMBED_PARAMS):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.backbone.depth + 1

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, layer_decay: float = 1.0,
                     decay_norms_biases: bool = False) -> list[dict]:
        """Encoder parameters at ``lr x layer_decay ** (depth + 1 - layer)`` (:meth:`layer_id`:
        the final norm at ``lr``, the embeddings at ``lr x layer_decay ** (depth + 1)``: the
        layer ids of BEiT's layer-wise decay as mmsegmentation's
        ``LayerDecayOptimizerConstructor`` assigns them); pyramid, decoder and projection head
        (all randomly initialised) at ``head_lr_mult x lr``. Biases, norms and LayerScale
        gammas have no weight decay (DINOv2's rule) unless ``decay_norms_biases``
        (``train.decay_norms_biases``: every parameter decays, as VFM-UDA's AdamW).

        One group per distinct (LR multiplier, weight decay); each carries its multiplier in
        ``lr_mult``, which the trainer's schedule scales.
        """
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        groups: dict[tuple[float, bool], dict] = {}
        top = self.backbone.depth + 1
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            layer = self.layer_id(name)
            mult = layer_decay ** (top - layer)
            no_wd = not decay_norms_biases and (name.endswith(".bias") or "norm" in name or name.endswith(".gamma"))
            key = (mult, no_wd)
            if key not in groups:
                groups[key] = {"params": [], "lr": lr * mult, "lr_mult": mult,
                               "name": f"backbone_x{mult:.4g}" + ("_no_wd" if no_wd else "")}
                if no_wd:
                    groups[key]["weight_decay"] = 0.0
            groups[key]["params"].append(p)
        head = [p for m in (self.neck, self.decode_head, self.proj) for p in m.parameters() if p.requires_grad]
        return [*groups.values(), {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "head"}]

    def vit_input_size(self, h: int, w: int) -> tuple[int, int]:
        """The size an h x w input reaches the ViT at (resized with ``input_scale``, else as is)."""
        if self.input_scale == 1.0:
            return h, w
        return tuple(max(PATCH, s * self._scale_num // (self._scale_den * PATCH) * PATCH) for s in (h, w))

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The patch grid (gh, gw) of an h x w input: what ``token_keep`` of :meth:`forward` covers."""
        return tuple(padded_size(s) // PATCH for s in self.vit_input_size(h, w))

    def forward(self, x: Tensor, domain: Literal["source", "target"] = "source",  # noqa: ARG002
                token_keep: Tensor | None = None) -> SegOutput:
        """Logits and contrast features of a batch (either domain).

        ``token_keep`` (``model.mask_token``): patch tokens where it is False are replaced by
        the mask token (:meth:`token_grid` gives its size).

        Shape:
            x: (B, 3, H, W), token_keep: (B, gh, gw) bool or None -> SegOutput(logits (B, K, h, w),
            features (B, proj_dim, h, w)), h = ceil(2H/7), w = ceil(2W/7) (of the resized input
            with ``input_scale``).
        """
        size = self.vit_input_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):  # VFM-UDA's resize: the ViT sees a whole grid of patches, no padding
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.decode(self.neck(self.backbone(x, token_keep)), tuple(x.shape[-2:]))

    # The two halves of :meth:`forward` (with input_scale 1), for wrappers that reuse them
    # (HRDA, bida.models.hrda): outputs are ceil(2H/7) x ceil(2W/7), 3.5 input pixels a cell.
    output_stride = Fraction(7, 2)

    def encode(self, x: Tensor, domain: Literal["source", "target"] = "source") -> list[Tensor]:  # noqa: ARG002
        """The pyramid's four levels that the decoder reads (model.input_scale 1: no resize)."""
        return self.neck(self.backbone(x))

    def decode(self, levels: list[Tensor], size: tuple[int, int]) -> SegOutput:
        """Logits and contrast features of the levels of an input of ``size`` (the ViT's input),
        cropped to the cells that cover it."""
        h, w = ((4 * s + PATCH - 1) // PATCH for s in size)  # ceil(4s/14), in integers (see padded_size)
        logits, fused = self.decode_head(levels)
        return SegOutput(logits=logits[..., :h, :w], features=self.proj(fused[..., :h, :w]))

    def attention_head(self, out_channels: int) -> nn.Module:
        """A fresh decoder of ``out_channels`` maps on :meth:`encode`'s levels (HRDA's scale attention)."""
        if isinstance(self.decode_head, LightHead):
            raise ValueError("HRDA's scale attention needs a segformer or daformer decoder, not the light head")
        return AttentionHead([self.backbone.dim] * 4, self.decode_head.embed_dim, out_channels)


# Checkpoint filters: other releases' key layouts as this module's names (the release ones), kept
# beside the model whose names they target; bida.models.weights detects the layout and calls them.

# Hugging Face dinov2 -> DINOv2 release names, inside one block; q/k/v and SwiGLU's gate/up are stacked apart.
_HF_DINO_BLOCK_NAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",
    "mlp.down_proj.": "mlp.w3.",
}
_HF_DINO_EMBED_NAMES = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens", "embeddings.patch_embeddings.projection.weight":
    "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_HF_DINO_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Parts stacked into one release tensor, in the release's order: qkv = [q; k; v], w12 = [gate; up].
_HF_DINO_STACKED = {
    **{f"attention.attention.{p}.": ("attn.qkv", i) for i, p in enumerate(("query", "key", "value"))},
    **{f"attention.{p}.": ("attn.qkv", i) for i, p in enumerate(("q_proj", "k_proj", "v_proj"))},
    "mlp.gate_proj.": ("mlp.w12", 0), "mlp.up_proj.": ("mlp.w12", 1),
}
_STACK_PARTS = {"attn.qkv": ("query", "key", "value"), "mlp.w12": ("gate", "up")}
_CHUNKED_BLOCK = re.compile(r"blocks\.\d+\.(\d+\..+)")


def from_dinov2_release(state: dict[str, torch.Tensor],
                         mask_token: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DINOv2 release file's keys as the bida DINOv2 segmentor's (``backbone.`` prefixed).

    ``mask_token``: the model keeps the pretraining mask token (``model.mask_token``), so it loads.

    Returns:
        (converted state, skipped keys: ``mask_token`` unless the model has one).
    """
    out: dict[str, torch.Tensor] = {}
    skipped = [k for k in state if k == "mask_token" and not mask_token]
    for key, value in state.items():
        if key in skipped:
            continue
        if m := _CHUNKED_BLOCK.fullmatch(key):  # FSDP chunks: blocks.C.N.* with N the block's own index
            key = f"blocks.{m[1]}"
        out[f"backbone.{key}"] = value
    return out, skipped


def hf_dinov2_name(key: str) -> str | None:
    """The release name of a Hugging Face dinov2 key (prefix removed), else None."""
    if key in _HF_DINO_EMBED_NAMES:
        return _HF_DINO_EMBED_NAMES[key]
    if m := _HF_DINO_BLOCK.fullmatch(key):
        for old, new in _HF_DINO_BLOCK_NAMES.items():
            if m[2].startswith(old):
                return f"blocks.{m[1]}.{new}{m[2][len(old):]}"
    return None


def from_hf_dinov2(state: dict[str, torch.Tensor], path: str | Path,
                    mask_token: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face dinov2 keys as the bida DINOv2 segmentor's (``backbone.`` + release names).

    ``mask_token``: the model keeps the pretraining mask token (``model.mask_token``), so it loads.

    Returns:
        (converted state, skipped keys: ``mask_token`` unless the model has one, and an
        ImageNet ``classifier``).
    """
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    stacked: dict[str, dict[int, torch.Tensor]] = {}  # "blocks.0.attn.qkv.weight" -> {0: q, 1: k, 2: v}
    for key, value in state.items():
        name = key.split(".", 1)[1] if key.startswith(("dinov2.", "dinov2_with_registers.")) else key
        if name == "embeddings.mask_token" and mask_token:
            out["backbone.mask_token"] = value
            continue
        if name == "embeddings.mask_token" or key.startswith("classifier."):
            skipped.append(key)
            continue
        block = _HF_DINO_BLOCK.fullmatch(name)
        part = next(((old, target) for old, target in _HF_DINO_STACKED.items()
                     if block and block[2].startswith(old)), None)
        if part:
            (old, (target, index)) = part
            stacked.setdefault(f"blocks.{block[1]}.{target}.{block[2][len(old):]}", {})[index] = value
            continue
        new = hf_dinov2_name(name)
        out[f"backbone.{new}" if new is not None else key] = value  # unknown keys stay, to be reported
    for name, parts in stacked.items():
        labels = _STACK_PARTS[".".join(name.split(".")[2:4])]
        if len(parts) != len(labels):
            lacking = [labels[i] for i in range(len(labels)) if i not in parts]
            raise CheckpointError(f"pretrained file {path}: the {'/'.join(lacking)} part of {name} is missing")
        out[f"backbone.{name}"] = torch.cat([parts[i] for i in range(len(labels))], 0)
    return out, skipped
