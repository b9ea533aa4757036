"""DeepLab-V2: a dilated ResNet (output stride 8) with the ASPP classifier.

State-dict keys follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``) and
the DeepLab-V2 checkpoints that UDA repositories share (the classifier is
``layer5.conv2d_list.{0..3}``), so both load without renaming (see :mod:`bida.weights`).

Bottlenecks put their stride on the first 1x1 conv, as the caffe DeepLab does; layer3 and
layer4 keep stride 1 and use dilation 2 and 4. The ASPP classifier is four 3x3 convs of
dilation 6/12/18/24, each giving K class scores, **summed** into the logits.

HRDA (:mod:`bida.models.hrda`) reads the model through :meth:`DeepLabV2.encode` /
:meth:`DeepLabV2.decode`. Its crops need cell ``i`` of the output grid to stand for input pixels
``[8i, 8i + 8)`` on every crop alike. The caffe stem's ceil-mode max pool adds one cell past
the end (an input of side ``H``, a multiple of 8, gives ``H/2`` conv1 cells, then ``H/4 + 1``
pooled cells, then ``H/8 + 1`` output cells, cell ``i`` centred on input pixel ``8i``: the last
one on pixel ``H``, outside the input). :meth:`encode` pools in floor mode instead, which is
the ceil-mode output without that last row and column: ``H/8`` cells, as mmseg's ResNetV1c
gives HRDA. :meth:`forward` keeps the caffe pool.
"""

from __future__ import annotations

import copy
from fractions import Fraction
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .grad_checkpoint import checkpointed, checkpointing
from .output import SegOutput

ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
ASPP_DILATIONS = (6, 12, 18, 24)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # caffe style: the stride sits on the first 1x1 conv, not on the 3x3.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Stage(nn.Sequential):
    """A ResNet stage (``layer1``..``layer4``): its blocks in order, each optionally checkpointed.

    Checkpointing block by block (``grad_checkpoint``, training with grad only) keeps each
    block's input and recomputes one block at a time in the backward; the stage stays one
    module call, so a forward hook on it (the feature distance reads ``layer4``) fires once.
    State-dict keys are those of ``nn.Sequential``.
    """

    grad_checkpoint = False

    def forward(self, x: Tensor) -> Tensor:
        recompute = checkpointing(self, self.grad_checkpoint)
        for block in self:
            x = checkpointed(block, x) if recompute else block(x)
        return x


class ASPPClassifier(nn.Module):
    """Four parallel dilated 3x3 convs, each to K scores; the logits are their sum."""

    def __init__(self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (logits (B,K,h,w), branches (B,4K,h,w)); each branch is computed once."""
        branches = [conv(x) for conv in self.conv2d_list]
        return torch.stack(branches, 0).sum(0), torch.cat(branches, 1)


class ASPPAttentionHead(ASPPClassifier):
    """HRDA's scale attention on DeepLab-V2: an ASPP of the classifier's kind (four dilated 3x3
    convs, summed, no norm or activation) to ``out_channels`` maps (K, or 1 for all classes), on
    the deepest of :meth:`DeepLabV2.encode`'s levels. Its output is the attention's logit."""

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(logits (B, out_channels, h, w), branches) of ``levels[-1]`` (B, C, h, w)."""
        return super().forward(levels[-1])


class Stem(nn.Module):
    """conv1, bn1, maxpool, layer1: the part the official code duplicates for target images."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, layer1: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.layer1 = conv1, bn1, layer1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


def _channels(base: int, width: float) -> int:
    return max(4, int(round(base * width)))


class DeepLabV2(nn.Module):
    """DeepLab-V2 with a ResNet backbone.

    Args:
        num_classes: K.
        backbone: ``resnet18|resnet34|resnet50|resnet101``.
        width: channel multiplier (1.0 = standard ResNet).
        freeze_bn: keep BatchNorm in eval mode with frozen affine parameters (the paper).
        bn_batch_stats: with ``freeze_bn``, freeze only the affine parameters and leave BN in
            train mode: each training forward normalises with its own batch statistics and
            updates the running statistics that evaluation uses (the official code).
        feature: ``aspp_branches`` (concatenated ASPP branch scores, 4K channels) or
            ``backbone`` (layer4 through a 2-layer 1x1 projection head, ``proj_dim`` channels).
        separate_target_stem: own conv1/bn1/layer1 for target images (the official code).
        grad_checkpoint: recompute the activations of the blocks of layer1..layer4 in the
            backward (training with grad only; same results, less memory, see
            :mod:`bida.models.grad_checkpoint`).

    Shape:
        input (B, 3, H, W) -> logits (B, K, ceil(H/8), ceil(W/8)) roughly (caffe pooling).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        width: float = 1.0,
        freeze_bn: bool = True,
        feature: Literal["aspp_branches", "backbone"] = "aspp_branches",
        separate_target_stem: bool = False,
        proj_dim: int = 256,
        bn_batch_stats: bool = False,
        grad_checkpoint: bool = False,
    ):
        super().__init__()
        if backbone not in ARCHS:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(ARCHS)}")
        if feature not in ("aspp_branches", "backbone"):
            raise ValueError(f"DeepLab-V2 contrasts 'aspp_branches' or 'backbone' features, not {feature!r}")
        if bn_batch_stats and not freeze_bn:
            raise ValueError("bn_batch_stats needs freeze_bn: without it BN trains with batch statistics anyway")
        block_kind, layers = ARCHS[backbone]
        block = Bottleneck if block_kind == "bottleneck" else BasicBlock
        self.arch = backbone
        self.width = width  # channel multiplier: named when a weight file of another width does not fit
        self.num_classes = num_classes
        self.feature_kind = feature
        self.freeze_bn = freeze_bn
        self.bn_batch_stats = bn_batch_stats
        self.inplanes = _channels(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.layer1 = self._make_layer(block, _channels(64, width), layers[0])
        self.layer2 = self._make_layer(block, _channels(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, _channels(256, width), layers[2], dilation=2)
        self.layer4 = self._make_layer(block, _channels(512, width), layers[3], dilation=4)
        self.grad_checkpoint = grad_checkpoint
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            stage.grad_checkpoint = grad_checkpoint  # the target stem's layer1 is a copy of layer1
        out_channels = self.inplanes
        self.layer5 = ASPPClassifier(out_channels, num_classes)
        self.feature_dim = proj_dim if feature == "backbone" else 4 * num_classes
        self.backbone_channels = out_channels
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.relu = nn.ReLU(inplace=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in set(self.layer5.conv2d_list):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # The projection head draws its random numbers last: the segmentation path starts with
        # the same weights with and without it (method.pretrain_head's source-only models).
        self.proj: nn.Module | None = None
        if feature == "backbone":
            self.proj = nn.Sequential(
                nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(out_channels, proj_dim, 1)
            )
            for m in self.proj.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.target_stem: Stem | None = None
        if separate_target_stem:  # after the random init: a copy draws no random numbers
            self.target_stem = Stem(copy.deepcopy(self.conv1), copy.deepcopy(self.bn1), copy.deepcopy(self.layer1))
        self._apply_bn_freeze()

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> Stage:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion or dilation > 1:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return Stage(*layers)

    # ------------------------------------------------------------------ state helpers
    def sync_target_stem(self) -> None:
        """Copy the source stem's weights and BN statistics into the target stem.

        Called after loading weights without a trained target stem and after every step of
        a source phase (which trains the source stem only). The copy is in place, so that an
        optimizer or a DDP wrapper holding the target stem's parameters stays valid.
        """
        if self.target_stem is None:
            return
        source = {f"{name}.{key}": value for name in ("conv1", "bn1", "layer1")
                  for key, value in getattr(self, name).state_dict().items()}
        self.target_stem.load_state_dict(source)

    @property
    def concat_domains_ok(self) -> bool:
        """Whether source and target may share one forward (one BN batch) in training.

        Not with ``bn_batch_stats``: the official code forwards each domain separately, so
        BN normalises each with its own batch statistics.
        """
        return not self.bn_batch_stats

    def _apply_bn_freeze(self) -> None:
        if not self.freeze_bn:
            return
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)
                if not self.bn_batch_stats:  # eval mode: stored statistics, never updated
                    m.eval()

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        self._apply_bn_freeze()  # frozen BN stays in eval mode in training too (unless bn_batch_stats)
        return self

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """Backbone parameters at ``lr``, classifier (and projection head) at ``head_lr_mult x lr``."""
        head_ids = {id(p) for m in (self.layer5, self.proj) if m is not None for p in m.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in params if id(p) not in head_ids]
        head = [p for p in params if id(p) in head_ids]
        return [
            {"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
            {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "head"},
        ]

    def backbone_output_module(self) -> nn.Module:
        """The module whose output is the deepest backbone feature (read by the feature distance)."""
        return self.layer4

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, domain: Literal["source", "target"] = "source") -> SegOutput:
        """Logits and contrast features of a batch from one domain.

        Shape:
            x: (B, 3, H, W) -> SegOutput(logits (B, K, h, w), features (B, D, h, w)).
        """
        if domain == "target" and self.target_stem is not None:
            x = self.target_stem(x)
        else:
            x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        x = self.layer4(self.layer3(self.layer2(x)))  # (B, C, h, w), output stride 8
        return self.decode([x], tuple(x.shape[-2:]))

    # ------------------------------------------------------------------ HRDA's interface
    output_stride = Fraction(8)  # input pixels per cell of encode/decode's grid (H/8 cells)
    min_input = 8  # the shortest side encode takes: one output cell

    def encode(self, x: Tensor, domain: Literal["source", "target"] = "source") -> list[Tensor]:
        """layer4's output (what the ASPP classifier reads), with the stem's max pool in floor mode.

        The floor-mode pool drops the ceil-mode pool's extra last row and column (see the module
        docstring), so that cell ``i`` stands for input pixels ``[8i, 8i + 8)`` on any input whose
        sides are multiples of 8.

        Shape:
            x: (B, 3, H, W) -> [(B, C, floor-pooled H/8, W/8)] (H/8, W/8 for multiples of 8).
        """
        stem = self.target_stem if domain == "target" and self.target_stem is not None else self
        x = F.max_pool2d(stem.relu(stem.bn1(stem.conv1(x))), 3, 2, 1, ceil_mode=False)
        return [self.layer4(self.layer3(self.layer2(stem.layer1(x))))]

    def decode(self, levels: list[Tensor], size: tuple[int, int]) -> SegOutput:  # noqa: ARG002
        """The ASPP classifier's logits and the contrast features (as :meth:`forward` gives them)
        of :meth:`encode`'s levels (``size``: the input's, unused).

        Shape:
            levels: [(B, C, h, w)] -> SegOutput(logits (B, K, h, w), features (B, D, h, w)).
        """
        x = levels[-1]
        logits, branches = self.layer5(x)
        features = branches if self.proj is None else self.proj(x)
        return SegOutput(logits=logits, features=features)

    def attention_head(self, out_channels: int) -> nn.Module:
        """A fresh ASPP of ``out_channels`` maps on :meth:`encode`'s levels (HRDA's scale attention
        on DeepLab-V2: a second DeepLab-V2 classifier)."""
        return ASPPAttentionHead(self.backbone_channels, out_channels)


def build_deeplabv2(model_cfg, num_classes: int, feature: str = "aspp_branches") -> DeepLabV2:
    """A :class:`DeepLabV2` from a ``ModelConfig``.

    Raises:
        ConfigError: ``model.bn_batch_stats`` without ``model.freeze_bn``.
    """
    if model_cfg.bn_batch_stats and not model_cfg.freeze_bn:
        raise ConfigError("model.bn_batch_stats=true needs model.freeze_bn=true (the official code's BN: "
                          "affine parameters frozen, batch statistics in training)")
    return DeepLabV2(
        num_classes=num_classes,
        backbone=model_cfg.backbone,
        width=model_cfg.width,
        freeze_bn=model_cfg.freeze_bn,
        feature=feature,
        separate_target_stem=model_cfg.separate_target_stem,
        proj_dim=model_cfg.proj_dim,
        bn_batch_stats=model_cfg.bn_batch_stats,
        grad_checkpoint=model_cfg.grad_checkpoint,
    )
