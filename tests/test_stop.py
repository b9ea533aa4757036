"""bida.engine.stop: what the first and second SIGTERM/SIGINT do, and where a run stops."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from bida.engine.state import RunState
from bida.engine.stop import StopControl, _Stopping
from bida.errors import Interrupted


def _run(step: int = 3) -> StopControl:
    """The stop control of a run in runs/x at ``step``, no checkpoint written yet."""
    return StopControl(Path("runs/x"), RunState(step=step))


def test_first_signal_asks_for_a_checkpoint_second_stops_at_once(capsys):
    stop = _run()
    before = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        stop.check(True)  # no signal: nothing happens
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and stop.seen() == signal.SIGTERM
        assert "stop requested (SIGTERM): saving a checkpoint at step 3" in capsys.readouterr().err
        stop.in_step = True
        assert stop.stop_step() == 4  # inside a step: saved after it
        with pytest.raises(_Stopping):
            stop.on_rank0(lambda check_stop: check_stop())
        with pytest.raises(Interrupted, match="stopped at once by a second SIGINT during step 4; no good"):
            signal.raise_signal(signal.SIGINT)
        assert stop.exiting
        signal.raise_signal(signal.SIGTERM)  # exiting: ignored
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    # The last signal acted on (the SIGTERM while exiting was ignored) names the stop.
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 3 \\(checkpoint saved\\); continue with: "
                                          "bida train --resume runs/x") as err:
        stop.check(True)
    assert err.value.signum == signal.SIGINT


def test_a_second_signal_while_saving_waits_for_the_write():
    stop = _run()
    stop.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        stop.saving = True
        signal.raise_signal(signal.SIGTERM)  # no exception: the save finishes, then stops
        assert stop.now and not stop.exiting
    finally:
        stop.restore()


def test_set_up_stops_at_once_unless_the_run_directory_is_being_written():
    stop = _run()
    stop.setting_up = True
    stop.install()
    try:
        with pytest.raises(Interrupted, match="before the run started; nothing was written to runs/x"):
            signal.raise_signal(signal.SIGINT)
        stop.exiting, stop.signal, stop.deferring = False, None, True
        signal.raise_signal(signal.SIGTERM)  # deferred: noted, acted on once the directory is complete
        assert stop.signal == signal.SIGTERM
        stop.run_written = True
        assert stop.setup_message(signal.SIGTERM).endswith("continue with: bida train --resume runs/x")
    finally:
        stop.restore()
    assert _run().on_rank0(lambda check_stop: 7) == 7
