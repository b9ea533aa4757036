"""bida.engine.optim: optimizers, warm-up and the poly schedule."""

from __future__ import annotations

import pytest
import torch

from bida.config import load_config
from bida.engine.optim import WARMUP_RATIO, warmup_factor
from bida.engine.schedules import plan_phases
from helpers import TEACHER


def test_adamw_warm_up_and_poly_lr(tiny_overrides):
    from bida.engine.distributed import DistContext
    from bida.engine.optim import phase_optimizer, set_lr
    from bida.engine.schedules import build_schedule
    from bida.engine.state import RunState
    from bida.models import build_model

    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER, "train.iters=10",
                                              "train.warmup_iters=4"])
    model = build_model(cfg.model, 4, cfg.method.feature)
    schedule = build_schedule(plan_phases(cfg)[-1], cfg, model, DistContext(), 4, RunState(), source_iters=0)
    opt = phase_optimizer(model, cfg.train, schedule.base_lr)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["weight_decay"] == 0.01
    for it, warm in [(0, WARMUP_RATIO), (1, 0.25 + 0.75 * WARMUP_RATIO), (3, 0.75 + 0.25 * WARMUP_RATIO),
                     (4, 1.0), (7, 1.0)]:
        lr = schedule.lr(it)
        set_lr(opt, lr)
        expected = 6e-4 * (1 - it / 10) * warm  # poly power 1.0 times the linear warm-up
        assert lr == pytest.approx(expected, rel=1e-9) and warmup_factor(it, 4) == pytest.approx(warm)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, 10 * lr])
