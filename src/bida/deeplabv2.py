"""Compatibility path: the DeepLab-V2 segmentor now lives in :mod:`bida.models.deeplabv2`.

``from bida.deeplabv2 import DeepLabV2, SegOutput, build_model`` keeps working;
``build_model`` is the dispatching one of :mod:`bida.models` (ResNet and MiT backbones).
"""

from .models import SegOutput, build_model, upsample
from .models.deeplabv2 import ARCHS, ASPP_DILATIONS, ASPPClassifier, BasicBlock, Bottleneck, DeepLabV2, Stem

__all__ = ["ARCHS", "ASPP_DILATIONS", "ASPPClassifier", "BasicBlock", "Bottleneck", "DeepLabV2", "SegOutput",
           "Stem", "build_model", "upsample"]
