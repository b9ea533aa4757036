"""Mix Transformer (MiT-B0..B5, SegFormer) and the segmentor built on it.

A MiT is four stages. Each stage starts with an *overlapping* patch embedding (a strided
conv, 7x7/4 for the first stage, 3x3/2 after, then LayerNorm), runs ``depth`` blocks and
ends with a LayerNorm; its tokens go back to a (B, C, h, w) map at stride 4, 8, 16, 32.
A block is pre-norm: efficient self-attention, whose keys and values come from the tokens
reduced by a ``sr`` x ``sr`` strided conv + LayerNorm (``sr`` = 8, 4, 2, 1 per stage), then
a Mix-FFN (linear, 3x3 depthwise conv, GELU, linear: the conv gives the position
information that MiT has no positional embedding for). Both residual branches go through
stochastic depth, whose rate grows linearly from 0 to ``drop_path`` over all blocks.

Parameter names follow the SegFormer/mmseg ``mit_b*.pth`` files (``patch_embed1.proj``,
``block1.0.attn.q``/``kv``/``sr``/``norm``/``proj``, ``block1.0.mlp.fc1``/``dwconv.dwconv``/
``fc2``, ``norm1``...), so those load without renaming; :func:`from_hf_segformer` (at the end of this
module) maps the Hugging Face ``segformer`` layout onto them. Layer norms inside the blocks and after each
stage use eps 1e-6, those of the patch embeddings and the key/value reduction 1e-5, as the
released checkpoints were trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from fractions import Fraction
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError
from .grad_checkpoint import checkpointed, checkpointing
from .heads import HEADS, AttentionHead
from .output import SegOutput


@dataclass(frozen=True)
class MiTSpec:
    """Per-stage settings of one MiT variant (SegFormer, Table 6)."""

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


ARCHS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": MiTSpec((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": MiTSpec((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": MiTSpec((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": MiTSpec((64, 128, 320, 512), (3, 6, 40, 3)),
}
STRIDES = (4, 8, 16, 32)
MIN_INPUT = 32  # the first stage (stride 4) must keep >= 1 key/value token after its 8x8 reduction
NORM_EPS = 1e-6


def scaled_dims(spec: MiTSpec, width: float) -> tuple[int, ...]:
    """Stage widths times ``width``, rounded to a multiple of the stage's heads (at least one per head)."""
    return tuple(max(h, int(round(d * width / h)) * h) for d, h in zip(spec.dims, spec.heads))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability ``p``.

    Kept samples are scaled by 1/(1-p), so the expectation is unchanged; identity in eval
    mode and for ``p = 0``. The mask comes from the global torch generator, so a seeded run
    (and a resumed one, which restores the generator) draws the same masks.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows (kernel > stride), then LayerNorm over channels.

    Shape:
        (B, C_in, H, W) -> tokens (B, h*w, C), with h = ceil(H / stride), w = ceil(W / stride)
    """

    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced token map.

    ``q`` and ``kv`` (keys then values in one linear layer) have biases; for ``sr > 1``
    the tokens are reduced by an ``sr`` x ``sr`` conv of stride ``sr`` and a LayerNorm
    before ``kv``, so the cost is N x N/sr^2 instead of N x N.

    Shape:
        x: (B, N, C), N = h*w -> (B, N, C)
    """

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of its {heads} heads")
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, d)
        src = x
        if self.sr_ratio > 1:
            src = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)  # (B, N', C)
            src = self.norm(src)
        k, v = self.kv(src).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv applied to a token sequence laid out as its (h, w) map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm1 x)), then + drop(mlp(norm2 x))."""

    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """The MiT encoder: four stages at strides 4, 8, 16, 32.

    Args:
        arch: ``mit_b0`` .. ``mit_b5``.
        width: stage-width multiplier (1.0 = the published widths; < 1 for CPU demos).
        drop_path: the stochastic-depth rate of the last block (0 for the first).
        grad_checkpoint: recompute each block's activations in the backward (training with
            grad only; same results, less memory, see :mod:`bida.models.grad_checkpoint`).

    Shape:
        (B, 3, H, W) -> [(B, C_i, ceil(H / s_i), ceil(W / s_i)) for s_i in 4, 8, 16, 32]
    """

    def __init__(self, arch: str = "mit_b0", width: float = 1.0, drop_path: float = 0.1,
                 grad_checkpoint: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown MiT variant {arch!r}; choose from {sorted(ARCHS)}")
        spec = ARCHS[arch]
        self.dims = scaled_dims(spec, width)
        self.depths = spec.depths
        self.grad_checkpoint = grad_checkpoint
        self.sr_ratios = spec.sr_ratios
        n = sum(spec.depths)
        rates = [drop_path * i / (n - 1) for i in range(n)]  # stochastic depth: 0 at the first block, linear
        in_ch, first = 3, 0
        for i, (dim, depth, heads, sr) in enumerate(zip(self.dims, spec.depths, spec.heads, spec.sr_ratios), 1):
            kernel, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(in_ch, dim, kernel, stride))
            setattr(self, f"block{i}", nn.ModuleList(
                Block(dim, heads, sr, spec.mlp_ratio, rates[first + j]) for j in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=NORM_EPS))
            in_ch, first = dim, first + depth
        self.last_level = nn.Identity()  # names the deepest level for forward hooks (feature distance)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        if min(x.shape[-2:]) < MIN_INPUT:
            raise ValueError(f"MiT needs inputs of at least {MIN_INPUT}x{MIN_INPUT} pixels, got "
                             f"{tuple(x.shape[-2:])}")
        b = x.shape[0]
        levels = []
        recompute = checkpointing(self, self.grad_checkpoint)
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)  # (B, h*w, C)
            for block in getattr(self, f"block{i}"):
                x = checkpointed(block, x, h, w) if recompute else block(x, h, w)
            x = getattr(self, f"norm{i}")(x).transpose(1, 2).reshape(b, -1, h, w)  # (B, C, h, w)
            levels.append(x)
        levels[-1] = self.last_level(levels[-1])
        return levels


def _init_weights(m: nn.Module) -> None:
    """Truncated normal (std 0.02) linear layers, fan-out normal convs, unit LayerNorms (as SegFormer)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(m.bias)


class MiTSegmentor(nn.Module):
    """A MiT encoder with a SegFormer or DAFormer decoder, behind the DeepLab-V2 interface.

    The contrast reads the **fused decoder feature** (the input of the decoder's dropout
    and classifier: after the 1x1 fuse conv + BN + ReLU for SegFormer, after the bottleneck
    for DAFormer), through a projection head ``proj`` (1x1 conv, ReLU, 1x1 conv to
    ``proj_dim`` channels), at 1/4 of the input resolution like the logits
    (``method.feature = decoder``). The decoder's last layer gives class scores, so the
    projection keeps the contrast off the classifier's own space, as DeepLab-V2's
    ``method.feature = backbone`` does.

    Every input goes through the same network (``domain`` is accepted and ignored: no
    separate target stem); the only BatchNorms are the decoder's, trained, so source and
    target may share one forward (``concat_domains_ok``).

    Args:
        num_classes: K.
        backbone: ``mit_b0`` .. ``mit_b5``.
        decoder: ``segformer`` or ``daformer``.
        decoder_dim: channels of the per-level embeddings and the fused feature
            (SegFormer-B0/B1: 256, B2-B5: 768; DAFormer: 256).
        width: MiT stage-width multiplier.
        drop_path: stochastic-depth rate of the last encoder block.
        proj_dim: contrast feature channels.
        grad_checkpoint: activation checkpointing of the encoder blocks (``model.grad_checkpoint``).

    Shape:
        input (B, 3, H, W) -> logits and features (B, ., ceil(H/4), ceil(W/4)).
    """

    target_stem = None  # the DeepLab-V2 option of the official code has no MiT counterpart
    concat_domains_ok = True

    def __init__(self, num_classes: int, backbone: str = "mit_b0",
                 decoder: Literal["segformer", "daformer"] = "segformer", decoder_dim: int = 256,
                 width: float = 1.0, drop_path: float = 0.1, proj_dim: int = 256, grad_checkpoint: bool = False):
        super().__init__()
        if decoder not in HEADS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {sorted(HEADS)}")
        self.arch = backbone
        self.width = width  # channel multiplier: named when a weight file of another width does not fit
        self.num_classes = num_classes
        self.feature_kind = "decoder"
        self.backbone = MixTransformer(backbone, width, drop_path, grad_checkpoint)
        self.decode_head = HEADS[decoder](self.backbone.dims, decoder_dim, num_classes)
        self.proj = nn.Sequential(nn.Conv2d(decoder_dim, decoder_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(decoder_dim, proj_dim, 1))
        for m in self.proj.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = proj_dim
        self.backbone_channels = self.backbone.dims[-1]

    def sync_target_stem(self) -> None:
        """Nothing to copy: there is no target stem (the trainer calls this after source steps)."""

    def backbone_output_module(self) -> nn.Module:
        """The module whose output is the deepest encoder level (read by the feature distance)."""
        return self.backbone.last_level

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """Encoder parameters at ``lr`` (its LayerNorms without weight decay, as DAFormer);
        decoder and projection head at ``head_lr_mult x lr``."""
        head = [p for m in (self.decode_head, self.proj) for p in m.parameters() if p.requires_grad]
        named = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]
        backbone = [p for n, p in named if "norm" not in n]
        norms = [p for n, p in named if "norm" in n]  # DAFormer: no weight decay on the encoder's norms
        return [
            {"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
            {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "head"},
            {"params": norms, "lr": lr, "lr_mult": 1.0, "weight_decay": 0.0, "name": "backbone_norm"},
        ]

    def forward(self, x: Tensor, domain: Literal["source", "target"] = "source") -> SegOutput:  # noqa: ARG002
        """Logits and contrast features of a batch (either domain).

        Shape:
            x: (B, 3, H, W) -> SegOutput(logits (B, K, h, w), features (B, proj_dim, h, w)),
            h = ceil(H/4), w = ceil(W/4).
        """
        return self.decode(self.encode(x), tuple(x.shape[-2:]))

    # The two halves of :meth:`forward`, for wrappers that reuse them (HRDA, bida.models.hrda).
    output_stride = Fraction(4)  # input pixels per output cell: outputs are ceil(H/4) x ceil(W/4)
    min_input = MIN_INPUT  # the shortest side the encoder takes

    def encode(self, x: Tensor, domain: Literal["source", "target"] = "source") -> list[Tensor]:  # noqa: ARG002
        """The encoder's four levels (strides 4, 8, 16, 32) that the decoder reads."""
        return self.backbone(x)

    def decode(self, levels: list[Tensor], size: tuple[int, int]) -> SegOutput:  # noqa: ARG002
        """Logits and contrast features of :meth:`encode`'s levels (``size``: the input's, unused)."""
        logits, fused = self.decode_head(levels)
        return SegOutput(logits=logits, features=self.proj(fused))

    def attention_head(self, out_channels: int) -> nn.Module:
        """A fresh decoder of ``out_channels`` maps on :meth:`encode`'s levels (HRDA's scale attention)."""
        return AttentionHead(self.backbone.dims, self.decode_head.embed_dim, out_channels)


# Checkpoint filters: other releases' key layouts as this module's names (the mmseg ones), kept
# beside the model whose names they target; bida.models.weights detects the layout and calls them.

# Hugging Face segformer -> mmseg MiT names, inside one block (``key``/``value`` are merged apart).
_HF_BLOCK_NAMES = {
    "layer_norm_1.": "norm1.", "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.", "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.", "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.", "mlp.dense2.": "mlp.fc2.",
}
_HF_PATCH = re.compile(r"encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(\d+)\.(.+)")
_HF_NORM = re.compile(r"encoder\.layer_norm\.(\d+)\.(.+)")
_HF_KV = re.compile(r"attention\.self\.(key|value)\.(weight|bias)")


def hf_segformer_name(key: str) -> str | None:
    """The mmseg MiT name of a Hugging Face encoder key (``segformer.`` already removed), else None."""
    if m := _HF_PATCH.fullmatch(key):
        return f"patch_embed{int(m[1]) + 1}.{'proj' if m[2] == 'proj' else 'norm'}.{m[3]}"
    if m := _HF_NORM.fullmatch(key):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    if m := _HF_BLOCK.fullmatch(key):
        for old, new in _HF_BLOCK_NAMES.items():
            if m[3].startswith(old):
                return f"block{int(m[1]) + 1}.{m[2]}.{new}{m[3][len(old):]}"
    return None


def from_hf_segformer(state: dict[str, torch.Tensor], path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face segformer keys as the bida MiT segmentor's (``backbone.`` + mmseg names).

    Returns:
        (converted state, skipped keys: the ImageNet classifier and any decode head).
    """
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    kv: dict[str, dict[str, torch.Tensor]] = {}  # "block1.0.attn.kv.weight" -> {"key": ..., "value": ...}
    for key, value in state.items():
        if key.startswith(("classifier.", "decode_head.")):
            skipped.append(key)
            continue
        name = key[len("segformer."):] if key.startswith("segformer.") else key
        block = _HF_BLOCK.fullmatch(name)
        if block and (m := _HF_KV.fullmatch(block[3])):
            kv.setdefault(f"block{int(block[1]) + 1}.{block[2]}.attn.kv.{m[2]}", {})[m[1]] = value
            continue
        new = hf_segformer_name(name)
        out[f"backbone.{new}" if new is not None else key] = value  # unknown keys stay, to be reported
    for name, parts in kv.items():
        if set(parts) != {"key", "value"}:
            lacking = "value" if "key" in parts else "key"
            raise CheckpointError(f"pretrained file {path}: the attention {lacking} layer of {name} is missing")
        out[f"backbone.{name}"] = torch.cat([parts["key"], parts["value"]], 0)  # mmseg kv: keys, then values
    return out, skipped


def from_mit_imagenet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ImageNet ``mit_b*.pth`` (encoder keys without a prefix, maybe an ImageNet ``head``)
    as the bida MiT segmentor's keys (``backbone.`` prefixed).

    Returns:
        (converted state, skipped keys: the ImageNet head).
    """
    skipped = [k for k in state if k.startswith("head.")]
    return {f"backbone.{k}": v for k, v in state.items() if k not in skipped}, skipped
