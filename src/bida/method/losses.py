"""Losses of BiDA and its baselines, as pure functions of tensors (docs/method.md sections 2, 5).

Every loss is computed in float32 and returns a float32 scalar. When nothing qualifies
(all pixels ignored, no class present) it returns a zero that is still connected to the
inputs' graph, so that ``backward()`` works in every iteration without special cases.
Loss weights are applied by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .prototypes import _full_precision, scaled_similarity

__all__ = ["seg_cross_entropy", "ce_pixel_count", "entropy", "pixel_prototype_contrast",
           "inverse_sqrt_frequency_weights"]

# Logit given to absent classes: exp() of it is exactly 0 next to any cos/tau for a sane
# temperature, yet it stays finite, so that a pixel with every class masked gives a finite
# (uniform) log-softmax instead of NaN.
MASKED_LOGIT = -1.0e9


MEANS = ("labelled", "all")


def seg_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255, mean_over: str = "labelled",
                      class_weights: Tensor | None = None) -> Tensor:
    """Pixel-wise cross entropy, averaged over the labelled pixels (or, ``mean_over="all"``,
    over every pixel, an ignored one counting 0: mmseg's mean, which DAFormer and MIC use).

    With ``class_weights`` (``loss.class_weights``) a pixel of class c counts ``w_c`` times its
    cross entropy; the sum is still divided by the pixel count, not by the batch's weight sum
    (``F.cross_entropy``'s weighted mean), so that a batch holding only majority pixels is not
    scaled back up: weights whose pixel-weighted mean over the data is 1
    (:func:`inverse_sqrt_frequency_weights`) keep the loss's scale.

    Logits at a lower resolution than the labels are upsampled bilinearly first
    (align_corners=False), so that the loss is taken at full label resolution.

    Args:
        logits: Class scores (any float dtype; the loss is computed in float32).
        labels: Class ids; ``ignore_index`` pixels do not count.
        ignore_index: Label value that marks pixels without a class.
        mean_over: ``"labelled"`` divides the sum by the labelled pixels, ``"all"`` by
            ``labels.numel()`` (:func:`ce_pixel_count`).
        class_weights: Optional (K,) float weight of each class's pixels; None: all 1.

    Returns:
        float32 scalar; 0 (with graph) when no pixel is labelled, where
        ``F.cross_entropy(reduction="mean")`` would return NaN.

    Shape:
        - logits: (B, K, h, w)
        - labels: (B, H, W)
        - output: ()

    Examples:
        >>> logits, y = torch.randn(2, 19, 8, 8), torch.randint(0, 19, (2, 64, 64))
        >>> seg_cross_entropy(logits, y).shape
        torch.Size([])
    """
    count = ce_pixel_count(labels, mean_over, ignore_index)
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    weight = None if class_weights is None else class_weights.to(device=logits.device, dtype=torch.float32)
    total = F.cross_entropy(logits, labels.long(), weight=weight, ignore_index=ignore_index, reduction="sum")
    # Dividing by a clamped count (a tensor, no host sync) is the mean when pixels are
    # labelled and an exact 0 / 1 when none is.
    return total / count.clamp_min(1)


def inverse_sqrt_frequency_weights(histogram: Tensor) -> Tensor:
    """Class weights ``w_c ∝ 1 / sqrt(f_c)`` from a pixel histogram (``loss.class_weights=
    inverse_sqrt_freq``), ``f_c = n_c / sum(n)``, scaled so that ``sum_c f_c w_c = 1``: the
    mean weight of a labelled pixel of the data is 1, and the loss keeps its scale. The square
    root balances halfway between none and full inverse frequency, which would let a class of
    a few pixels dominate. A class without pixels weighs 0: no source pixel ever carries it.

    Shape:
        - histogram: (K,) pixel counts (any numeric dtype); output: (K,) float32

    Examples:
        >>> inverse_sqrt_frequency_weights(torch.tensor([81, 9, 9, 0, 1]))  # 1/sqrt(f) / (0.9+0.3+0.3+0.1)
        tensor([0.6944, 2.0833, 2.0833, 0.0000, 6.2500])
    """
    counts = histogram.double()
    freq = counts / counts.sum().clamp_min(1)
    # sum_c f_c / sqrt(f_c) = sum_c sqrt(f_c): the normaliser of the pixel-weighted mean
    inv = torch.where(freq > 0, freq.clamp_min(1e-300).rsqrt(), torch.zeros_like(freq))
    return (inv / freq.sqrt().sum().clamp_min(1e-300)).float()


def ce_pixel_count(labels: Tensor, mean_over: str, ignore_index: int = 255) -> Tensor:
    """The pixels a cross entropy with ``mean_over`` divides by, as a device scalar (no host
    read): the labelled ones, or all of them. Distributed runs sum it over processes.

    Shape:
        - labels: (B, H, W); output: () int64
    """
    if mean_over not in MEANS:
        raise ValueError(f"mean_over must be 'labelled' or 'all', not {mean_over!r}")
    if mean_over == "all":
        return torch.full((), labels.numel(), device=labels.device, dtype=torch.int64)
    return (labels != ignore_index).sum()


def entropy(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean per-pixel Shannon entropy of the softmax over classes.

    This is the true entropy ``-(p * log p).sum(1).mean()``; the official code applies
    ``log_softmax`` to probabilities instead (docs/method.md section 5). ``log_softmax`` is
    used for ``log p`` so that saturated pixels give 0 * (-large), not 0 * log(0) = NaN.

    Args:
        logits: Class scores (any float dtype; computed in float32).
        valid: Optional mask of the pixels that count (e.g. not crop padding); the mean
            is taken over them, and is 0 (with graph) when there are none.

    Returns:
        float32 scalar in [0, log K].

    Shape:
        - logits: (B, K, H, W)
        - valid: (B, H, W), bool
        - output: ()

    Examples:
        >>> float(entropy(torch.zeros(1, 4, 2, 2)))  # log(4)
        1.3862943649291992
    """
    log_prob = logits.float().log_softmax(dim=1)
    per_pixel = -(log_prob.exp() * log_prob).sum(dim=1)  # (B, H, W)
    if valid is None:
        return per_pixel.mean()
    if valid.shape != per_pixel.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match the logits' (B, H, W) {tuple(per_pixel.shape)}")
    valid = valid.to(device=per_pixel.device, dtype=torch.bool)
    total = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / valid.sum().clamp_min(1)


def _label_to_feature_index(
    label_size: tuple[int, int],
    feature_size: tuple[int, int],
    resolution: str,
    device: torch.device,
) -> Tensor:
    """For each label pixel, the flat index of the feature pixel whose logits it uses.

    Nearest upsampling only copies pixels, so reading the per-pixel log-softmax at the
    feature size through this index gives exactly the loss of upsampling the similarity
    logits first (the official code) without materialising K maps at crop size.
    """
    if resolution not in ("feature", "label"):
        raise ValueError(f"resolution must be 'feature' or 'label', got {resolution!r}")
    height, width = feature_size
    if label_size == feature_size:
        return torch.arange(height * width, device=device)
    if resolution == "feature":
        raise ValueError(
            f"labels of size {label_size} do not match the features {feature_size}: "
            "downsample them with downsample_labels, or pass resolution='label'"
        )
    if label_size[0] < height or label_size[1] < width:
        raise ValueError(
            f"resolution='label' needs labels at least as large as the features, got "
            f"labels {label_size} and features {feature_size}"
        )
    # Let F.interpolate pick the source pixels so the mapping is exactly its "nearest";
    # flat indices of a stride-8 map are far below 2**24, hence exact in float32.
    grid = torch.arange(height * width, device=device, dtype=torch.float32)
    grid = grid.view(1, 1, height, width)
    return F.interpolate(grid, size=label_size, mode="nearest").flatten().long()


def pixel_prototype_contrast(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    present: Tensor,
    temperature: float,
    ignore_index: int = 255,
    resolution: str = "feature",
    return_count: bool = False,
    per_image: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pixel-to-prototype contrast, one direction of BiDA's loss (docs/method.md section 2).

    For every pixel whose label is a present class:
    ``-log softmax_{c present}(cos(f(p), rho_c) / tau)[y(p)]``, averaged over those pixels.
    Absent classes are excluded from the denominator (not given a made-up similarity).
    ``L_t2s`` is (target features, fused target labels, source prototypes); ``L_s2t`` is
    (source features, source labels, target prototypes).

    Args:
        features: Pixel features (any float dtype; computed in float32).
        labels: Class ids, at the feature size (``resolution="feature"``) or larger
            (``resolution="label"``).
        prototypes: One prototype set for the batch, or one per image (pair scope: image
            ``b``'s pixels against ``prototypes[b]``). Gradients flow through them.
        present: Which prototypes are real means.
        temperature: tau.
        ignore_index: Label value that marks pixels without a class.
        resolution: ``"feature"``: labels must be at the feature size. ``"label"``: the
            similarity logits are upsampled with nearest to the label size (the official
            code's behaviour), so that every label pixel counts once.
        return_count: Also return the number of qualifying pixels (images with
            ``per_image``), which distributed runs all-reduce to turn each rank's mean into
            the global batch's.
        per_image: Average each image's mean over its qualifying pixels, then those means
            over the images that have any (pair scope, as the official code averages its
            per-pair losses), instead of one mean over every qualifying pixel of the batch.

    Returns:
        float32 scalar; 0 (with graph) when no pixel qualifies. Exactly 0 when a single
        class is present (its only candidate has probability 1). With ``return_count``,
        ``(loss, count)`` where ``count`` is an int64 scalar tensor: qualifying pixels, or
        with ``per_image`` the images that hold one.

    Shape:
        - features: (B, D, h, w)
        - labels: (B, h, w), or (B, H, W) with ``resolution="label"``
        - prototypes: (K, D) or (B, K, D)
        - present: (K,) or (B, K), bool
        - output: ()

    Examples:
        >>> f, y = torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> protos, present = torch.randn(3, 8), torch.ones(3, dtype=torch.bool)
        >>> pixel_prototype_contrast(f, y, protos, present, temperature=0.1).shape
        torch.Size([])
    """
    if labels.dim() != 3 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be (B, H, W) with B={features.shape[0]}, got {tuple(labels.shape)}"
        )
    if present.shape != prototypes.shape[:-1]:
        raise ValueError(
            f"present {tuple(present.shape)} must match prototypes {tuple(prototypes.shape)} "
            "without the feature dimension"
        )
    logits = scaled_similarity(features, prototypes, 1.0 / temperature)  # (B, K, h, w)
    present = present.to(device=logits.device, dtype=torch.bool)
    present_map = present.view(-1, logits.shape[1], 1, 1)  # (1 or B, K, 1, 1)
    log_prob = logits.masked_fill(~present_map, MASKED_LOGIT).log_softmax(dim=1)
    return _mean_over_pixels(log_prob, labels, present, ignore_index, resolution, return_count, per_image)


def _mean_over_pixels(log_prob: Tensor, labels: Tensor, present: Tensor, ignore_index: int, resolution: str,
                      return_count: bool, per_image: bool) -> Tensor | tuple[Tensor, Tensor]:
    """``-log_prob[y(p)]`` averaged over the pixels whose label is a present class (see
    :func:`pixel_prototype_contrast` for ``resolution``, ``return_count`` and ``per_image``).

    Shape:
        - log_prob: (B, K, h, w), float32
        - labels: (B, h, w) or (B, H, W)
        - present: (K,) or (B, K), bool
    """
    batch, num_classes = log_prob.shape[:2]
    feature_size = tuple(log_prob.shape[-2:])
    log_prob = log_prob.flatten(2)  # (B, K, h*w)

    same_size = tuple(labels.shape[-2:]) == feature_size
    if not same_size:
        feature_index = _label_to_feature_index(
            tuple(labels.shape[-2:]), feature_size, resolution, log_prob.device
        )  # (M,)
    elif resolution not in ("feature", "label"):
        raise ValueError(f"resolution must be 'feature' or 'label', got {resolution!r}")
    flat_labels = labels.flatten(1).long()  # (B, M)
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    safe_labels = torch.where(valid, flat_labels, 0)  # any in-range id; masked below
    if present.dim() == 1:
        label_present = present[safe_labels]
    else:
        label_present = present.gather(1, safe_labels)
    qualifies = valid & label_present  # (B, M)

    # One gather reads log q[y(p)] at (class y(p), feature pixel of p) for every pixel; at
    # the feature size the pixel is its own, and the gather runs along the class axis.
    if same_size:
        picked = log_prob.gather(1, safe_labels[:, None]).squeeze(1)  # (B, M)
    else:
        flat_index = safe_labels * log_prob.shape[-1] + feature_index
        picked = log_prob.reshape(batch, -1).gather(1, flat_index)  # (B, M)
    # where (not multiply) so that a masked value can never turn 0 * x into NaN.
    picked = torch.where(qualifies, picked, torch.zeros_like(picked))
    if per_image:
        pixels = qualifies.sum(1)  # (B,)
        count = (pixels > 0).sum()  # an image without a qualifying pixel has mean 0 and does not count
        loss = -(picked.sum(1) / pixels.clamp_min(1)).sum() / count.clamp_min(1)
    else:
        count = qualifies.sum()
        loss = -picked.sum() / count.clamp_min(1)
    return (loss, count) if return_count else loss
