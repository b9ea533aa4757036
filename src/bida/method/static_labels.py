"""Static pseudo labels y_F of target images (docs/method.md section 3), made once per round.

Class-balanced thresholds (CBST-style) over the whole target set, from a bounded sample of
every image's confidences, united with a per-image top-fraction rule. Public as part of
:mod:`bida.pseudo_labels`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sample_confidences", "class_thresholds", "image_thresholds", "static_labels"]


def sample_confidences(
    conf: Tensor, pred: Tensor, max_pixels: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A bounded random subsample of one image's pixel confidences and predictions.

    The class thresholds need the confidence distribution of the whole target set; a
    fixed number of pixels per image bounds the memory (19 x 2M pixels per image at full
    Cityscapes size would not fit) while keeping every image's share equal.

    Args:
        conf: Max softmax probability per pixel.
        pred: Predicted class per pixel.
        max_pixels: Sample size; images with fewer pixels are kept whole.
        generator: Source of randomness; the same generator state gives the same sample.

    Returns:
        ``(conf_sample, pred_sample)``, flattened.

    Shape:
        - conf: (H, W)
        - pred: (H, W)
        - output: (n,) and (n,) with ``n = min(H * W, max_pixels)``

    Examples:
        >>> conf, pred = torch.rand(10, 10), torch.randint(0, 3, (10, 10))
        >>> gen = torch.Generator().manual_seed(0)
        >>> sample_confidences(conf, pred, max_pixels=20, generator=gen)[0].shape
        torch.Size([20])
    """
    if conf.shape != pred.shape:
        raise ValueError(f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} differ in shape")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    conf, pred = conf.flatten(), pred.flatten()
    if conf.numel() <= max_pixels:
        return conf, pred
    # randperm runs where the generator lives (a CPU generator for GPU predictions is fine).
    gen_device = generator.device if generator is not None else conf.device
    index = torch.randperm(conf.numel(), generator=generator, device=gen_device)[:max_pixels]
    index = index.to(conf.device)
    return conf[index], pred[index]


def _top_count(total: Tensor, fraction: float) -> Tensor:
    """``ceil(fraction * total)``, at least 1, tolerant of float error (0.1 * 30 -> 3)."""
    # 0.1 * 30 == 3.0000000000000004 in binary floating point; without the tolerance ceil
    # would keep one pixel too many.
    count = torch.ceil(total.double() * fraction - 1e-9).long()
    return torch.minimum(count.clamp_min(1), total.long())


def class_thresholds(conf: Tensor, pred: Tensor, num_classes: int, fraction: float) -> Tensor:
    """Per-class confidence thresholds for class-balanced self-training (CBST).

    For class k with n_k sampled pixels, the threshold is the ``ceil(fraction * n_k)``-th
    largest confidence among them, so that (ties aside) exactly that many pixels of class k
    satisfy ``conf >= threshold``. Rare classes thus keep their share of pseudo labels.

    Args:
        conf: Sampled confidences (e.g. concatenated :func:`sample_confidences`).
        pred: Predicted class of each sample; ids outside ``[0, num_classes)`` are skipped.
        num_classes: K.
        fraction: Share of each class to keep, in [0, 1].

    Returns:
        float32 thresholds; ``+inf`` for a class without samples (the class rule then
        selects none of its pixels) and for every class when ``fraction == 0``.

    Shape:
        - conf: (N,)
        - pred: (N,)
        - output: (K,)

    Examples:
        >>> conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
        >>> pred = torch.tensor([0, 0, 0, 1, 1])
        >>> class_thresholds(conf, pred, num_classes=3, fraction=0.5).tolist()
        [0.800000011920929, 0.6000000238418579, inf]
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    conf, pred = conf.flatten().float(), pred.flatten().long()
    if conf.shape != pred.shape:
        raise ValueError(f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} differ in shape")
    thresholds = torch.full((num_classes,), math.inf, device=conf.device)
    if fraction == 0.0:
        return thresholds
    in_range = (pred >= 0) & (pred < num_classes)
    conf, pred = conf[in_range], pred[in_range]
    if conf.numel() == 0:
        return thresholds
    # Two stable sorts give (class ascending, confidence descending): each class occupies
    # one contiguous run, most confident first.
    by_conf = torch.sort(conf, descending=True, stable=True).indices
    by_class = torch.sort(pred[by_conf], stable=True).indices
    sorted_conf = conf[by_conf][by_class]
    counts = torch.bincount(pred, minlength=num_classes)  # (K,)
    starts = torch.cumsum(counts, 0) - counts
    has_pixels = counts > 0
    # Absent classes point at a valid slot (clamped) and are overwritten with +inf below.
    position = (starts + _top_count(counts, fraction) - 1).clamp(0, conf.numel() - 1)
    return torch.where(has_pixels, sorted_conf[position], thresholds)


def image_thresholds(conf: Tensor, fraction: float) -> Tensor:
    """Per image, the confidence of its ``ceil(fraction * H * W)``-th most confident pixel.

    Args:
        conf: Max softmax probability per pixel.
        fraction: Share of each image to keep, in [0, 1].

    Returns:
        float32 thresholds; ``+inf`` when ``fraction == 0``.

    Shape:
        - conf: (B, H, W)
        - output: (B,)

    Examples:
        >>> conf = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
        >>> image_thresholds(conf, fraction=0.5).tolist()
        [0.30000001192092896]
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = conf.flatten(1).float()  # (B, N)
    if fraction == 0.0:
        return torch.full((flat.shape[0],), math.inf, device=flat.device)
    num_pixels = flat.shape[1]
    keep = int(_top_count(torch.tensor(num_pixels), fraction))
    # kthvalue counts from the smallest: the keep-th largest is the (N - keep + 1)-th smallest.
    return flat.kthvalue(num_pixels - keep + 1, dim=1).values


def static_labels(
    conf: Tensor,
    pred: Tensor,
    class_thr: Tensor,
    image_fraction: float,
    ignore_index: int = 255,
    labelled_classes: Tensor | None = None,
) -> Tensor:
    """Static round labels y_F: the prediction where either selection rule keeps the pixel.

    A pixel is kept if ``conf >= class_thr[pred]`` (global, class-balanced) or if it is
    among its image's top ``image_fraction`` (so that every image gets some labels).

    Args:
        conf: Max softmax probability per pixel.
        pred: Predicted class per pixel, in ``[0, K)``.
        class_thr: Per-class thresholds from :func:`class_thresholds`.
        image_fraction: Share of each image kept by the per-image rule.
        ignore_index: Value of unlabelled pixels.
        labelled_classes: Classes that may be labelled at all (None: every class); a pixel
            predicted as another class stays unlabelled under both rules. The classes the
            source never labels (SYNTHIA's terrain, truck, train): the official code sets
            their thresholds to 1.

    Returns:
        int64 labels.

    Shape:
        - conf: (B, H, W)
        - pred: (B, H, W)
        - class_thr: (K,)
        - labelled_classes: (K,), bool
        - output: (B, H, W)

    Examples:
        >>> conf = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])
        >>> pred = torch.tensor([[[0, 1], [1, 0]]])
        >>> static_labels(conf, pred, torch.tensor([0.95, 0.5]), image_fraction=0.25).tolist()
        [[[0, 255], [1, 255]]]
    """
    if conf.shape != pred.shape or conf.dim() != 3:
        raise ValueError(
            f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} must both be (B, H, W)"
        )
    conf = conf.float()
    pred = pred.long()
    by_class = conf >= class_thr.to(device=conf.device, dtype=torch.float32)[pred]
    by_image = conf >= image_thresholds(conf, image_fraction).view(-1, 1, 1)
    keep = by_class | by_image
    if labelled_classes is not None:
        keep = keep & labelled_classes.to(device=pred.device, dtype=torch.bool)[pred]
    return torch.where(keep, pred, torch.full_like(pred, ignore_index))
