"""The paper's losses (public): segmentation CE, entropy and the pixel-prototype contrast.

Defined in :mod:`bida.method.losses`; this module is the stable import path for other tooling.
"""

from .method.losses import (
    seg_cross_entropy, ce_pixel_count, entropy, pixel_prototype_contrast, inverse_sqrt_frequency_weights,
)

__all__ = [
    "seg_cross_entropy", "ce_pixel_count", "entropy", "pixel_prototype_contrast",
    "inverse_sqrt_frequency_weights",
]
