"""bida.engine.guard: a non-finite step is detected by one flag and undone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import bida.data.datasets
import bida.method.train_step
from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.guard import StepGuard, _first_non_finite, _grad_max_norm, _step_is_finite
from helpers import _records, _records_trust


def test_a_nan_forward_is_undone_in_the_running_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2).eval())
    model[2].eval()
    guard = StepGuard(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = guard.snapshot()
    model(torch.full((2, 1, 3, 3), float("nan")))
    assert not torch.isfinite(model[1].running_mean).all()
    # Floating buffers of the module in training mode only (the eval-mode BN changes nothing).
    changed = guard.changed_state()
    assert [id(t) for t in changed] == [id(model[1].running_mean), id(model[1].running_var)]
    assert not torch.isfinite(_grad_max_norm(changed))
    guard.restore(snapshot)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_flags_and_first_non_finite():
    assert _step_is_finite(torch.tensor(True)) == (True, 0)
    assert _step_is_finite(torch.tensor(False)) == (False, 0)
    assert _step_is_finite(torch.tensor([0.0, 15.0])) == (True, 15)  # torchrun: (bad ranks, stop signal)
    assert _step_is_finite(torch.tensor([1.0, 0.0])) == (False, 0)
    assert _grad_max_norm([torch.tensor([1.0, -3.0]), torch.tensor([2.0])]).item() == 3.0
    assert math.isnan(_grad_max_norm([torch.tensor([1.0, float("nan")])]).item())
    tree = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "n": torch.tensor([7])}}
    assert _first_non_finite(tree) == "model.b"
    assert _first_non_finite({"model": {"a": torch.ones(2)}, "steps": 3}) is None


def _poison_second_batch(monkeypatch):
    """A NaN image in the 2nd source batch: NaN loss and NaN BatchNorm statistics."""
    import bida.engine.train as tr

    real, state = bida.method.train_step.source_step, {"calls": 0, "armed": True}

    def step(model, batch, cfg, **kwargs):
        state["calls"] += 1
        if state["armed"] and state["calls"] == 2:
            batch = {**batch, "image": batch["image"] * float("nan")}
        return real(model, batch, cfg, **kwargs)

    monkeypatch.setattr(bida.method.train_step, "source_step", step)
    return state


def test_a_skipped_step_leaves_no_trace_and_resume_stays_exact(tmp_path, tiny_overrides, monkeypatch):
    # before: the NaN forward poisoned BN running stats (non-finite tensors in last.pt, exit 0),
    # and a run resumed after the skip drew other batches than the uninterrupted run
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=5", "train.checkpoint_every=1"])
    _poison_second_batch(monkeypatch)
    tr.Trainer(cfg, tmp_path / "full").fit()
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in full["model"].values() if v.is_floating_point())
    assert [r["step"] for r in _records(tmp_path / "full") if "numerics/skipped_step" in r] == [1]

    poison = _poison_second_batch(monkeypatch)
    assert tr.Trainer(cfg, tmp_path / "part").fit(stop_after=2) is None  # after the skip
    poison["armed"] = False  # the resumed process meets no NaN: the skip is in its past
    tr.Trainer(cfg, tmp_path / "part", resume=True).fit()
    part = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert part["data_pos"] == full["data_pos"] == 6 and part["step"] == 5
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k


def test_a_step_that_blows_up_a_batchnorm_statistic_is_skipped(tmp_path, tiny_overrides):
    # before: the step counted as finite, and the checkpoint after it was refused (run failed)
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=3", "train.checkpoint_every=1"])
    trainer = tr.Trainer(cfg, tmp_path / "run")
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training)
    calls = {"n": 0}

    def blow_up(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2:
                module.running_var.data[0] = float("inf")  # .data: no autograd version bump

    bn.register_forward_hook(blow_up)
    trainer.fit()
    assert [r["step"] for r in _records_trust(tmp_path / "run") if "numerics/skipped_step" in r] == [1]
    for name in ("last", "last.prev"):
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"{name}.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name
    assert state["step"] == 2
