"""bida.engine.checkpointer: checkpoints and --resume from what a stopped or damaged run left, losing no record."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bida.engine.train as tr
from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.guard import TrainingDiverged
from bida.models import build_model
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import _one_line, _records, _records_trust, _same_weights, _tree, folder_args, folder_pair, snapshot, stopped_run  # noqa: F401 (fixtures)


def test_a_bad_saved_config_is_one_line_on_resume_and_evaluate(tmp_path, capsys):
    from bida.config import load_config
    from bida.engine.train import Trainer

    src, tgt = folder_pair(tmp_path)
    run = tmp_path / "run"
    Trainer(load_config(None, folder_args(src, tgt) + ["train.iters=4"]), run).fit(stop_after=1)
    saved = (run / "config.yaml").read_text()
    ckpt = str(run / "checkpoints" / "last.pt")
    for edit in ("eval_classes: null", "crop:\n  - 8\n  - 12"):
        assert edit in saved
    for bad, needle in (("eval_classes: [99]", "data.eval_classes"), ("crop: [.inf, 12]", "data.crop")):
        edited = saved.replace("eval_classes: null" if "eval" in bad else "crop:\n  - 8\n  - 12", bad)
        (run / "config.yaml").write_text(edited)
        before = {k: v for k, v in snapshot(run).items() if k != ".lock"}
        assert main(["train", "--resume", str(run)]) == 2  # was an IndexError traceback at the evaluation
        err = capsys.readouterr().err.strip()
        assert err.startswith("bida: error:") and "\n" not in err and needle in err, err
        assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before
    (run / "config.yaml").write_text(saved)
    assert main(["evaluate", "--checkpoint", ckpt, "data.eval_classes=[99]", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.eval_classes" in err and ">= 3" in err, err


def test_checkpointer_alone_saves_rotates_and_restores(tmp_path):
    # The checkpointer is built from what it uses: no trainer, no data, no run set-up.
    from types import SimpleNamespace

    from bida.engine.checkpointer import Checkpointer
    from bida.engine.distributed import BatchNormAverager, DistContext
    from bida.engine.runlog import RunLog
    from bida.engine.state import RunState
    from bida.engine.stop import StopControl

    cfg = load_config(None, ["model.width=0.125"])
    classes = SimpleNamespace(num_classes=3, names=["a", "b", "c"], palette=[(0, 0, 0)] * 3)
    model = build_model(cfg.model, 3, cfg.method.feature)
    state, dist = RunState(), DistContext()
    (tmp_path / "checkpoints").mkdir()
    log = RunLog(tmp_path, dist)

    def checkpointer(model, state):
        return Checkpointer(tmp_path, cfg, classes, state, model, None, None, log, dist,
                            BatchNormAverager(dist, model), StopControl(tmp_path, state), lambda msg: None)

    ckpt = checkpointer(model, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert ckpt.kept() == "no good checkpoint was saved (start again with --overwrite)"
    state.step, state.iter = 1, 1
    ckpt.save("last", optimizer, scaler)
    state.step, state.iter, state.best_miou = 2, 2, 0.25
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    ckpt.save("last", optimizer, scaler)
    assert load_checkpoint(ckpt.path("last.prev"))["step"] == 1  # the previous one is kept
    assert ckpt.kept() == "the checkpoint of step 2 is kept"
    assert ckpt.last_good() == f"the last good checkpoint is {ckpt.path('last')} (step 2)"
    # a fresh model and state, restored from the file
    model2, state2 = build_model(cfg.model, 3, cfg.method.feature), RunState()
    resumed = checkpointer(model2, state2).find_resume(torch.device("cpu"), "source")
    assert resumed is not None and resumed[0] == ckpt.path("last")
    optimizer_state, _ = checkpointer(model2, state2).load(*resumed)
    assert state2 == RunState(phase=0, iter=2, step=2, data_pos=0, best_miou=0.25) and optimizer_state is not None
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


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


def test_a_run_stopped_before_its_first_checkpoint_resumes(tmp_path, capsys, tiny_overrides):
    # before: "cannot resume ...: no checkpoints/last.pt", and a plain rerun pointed to --resume
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=2"])
    tr.Trainer(cfg, tmp_path / "ref").fit()
    tr.Trainer(cfg, tmp_path / "run")  # crashed right after creating the run: config.yaml, no checkpoint
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    _same_weights(tmp_path / "ref", tmp_path / "run")


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


def test_resume_without_last_pt_falls_back_and_keeps_every_record(stopped_run, capsys):
    # before: the run restarted from step 0 and log.jsonl went from its records to none
    run = stopped_run
    original = _records_trust(run)
    assert max(r["step"] for r in original) == 3
    (run / "checkpoints" / "last.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "last.pt is missing" in err and "last.prev.pt (step 2)" in err, err
    # the step-3 record was written again by the resumed run; the first one is kept aside
    assert [r for r in _records_trust(run, "log.discarded.jsonl")] == [r for r in original if r["step"] > 2]
    assert [r["step"] for r in _records_trust(run) if "loss/seg_src" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_without_any_checkpoint_refuses_and_changes_nothing(stopped_run, capsys):
    run = stopped_run
    for name in ("last.pt", "last.prev.pt"):
        (run / "checkpoints" / name).unlink(missing_ok=True)
    before = _tree(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys)
    assert "last.pt is missing" in err and "up to step 3" in err and "nothing was changed" in err, err
    assert _tree(run) == before


def test_resume_without_checkpoint_or_log_refuses_when_pseudo_labels_were_made(tmp_path, capsys, tiny_overrides):
    # before: the restarted run reused pseudo_labels/round_0 of the lost model
    import bida.engine.train as tr

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.rounds=1"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None  # inside round 0, after its pseudo labels
    for name in ("checkpoints", "log.jsonl"):
        (run / name).rename(tmp_path / name)
    before = _tree(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "pseudo_labels/ holds labels of its trained model" in _one_line(capsys)
    assert _tree(run) == before


def test_resume_with_last_pt_a_directory_refuses_before_touching_the_log(stopped_run, capsys):
    # before: the log was wiped, then the run failed
    run = stopped_run
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    last.mkdir()
    before = _tree(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = _one_line(capsys)
    assert "is a directory, not a checkpoint file" in err and "nothing was changed" in err, err
    assert _tree(run) == before


def test_resume_before_any_trained_step_restarts_from_step_0_saying_so(tmp_path, capsys, tiny_overrides):
    import bida.engine.train as tr

    run = tmp_path / "run"
    tr.Trainer(load_config(None, tiny_overrides + ["train.iters=1"]), run).close()  # config.yaml only
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "no step was trained yet: starting again from step 0" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["missing", "file"])
def test_resume_of_a_path_that_is_no_run_directory_says_so(tmp_path, capsys, make):
    # before: "the run stopped before it saved its config" for a typo or a file
    path = tmp_path / "nowhere"
    if make == "file":
        path.write_text("x")
    assert main(["train", "--resume", str(path)]) == 2
    assert ("no such directory" if make == "missing" else "it is a file, not a run directory") in _one_line(capsys)


def test_a_temporary_file_of_a_killed_writer_is_removed_on_resume(stopped_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = stopped_run / "checkpoints" / f".last.pt.tmp-{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    assert main(["train", "--resume", str(stopped_run), "--quiet"]) == 0
    assert not stale.exists()


def test_a_resumed_finished_run_logs_source_val_once(tmp_path, tiny_overrides):
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=1", "data.source.val_split=val"])
    tr.Trainer(cfg, tmp_path / "run").fit()
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert len([r for r in _records_trust(tmp_path / "run") if "eval/source_mIoU" in r]) == 1


def test_the_rng_state_holds_the_cuda_generator_of_the_current_device(monkeypatch):
    # Dropout and stochastic depth on a GPU draw from the CUDA generator: without its state in
    # the checkpoint a resumed GPU run draws other masks than the run it continues. (A stand-in
    # CUDA generator: this machine has no GPU.)
    from bida.engine.checkpointer import rng_state, set_rng_state

    cuda = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: cuda.update(state=t))
    state = rng_state()
    draws = torch.rand(3)
    cuda["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the generator moved on
    set_rng_state(state)
    assert cuda["state"].tolist() == [1, 2, 3]
    assert torch.equal(torch.rand(3), draws)


def test_resume_says_it_loads_the_static_labels(tmp_path, tiny_overrides, capsys):
    from bida.config import load_config
    from bida.engine.train import Trainer

    verbose = [o for o in tiny_overrides if o != "train.quiet=true"]
    run = tmp_path / "r"
    cfg = load_config(None, verbose + ["method=self_training", "train.iters=2", "train.rounds=1"])
    assert Trainer(cfg, run).fit(stop_after=3) is None  # stopped inside round 0, after its labels
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "loading static pseudo labels of round 0" in text and "generating static pseudo labels" not in text


def test_resume_says_from_which_step_phase_and_iteration(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    from bida.config import load_config

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.rounds=1",
                                              "train.iters_per_round=4"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None  # 2 source steps, then 1 of the round
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"bida: resuming from step 3 (phase 2 of 2: round, iteration 1 of 4) in {run}" in out, out
