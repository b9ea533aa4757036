"""DINOv2 vision transformers (ViT-S/B/L/g, patch 14) and the segmentor built on them.

The encoder follows DINOv2's definition (Oquab et al., 2023; ``dinov2/models/vision_transformer.py``):

- a 14x14 patch embedding (a conv of stride 14), a class token and, for the ``_reg``
  variants, 4 register tokens (Darcet et al., 2024), in the order [cls, registers, patches];
- learned position embeddings for the pretraining grid of 37x37 patches (518 pixels) plus
  the class token; the registers have none. For any other grid the patch part is resampled
  on the fly, bicubically, in float32 (the interpolation of Hugging Face's ``Dinov2Model``
  and ``Dinov2WithRegistersModel``: to the grid size, with antialiasing for the register
  variants, as their released models were trained);
- pre-norm blocks ``x + ls1 * attn(norm1 x)``, ``x + ls2 * mlp(norm2 x)`` with LayerScale
  (``ls1.gamma``, ``ls2.gamma``), multi-head attention through one ``qkv`` layer (queries,
  keys, values stacked), a GELU MLP of 4x the width or, for ViT-g, SwiGLU
  (``w12`` = gate and value stacked, ``w3``; hidden width 2/3 x 4x the width rounded up to a
  multiple of 8: 4096 for ViT-g); LayerNorms with eps 1e-6; a final LayerNorm ``norm``.

Parameter names are those of the public release files (``dinov2_vits14_pretrain.pth``...),
so those load without renaming; :mod:`bida.weights` maps the Hugging Face ``dinov2``
layout onto them. The release's ``mask_token`` (iBOT's masked-patch token) is only used in
pretraining and is not a parameter here.

Inputs whose sides are not multiples of 14 are padded with zeros (the mean colour of the
normalised input) at the bottom and right up to the next multiple, as DINOv2's segmentation
code pads (it centres the padding; bottom/right keeps the patch grid anchored at the
image's top-left corner, so outputs need no shift). :class:`DINOv2Segmentor` crops its
outputs back to the input's extent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpointing import checkpointed, checkpointing
from .heads import HEADS
from .mit import DropPath
from .output import SegOutput

PATCH = 14
PRETRAIN_GRID = 37  # 518 / 14: the grid the released position embeddings were trained at
NUM_REGISTERS = 4
NORM_EPS = 1e-6
MLP_RATIO = 4
LAYERSCALE_INIT = 1e-5  # DINOv2's training value; pretrained files overwrite it
# The final LayerNorm is the last "layer" of layer-wise LR decay; the head comes after it.
EMBED_PARAMS = ("patch_embed.", "cls_token", "pos_embed", "register_tokens")


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
            grad only; same results, less memory, see :mod:`bida.models.checkpointing`).
        pos_grid: side of the square patch grid of the position embeddings (37 for every
            released model; smaller for reference tests).

    Shape:
        (B, 3, H, W) -> four (B, C, ceil(H/14), ceil(W/14)) maps: the outputs of the blocks
        ``levels``, each through the final LayerNorm, without the class and register tokens.
    """

    def __init__(self, arch: str = "dinov2_vits14", width: float = 1.0, drop_path: float = 0.0,
                 grad_checkpoint: bool = False, pos_grid: int = PRETRAIN_GRID):
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
        self.antialias = spec.registers > 0  # the register models' (and Hugging Face's) interpolation
        self.grad_checkpoint = grad_checkpoint
        self.patch_embed = PatchEmbed(self.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, self.dim))
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, self.dim))
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

        Bicubic in float32 (``align_corners=False``; antialiased for the register
        variants), cast back to the parameter's dtype; unchanged at the pretraining grid.

        Shape:
            -> (1, 1 + gh*gw, C)
        """
        pos = self.pos_embed
        if (gh, gw) == (self.pos_grid, self.pos_grid):
            return pos
        g, c = self.pos_grid, pos.shape[-1]
        patch = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=(gh, gw), mode="bicubic", align_corners=False,
                              antialias=self.antialias).to(pos.dtype)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], 1)

    def tokens(self, x: Tensor, blocks: tuple[int, ...]) -> tuple[list[Tensor], int, int]:
        """The raw outputs (before the final norm) of the given blocks, and the patch grid.

        ``x`` is padded at the bottom and right to multiples of 14 (zeros) when needed.

        Shape:
            x: (B, 3, H, W) -> [(B, 1 + R + gh*gw, C)], gh = ceil(H/14), gw = ceil(W/14),
            tokens ordered [cls, R registers, patches row by row].
        """
        h, w = x.shape[-2:]
        pad_h, pad_w = padded_size(h) - h, padded_size(w) - w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        patches = self.patch_embed(x)  # (B, C, gh, gw)
        b, _, gh, gw = patches.shape
        t = torch.cat([self.cls_token.expand(b, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
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

    def forward(self, x: Tensor) -> list[Tensor]:
        outs, gh, gw = self.tokens(x, self.levels)
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


class DINOv2Segmentor(nn.Module):
    """A DINOv2 encoder, a simple feature pyramid and a SegFormer or DAFormer decoder.

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

    Shape:
        input (B, 3, H, W) -> logits and features (B, ., ceil(2H/7), ceil(2W/7)).
    """

    target_stem = None
    concat_domains_ok = True

    def __init__(self, num_classes: int, backbone: str = "dinov2_vits14",
                 decoder: Literal["segformer", "daformer"] = "daformer", decoder_dim: int = 256,
                 width: float = 1.0, drop_path: float = 0.0, proj_dim: int = 256, grad_checkpoint: bool = False,
                 pos_grid: int = PRETRAIN_GRID):
        super().__init__()
        if decoder not in HEADS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {sorted(HEADS)}")
        self.arch = backbone
        self.num_classes = num_classes
        self.feature_kind = "decoder"
        self.backbone = VisionTransformer(backbone, width, drop_path, grad_checkpoint, pos_grid)
        dim = self.backbone.dim
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

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, layer_decay: float = 1.0) -> list[dict]:
        """Encoder parameters at ``lr x layer_decay ** (depth + 1 - layer)`` (:meth:`layer_id`:
        the final norm at ``lr``, the embeddings at ``lr x layer_decay ** (depth + 1)``, the
        mmseg/BEiT rule); pyramid, decoder and projection head (all randomly initialised) at
        ``head_lr_mult x lr``. Biases, norms and LayerScale gammas have no weight decay
        (DINOv2's rule).

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
            no_wd = name.endswith(".bias") or "norm" in name or name.endswith(".gamma")
            key = (mult, no_wd)
            if key not in groups:
                groups[key] = {"params": [], "lr": lr * mult, "lr_mult": mult,
                               "name": f"backbone_x{mult:.4g}" + ("_no_wd" if no_wd else "")}
                if no_wd:
                    groups[key]["weight_decay"] = 0.0
            groups[key]["params"].append(p)
        head = [p for m in (self.neck, self.decode_head, self.proj) for p in m.parameters() if p.requires_grad]
        return [*groups.values(), {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "head"}]

    def forward(self, x: Tensor, domain: Literal["source", "target"] = "source") -> SegOutput:  # noqa: ARG002
        """Logits and contrast features of a batch (either domain).

        Shape:
            x: (B, 3, H, W) -> SegOutput(logits (B, K, h, w), features (B, proj_dim, h, w)),
            h = ceil(2H/7), w = ceil(2W/7).
        """
        h, w = ((4 * s + PATCH - 1) // PATCH for s in x.shape[-2:])  # ceil(4s/14), in integers (see padded_size)
        logits, fused = self.decode_head(self.neck(self.backbone(x)))
        return SegOutput(logits=logits[..., :h, :w], features=self.proj(fused[..., :h, :w]))
