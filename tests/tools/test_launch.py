"""bida.tools.launch: the torchrun launcher, its signals and errors."""

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

from bida.checkpoint import load_checkpoint
from bida.tools.cli import main
from helpers import WORLD, _bida, _env, _wait_for


def _records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


LAUNCH_CASES = {  # (signal to the launcher, overrides, hook, what shows the place was reached)
    "SIGTERM in the pseudo-label pass": (
        signal.SIGTERM, ["method=self_training", "train.iters=2", "train.rounds=1", "train.iters_per_round=2"],
        "engine.round_labels:predict_probs:slow", lambda run, tmp: (tmp / "started-rank0").exists()),
    "SIGINT in the steps": (signal.SIGINT, ["train.iters=30"], None,
                            lambda run, tmp: len([r for r in _records(run) if "loss/seg_src" in r]) >= 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_a_signal_to_the_launcher_stops_the_job_with_one_message(tmp_path, tiny_overrides, case):
    # before (torchrun): exit 1 with a SignalException traceback, the "stopped by" line once
    # per rank, and in the pseudo-label pass rank 1 died with a gloo traceback
    sig, overrides, hook, reached = LAUNCH_CASES[case]
    run = tmp_path / "run"
    proc = _bida(["launch", "--standalone", f"--nproc_per_node={WORLD}", "train", *tiny_overrides, *overrides,
                  "train.checkpoint_every=1000", "--out", str(run)], _env(tmp_path, hook))
    _wait_for(lambda: reached(run, tmp_path), [proc], what=case)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 128 + sig, err[-4000:]
    assert "Traceback" not in out + err and "SignalException" not in out + err, err[-4000:]
    stopped = [line for line in (out + err).splitlines() if "stopped by" in line]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert stopped == [f"bida: stopped by {sig.name} at step {state['step']} (checkpoint saved); "
                       f"continue with: bida train --resume {run}"], err[-4000:]
    assert main(["train", "--resume", str(run)]) == 0


def test_launch_names_a_missing_command_in_one_line(capsys):
    assert main(["launch", "--nproc_per_node=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no bida command given" in err
