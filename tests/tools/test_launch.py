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


WORLD = 2

HOOK = textwrap.dedent("""
    import os
    if os.environ.get("BIDA_TEST_HOOK"):  # test hook: MODULE:FUNCTION:ACTION:MARKER
        import dataclasses, importlib, signal, time
        from pathlib import Path
        module, function, action, marker = os.environ["BIDA_TEST_HOOK"].split(":", 3)
        mod = importlib.import_module("bida." + module)
        real = getattr(mod, function)
        calls = []
        def hooked(*args, **kwargs):
            Path(f"{marker}-rank{os.environ.get('RANK', '0')}").touch()  # the place was reached
            if action == "slow":
                time.sleep(0.4)
            out = real(*args, **kwargs)
            calls.append(1)
            if action == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if action == "nan" and os.environ.get("RANK") == "1" and len(calls) == 2:  # a step's StepResult
                out = dataclasses.replace(out, loss=out.loss * float("nan"))
            return out
        setattr(mod, function, hooked)
""")


def _env(tmp_path: Path, hook: str | None = None) -> dict:
    """Environment of a child: short collective timeout, one thread, an optional hook
    (``module:function:action``, action ``slow``, ``term``, or ``nan``: rank 1's second step
    result gets a NaN loss) that marks ``tmp_path/started-rank<r>``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, OMP_NUM_THREADS="1", BIDA_DIST_TIMEOUT_S="90",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("BIDA_TEST_HOOK", None)
    if hook:
        env["BIDA_TEST_HOOK"] = f"{hook}:{tmp_path / 'started'}"
    return env


def _bida(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bida", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


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
