"""bida.engine.run_dir: the checks before a run directory is created, its creation and its lock."""

from __future__ import annotations

import os

import pytest

from bida.engine.run_dir import LOCK_NAME, RunLock, check_run_dir, create_run_dir
from bida.errors import RunDirError


def test_check_refuses_to_clobber_and_to_overwrite_what_is_not_a_run(tmp_path):
    check_run_dir(tmp_path / "new", resume=False, overwrite=False)  # nothing there: fine, and nothing created
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(RunDirError, match="already exists; use --resume"):
        check_run_dir(run, resume=False, overwrite=False)
    check_run_dir(run, resume=False, overwrite=True)  # a run: --overwrite may replace it
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt, which is not part of a bida run"):
        check_run_dir(run, resume=False, overwrite=True)
    with pytest.raises(RunDirError, match="no such directory"):
        check_run_dir(tmp_path / "missing", resume=True, overwrite=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="the directory is empty"):
        check_run_dir(tmp_path / "empty", resume=True, overwrite=False)


def test_create_with_overwrite_removes_only_the_run_and_holds_the_lock(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / f".metrics.json.tmp-{os.getpid()}").write_text("{")  # an atomic write's temporary file
    lock = create_run_dir(run, overwrite=True)
    try:
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "checkpoints"]
        assert not any((run / "checkpoints").iterdir())
        assert (run / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        # A second holder (another open file: the kernel lock is per open file) is refused, naming the pid.
        with pytest.raises(RunDirError, match=f"in use by another bida process \\(pid {os.getpid()}\\)"):
            RunLock(run).acquire()
    finally:
        lock.release()
    RunLock(run).acquire().release()  # released: free again
    lock.release()  # a second release does nothing


def test_create_refuses_a_run_created_meanwhile(tmp_path):
    run = tmp_path / "run"
    check_run_dir(run, resume=False, overwrite=False)
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # another run got there first
    with pytest.raises(RunDirError, match="already exists"):
        create_run_dir(run, overwrite=False)
    assert (run / "config.yaml").read_text() == "seed: 0\n"
