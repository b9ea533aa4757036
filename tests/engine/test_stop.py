"""bida.engine.stop: what the first and second SIGTERM/SIGINT do, and where a run stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bida.checkpoint
import bida.data.datasets
import bida.method.train_step
from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.state import RunState
from bida.engine.stop import StopControl, _Stopping
from bida.errors import Interrupted
from bida.tools.cli import main
from helpers import _bida, _env, _one_line_error, _records, _wait_for


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


def test_stop_flag_is_read_before_the_first_iteration(tmp_path, tiny_overrides, monkeypatch):
    # before: the flag was read only after an iteration, so a SIGTERM that arrived while the
    # loaders were built still ran a full step (at real scale: minutes) before stopping.
    import bida.engine.train as tr

    real = bida.data.datasets.build_train_dataset

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(bida.data.datasets, "build_train_dataset", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="--resume") as info:
        tr.Trainer(load_config(None, tiny_overrides), run).fit()
    assert info.value.signum == signal.SIGTERM
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 0
    assert not [r for r in _records(run) if "loss/seg_src" in r]  # no step was taken
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's handler is removed again


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_clean_stop_by_signal_exits_128_plus_signal(tmp_path, capsys, tiny_overrides, monkeypatch, sig, code):
    # before: exit code 2 and "bida: error: ...", which a scheduler reads as bad input
    import bida.engine.train as tr

    real, calls = bida.method.train_step.source_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(bida.method.train_step, "source_step", step)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides]) == code
    err = _one_line_error(capsys)
    assert "error" not in err and f"--resume {run}" in err and signal.Signals(sig).name in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert main(["train", "--resume", str(run)]) == 0


def _records_stop_paths(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _stop_lines(capsys) -> tuple[str, str]:
    """(the announcement printed at the signal, the rest of stderr)."""
    err = capsys.readouterr().err.strip().splitlines()
    announced = [line for line in err if line.startswith("bida: stop requested")]
    assert len(announced) == 1, err
    return announced[0], "\n".join(line for line in err if line not in announced)


@pytest.mark.parametrize("where", ["final evaluation", "checkpoint write"])
def test_the_stop_message_names_the_step_really_saved(tmp_path, capsys, tiny_overrides, monkeypatch, where):
    # before: "saving a checkpoint at step 3", then "stopped by SIGTERM at step 2"
    import bida.checkpoint
    import bida.engine.inference

    module, name, at_call = ((bida.engine.inference, "evaluate", 2) if where == "final evaluation"
                             else (bida.checkpoint, "save_checkpoint", 2))
    real, calls = getattr(module, name), {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:  # the evaluation of _finish / the checkpoint of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, "train.iters=2", "train.checkpoint_every=2"]) == 143
    announced, final = _stop_lines(capsys)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert saved == 2 and f"at step {saved} " in announced and f"at step {saved} " in final, (announced, final)
    assert main(["train", "--resume", str(run)]) == 0


@pytest.mark.slow
def test_sigterm_between_the_config_and_the_first_step_leaves_a_resumable_run(tmp_path, tiny_overrides):
    # before: killed silently (no handler yet), and run.json was never written, even by the resume
    run = tmp_path / "run"
    proc = _bida(["train", *tiny_overrides, "train.iters=2", "--out", str(run)], _env(tmp_path, "engine.train:dump_config:term"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"bida: stopped by SIGTERM before training started; continue with: " \
                                           f"bida train --resume {run}"
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    (run / "run.json").unlink()  # as a run killed outright between the two leaves it
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_more_ctrl_c_while_a_stopped_run_exits_still_exit_130_without_traceback(tmp_path, tiny_overrides, trial):
    # before: a traceback in 1 of 19 trials, death by SIGINT instead of exit 130 in 11 of 19
    run = tmp_path / "run"
    proc = _bida(["train", *tiny_overrides, "train.iters=200", "train.checkpoint_every=1000", "--out", str(run)],
                 _env(tmp_path))
    _wait_for(lambda: len(_records_stop_paths(run)) >= 2, [proc], what="two steps")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02 * trial)
    while proc.poll() is None:  # Ctrl-C held down until the process is gone
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith("bida: stopped"), err


def _signal_at(monkeypatch, calls: dict[int, int]):
    """Send SIGINT from inside the source step on the given calls (call number -> count)."""
    real = bida.method.train_step.source_step
    seen = {"n": 0}

    def step(*a, **k):
        seen["n"] += 1
        for _ in range(calls.get(seen["n"], 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(bida.method.train_step, "source_step", step)


def test_ctrl_c_says_where_it_saves_and_saves_there(tmp_path, tiny_overrides, monkeypatch, capsys):
    _signal_at(monkeypatch, {3: 1})  # during step 3
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=100"]) == 130
    err = capsys.readouterr().err
    assert "stop requested (SIGINT): saving a checkpoint at step 3" in err and "again to stop at once" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path, tiny_overrides, monkeypatch, capsys):
    _signal_at(monkeypatch, {4: 2})  # twice during step 4; the last checkpoint is step 2
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=2"]) == 130
    err = capsys.readouterr().err
    assert "stopped at once by a second SIGINT during step 4" in err and "checkpoint of step 2 is kept" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0


def test_second_ctrl_c_during_a_save_waits_for_it(tmp_path, tiny_overrides, monkeypatch, capsys):
    real = bida.checkpoint.save_checkpoint
    sent = {"n": 0}

    def save(state, path):
        if state["step"] == 2 and not sent["n"]:
            sent["n"] = 1
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real(state, path)

    monkeypatch.setattr(bida.checkpoint, "save_checkpoint", save)
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=2"]) == 130
    assert "after saving step 2" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
