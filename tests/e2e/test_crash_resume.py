"""A training process killed with SIGKILL (also mid-checkpoint) resumes to the same result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# Child process that slows the checkpoint rename down and announces it, so that the test
# can kill it between "temporary file written" and "renamed into place".
SLOW_RENAME = textwrap.dedent(
    """
    import os, sys, time
    import bida.checkpoint as ck
    marker = sys.argv.pop(1)
    real_replace = os.replace
    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)
        @staticmethod
        def replace(a, b):
            if str(b).endswith("last.pt") and os.path.exists(b):
                open(marker, "w").close()
                time.sleep(30)
            return real_replace(a, b)
    ck.os = _Os()
    from bida.tools.cli import main
    sys.exit(main())
    """
)


def _args(overrides):
    return ["train", "--quiet", *overrides, "method=bida", "train.iters=8", "train.iters_per_round=6",
            "train.checkpoint_every=1"]


def _spawn(args, env, wrapper=None, marker=None):
    cmd = [sys.executable, "-c", wrapper, str(marker)] if wrapper else [sys.executable, "-m", "bida"]
    return subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_step(log: Path, step: int, proc, timeout=240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.is_file():
            steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


@pytest.fixture
def env(tiny_overrides):
    e = dict(os.environ)
    e["PYTHONHASHSEED"] = "0"
    return e


def _same_result(a: Path, b: Path) -> None:
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["mIoU"] == mb["mIoU"] and ma["per_class_iou"] == mb["per_class_iou"]


def test_sigkill_at_random_step_and_during_checkpoint_write(tmp_path, tiny_overrides, env):
    ref = tmp_path / "ref"
    assert subprocess.run([sys.executable, "-m", "bida", *_args(tiny_overrides), "--out", str(ref)], env=env,
                          capture_output=True).returncode == 0

    # 1. SIGKILL at a random iteration (source stage or a self-training round)
    step = random.Random(os.getpid()).randint(2, 12)
    run = tmp_path / "killed"
    proc = _spawn(_args(tiny_overrides) + ["--out", str(run)], env)
    _wait_step(run / "log.jsonl", step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run([sys.executable, "-m", "bida", "train", "--resume", str(run)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _same_result(ref, run)

    # 2. SIGKILL while a checkpoint is being written (temp file complete, not yet renamed)
    run2 = tmp_path / "killed_in_write"
    marker = tmp_path / "in_write"
    proc = _spawn(_args(tiny_overrides) + ["--out", str(run2)], env, wrapper=SLOW_RENAME, marker=marker)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p for p in (run2 / "checkpoints").iterdir() if ".tmp-" in p.name]  # killed mid-write
    load_checkpoint(run2 / "checkpoints" / "last.pt")  # the previous checkpoint is intact
    out = subprocess.run([sys.executable, "-m", "bida", "train", "--resume", str(run2)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _same_result(ref, run2)
    assert not [p for p in (run2 / "checkpoints").iterdir() if ".tmp-" in p.name]  # the killed writer's file is gone


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_overrides, env):
    run = tmp_path / "term"
    proc = _spawn(_args(tiny_overrides) + ["--out", str(run)], env)
    _wait_step(run / "log.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and b"--resume" in err  # 128 + SIGTERM: a clean stop, not bad input
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    logged = max(json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines())
    assert state["step"] == logged  # the checkpoint holds the last finished step
