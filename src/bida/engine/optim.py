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
