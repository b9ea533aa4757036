"""A disk that fills up: every writer names its file in one line and leaves nothing half-written.

The full disk is simulated at the file-object level: the file is created (as on a real full
disk), then its writes fail with ENOSPC once a byte budget is spent.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

import bida.data.datasets
import bida.method.train_step
from bida.config import load_config
from bida.engine.runlog import LOG_DISCARDED, LogAccumulator, RunLogger, log_has, logged_steps, truncate_log
from bida.tools.cli import main
from helpers import TINY_RUN, _one_line_error, fill_disk


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bida: error:") and "\n" not in err, err
    return err


def test_full_disk_while_logging_names_the_log_and_keeps_whole_records(tmp_path, capsys, synthetic_cache,
                                                                       monkeypatch):
    # before: "bida: error: cannot write: No space left on device", with no file named
    run = tmp_path / "run"
    log = run / "log.jsonl"
    with monkeypatch.context() as m:
        fill_disk(m, lambda p: p == log, budget=600)  # a few records fit, then one is cut short
        assert main(["train", "--out", str(run), *TINY_RUN, f"data.synthetic.cache_dir={synthetic_cache}"]) == 2
    err = _one_line(capsys)
    assert f"cannot write {log}: No space left on device" in err, err
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["step"] >= 1 for line in lines)  # no half record left behind


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


def test_accumulator_means_leave_out_non_finite_values_and_survive_a_state_round_trip():
    acc = LogAccumulator()
    acc.add({"loss": torch.tensor(1.0), "acc": torch.tensor(float("nan")), "lr": 0.5})
    acc.add({"loss": torch.tensor(3.0), "acc": torch.tensor(0.25), "lr": 1.5})
    copy = LogAccumulator()
    copy.load_state_dict(acc.state_dict())
    acc.add({"loss": torch.tensor(5.0), "acc": torch.tensor(0.75), "lr": float("inf")})
    copy.add({"loss": torch.tensor(5.0), "acc": torch.tensor(0.75), "lr": float("inf")})
    for a in (acc, copy):
        assert a.steps == 3
        assert a.means() == {"loss": 3.0, "acc": 0.5, "lr": 1.0}
        assert a.means() == {} and a.steps == 0  # reset
    acc.add({"x": torch.tensor(float("nan"))})
    assert math.isnan(acc.means()["x"])


def test_logger_writes_host_values_and_the_log_reads_back(tmp_path):
    logger = RunLogger(tmp_path, enabled=True)
    try:
        logger.log({"loss": torch.tensor(0.5), "round": 0}, step=1)
        logger.log({"loss": 0.25}, step=2)
        logger.log({"loss": 0.125, "eval/mIoU": 0.5}, step=3)
    finally:
        logger.close()
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 0.5, "round": 0}
    RunLogger(tmp_path / "nowhere", enabled=False).log({"loss": 1.0}, step=1)  # off rank 0: writes nothing
    assert not (tmp_path / "nowhere").exists()
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert log_has(tmp_path, lambda r: "eval/mIoU" in r) and not log_has(tmp_path, lambda r: r["step"] == 9)


def test_truncate_moves_later_and_torn_records_and_destroys_none(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo\n')
    assert truncate_log(tmp_path, 2) == 2
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert (tmp_path / LOG_DISCARDED).read_text() == '{"step": 3}\n{"step": 4, "lo\n'
    assert truncate_log(tmp_path, 2) == 0 and truncate_log(tmp_path / "none", 0) == 0
