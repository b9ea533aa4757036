"""Pseudo labels of target images (docs/method.md sections 3 and 4).

- Dynamic labels: label transfer to calibrated source prototypes, every iteration.
- Calibration: EMA source and target prototypes; their difference shifts the source
  prototypes towards the target domain, with a weight that ramps up.
- Static labels: class-balanced thresholds (CBST-style) computed once per round from
  model predictions (a bounded sample of every image's confidences), united with a
  per-image top-fraction rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import CheckpointError
from .losses import MASKED_LOGIT
from .prototypes import PrototypeMemory, scaled_similarity

__all__ = [
    "label_transfer",
    "fuse_labels",
    "calibrated_prototypes",
    "calibration_weight",
    "Calibration",
    "sample_confidences",
    "class_thresholds",
    "image_thresholds",
    "static_labels",
]


@torch.no_grad()
def label_transfer(
    features: Tensor,
    prototypes: Tensor,
    present: Tensor,
    temperature: float,
    threshold: float,
    ignore_index: int = 255,
) -> Tensor:
    """Dynamic pseudo labels: the class of the most similar prototype, if confident.

    ``q(p) = softmax_{c present}(cos(f(p), rho_c) / tau)``; the label is ``argmax q`` where
    ``max q >= threshold`` and ``ignore_index`` elsewhere. The confidence is a
    probability (the official code compares class indices with the threshold).

    Args:
        features: Target pixel features.
        prototypes: (Calibrated) source prototypes, one set or one per image.
        present: Which prototypes are usable; absent classes are never predicted.
        temperature: tau.
        threshold: Minimum probability of the winning class.
        ignore_index: Value of unlabelled pixels.

    Returns:
        int64 labels; all ``ignore_index`` when no class is present.

    Shape:
        - features: (B, D, h, w)
        - prototypes: (K, D) or (B, K, D)
        - present: (K,) or (B, K), bool
        - output: (B, h, w)

    Examples:
        >>> f = torch.randn(2, 8, 4, 4)
        >>> protos, present = torch.randn(3, 8), torch.ones(3, dtype=torch.bool)
        >>> label_transfer(f, protos, present, temperature=0.1, threshold=0.8).shape
        torch.Size([2, 4, 4])
    """
    if present.shape != prototypes.shape[:-1]:
        raise ValueError(
            f"present {tuple(present.shape)} must match prototypes {tuple(prototypes.shape)} "
            "without the feature dimension"
        )
    logits = scaled_similarity(features, prototypes, 1.0 / temperature)  # (B, K, h, w)
    num_classes = logits.shape[1]
    present = present.to(device=logits.device, dtype=torch.bool)
    prob = logits.masked_fill(~present.view(-1, num_classes, 1, 1), MASKED_LOGIT).softmax(dim=1)
    confidence, label = prob.max(dim=1)  # (B, h, w)
    # With every class masked the softmax is uniform, which could pass a low threshold:
    # no present class must mean no label at all.
    any_present = present.any(dim=-1).view(-1, 1, 1)
    keep = (confidence >= threshold) & any_present
    return torch.where(keep, label, torch.full_like(label, ignore_index))


def fuse_labels(static: Tensor, dynamic: Tensor, ignore_index: int = 255) -> Tensor:
    """Static labels where they exist, dynamic labels elsewhere (y_T of docs/method.md section 3).

    Args:
        static: Round labels y_F.
        dynamic: Label-transfer labels y_D.
        ignore_index: Value of unlabelled pixels.

    Returns:
        The fused labels y_T.

    Shape:
        - static: (B, h, w)
        - dynamic: (B, h, w)
        - output: (B, h, w)

    Examples:
        >>> fuse_labels(torch.tensor([[[1, 255]]]), torch.tensor([[[2, 3]]])).tolist()
        [[[1, 3]]]
    """
    if static.shape != dynamic.shape:
        raise ValueError(
            f"static {tuple(static.shape)} and dynamic {tuple(dynamic.shape)} labels differ "
            "in shape; downsample the static labels to the feature size first"
        )
    return torch.where(static != ignore_index, static, dynamic.to(static.dtype))


def calibrated_prototypes(
    batch_protos: Tensor,
    batch_present: Tensor,
    mem_src: PrototypeMemory,
    mem_tgt: PrototypeMemory,
    weight: float,
) -> tuple[Tensor, Tensor]:
    """Source prototypes shifted by the class-wise domain bias (docs/method.md section 4).

    ``rho_hat_c = base_c + weight * (ema_tgt_c - ema_src_c)`` where ``base_c`` is the batch
    prototype if class c is in the batch, else its source EMA (so classes missing from
    this source batch can still be transferred). The shift applies only where both EMAs
    are initialised; otherwise the bias is unknown and the prototype is left as is.

    Args:
        batch_protos: Source prototypes of the current batch.
        batch_present: Which batch prototypes are real means.
        mem_src: EMA of source prototypes.
        mem_tgt: EMA of target prototypes.
        weight: lambda_cal(t), see :func:`calibration_weight`.

    Returns:
        ``(prototypes, present)`` with ``present = batch_present | mem_src.initialized``;
        float32, on the device of ``batch_protos``.

    Shape:
        - batch_protos: (K, D)
        - batch_present: (K,), bool
        - prototypes: (K, D)
        - present: (K,), bool

    Examples:
        >>> src, tgt = PrototypeMemory(3, 8), PrototypeMemory(3, 8)
        >>> batch, present = torch.randn(3, 8), torch.ones(3, dtype=torch.bool)
        >>> protos, present = calibrated_prototypes(batch, present, src, tgt, weight=0.5)
        >>> protos.shape
        torch.Size([3, 8])
    """
    device = batch_protos.device
    batch_present = batch_present.to(device=device, dtype=torch.bool)
    ema_src, ema_tgt = mem_src.value.to(device), mem_tgt.value.to(device)
    src_init = mem_src.initialized.to(device)
    both_init = src_init & mem_tgt.initialized.to(device)
    base = torch.where(batch_present[:, None], batch_protos.float(), ema_src)
    shift = torch.where(both_init[:, None], ema_tgt - ema_src, torch.zeros_like(ema_src))
    return base + weight * shift, batch_present | src_init


def calibration_weight(step: int, ramp_iters: int, max_weight: float) -> float:
    """lambda_cal(t): a linear ramp from 0 to ``max_weight`` over ``ramp_iters`` steps.

    The ramp keeps the shift small while the target EMA is still built from poor pseudo
    labels. ``ramp_iters <= 0`` applies ``max_weight`` from the first step.

    Examples:
        >>> calibration_weight(150, ramp_iters=600, max_weight=1.0)
        0.25
    """
    if ramp_iters <= 0:
        return float(max_weight)
    return float(max_weight) * min(1.0, max(0.0, step / ramp_iters))


class Calibration:
    """Prototype calibration state: both EMAs and the step of the weight ramp.

    Reads like the algorithm: ``protos, present = calibration.calibrate(rho_src, present_src)``
    before label transfer, ``calibration.update(rho_src, present_src, rho_tgt, present_tgt)``
    after the losses.

    Attributes:
        source: EMA of source prototypes.
        target: EMA of target prototypes (built from fused target labels y_T).
        step: Number of updates so far (drives the ramp).
        max_weight: Final calibration weight.
        ramp_iters: Updates over which the weight ramps from 0 to ``max_weight``.

    Examples:
        >>> calibration = Calibration(num_classes=3, dim=8, ramp_iters=100)
        >>> protos, present = torch.randn(3, 8), torch.ones(3, dtype=torch.bool)
        >>> calibration.update(protos, present, protos + 1, present)
        >>> calibration.step, round(calibration.weight(), 2)
        (1, 0.01)
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        ramp_iters: int,
        max_weight: float = 1.0,
        momentum: float = 0.99,
    ) -> None:
        self.source = PrototypeMemory(num_classes, dim, momentum)
        self.target = PrototypeMemory(num_classes, dim, momentum)
        self.step = 0
        self.max_weight = max_weight
        self.ramp_iters = ramp_iters

    def weight(self) -> float:
        """The current lambda_cal."""
        return calibration_weight(self.step, self.ramp_iters, self.max_weight)

    def calibrate(self, batch_protos: Tensor, batch_present: Tensor) -> tuple[Tensor, Tensor]:
        """Calibrated source prototypes for label transfer; see :func:`calibrated_prototypes`.

        Shape:
            - batch_protos: (K, D)
            - batch_present: (K,), bool
            - output: (K, D) and (K,)
        """
        return calibrated_prototypes(
            batch_protos, batch_present, self.source, self.target, self.weight()
        )

    def update(
        self, src_protos: Tensor, src_present: Tensor, tgt_protos: Tensor, tgt_present: Tensor
    ) -> None:
        """Update both EMAs with this batch's prototypes and advance the ramp.

        Shape:
            - src_protos, tgt_protos: (K, D)
            - src_present, tgt_present: (K,), bool
        """
        self.source.update(src_protos, src_present)
        self.target.update(tgt_protos, tgt_present)
        self.step += 1

    def mean_shift(self) -> float:
        """Mean L2 norm of (EMA target - EMA source) over classes seen in both domains.

        A logging figure for the size of the estimated domain bias; 0.0 before any class
        has been seen in both.
        """
        return float(self.mean_shift_tensor())

    def mean_shift_tensor(self) -> Tensor:
        """:meth:`mean_shift` as a 0-dim float32 tensor on the memories' device (no host sync)."""
        device = self.source.value.device
        both = (self.source.initialized & self.target.initialized.to(device)).float()
        norms = (self.target.value.to(device) - self.source.value).norm(dim=1)
        return (norms * both).sum() / both.sum().clamp_min(1.0)

    def state_dict(self) -> dict[str, object]:
        """Both memories and the step, loadable with ``torch.load(weights_only=True)``."""
        return {
            "source": self.source.state_dict(),
            "target": self.target.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        missing = {"source", "target", "step"} - set(state)
        if missing:
            raise CheckpointError(f"calibration state lacks {sorted(missing)}")
        self.source.load_state_dict(state["source"])  # type: ignore[arg-type]
        self.target.load_state_dict(state["target"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]

    def to(self, device: torch.device | str) -> Calibration:
        """Move both memories to ``device`` and return ``self``."""
        self.source.to(device)
        self.target.to(device)
        return self


# Static pseudo labels y_F (docs/method.md section 3), made once per round.
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
