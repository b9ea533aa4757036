"""Issue 18: nothing a user owns is lost, no result is silently wrong.

--overwrite replaces only what a run wrote; --resume without a usable last.pt falls back to
the previous checkpoint or refuses, and never destroys a log record; every checkpoint
carries a checksum checked on every load; the per-step finiteness flag covers the buffers
a step changes; a resumed run logs what an uninterrupted one logs.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.tools.cli import main
from bida.config import load_config
from bida.errors import CheckpointError, RunDirError


def _records(run: Path, name: str = "log.jsonl") -> list[dict]:
    log = run / name
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped_run(tmp_path, tiny_overrides):
    """A source-only run stopped at step 3 (checkpoints at 2 and 3: last.pt and last.prev.pt)."""
    import bida.engine.train as tr

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.iters=6"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None
    return run


# ---------------------------------------------------------------- 1. --overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, tiny_overrides):
    # before: --overwrite deleted every file of a dataset copy, exit 0
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"{i}.png").write_bytes(b"img")
    (data / "notes.txt").write_text("mine")
    before = _tree(data)
    assert main(["train", "--out", str(data), "--overwrite", *tiny_overrides]) == 2
    err = _one_line(capsys)
    assert "not a bida run directory" in err and str(data / "images") in err, err
    assert _tree(data) == before

    notes = tmp_path / "notes.txt"  # a file given as the run directory was deleted too
    notes.write_text("mine")
    assert main(["train", "--out", str(notes), "--overwrite", *tiny_overrides]) == 2
    assert "is a file" in _one_line(capsys) and notes.read_text() == "mine"


def test_overwrite_replaces_only_a_run_and_refuses_a_run_with_foreign_files(stopped_run, capsys, tiny_overrides):
    run = stopped_run
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    args = ["train", "--out", str(run), "--overwrite", *tiny_overrides, "train.iters=1"]
    assert main(args) == 2
    err = _one_line(capsys)
    assert str(run / "notes.txt") in err and "not part of a bida run" in err, err
    assert _tree(run) == before  # refused before anything was removed
    (run / "notes.txt").unlink()
    assert main(args) == 0
    assert max(r["step"] for r in _records(run)) == 1  # the old run is replaced


def test_predict_overwrite_never_replaces_inputs_or_files_it_did_not_write(stopped_run, tmp_path, capsys):
    # before: --overwrite with --out the input folder replaced the input images by label maps
    from PIL import Image

    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    Image.new("RGB", (64, 32), (10, 200, 30)).save(images / "a.png")
    Image.new("RGB", (8, 8)).save(other / "a.png")  # someone's picture that happens to share the name
    before = _tree(tmp_path / "images") | _tree(tmp_path / "other")
    ckpt = str(stopped_run / "checkpoints" / "last.pt")
    assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(images), "--overwrite", "--quiet"]) == 2
    assert "one of the input images" in _one_line(capsys)
    assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(other), "--overwrite", "--quiet"]) == 2
    assert "holds no bida predictions" in _one_line(capsys)
    assert _tree(tmp_path / "images") | _tree(tmp_path / "other") == before
    out = tmp_path / "pred"
    for _ in range(2):  # predictions of bida are replaced with --overwrite
        assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "a.png").is_file()


def test_report_overwrite_replaces_only_a_bida_report(stopped_run, tmp_path, capsys):
    # before: --overwrite replaced any index.html and deleted any figures/*.png
    from bida.tools.report import prepare_out_dir

    site = tmp_path / "site"
    (site / "figures").mkdir(parents=True)
    (site / "index.html").write_text("<html>my page</html>")
    (site / "figures" / "plot.png").write_bytes(b"png")
    before = _tree(site)
    assert main(["report", str(stopped_run), "--out", str(site), "--overwrite"]) == 2
    err = _one_line(capsys)
    assert str(site / "index.html") in err and "not written by bida report" in err, err
    assert _tree(site) == before
    (site / "index.html").write_text("<p>Written by <code>bida report</code> on today</p>")
    (site / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt is not part of a bida report"):
        prepare_out_dir(site, overwrite=True)
    (site / "notes.txt").unlink()
    prepare_out_dir(site, overwrite=True)  # a report of bida: its old figures go
    assert not (site / "figures" / "plot.png").exists()


# ---------------------------------------------------------------- 2. --resume without last.pt


def test_resume_without_last_pt_falls_back_and_keeps_every_record(stopped_run, capsys):
    # before: the run restarted from step 0 and log.jsonl went from its records to none
    run = stopped_run
    original = _records(run)
    assert max(r["step"] for r in original) == 3
    (run / "checkpoints" / "last.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "last.pt is missing" in err and "last.prev.pt (step 2)" in err, err
    # the step-3 record was written again by the resumed run; the first one is kept aside
    assert [r for r in _records(run, "log.discarded.jsonl")] == [r for r in original if r["step"] > 2]
    assert [r["step"] for r in _records(run) if "loss/seg_src" in r] == [1, 2, 3, 4, 5, 6]


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


# ---------------------------------------------------------------- 3. checksums, previous checkpoint


def _flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor payload of a torch.save zip."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_refused_everywhere_and_resume_falls_back(stopped_run, capsys, tiny_overrides,
                                                                          tmp_path):
    # before: resume loaded the damaged file and trained on, exit 0; evaluate/predict used it
    run = stopped_run
    last = run / "checkpoints" / "last.pt"
    _flip_tensor_bytes(last)
    with pytest.raises(CheckpointError, match="damaged: checksum mismatch"):
        load_checkpoint(last)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 32)).save(image)
    for args in (["evaluate", "--checkpoint", str(last)],
                 ["predict", "--checkpoint", str(last), str(image), "--out", str(tmp_path / "pred")],
                 ["train", "--out", str(tmp_path / "adapt"), *tiny_overrides, "method=bida",
                  f"model.init_checkpoint={last}"]):
        assert main(args) == 2, args
        err = _one_line(capsys)
        assert str(last) in err and "damaged: checksum mismatch" in err, err
    damaged = last.read_bytes()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "damaged: checksum mismatch" in err and "resuming from the previous checkpoint" in err, err
    assert (run / "checkpoints" / "last.damaged.pt").read_bytes() == damaged  # kept, out of the way
    assert load_checkpoint(last)["step"] == 6


def test_the_last_good_checkpoint_is_never_a_damaged_one(stopped_run, tiny_overrides):
    # before: a TrainingDiverged message named a damaged last.pt "the last good checkpoint"
    from bida.engine.checkpointer import Checkpointer
    from bida.engine.distributed import DistContext
    from bida.engine.state import RunState

    _flip_tensor_bytes(stopped_run / "checkpoints" / "last.pt")
    # last_good reads only the files: the checkpointer of that directory, with nothing to save
    checkpointer = Checkpointer(stopped_run, None, None, RunState(), None, None, None, None, DistContext(), None,
                                None, print)
    assert checkpointer.last_good().endswith(f"{stopped_run / 'checkpoints' / 'last.prev.pt'} (step 2)")


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "old.pt")  # an older bida file, or public weights
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["model"]["w"], torch.ones(2))


# ---------------------------------------------------------------- 4. buffers in the finiteness flag


def test_a_step_that_blows_up_a_batchnorm_statistic_is_skipped(tmp_path, tiny_overrides):
    # before: the step counted as finite, and the checkpoint after it was refused (run failed)
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=3", "train.checkpoint_every=1"])
    trainer = tr.Trainer(cfg, tmp_path / "run")
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training)
    calls = {"n": 0}

    def blow_up(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2:
                module.running_var.data[0] = float("inf")  # .data: no autograd version bump

    bn.register_forward_hook(blow_up)
    trainer.fit()
    assert [r["step"] for r in _records(tmp_path / "run") if "numerics/skipped_step" in r] == [1]
    for name in ("last", "last.prev"):
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"{name}.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name
    assert state["step"] == 2


# ---------------------------------------------------------------- 12. leftovers


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
    assert len([r for r in _records(tmp_path / "run") if "eval/source_mIoU" in r]) == 1


def test_a_run_resumed_between_log_points_logs_what_an_uninterrupted_one_logs(tmp_path, tiny_overrides):
    # before: the first record after the resume averaged only the steps since the resume
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["train.iters=4", "train.log_every=3", "train.checkpoint_every=100"])
    tr.Trainer(cfg, tmp_path / "full").fit()
    assert tr.Trainer(cfg, tmp_path / "part").fit(stop_after=2) is None
    tr.Trainer(cfg, tmp_path / "part", resume=True).fit()

    def strip(records):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]

    full, part = strip(_records(tmp_path / "full")), strip(_records(tmp_path / "part"))
    assert [r["step"] for r in full if "loss/seg_src" in r] == [3, 4]
    assert part == full


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
