"""bida.engine.guard: a non-finite step is detected by one flag and undone."""

from __future__ import annotations

import math

import torch

from bida.engine.guard import StepGuard, _first_non_finite, _grad_max_norm, _step_is_finite


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
