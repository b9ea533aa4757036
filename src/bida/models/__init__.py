"""Segmentors: anything that maps an image batch to a :class:`SegOutput`.

- :mod:`bida.models.deeplabv2`: DeepLab-V2 (dilated ResNet + ASPP), ``model.backbone: resnet*``.
- :mod:`bida.models.mit`: MiT-B0..B5 encoders with a decoder from :mod:`bida.models.heads`
  (``model.decoder: segformer | daformer``), ``model.backbone: mit_b*``.
- :mod:`bida.models.dinov2`: DINOv2 ViTs (patch 14, with or without registers), a simple
  feature pyramid and the same decoders, ``model.backbone: dinov2_*``.

- :mod:`bida.models.hrda`: HRDA's context and detail crops fused by a scale attention, around
  a MiT, DINOv2 or DeepLab-V2 segmentor (``model.hrda.enabled``).

- :mod:`bida.models.weights`: pretrained and checkpoint weights into a model (each public
  release's key layout, detected and converted).
- :mod:`bida.models.grad_checkpoint`: activation checkpointing (``model.grad_checkpoint``);
  :mod:`bida.models.sync_bn`: BatchNorm synchronised across processes (``model.sync_bn``).

All expose the interface the trainer uses: ``forward(x, domain) -> SegOutput``,
``param_groups(lr, head_lr_mult)``, ``num_classes``, ``feature_dim``, ``proj`` (or None),
``target_stem`` (or None), ``sync_target_stem()`` and ``concat_domains_ok``.

May import only the shared modules (:mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint`);
never :mod:`bida.method`, :mod:`bida.engine`, :mod:`bida.tools` or :mod:`bida.data`
(``tests/test_layering.py`` checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..config import default_feature
from ..errors import ConfigError
from .deeplabv2 import ARCHS as RESNET_ARCHS
from .deeplabv2 import DeepLabV2, build_deeplabv2
from .dinov2 import ARCHS as DINOV2_ARCHS
from .dinov2 import DINOv2Segmentor, VisionTransformer
from .hrda import HRDAOutput, HRDASegmentor
from .mit import ARCHS as MIT_ARCHS
from .mit import MiTSegmentor, MixTransformer
from .output import SegOutput, upsample

if TYPE_CHECKING:
    from ..config.schema import HRDAConfig

__all__ = ["SegOutput", "DeepLabV2", "MiTSegmentor", "MixTransformer", "DINOv2Segmentor", "VisionTransformer",
           "build_model", "upsample", "HRDASegmentor", "HRDAOutput", "RESNET_ARCHS", "MIT_ARCHS", "DINOV2_ARCHS", "is_mit", "is_dinov2"]


def is_mit(backbone: str) -> bool:
    """Whether ``model.backbone`` names a Mix Transformer (else a DeepLab-V2 ResNet)."""
    return backbone in MIT_ARCHS


def is_dinov2(backbone: str) -> bool:
    """Whether ``model.backbone`` names a DINOv2 vision transformer."""
    return backbone in DINOV2_ARCHS


def build_model(model_cfg, num_classes: int, feature: str | None = None) -> nn.Module:
    """The segmentor of a ``ModelConfig``: DeepLab-V2 for ``resnet*``, MiT for ``mit_b*``,
    a DINOv2 ViT for ``dinov2_*``.

    ``feature`` is ``method.feature``: which map the contrast reads (``decoder`` for MiT and DINOv2);
    None: the backbone's default (:func:`bida.config.default_feature`).
    Combinations that make no sense are rejected when the config is loaded
    (:func:`bida.config.check_model_choices`); the constructors check them again.

    Raises:
        ConfigError: ``model.bn_batch_stats`` without ``model.freeze_bn``; a ``method.feature``
            the segmentor does not have.
    """
    if feature is None:
        feature = default_feature(model_cfg.backbone)
    if not is_mit(model_cfg.backbone) and not is_dinov2(model_cfg.backbone):
        return _with_hrda(build_deeplabv2(model_cfg, num_classes, feature), model_cfg.hrda)
    if feature != "decoder":
        raise ConfigError(f"method.feature={feature}: model.backbone={model_cfg.backbone} contrasts its decoder "
                          "feature (method.feature=decoder)")
    segmentor = DINOv2Segmentor if is_dinov2(model_cfg.backbone) else MiTSegmentor
    vit_only = ({"input_scale": model_cfg.input_scale, "mask_token": model_cfg.mask_token}
                if is_dinov2(model_cfg.backbone) else {})
    model = segmentor(
        num_classes=num_classes,
        backbone=model_cfg.backbone,
        decoder=model_cfg.decoder,
        decoder_dim=model_cfg.decoder_dim,
        width=model_cfg.width,
        drop_path=model_cfg.drop_path,
        proj_dim=model_cfg.proj_dim,
        grad_checkpoint=model_cfg.grad_checkpoint,
        **vit_only,
    )
    return _with_hrda(model, model_cfg.hrda)


def _with_hrda(model: nn.Module, hrda: HRDAConfig) -> nn.Module:
    """``model`` inside :class:`HRDASegmentor` when ``model.hrda.enabled``, else ``model``."""
    if not hrda.enabled:
        return model
    # Drawn after the segmentor: its weights start as without HRDA, the attention decoder's follow.
    return HRDASegmentor(model, hrda.context_scale, tuple(hrda.detail_crop), hrda.attention_classwise,
                         hrda.slide_pseudo_labels)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP and/or torch.compile wrapper (``model`` itself when unwrapped)."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def model_state_for_checkpoint(model: nn.Module) -> dict:
    """State dict of the underlying module (unwraps DDP and torch.compile)."""
    return unwrap_model(model).state_dict()
