"""bida.engine.schedules: the phases of a run and what each kind of phase does."""

from __future__ import annotations

import pytest
import torch

from bida.config import load_config
from bida.engine.distributed import DistContext
from bida.engine.schedules import (Phase, Rounds, SourceStage, TeacherPhase, build_schedule, plan_phases,
    poly_lr, rank_batch)
from bida.engine.state import RunState


def _cfg(*overrides):
    return load_config(None, ["train.lr=0.01", "train.adapt_lr=0.004", "train.round_lr_decay=0.5",
                              "train.poly_horizon=1.25", "train.poly_power=1.0", *overrides])


def test_learning_rates_and_phase_ends_by_hand():
    cfg = _cfg()
    dist, state = DistContext(), RunState()
    src = SourceStage(Phase("source", 10), cfg, None, dist, 3, state)
    assert src.lr(0) == 0.01 and src.lr(5) == pytest.approx(0.005) and src.lr(10) == 0.0
    assert not src.uses_target and not src.ended(9) and src.ended(10)
    round1 = Rounds(Phase("round", 8, 1), cfg, None, dist, 3, state, label_dir=None)
    assert round1.base_lr == pytest.approx(0.002)  # adapt_lr halved once
    assert round1.lr(5) == pytest.approx(0.002 * (1 - 5 / 10))  # poly over 1.25 x 8 iterations
    teacher = TeacherPhase(Phase("teacher", 4), _cfg("train.warmup_iters=2"), None, dist, 3, state)
    assert teacher.base_lr == pytest.approx(0.004) and teacher.uses_target
    assert teacher.lr(3) == pytest.approx(0.004 * (1 - 3 / 4))  # past the warm-up
    assert teacher.lr(0) < teacher.lr(1) < 0.004  # warming up
    # train.batch_size is the global batch on every schedule: each of 2 processes takes half
    assert rank_batch(_cfg("train.batch_size=4", "train.schedule=teacher"), 2) == 2
    assert rank_batch(_cfg("train.batch_size=4"), 2) == 2
    assert rank_batch(_cfg("train.batch_size=4"), 1) == 4


def test_plan_and_steps_call_the_method_with_the_run_state(monkeypatch):
    from bida.method import teacher, train_step

    cfg = _cfg("method=bida", "train.iters=3", "train.rounds=2", "train.iters_per_round=2")
    assert plan_phases(cfg) == [Phase("source", 3), Phase("round", 2, 0), Phase("round", 2, 1)]
    calls = []

    def step(*args, **kwargs):
        calls.append((args, kwargs))
        return "result"

    for module, name in ((train_step, "source_step"), (train_step, "adapt_step"), (teacher, "teacher_step")):
        monkeypatch.setattr(module, name, step)
    state = RunState(step=5)
    parts = dict(model="student", dist=DistContext(), num_classes=3, state=state, source_iters=3,
                 class_weights="weights")
    src, tgt = {"image": 1}, {"label": torch.zeros(2, dtype=torch.uint8)}
    assert build_schedule(Phase("source", 3), cfg, **parts).step("model", src, None) == "result"
    assert calls[-1][0] == ("model", src, cfg) and set(calls[-1][1]) == {"reduce_sums", "num_classes", "class_weights"}
    assert calls[-1][1]["num_classes"] == 3 and calls[-1][1]["class_weights"] == "weights"
    rounds = build_schedule(Phase("round", 2), cfg, **parts, calibration="cal", mean_teacher="mt")
    assert isinstance(rounds, Rounds) and rounds.label_dir is None
    rounds.step("model", src, tgt)
    assert calls[-1][0] == ("model", src, tgt, cfg, "cal", 3)
    assert calls[-1][1]["adapt_iter"] == 5 - 3  # the contrast warm-up counts adaptation steps only
    assert calls[-1][1]["class_weights"] == "weights"  # loss.class_weights reaches every schedule's source CE
    assert tgt["label"].tolist() == [255, 255]  # no labels (minent): every target pixel ignored
    state.step = 6  # the schedule reads the run's progress, not a copy of it
    build_schedule(Phase("teacher", 2), cfg, **parts, calibration="cal", mean_teacher="mt").step("model", src, tgt)
    assert calls[-1][0] == ("model", src, tgt, cfg, "mt", "cal", 3) and calls[-1][1]["adapt_iter"] == 3
    assert calls[-1][1]["class_weights"] == "weights"


def test_poly_lr_and_phases():
    assert poly_lr(1.0, 0, 10, 0.9) == 1.0 and poly_lr(1.0, 10, 10, 0.9) == 0.0
    cfg = load_config(None, ["method=bida", "train.rounds=3"])
    kinds = [(p.kind, p.round) for p in plan_phases(cfg)]
    assert kinds == [("source", -1), ("round", 0), ("round", 1), ("round", 2)]
    cfg = load_config(None, ["method=bida", "model.init_checkpoint=x.pt", "train.rounds=2"])
    assert [p.kind for p in plan_phases(cfg)] == ["round", "round"]
