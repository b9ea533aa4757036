"""Pseudo labels of target images (docs/method.md sections 3 and 4).

- Dynamic labels: label transfer to calibrated source prototypes, every iteration.
- Calibration: EMA source and target prototypes; their difference shifts the source
  prototypes towards the target domain, with a weight that ramps up.
- Static labels: class-balanced thresholds (CBST-style) computed once per round from
  model predictions, united with a per-image top-fraction rule. They live in
  :mod:`bida.method.static_labels` and are public here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CheckpointError
from .losses import MASKED_LOGIT
from .prototypes import PrototypeMemory, scaled_similarity
from .static_labels import class_thresholds, image_thresholds, sample_confidences, static_labels

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
