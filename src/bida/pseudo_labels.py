"""Pseudo labels of target images (public): dynamic label transfer, calibration, static labels.

Defined in :mod:`bida.method.pseudo_labels`; this module is the stable import path for other tooling.
"""

from .method.pseudo_labels import (
    label_transfer, fuse_labels, calibrated_prototypes, calibration_weight, Calibration,
    sample_confidences, class_thresholds, image_thresholds, static_labels,
)

__all__ = [
    "label_transfer", "fuse_labels", "calibrated_prototypes", "calibration_weight", "Calibration",
    "sample_confidences", "class_thresholds", "image_thresholds", "static_labels",
]
