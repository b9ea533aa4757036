"""Issue 18: every stop path of a run, single process and under torchrun.

A stop on any rank reaches every rank and saves once; torchrun's launcher stops with one
message; a SIGKILLed run's workers do not keep it locked; every rank evaluates and saves
the same BatchNorm statistics; long passes check for stops; an interrupted synthetic
cache leaves nothing behind; a stop during set-up and a second Ctrl-C during the exit
both end cleanly. Every test failed before its fix.
"""

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
import torch

from bida.checkpoint import load_checkpoint
from bida.cli import main
from bida.config import load_config
from bida.train import Interrupted


def _records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _wait_for(predicate, procs, timeout: float = 180.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not predicate():
        for p in procs:
            assert p.poll() is None, (what, p.communicate())
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- 8. lock and orphaned workers

HOLD_LOCK = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from bida.train import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()
    child = os.fork()
    if child == 0:  # a DataLoader worker: inherits the lock's descriptor, outlives its parent
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
""")


def test_a_sigkilled_holder_with_live_forked_children_does_not_block_resume(tmp_path):
    # before: the forked child shared the flock'd open file description, so the lock
    # outlived the SIGKILLed process: "in use by another bida process (pid <dead>)"
    from bida.train import RunLock

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(child, 0)  # the child still lives
        t0 = time.monotonic()
        lock = RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 2.0
        lock.release()
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
