"""A disk that fills up: every writer names its file in one line and leaves nothing half-written.

The full disk is simulated at the file-object level: the file is created (as on a real full
disk), then its writes fail with ENOSPC once a byte budget is spent.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

from bida.checkpoint import ensure_writable
from bida.tools.cli import main
from bida.errors import BidaError

TINY_RUN = [
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2", "data.synthetic.height=32",
    "data.synthetic.width=64", "data.crop=[32,64]", "model.width=0.125", "train.iters=4",
    "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=1", "train.quiet=true",
]


class _FullFile:
    """A real file object whose writes fail with ENOSPC once ``budget[0]`` bytes are written."""

    def __init__(self, fh, budget: list[int]):
        self._fh, self._budget = fh, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            if self._budget[0]:
                self._fh.write(data[: self._budget[0]])  # the disk takes what fits
                self._fh.flush()
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def fill_disk(monkeypatch, target, budget: int) -> None:
    """Files opened for writing whose path ``target(path)`` accepts share ``budget`` bytes."""
    real_open, left = builtins.open, [budget]

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax") and target(Path(file)):
            return _FullFile(fh, left)
        return fh

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # what pathlib's write_text and open call


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


def test_full_disk_in_the_report_names_the_figure_and_leaves_no_empty_png(tmp_path, capsys, synthetic_cache,
                                                                          monkeypatch):
    # before: one line without a file name, and a 0-byte figures/iou_bars.png
    from bida.config import load_config
    from bida.engine.train import train

    run, out = tmp_path / "run", tmp_path / "report"
    train(load_config(None, [*TINY_RUN, "train.iters=2", f"data.synthetic.cache_dir={synthetic_cache}"]), run)
    with monkeypatch.context() as m:
        fill_disk(m, lambda p: out in p.parents, budget=0)
        assert main(["report", str(run), "--out", str(out), "--max-images", "1"]) == 2
    err = _one_line(capsys)
    assert "No space left on device" in err and str(out / "figures") in err and ".png" in err, err
    assert list((out / "figures").iterdir()) == []  # no empty, partial or temporary file
    assert not (out / "index.html").exists()


def test_full_disk_leaves_no_write_probe(tmp_path, capsys, synthetic_cache, monkeypatch):
    # before: a 0-byte .write-test-<pid> in the output directory, and .write-test in the run directory
    with monkeypatch.context() as m:
        fill_disk(m, lambda p: p.name.startswith(".write-test"), budget=0)
        with pytest.raises(BidaError, match="not writable: No space left on device"):
            ensure_writable(tmp_path / "out")
        run = tmp_path / "run"
        assert main(["train", "--out", str(run), *TINY_RUN, f"data.synthetic.cache_dir={synthetic_cache}"]) == 2
    assert "not writable: No space left on device" in _one_line(capsys)
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in run.rglob(".write-test*")] == []
