"""DAFormer's ImageNet feature distance for the teacher schedule (``loss.feature_distance_weight``).

The student's source backbone features are kept near those of a frozen copy of the
ImageNet-initialised model, on the pixels of the given classes; labels come to the feature
size by majority over each feature pixel's area (:func:`downscale_labels_by_ratio`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import unwrap_model

IGNORE = 255
FD_MIN_RATIO = 0.75  # DAFormer: a feature pixel takes a label only when 75% of its pixels share it


def downscale_labels_by_ratio(labels: Tensor, size: tuple[int, int], num_classes: int,
                              min_ratio: float = FD_MIN_RATIO, ignore_index: int = IGNORE) -> Tensor:
    """Majority label of each feature pixel's area, ignore where it covers less than ``min_ratio``.

    Shape:
        - labels: (B, H, W); output: (B, h, w) int64
    """
    ids = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels).long()
    share = F.adaptive_avg_pool2d(F.one_hot(ids, num_classes + 1).permute(0, 3, 1, 2).float(), size)
    ratio, out = share.max(1)
    bad = (out == num_classes) | (ratio < min_ratio)
    return torch.where(bad, torch.full_like(out, ignore_index), out)


class FeatureDistance:
    """DAFormer's ImageNet feature distance: L2 distance of the student's source backbone
    features to those of a frozen copy of the ImageNet-initialised model, on pixels of the
    given classes (thing classes, which source training tends to forget).

    Both models name their backbone output with ``backbone_output_module()``; a forward hook
    reads it during the student's ordinary forward, so nothing is computed twice.
    """

    def __init__(self, imagenet_model: torch.nn.Module, classes: list[int] | None, num_classes: int,
                 forward_kwargs: dict | None = None):
        self.model = imagenet_model.eval().requires_grad_(False)
        # HRDA ({"context_only": True}): the frozen model encodes the context crop alone, the
        # student's first encoding of each forward, which the hook reads.
        self.forward_kwargs = forward_kwargs or {}
        self.num_classes = num_classes
        # Lookup table over class ids plus ignore (the last entry): which pixels count.
        table = torch.zeros(num_classes + 1, dtype=torch.bool)
        table[list(classes) if classes is not None else slice(0, num_classes)] = True
        self._table_cpu, self._table = table, table
        self._captured: list[Tensor] = []

    def capture(self, student: torch.nn.Module):
        """Context manager: record the student's backbone outputs of the forwards inside it."""
        return _Capture(_backbone_module(unwrap_model(student)), self._captured)

    def loss(self, img_src: Tensor, y_src: Tensor, return_count: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Distance for the source batch the student forwarded first inside :meth:`capture`
        (with ``return_count``, also the number of feature pixels it averages over)."""
        feat = self._captured[0][: img_src.shape[0]].float()
        self._captured.clear()
        with torch.no_grad():
            frozen: list[Tensor] = []
            with _Capture(_backbone_module(self.model), frozen):
                self.model(img_src, "source", **self.forward_kwargs)
            feat_imnet = frozen[0].float()
        dist = (feat - feat_imnet).norm(dim=1)  # (B, h, w)
        y = downscale_labels_by_ratio(y_src, tuple(feat.shape[-2:]), self.num_classes)
        if self._table.device != y.device:  # copied to the device once, not every step
            self._table = self._table_cpu.to(y.device)
        mask = self._table[torch.where(y == IGNORE, torch.full_like(y, self.num_classes), y)]
        count = mask.sum()
        loss = (dist * mask).sum() / count.clamp_min(1)
        return (loss, count) if return_count else loss


def _backbone_module(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "backbone_output_module", None)
    if getter is None:
        from ..errors import ConfigError

        raise ConfigError(f"loss.feature_distance_weight: {type(model).__name__} does not name its backbone "
                          f"output (backbone_output_module); set the weight to 0")
    return getter()


class _Capture:
    def __init__(self, module: torch.nn.Module, store: list[Tensor]):
        self.module, self.store, self.handle = module, store, None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, i, o: self.store.append(o))
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False
