"""Optimizers and the learning-rate warm-up (``train.optimizer``, ``train.warmup_iters``).

SGD is the DeepLab-V2 recipe (docs/method.md section 5); AdamW with a linear warm-up is the
recipe of DAFormer and the transformer segmentors (betas 0.9/0.999, warm-up from 1e-6 of
the LR, then poly decay). Both take the model's parameter groups, so the head keeps its
``head_lr_mult`` x LR.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig

WARMUP_RATIO = 1e-6  # mmcv / DAFormer: the warm-up starts at this share of the scheduled LR (train.warmup_ratio)
ADAMW_BETAS = (0.9, 0.999)


def build_optimizer(groups: list[dict], lr: float, t: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum ``t.momentum``) or AdamW over ``groups``, weight decay ``t.weight_decay``."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)


def warmup_factor(it: int, warmup_iters: int, ratio: float = WARMUP_RATIO) -> float:
    """mmcv's linear warm-up: the scheduled LR times ``1 - (1 - it / W) (1 - ratio)`` for it < W.

    Examples:
        >>> round(warmup_factor(750, 1500), 7), warmup_factor(1500, 1500)
        (0.5000005, 1.0)
    """
    if it >= warmup_iters:
        return 1.0
    return 1.0 - (1.0 - it / warmup_iters) * (1.0 - ratio)


def phase_optimizer(model: torch.nn.Module, t: TrainConfig, base_lr: float) -> torch.optim.Optimizer:
    """A phase's fresh optimizer over ``model``'s parameter groups (``train.head_lr_mult``,
    ``train.layer_decay``, ``train.decay_norms_biases``) at the phase's base LR ``base_lr``."""
    # train.layer_decay is refused at load time for segmentors without ViT blocks
    decay = {"layer_decay": t.layer_decay} if t.layer_decay != 1.0 else {}
    if t.decay_norms_biases:  # refused at load time for segmentors other than DINOv2's
        decay["decay_norms_biases"] = True
    groups = getattr(model, "module", model).param_groups(base_lr, t.head_lr_mult, **decay)
    return build_optimizer(groups, base_lr, t)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each parameter group at ``lr`` times its ``lr_mult`` (the head's ``train.head_lr_mult``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
