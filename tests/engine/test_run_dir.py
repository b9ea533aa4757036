"""bida.engine.run_dir: the checks before a run directory is created, its creation and its lock."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bida.checkpoint import ensure_writable
from bida.config import load_config
from bida.engine.run_dir import LOCK_NAME, RunLock, check_run_dir, create_run_dir
from bida.errors import BidaError, RunDirError
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import TINY_RUN, _one_line_error, _one_line_trust, _tree, fill_disk, folder_args, folder_pair, run_cli, stopped_run  # noqa: F401 (fixtures)


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


def test_output_directory_not_writable(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    run_cli(tmp_path, ["train", "--out", str(blocker / "run"), *folder_args(src, tgt)], capsys, "not writable")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bida: error:") and "\n" not in err, err
    return err


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


@pytest.mark.slow
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


def _records(run: Path, name: str = "log.jsonl") -> list[dict]:
    log = run / name
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, tiny_overrides):
    # before: --overwrite deleted every file of a dataset copy, exit 0
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"{i}.png").write_bytes(b"img")
    (data / "notes.txt").write_text("mine")
    before = _tree(data)
    assert main(["train", "--out", str(data), "--overwrite", *tiny_overrides]) == 2
    err = _one_line_trust(capsys)
    assert "not a bida run directory" in err and str(data / "images") in err, err
    assert _tree(data) == before

    notes = tmp_path / "notes.txt"  # a file given as the run directory was deleted too
    notes.write_text("mine")
    assert main(["train", "--out", str(notes), "--overwrite", *tiny_overrides]) == 2
    assert "is a file" in _one_line_trust(capsys) and notes.read_text() == "mine"


def test_overwrite_replaces_only_a_run_and_refuses_a_run_with_foreign_files(stopped_run, capsys, tiny_overrides):
    run = stopped_run
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    args = ["train", "--out", str(run), "--overwrite", *tiny_overrides, "train.iters=1"]
    assert main(args) == 2
    err = _one_line_trust(capsys)
    assert str(run / "notes.txt") in err and "not part of a bida run" in err, err
    assert _tree(run) == before  # refused before anything was removed
    (run / "notes.txt").unlink()
    assert main(args) == 0
    assert max(r["step"] for r in _records(run)) == 1  # the old run is replaced
