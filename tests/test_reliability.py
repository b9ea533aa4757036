"""Issue 12: reliability under real schedulers and real faults.

Every test is a probe that failed before its fix: counts validated, stop flags honoured
wherever the trainer waits, run-directory locks, exit codes a scheduler can read,
DataLoader workers that leave shutdown to the main process, non-finite steps that leave
no trace, and runs stopped before their first checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.tools.cli import main
from bida.config import load_config
from bida.engine.guard import TrainingDiverged
from bida.engine.run_dir import check_run_dir, create_run_dir
from bida.engine.runlog import RunLogger
from bida.errors import Interrupted, RunDirError
import bida.method.train_step
import bida.data.datasets


def _records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _one_line_error(capsys) -> str:
    """The final stderr line; the announcement a stop signal prints at once is left out."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("bida: stop requested"))
    assert "\n" not in err, err
    return err


# ---------------------------------------------------------------- 1. counts and stop flags


@pytest.mark.parametrize("override", ["train.iters=0", "train.iters_per_round=0", "train.rounds=-1",
                                      "train.max_bad_steps=0"])
def test_counts_are_validated_before_anything_is_created(tmp_path, capsys, tiny_overrides, override):
    # before: train.iters=0 hung forever (a phase of 0 iterations never ended) and ignored SIGTERM
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=bida", override]) == 2
    assert override.split("=")[0] in _one_line_error(capsys)
    assert not run.exists()


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


# ---------------------------------------------------------------- 11. exit codes


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


# ---------------------------------------------------------------- 4. run-directory lock


def test_a_live_run_directory_is_locked(tmp_path, capsys, tiny_overrides):
    # before: a second run (--overwrite) or --resume on a live run was accepted, and two
    # runs started together both wrote into the same directory.
    import bida.engine.train as tr

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides)
    check_run_dir(run, resume=False, overwrite=False)  # a second run passes this check first...
    live = tr.Trainer(cfg, run)  # ...then the first one creates the directory and holds the lock
    with pytest.raises(RunDirError, match="in use by another bida process"):
        create_run_dir(run, overwrite=False)  # the second one's creation step refuses
    for args in (["--resume", str(run)], ["--out", str(run), "--overwrite", *tiny_overrides]):
        assert main(["train", *args]) == 2
        err = _one_line_error(capsys)
        assert "in use by another bida process" in err and f"pid {os.getpid()}" in err, err
    assert live.fit(stop_after=1) is None  # the live run is undisturbed; the lock ends with it
    assert main(["train", "--resume", str(run)]) == 0


# ---------------------------------------------------------------- 6. evaluate: class count


def test_evaluate_refuses_a_checkpoint_of_another_class_count(tmp_path, capsys, tiny_overrides):
    # before: exit 0 and metrics computed with 7 output channels against the dataset's classes
    from bida.checkpoint import save_checkpoint
    from bida.config import to_dict
    from bida.models import build_model

    cfg = load_config(None, tiny_overrides)
    ckpt = tmp_path / "k7.pt"
    save_checkpoint({"model": build_model(cfg.model, 7, cfg.method.feature).state_dict(), "config": to_dict(cfg),
                     "num_classes": 7, "class_names": [f"c{i}" for i in range(7)]}, ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"), *tiny_overrides]) == 2
    err = _one_line_error(capsys)
    assert "7 classes, the config has" in err and "k7.pt" in err
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------- 8. float overrides


def test_exponent_floats_are_accepted_where_the_key_is_a_float(tmp_path):
    # before: YAML 1.1 reads 1e-3 and 1e6 (no dot) as strings: "expected a number, got '1e-3'"
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=1e6", "train.adapt_lr=7.5E-5"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.adapt_lr) == (1e-3, 1e6, 7.5e-5)
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_config(path).train.lr == 1e-3
    with pytest.raises(Exception, match="train.iters"):  # ints and strings are unchanged
        load_config(None, ["train.iters=1e3"])


# ---------------------------------------------------------------- 2. process-group signals


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


# ---------------------------------------------------------------- 5. non-finite steps


def _poison_second_batch(monkeypatch):
    """A NaN image in the 2nd source batch: NaN loss and NaN BatchNorm statistics."""
    import bida.engine.train as tr

    real, state = bida.method.train_step.source_step, {"calls": 0, "armed": True}

    def step(model, batch, cfg, **kwargs):
        state["calls"] += 1
        if state["armed"] and state["calls"] == 2:
            batch = {**batch, "image": batch["image"] * float("nan")}
        return real(model, batch, cfg, **kwargs)

    monkeypatch.setattr(bida.method.train_step, "source_step", step)
    return state


def test_a_skipped_step_leaves_no_trace_and_resume_stays_exact(tmp_path, tiny_overrides, monkeypatch):
    # before: the NaN forward poisoned BN running stats (non-finite tensors in last.pt, exit 0),
    # and a run resumed after the skip drew other batches than the uninterrupted run
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=5", "train.checkpoint_every=1"])
    _poison_second_batch(monkeypatch)
    tr.Trainer(cfg, tmp_path / "full").fit()
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in full["model"].values() if v.is_floating_point())
    assert [r["step"] for r in _records(tmp_path / "full") if "numerics/skipped_step" in r] == [1]

    poison = _poison_second_batch(monkeypatch)
    assert tr.Trainer(cfg, tmp_path / "part").fit(stop_after=2) is None  # after the skip
    poison["armed"] = False  # the resumed process meets no NaN: the skip is in its past
    tr.Trainer(cfg, tmp_path / "part", resume=True).fit()
    part = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert part["data_pos"] == full["data_pos"] == 6 and part["step"] == 5
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k


def test_a_checkpoint_with_a_non_finite_tensor_is_never_written(tmp_path, tiny_overrides):
    import bida.engine.train as tr

    trainer = tr.Trainer(load_config(None, tiny_overrides), tmp_path / "run")
    assert trainer.fit(stop_after=1) is None
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(TrainingDiverged, match="non-finite.*the last good checkpoint is .*last.pt"):
        trainer.checkpointer.save("last", optimizer, torch.amp.GradScaler("cpu", enabled=False))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


# ---------------------------------------------------------------- 3. stops before a checkpoint, in passes


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_run_stopped_before_its_first_checkpoint_resumes(tmp_path, capsys, tiny_overrides):
    # before: "cannot resume ...: no checkpoints/last.pt", and a plain rerun pointed to --resume
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=2"])
    tr.Trainer(cfg, tmp_path / "ref").fit()
    tr.Trainer(cfg, tmp_path / "run")  # crashed right after creating the run: config.yaml, no checkpoint
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    _same_weights(tmp_path / "ref", tmp_path / "run")


def test_sigterm_in_the_pseudo_label_pass_stops_at_once_and_the_pass_resumes(tmp_path, tiny_overrides, monkeypatch):
    # before: SIGTERM waited for the whole pass (at scale: the scheduler's SIGKILL came first)
    # and the pass restarted from its first image
    import bida.engine.round_labels as rl
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.iters_per_round=2",
                                              "train.rounds=1"])
    tr.Trainer(cfg, tmp_path / "ref").fit()
    real, calls = rl.predict_probs, {"n": 0}

    def predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "predict_probs", predict)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        tr.Trainer(cfg, run).fit()
    assert calls["n"] == 3 and len(list((run / "pseudo_labels" / "round_0.tmp" / "raw").iterdir())) == 3
    tr.Trainer(cfg, run, resume=True).fit()
    assert calls["n"] == 8  # the 5 images left, not 8 again
    _same_weights(tmp_path / "ref", run)
    ref_labels = sorted((tmp_path / "ref" / "pseudo_labels" / "round_0").glob("*.png"))
    for p in ref_labels:
        assert p.read_bytes() == (run / "pseudo_labels" / "round_0" / p.name).read_bytes()


def test_sigterm_in_an_evaluation_stops_at_once_and_resume_evaluates_again(tmp_path, tiny_overrides, monkeypatch):
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=4", "train.eval_every=2", "train.checkpoint_every=100"])
    tr.Trainer(cfg, tmp_path / "ref").fit()
    real, calls = bida.engine.inference.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(bida.engine.inference, "evaluate", evaluate)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="step 2"):
        tr.Trainer(cfg, run).fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["pending_eval"]
    tr.Trainer(cfg, run, resume=True).fit()
    _same_weights(tmp_path / "ref", run)
    evals = [[(r["step"], r["eval/mIoU"]) for r in _records(d) if "eval/mIoU" in r] for d in (tmp_path / "ref", run)]
    assert evals[0] == evals[1] and [s for s, _ in evals[0]] == [2, 4]


# ---------------------------------------------------------------- 9. full disk / read-only outside checkpoints


def test_full_disk_or_read_only_output_in_other_writers_gives_one_line(tmp_path, capsys, tiny_overrides, monkeypatch):
    # before: tracebacks (exit 1) from the log writer and predict (leaving a 0-byte PNG),
    # and `evaluate --out` failed only after the whole evaluation
    import errno

    import numpy as np
    from PIL import Image

    import bida.engine.inference
    import bida.engine.train as tr

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "log.jsonl"))

    with monkeypatch.context() as m:
        m.setattr(RunLogger, "log", full)
        assert main(["train", "--out", str(tmp_path / "run"), *tiny_overrides]) == 2
        assert "No space left on device" in _one_line_error(capsys)

    tr.Trainer(load_config(None, tiny_overrides), tmp_path / "ok").fit(stop_after=1)
    ckpt = str(tmp_path / "ok" / "checkpoints" / "last.pt")
    (tmp_path / "afile").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(bida.engine.inference, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
        assert main(["evaluate", "--checkpoint", ckpt, "--out", str(tmp_path / "afile" / "eval")]) == 2
        assert "not writable" in _one_line_error(capsys)

    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "pred" in str(fp):
            open(fp, "wb").close()  # the disk fills up after the file was created
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", save)
        assert main(["predict", "--checkpoint", ckpt, str(tmp_path / "x.png"), "--out", str(tmp_path / "pred"), "--quiet"]) == 2
        assert "No space left on device" in _one_line_error(capsys)
    assert [p.name for p in (tmp_path / "pred").iterdir() if p.suffix == ".png"] == []  # no 0-byte PNG
    assert main(["predict", "--checkpoint", ckpt, str(tmp_path / "x.png"), "--out", str(tmp_path / "pred")]) == 0


# ---------------------------------------------------------------- 12. minor


def test_resume_honours_quiet_and_logs_round_statistics_once(tmp_path, capsys, tiny_overrides):
    import bida.engine.train as tr

    cfg = load_config(None, [o for o in tiny_overrides if o != "train.quiet=true"] +
                      ["method=self_training", "train.iters=2", "train.iters_per_round=2", "train.rounds=1"])
    run = tmp_path / "run"
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None  # inside round 0, after its pseudo labels
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "pseudo labels" not in printed.out + printed.err  # before: --quiet was ignored with --resume
    rounds = [r for r in _records(run) if "pseudo/static_accuracy" in r]
    assert [r["round"] for r in rounds] == [0]  # before: logged again by the resumed run


def test_a_directory_given_as_checkpoint_is_named_as_such(tmp_path, capsys, tiny_overrides):
    # before: "checkpoint DIR does not exist" for a directory that exists
    assert main(["train", "--out", str(tmp_path / "run"), *tiny_overrides, "method=bida",
                 f"model.init_checkpoint={tmp_path}"]) == 2
    assert "is a directory" in _one_line_error(capsys)


# ---------------------------------------------------------------- 10. bad file met mid-run


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_met_mid_run_gives_one_line_and_the_run_resumes(tmp_path, capsys, workers):
    # before: with workers, a 23-line "Caught DataError in DataLoader worker process" message
    from fixtures import make_folder_tree

    src, tgt = tmp_path / "src", tmp_path / "tgt"
    make_folder_tree(src, n_train=4)
    make_folder_tree(tgt, target_without_train_labels=True)
    bad = src / "images" / "train" / "img_003.png"  # beyond the 2 files checked up front
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    run = tmp_path / "run"
    args = ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
            "data.target.kind=folder", f"data.target.root={tgt}", "model.width=0.125", "train.iters=4",
            "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100", f"data.num_workers={workers}"]
    assert main(["train", "--out", str(run), *args]) == 2
    err = _one_line_error(capsys)
    assert "img_003.png" in err and "--resume" in err and "Traceback" not in err
    bad.write_bytes(good)
    assert main(["train", "--resume", str(run)]) == 0


def test_predict_after_a_bad_file_resumes_without_overwrite(tmp_path, capsys, tiny_overrides):
    # before: the outputs written before the bad file made the rerun refuse without --overwrite
    import numpy as np
    from PIL import Image

    import bida.engine.train as tr

    tr.Trainer(load_config(None, tiny_overrides), tmp_path / "ok").fit(stop_after=1)
    ckpt = str(tmp_path / "ok" / "checkpoints" / "last.pt")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(imgs / f"{name}.png")
    (imgs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = ["predict", "--checkpoint", ckpt, str(imgs), "--out", str(tmp_path / "pred"), "--quiet"]
    assert main(args) == 2 and "b.png" in _one_line_error(capsys)
    first = (tmp_path / "pred" / "a.png").stat().st_mtime_ns
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(imgs / "b.png")
    assert main(args) == 0
    assert (tmp_path / "pred" / "b_overlay.png").is_file()
    assert (tmp_path / "pred" / "a.png").stat().st_mtime_ns == first  # kept, not predicted again


def test_loader_workers_are_shut_down_on_every_exit_path(tmp_path):
    """Workers ignore SIGTERM, so a worker left to multiprocessing's exit handler (which
    terminates by signal, then joins) would hang the interpreter forever: an error in a
    phase must still stop them, even while the error (and its traceback) is kept alive."""
    import multiprocessing

    from fixtures import make_folder_tree

    import bida.engine.train as tr

    src, tgt = tmp_path / "src", tmp_path / "tgt"
    make_folder_tree(src, n_train=4)
    make_folder_tree(tgt, target_without_train_labels=True)
    (src / "images" / "train" / "img_003.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = load_config(None, ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
                             "data.target.kind=folder", f"data.target.root={tgt}", "model.width=0.125",
                             "train.iters=4", "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100",
                             "data.num_workers=1"])
    with pytest.raises(Exception) as err:
        tr.Trainer(cfg, tmp_path / "run").fit()
    assert "img_003.png" in str(err.value)
    assert not multiprocessing.active_children()  # the traceback in ``err`` keeps the frames alive
