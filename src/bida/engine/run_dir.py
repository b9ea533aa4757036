"""The run directory: what a run may write there, the checks before it is created, and its lock.

:func:`check_run_dir` refuses, before anything is written, to clobber a run without
``--overwrite``, to overwrite anything but a run, or to resume what cannot be resumed;
:func:`create_run_dir` then creates (or empties) and locks it. :class:`RunLock` keeps a
second process out of a live run for as long as the run lives.
"""

from __future__ import annotations

import os
import shutil
import time
import weakref
from pathlib import Path

from ..checkpoint import ensure_writable, pid_alive
from ..errors import RunDirError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run_dir>/.lock``, held for the life of a run.

    The kernel drops the lock when the process dies, however it dies, so a stale lock file
    never blocks a resume; the file itself stays (removing it would race with a new run).
    A flock belongs to the open file description, which a forked child (a DataLoader
    worker) shares: every child closes its copy right after the fork, so that workers that
    outlive a SIGKILLed main process for a few seconds do not keep the run locked. A lock
    whose recorded holder is dead (a child forked outside Python) is waited for briefly.
    """

    DEAD_HOLDER_WAIT_S = 15.0  # DataLoader workers notice their parent's death within ~5 s

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._fh = None

    def acquire(self) -> "RunLock":
        import fcntl

        fh = open(self.run_dir / LOCK_NAME, "a+")
        deadline = time.monotonic() + self.DEAD_HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                fh.seek(0)
                pid = fh.read().strip()
                if pid.isdigit() and not pid_alive(int(pid)) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                fh.close()
                raise RunDirError(f"run directory {self.run_dir} is in use by another bida process"
                                  f"{f' (pid {pid})' if pid else ''}; wait for it to end or stop it first") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (lock := ref()) is not None and lock._forget())
        return self

    def _forget(self) -> None:
        """In a forked child: close the inherited descriptor, which does not unlock the parent."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def release(self) -> None:
        if self._fh is not None:
            # Unlock explicitly: a child forked outside Python would otherwise keep the lock.
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# Every entry a training run writes in its directory: --overwrite replaces these and nothing
# else (a directory holding anything more is refused). Temporary ``.<entry>.tmp-<pid>`` files
# of an atomic write and the ``.write-test`` probe count as the run's too.
RUN_ENTRIES = ("config.yaml", "run.json", "log.jsonl", "log.discarded.jsonl", "metrics.json", "checkpoints",
               "tensorboard", "pseudo_labels", "rare_class_stats.json", "demo_result.json", LOCK_NAME,
               ".write-test")
RUN_MARKERS = ("config.yaml", "run.json")  # a bida training run has one of them from its first second


def _run_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME]


def _is_run_entry(name: str) -> bool:
    if name in RUN_ENTRIES:
        return True
    if name.startswith(".write-test-") and name[len(".write-test-"):].isdigit():  # ensure_writable's probe
        return True
    base, _, pid = name.rpartition(".tmp-")
    return base.startswith(".") and base[1:] in RUN_ENTRIES and pid.isdigit()


def _foreign_entries(run_dir: Path) -> str | None:
    """Why --overwrite may not empty ``run_dir`` (one clause naming a file), or None."""
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a run directory"
    files = sorted(_run_files(run_dir))
    if not files:
        return None
    if (run_dir / "grid.json").is_file():
        return f"{run_dir} is a bida demo/ablate directory, not a training run"
    if not any((run_dir / m).is_file() for m in RUN_MARKERS):
        return f"{run_dir} is not a bida run directory (no config.yaml or run.json; it holds {files[0]})"
    foreign = [p for p in files if not _is_run_entry(p.name)]
    if foreign:
        return f"{run_dir} holds {foreign[0]}, which is not part of a bida run"
    return None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run without --overwrite, anything but a run with it, or to resume
    what cannot be resumed.

    Changes nothing on disk: the directory is created only once every input is valid.
    """
    if resume:
        if not run_dir.exists():
            raise RunDirError(f"cannot resume {run_dir}: no such directory")
        if not run_dir.is_dir():
            raise RunDirError(f"cannot resume {run_dir}: it is a file, not a run directory")
        last = run_dir / "checkpoints" / "last.pt"
        if last.exists() and not last.is_file():
            raise RunDirError(f"cannot resume {run_dir}: {last} is a directory, not a checkpoint file; "
                              f"move it away, then resume again (nothing was changed)")
        if (run_dir / "grid.json").is_file():
            raise RunDirError(f"cannot resume {run_dir} with bida train: it is a bida demo/ablate directory; "
                              f"resume it with bida demo --resume or bida ablate --resume")
        if not (run_dir / "config.yaml").is_file():
            if not _run_files(run_dir):
                raise RunDirError(f"cannot resume {run_dir}: the directory is empty (no config.yaml); "
                                  f"start a run with --out {run_dir}")
            if not any((run_dir / m).exists() for m in RUN_ENTRIES if m != LOCK_NAME):
                raise RunDirError(f"cannot resume {run_dir}: it is not a bida run directory (no config.yaml)")
            raise RunDirError(f"cannot resume {run_dir}: no config.yaml (the run stopped before it saved its "
                              f"config); start it again with --overwrite")
        return
    if run_dir.exists() and (not run_dir.is_dir() or _run_files(run_dir)):
        if not overwrite:
            raise RunDirError(f"run directory {run_dir} already exists; use --resume to continue it or --overwrite to replace it")
        reason = _foreign_entries(run_dir)
        if reason is not None:
            raise RunDirError(f"refusing to --overwrite: {reason}; remove it yourself or choose another --out")


def create_run_dir(run_dir: Path, overwrite: bool) -> RunLock:
    """Create and lock the run directory (with --overwrite: removing what an earlier run
    wrote there, and only that); check it is writable.

    Raises:
        RunDirError: not writable, locked by a live run, filled by a concurrent run since
            :func:`check_run_dir`, or (--overwrite) holding files that no bida run writes.
    """
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"refusing to --overwrite: {run_dir} is a file, not a run directory; "
                              f"remove it yourself or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
        try:
            leftovers = _run_files(run_dir)
            if leftovers and not overwrite:  # another run created it after check_run_dir
                raise RunDirError(f"run directory {run_dir} already exists; use --resume to continue it "
                                  f"or --overwrite to replace it")
            reason = _foreign_entries(run_dir) if leftovers else None
            if reason is not None:  # checked again under the lock, before anything is removed
                raise RunDirError(f"refusing to --overwrite: {reason}; remove it yourself or choose another --out")
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            (run_dir / "checkpoints").mkdir()
            ensure_writable(run_dir)  # RunDirError; leaves no probe file behind, even on a full disk
        except BaseException:
            lock.release()
            raise
    except OSError as err:
        raise RunDirError(f"output directory {run_dir} is not writable: {err.strerror or err}") from None
    return lock


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a finished label directory: into ``<dst>.tmp``, then renamed (never half there)."""
    tmp = dst.with_name(dst.name + ".copy-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
