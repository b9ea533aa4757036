"""Class prototypes and their similarities (public).

Defined in :mod:`bida.method.prototypes`; this module is the stable import path for other tooling.
"""

from .method.prototypes import (
    downsample_labels, class_sums, prototypes_from_sums, class_prototypes, pair_prototypes,
    prototype_similarity, scaled_similarity, PrototypeMemory,
)

__all__ = [
    "downsample_labels", "class_sums", "prototypes_from_sums", "class_prototypes", "pair_prototypes",
    "prototype_similarity", "scaled_similarity", "PrototypeMemory",
]
