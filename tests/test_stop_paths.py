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

from bida.checkpoint import load_checkpoint
from bida.tools.cli import main
from bida.config import load_config
from bida.errors import Interrupted


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
    from bida.engine.run_dir import RunLock
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
    from bida.engine.run_dir import RunLock

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


# ---------------------------------------------------------------- 6, 7. stops under torchrun

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


def _ranks(args: list[str], env: dict) -> list[subprocess.Popen]:
    """``python -m bida ...`` as the ranks of a 2-process gloo job (what torchrun starts)."""
    from test_distributed import _free_port

    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "bida", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(WORLD)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


# The mean-teacher schedule with everything that carries state on: rare-class sampling,
# ClassMix, MIC and BiDA's terms; train.batch_size is its global batch.
TEACHER = ["method=bida", "train.schedule=teacher", "train.batch_size=4", "data.rare_class_sampling=true",
           "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8"]
STOP_CASES = {  # where rank 1 alone gets SIGTERM: (overrides, hook, what shows the place was reached)
    "step": (["train.iters=30"], None, lambda run, tmp: len([r for r in _records(run) if "loss/seg_src" in r]) >= 2),
    "teacher step": ([*TEACHER, "train.iters=30"], None,
                     lambda run, tmp: len([r for r in _records(run) if "loss/seg_mix" in r]) >= 2),
    "pseudo-labels": (["method=self_training", "train.iters=2", "train.rounds=1", "train.iters_per_round=2"],
                      "engine.round_labels:predict_probs:slow", lambda run, tmp: (tmp / "started-rank0").exists()),
    "evaluation": (["train.iters=4", "train.eval_every=2"], "engine.inference:predict_probs:slow",
                   lambda run, tmp: (tmp / "started-rank1").exists()),
}


@pytest.mark.parametrize("case", sorted(STOP_CASES))
def test_sigterm_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, tiny_overrides, case):
    # before: the other rank waited in its next collective until BIDA_DIST_TIMEOUT_S (30 min)
    # and both died with gloo tracebacks; in the pseudo-label pass rank 1 could not even
    # run its handler (it waited in a barrier)
    overrides, hook, reached = STOP_CASES[case]
    run = tmp_path / "run"
    procs = _ranks(["train", *tiny_overrides, *overrides, "train.checkpoint_every=1000", "--out", str(run)],
                   _env(tmp_path, hook))
    _wait_for(lambda: reached(run, tmp_path), procs, what=case)
    os.kill(procs[1].pid, signal.SIGTERM)
    t0 = time.monotonic()
    (code0, err0), (code1, err1) = _finish(procs, timeout=60)
    assert time.monotonic() - t0 < 30, "the stop did not reach rank 0 within seconds"
    assert (code0, code1) == (143, 143), (err0[-3000:], err1[-3000:])
    assert "Traceback" not in err0 + err1
    stopped = [line for line in (err0 + err1).splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and stopped[0] in err0 and f"--resume {run}" in stopped[0], err0 + err1  # rank 0 only
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert f"at step {state['step']} " in stopped[0]
    steps = [r["step"] for r in _records(run) if "loss/seg_src" in r or "loss/total" in r]
    assert state["step"] == max(steps, default=0)  # nothing done since the last step is lost
    if case == "evaluation":
        assert state["pending_eval"]
    assert main(["train", "--resume", str(run)]) == 0  # in one process here: the checkpoint is complete
    assert (run / "metrics.json").is_file()


def test_a_non_finite_teacher_step_on_one_rank_is_skipped_on_every_rank(tmp_path, tiny_overrides):
    # Rank 1's second step has a NaN loss: both ranks must skip it together (the gradient
    # all-reduce would otherwise spread the NaN, or one rank step while the other does not),
    # and the run go on to the end with one skipped step logged once.
    run = tmp_path / "run"
    args = ["train", *tiny_overrides, *TEACHER, "train.iters=3", "--out", str(run)]
    (code0, err0), (code1, err1) = _finish(_ranks(args, _env(tmp_path, "method.teacher:teacher_step:nan")), timeout=240)
    assert (code0, code1) == (0, 0), (err0[-3000:], err1[-3000:])
    skipped = [r for r in _records(run) if "numerics/skipped_step" in r]
    assert [r["step"] for r in skipped] == [1]  # after step 1, the second step's batch was dropped
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["step"], state["data_pos"]) == (3, 4)
    assert state["mean_teacher"]["teacher"]["updates"] == 3  # the skipped step left the teacher alone
    assert (run / "metrics.json").is_file()


# ---------------------------------------------------------------- 9. BatchNorm statistics under torchrun


def test_every_rank_evaluates_the_batchnorm_statistics_the_checkpoint_holds(tmp_path, tiny_overrides):
    # before: each rank evaluated its shard with its own running statistics and rank 0 saved
    # its own: evaluating the checkpoint again (as after a stop inside an evaluation) gave
    # another confusion matrix, so best-checkpoint selection could change on resume.
    # Per-rank statistics (model.sync_bn=false), averaged before evaluations and checkpoints;
    # synchronised BatchNorm has equal statistics on every rank anyway.
    run = tmp_path / "run"
    args = ["train", *tiny_overrides, "model.freeze_bn=false", "model.sync_bn=false", "train.iters=3", "--out", str(run)]
    (code0, err0), (code1, err1) = _finish(_ranks(args, _env(tmp_path)), timeout=240)
    assert (code0, code1) == (0, 0), (err0[-3000:], err1[-3000:])
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    during, again = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "again"))
    assert during["confusion"] == again["confusion"]
    assert during["per_class_iou"] == again["per_class_iou"]


# ---------------------------------------------------------------- 11. the step a stop promises


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


# ---------------------------------------------------------------- 13. long passes check for stops


def test_sigterm_in_the_second_pseudo_label_pass_stops_within_an_image(tmp_path, tiny_overrides, monkeypatch):
    # before: pass 2 (thresholds applied, one PNG written per image) ran to its end first
    import bida.engine.round_labels as rl
    import bida.engine.train as tr

    real, calls = rl.static_labels, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "static_labels", signalled)
    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.iters_per_round=2",
                                              "train.rounds=1"])
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="at step 2"):
        tr.Trainer(cfg, run).fit()
    assert calls["n"] == 1
    assert not (run / "pseudo_labels" / "round_0").exists()  # pass 1's files are kept for the resume
    assert len(list((run / "pseudo_labels" / "round_0.tmp" / "raw").iterdir())) == 8
    assert main(["train", "--resume", str(run)]) == 0
    assert len(list((run / "pseudo_labels" / "round_0").glob("*.png"))) == 8


def test_sigterm_in_the_class_pixel_count_scan_stops_within_an_image(tmp_path, tiny_overrides, monkeypatch):
    # before: the scan read every source label at full resolution before the stop was seen.
    # The scan checks data.rcs_min_pixels, before the run directory exists: a stop there leaves nothing.
    import bida.engine.train as tr
    from bida.data.datasets import SegmentationDataset

    real, calls = SegmentationDataset.load, {"n": 0}

    def signalled(self, index):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, index)

    monkeypatch.setattr(SegmentationDataset, "load", signalled)
    overrides = tiny_overrides + ["data.rare_class_sampling=true", "data.rcs_min_pixels=0"]
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="before the run started; nothing was written"):
        tr.Trainer(load_config(None, overrides), run).fit()
    assert calls["n"] == 1 and not run.exists()
    monkeypatch.setattr(SegmentationDataset, "load", real)
    assert main(["train", "--out", str(run), *overrides]) == 0  # the same command again


# ---------------------------------------------------------------- 12. leftovers and exits


def _bida(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bida", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def test_sigterm_while_the_synthetic_data_is_generated_leaves_nothing(tmp_path, tiny_overrides):
    # before: the process died by SIGTERM and left cache/synthetic-....tmp-<pid>/ for good
    cache = tmp_path / "cache"
    overrides = [o for o in tiny_overrides if not o.startswith("data.synthetic.cache_dir")]
    run = tmp_path / "run"
    proc = _bida(["train", *overrides, f"data.synthetic.cache_dir={cache}", "--out", str(run)],
                 _env(tmp_path, "data.synthetic:render_scene:slow"))
    _wait_for(lambda: (tmp_path / "started-rank0").exists(), [proc], what="generation")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"bida: stopped by SIGTERM before the run started; nothing was written to {run}"
    assert "Traceback" not in err and not run.exists()
    assert list(cache.iterdir()) == []


def test_a_generation_killed_outright_is_cleaned_up_by_the_next_one(tmp_path):
    # before: a SIGKILLed generation's .tmp-<pid> directory stayed in the cache for ever
    from bida.data.synthetic import SyntheticSpec, _root_name, ensure_synthetic

    spec = SyntheticSpec(num_train=2, num_val=1, height=32, width=64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"{_root_name(spec)}.tmp-{int(dead.stdout)}"
    (leftover / "source").mkdir(parents=True)
    live = tmp_path / f"{_root_name(spec)}.tmp-{os.getppid()}"  # a live process's generation is left alone
    live.mkdir()
    root = ensure_synthetic(spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, live.name])


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


@pytest.mark.parametrize("trial", range(3))
def test_more_ctrl_c_while_a_stopped_run_exits_still_exit_130_without_traceback(tmp_path, tiny_overrides, trial):
    # before: a traceback in 1 of 19 trials, death by SIGINT instead of exit 130 in 11 of 19
    run = tmp_path / "run"
    proc = _bida(["train", *tiny_overrides, "train.iters=200", "train.checkpoint_every=1000", "--out", str(run)],
                 _env(tmp_path))
    _wait_for(lambda: len(_records(run)) >= 2, [proc], what="two steps")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02 * trial)
    while proc.poll() is None:  # Ctrl-C held down until the process is gone
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith("bida: stopped"), err


LAUNCH_CASES = {  # (signal to the launcher, overrides, hook, what shows the place was reached)
    "SIGTERM in the pseudo-label pass": (
        signal.SIGTERM, ["method=self_training", "train.iters=2", "train.rounds=1", "train.iters_per_round=2"],
        "engine.round_labels:predict_probs:slow", lambda run, tmp: (tmp / "started-rank0").exists()),
    "SIGINT in the steps": (signal.SIGINT, ["train.iters=30"], None,
                            lambda run, tmp: len([r for r in _records(run) if "loss/seg_src" in r]) >= 2),
}


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
