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


TINY = ["model.width=0.125", "train.iters=2", "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (dirs as markers)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def folder_pair(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "data" / "src"
    tgt = tmp_path / "data" / "tgt"
    make_folder_tree(src)
    make_folder_tree(tgt, target_without_train_labels=True)
    return src, tgt


def folder_args(src: Path, tgt: Path) -> list[str]:
    return ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
            "data.target.kind=folder", f"data.target.root={tgt}", *TINY]


def run_cli(tmp_path: Path, args: list[str], capsys, needle: str) -> None:
    """Run ``bida ...``; expect exit 2, one stderr line containing ``needle``, nothing changed."""
    before = snapshot(tmp_path)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bida: error:") and "\n" not in err, err
    assert needle in err, err
    assert snapshot(tmp_path) == before


def test_output_directory_not_writable(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    run_cli(tmp_path, ["train", "--out", str(blocker / "run"), *folder_args(src, tgt)], capsys, "not writable")


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


def _one_line_error(capsys) -> str:
    """The final stderr line; the announcement a stop signal prints at once is left out."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("bida: stop requested"))
    assert "\n" not in err, err
    return err


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


def _one_line_trust(capsys) -> str:
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
