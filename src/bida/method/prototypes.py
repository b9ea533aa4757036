"""Class prototypes: masked average pooling of pixel features, and their moving average.

A prototype is the mean feature of the pixels of one class (docs/method.md section 1). Every
function here returns a ``present`` mask next to the prototypes: a class without pixels
has a zero row that must never be used as if it were a mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CheckpointError

__all__ = [
    "downsample_labels",
    "class_sums",
    "prototypes_from_sums",
    "class_prototypes",
    "pair_prototypes",
    "prototype_similarity",
    "scaled_similarity",
    "PrototypeMemory",
]


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour downsampling of label maps to the feature size.

    Nearest (not area or bilinear) so that every output pixel keeps a real class id or
    the ignore value; this is how the official code brings labels to stride 8.

    Args:
        labels: Integer label maps.
        size: Target ``(h, w)``.

    Returns:
        The label maps at ``size``, int64, ignore values preserved.

    Shape:
        - labels: (B, H, W)
        - output: (B, h, w)

    Examples:
        >>> y = torch.randint(0, 19, (2, 64, 64))
        >>> downsample_labels(y, (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    # interpolate needs a float (B, C, H, W) tensor; class ids are small integers, exact in fp32.
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()


def _full_precision(tensor: Tensor) -> torch.autocast:
    """A context that disables autocast on ``tensor``'s device type.

    Under ``torch.autocast`` a ``bmm``/``matmul`` of float32 inputs still runs in bf16/fp16;
    prototype sums and cosine similarities must not (bf16 sums carry ~0.5% error, fp16
    sums overflow), so every such product runs inside this context.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _check_features_labels(features: Tensor, labels: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the feature map (B, h, w) = "
            f"{(features.shape[0], *features.shape[2:])}; use downsample_labels first"
        )


def _per_image_sums(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-image class sums (B, K, D) and counts (B, K), both float32."""
    _check_features_labels(features, labels)
    batch, dim = features.shape[:2]
    # Ignored and out-of-range pixels go to an extra bucket K that is dropped at the end,
    # so that no pixel needs to be selected with a data-dependent (synchronising) mask.
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    bucket = torch.where(valid, labels, num_classes).flatten(1)  # (B, N)
    one_hot = torch.zeros(
        batch, bucket.shape[1], num_classes + 1, device=features.device, dtype=torch.float32
    ).scatter_(2, bucket[..., None], 1.0)  # (B, N, K+1)
    # A one-hot matmul rather than scatter_add: on GPUs a scatter into K bins serialises
    # on atomics, while a (D, N) x (N, K) product is a single dense kernel.
    # fp32: a sum over thousands of fp16 pixels loses precision and can overflow (max 65504).
    # Autocast would re-cast the bmm to half despite .float(), so it is switched off here.
    with _full_precision(features):
        flat = features.float().flatten(2)  # (B, D, N)
        sums = torch.bmm(flat, one_hot)[..., :num_classes].transpose(1, 2)  # (B, K, D)
    counts = one_hot.sum(1)[:, :num_classes]  # (B, K)
    return sums, counts


def class_sums(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Per-class feature sums and pixel counts over a batch.

    Sums and counts (not means) are what distributed runs all-reduce before dividing, so
    that every process ends up with the prototypes of the global batch.

    Args:
        features: Pixel features (any float dtype; summed in float32).
        labels: Class ids at the feature size; ``ignore_index`` and ids outside
            ``[0, num_classes)`` are skipped.
        num_classes: K.
        ignore_index: Label value that marks pixels without a class.

    Returns:
        ``(sums, counts)``, both float32; gradients flow from ``sums`` to ``features``.

    Shape:
        - features: (B, D, h, w)
        - labels: (B, h, w)
        - sums: (K, D)
        - counts: (K,)

    Examples:
        >>> f, y = torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> sums, counts = class_sums(f, y, num_classes=3)
        >>> int(counts.sum())
        32
    """
    sums, counts = _per_image_sums(features, labels, num_classes, ignore_index)
    return sums.sum(0), counts.sum(0)


def prototypes_from_sums(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Means from class sums and counts, with a mask of the classes that had pixels.

    Args:
        sums: Per-class feature sums (leading batch dimensions allowed).
        counts: Per-class pixel counts.

    Returns:
        ``(prototypes, present)``: the mean where ``counts > 0``; absent rows are zero and
        flagged ``False`` in ``present``.

    Shape:
        - sums: (..., K, D)
        - counts: (..., K)
        - prototypes: (..., K, D)
        - present: (..., K), bool

    Examples:
        >>> protos, present = prototypes_from_sums(torch.ones(3, 2), torch.tensor([2.0, 0.0, 1.0]))
        >>> present.tolist()
        [True, False, True]
    """
    present = counts > 0
    # clamp keeps absent rows at 0 / 1 = 0 instead of 0 / 0 = NaN, which would poison any
    # later reduction (and its gradient) even when the row is masked out.
    prototypes = sums / counts.clamp_min(1.0)[..., None]
    return prototypes, present


def class_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Masked average pooling over the whole batch (``method.prototype_scope: batch``).

    Args:
        features: Pixel features.
        labels: Class ids at the feature size.
        num_classes: K.
        ignore_index: Label value that marks pixels without a class.

    Returns:
        ``(prototypes, present)``; prototypes are float32 and carry gradients to
        ``features`` (the official code backpropagates through them).

    Shape:
        - features: (B, D, h, w)
        - labels: (B, h, w)
        - prototypes: (K, D)
        - present: (K,), bool

    Examples:
        >>> f, y = torch.randn(2, 8, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
        >>> protos, present = class_prototypes(f, y, num_classes=3)
        >>> protos.shape, present.tolist()
        (torch.Size([3, 8]), [True, False, False])
    """
    return prototypes_from_sums(*class_sums(features, labels, num_classes, ignore_index))


def pair_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Per-image prototypes (``method.prototype_scope: pair``, the official code's scope).

    Image ``b`` of the source batch is paired with image ``b`` of the target batch; each
    image's pixels are later contrasted with its partner's prototypes.

    Args:
        features: Pixel features.
        labels: Class ids at the feature size.
        num_classes: K.
        ignore_index: Label value that marks pixels without a class.

    Returns:
        ``(prototypes, present)``, one set per image.

    Shape:
        - features: (B, D, h, w)
        - labels: (B, h, w)
        - prototypes: (B, K, D)
        - present: (B, K), bool

    Examples:
        >>> f, y = torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> pair_prototypes(f, y, num_classes=3)[0].shape
        torch.Size([2, 3, 8])
    """
    return prototypes_from_sums(*_per_image_sums(features, labels, num_classes, ignore_index))


def scaled_similarity(features: Tensor, prototypes: Tensor, scale: float = 1.0) -> Tensor:
    """``scale`` times the cosine similarity of every pixel with every prototype.

    Computed in float32: normalising half-precision vectors of dimension 76 or 256 loses
    enough precision to move a softmax at temperature 0.1. The features are not
    normalised in place: the raw dot products are divided by the pixel norms afterwards,
    which touches K instead of D values per pixel, and ``scale`` (1 / tau) is folded into
    the K x D prototypes rather than applied to the K x h x w map.

    Args:
        features: Pixel features.
        prototypes: One prototype set for the batch, or one per image.
        scale: Factor applied to the cosines (``1 / temperature`` for logits).

    Returns:
        ``scale * cos``, float32 (zero for zero prototypes or zero features).

    Shape:
        - features: (B, D, h, w)
        - prototypes: (K, D) or (B, K, D)
        - output: (B, K, h, w)

    Examples:
        >>> f = torch.randn(2, 8, 4, 4)
        >>> scaled_similarity(f, torch.randn(3, 8), scale=10.0).abs().max() <= 10.0 + 1e-4
        tensor(True)
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D, h, w), got shape {tuple(features.shape)}")
    batch, dim, height, width = features.shape
    if not (
        (prototypes.dim() == 2 or (prototypes.dim() == 3 and prototypes.shape[0] == batch))
        and prototypes.shape[-1] == dim
    ):
        raise ValueError(
            f"prototypes must be (K, {dim}) or ({batch}, K, {dim}), got shape "
            f"{tuple(prototypes.shape)}"
        )
    with _full_precision(features):  # autocast would run the matmul in half precision
        flat = features.float().flatten(2)  # (B, D, N)
        protos = F.normalize(prototypes.float(), dim=-1) * scale  # (K, D) or (B, K, D)
        # Same eps as F.normalize, so that a zero feature gives 0 rather than NaN.
        inv_norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12).reciprocal()  # (B, 1, N)
        logits = torch.matmul(protos, flat) * inv_norm  # (B, K, N)
    return logits.view(batch, -1, height, width)


def prototype_similarity(features: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every pixel feature with every class prototype.

    Args:
        features: Pixel features (any float dtype; computed in float32).
        prototypes: One prototype set for the batch, or one per image.

    Returns:
        Similarities in [-1, 1], float32 (zero for zero prototypes).

    Shape:
        - features: (B, D, h, w)
        - prototypes: (K, D) or (B, K, D)
        - output: (B, K, h, w)

    Examples:
        >>> f = torch.randn(2, 8, 4, 4)
        >>> prototype_similarity(f, torch.randn(3, 8)).shape
        torch.Size([2, 3, 4, 4])
    """
    return scaled_similarity(features, prototypes, 1.0)


class PrototypeMemory:
    """Exponential moving average of per-class prototypes (docs/method.md section 4).

    Only classes present in a batch move; a class seen for the first time starts at its
    batch prototype, because an average started from zero would be biased towards the
    origin for about ``1 / (1 - momentum)`` updates. The buffers are plain tensors so
    that ``state_dict()`` loads with ``torch.load(weights_only=True)``.

    Attributes:
        value: (K, D) float32 averages; rows of uninitialised classes are zero.
        initialized: (K,) bool, classes seen at least once.
        num_updates: (K,) int64, number of batches that contained each class.

    Examples:
        >>> memory = PrototypeMemory(num_classes=3, dim=8)
        >>> memory.update(torch.randn(3, 8), torch.tensor([True, False, True]))
        >>> memory.initialized.tolist()
        [True, False, True]
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.dim = dim
        self.momentum = momentum
        self.value = torch.zeros(num_classes, dim)
        self.initialized = torch.zeros(num_classes, dtype=torch.bool)
        self.num_updates = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, prototypes: Tensor, present: Tensor) -> None:
        """Move the averages of the present classes towards the batch prototypes.

        Args:
            prototypes: Batch prototypes (detached here; the memory is not trained).
            present: Which rows of ``prototypes`` are real means.

        Shape:
            - prototypes: (K, D)
            - present: (K,), bool
        """
        if prototypes.shape != self.value.shape or present.shape != self.initialized.shape:
            raise ValueError(
                f"expected prototypes {tuple(self.value.shape)} and present "
                f"{tuple(self.initialized.shape)}, got {tuple(prototypes.shape)} and "
                f"{tuple(present.shape)}"
            )
        device = self.value.device
        batch = prototypes.detach().to(device=device, dtype=torch.float32)
        present = present.to(device=device, dtype=torch.bool)
        averaged = self.momentum * self.value + (1.0 - self.momentum) * batch
        moved = torch.where(self.initialized[:, None], averaged, batch)
        self.value = torch.where(present[:, None], moved, self.value)
        self.initialized = self.initialized | present
        self.num_updates = self.num_updates + present.long()

    def state_dict(self) -> dict[str, Tensor]:
        """The buffers (momentum is a hyper-parameter and comes from the config)."""
        return {
            "value": self.value.clone(),
            "initialized": self.initialized.clone(),
            "num_updates": self.num_updates.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore buffers saved by :meth:`state_dict`, on this memory's device."""
        expected = self.state_dict()
        if set(state) != set(expected):
            raise CheckpointError(
                f"prototype memory state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        for key, current in expected.items():
            if tuple(state[key].shape) != tuple(current.shape):
                raise CheckpointError(
                    f"prototype memory '{key}' has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(current.shape)} (different num_classes or feature dim?)"
                )
        device = self.value.device
        self.value = state["value"].to(device=device, dtype=torch.float32).clone()
        self.initialized = state["initialized"].to(device=device, dtype=torch.bool).clone()
        self.num_updates = state["num_updates"].to(device=device, dtype=torch.long).clone()

    def to(self, device: torch.device | str) -> PrototypeMemory:
        """Move the buffers to ``device`` (in place) and return ``self``."""
        self.value = self.value.to(device)
        self.initialized = self.initialized.to(device)
        self.num_updates = self.num_updates.to(device)
        return self
