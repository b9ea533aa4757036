"""Stop signals sent from outside to a bida process and its loader workers."""

from __future__ import annotations

import pytest
import json
import os
import signal
from pathlib import Path

import bida.data.datasets
import bida.method.train_step
from bida.checkpoint import load_checkpoint
from helpers import _records

pytestmark = pytest.mark.slow


def test_sigterm_to_the_process_group_with_workers_stops_cleanly(tmp_path, tiny_overrides):
    # before: the workers died first and the main process failed in its final save with
    # "DataLoader worker ... is killed by signal: Terminated" (exit 1, traceback, work lost)
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "bida", "train", "--out", str(run), *tiny_overrides, "data.num_workers=1",
            "train.iters=200", "train.checkpoint_every=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.time()
    while not [r for r in _records(run) if r.get("step", 0) >= 2]:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM, Kubernetes and `timeout` deliver it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err and b"--resume" in err
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == max(r["step"] for r in _records(run))  # nothing since the signal is lost
