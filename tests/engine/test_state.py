"""bida.engine.state: the run's progress and the checkpoint keys it writes."""

from __future__ import annotations


def test_run_state_is_the_checkpoints_progress_keys():
    from bida.engine.state import RunState

    state = RunState(phase=1, iter=2, step=7, data_pos=9, pending_eval=True, best_miou=0.5, best_step=6, bad_steps=1)
    saved = state.state_dict()
    assert list(saved) == ["phase", "iter", "step", "data_pos", "pending_eval", "best_miou", "best_step", "bad_steps"]
    again = RunState()
    again.load_state_dict(saved)
    assert again == state
    # a checkpoint of an older bida has no data_pos, pending_eval or bad_steps
    old = RunState()
    old.load_state_dict({"phase": 1, "iter": 2, "step": 7, "best_miou": 0.5, "best_step": 6})
    assert old == RunState(phase=1, iter=2, step=7, data_pos=7, best_miou=0.5, best_step=6)
