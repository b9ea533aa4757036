"""The training loop: source-only stage and self-training rounds, resumable exactly.

A run is a list of phases: ``source`` (``train.iters`` iterations of source CE) and, for
the adaptation methods, ``train.rounds`` rounds of ``train.iters_per_round`` iterations.
Each phase builds a fresh optimizer (``train.optimizer``) with its own poly schedule; each round first
writes the static pseudo labels of the target training set with the current model and
halves the base LR of the previous round. With ``train.schedule: teacher`` the adaptation
is one phase of ``train.iters`` mean-teacher iterations (:mod:`bida.teacher`) after an
optional source stage of ``train.source_iters``. The checkpoint records the phase, the
iteration and everything stateful, and the data samplers are addressed by the global step,
so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (atomic_write_text, ensure_writable, load_checkpoint, model_state_for_checkpoint,
                         pid_alive, remove_stale_temp_files, rng_state, rotate_checkpoint, save_checkpoint, set_rng_state)
from .config import Config, check_class_ids, dump_config, load_config, target_test_split, to_dict
from .data.datasets import (Domain, build_eval_dataset, build_train_dataset, check_same_classes, close_loader,
                            resolve_domain, train_loader)
from .data.rare_class import cached_class_pixel_counts, rare_class_loader
from .models import DeepLabV2, MiTSegmentor, build_model
from .errors import BidaError, CheckpointError, DataError, Interrupted, RunDirError  # noqa: F401 - Interrupted re-exported
from .evaluate import evaluate, markdown_table, write_metrics
from .optim import build_optimizer, warmup_factor
from .pseudo_labels import Calibration
from .round_labels import generate_static_labels
from .teacher import MeanTeacher, teacher_step
from .train_step import adapt_step, source_step
from .weights import check_trained_head, load_model_weights, load_pretrained


class TrainingDiverged(BidaError):
    """Too many non-finite losses or gradients in a row."""


class _StopRequested(Exception):
    """Internal: ``stop_after`` reached."""


class _Stopping(Exception):
    """Internal: a signal arrived during evaluation or the pseudo-label pass."""


@dataclass(frozen=True)
class Phase:
    kind: str  # "source", "round" or "teacher"
    iters: int
    round: int = -1


def plan_phases(cfg: Config) -> list[Phase]:
    """The phases of a run, from the method, the schedule and whether it starts from a checkpoint."""
    if cfg.method.name == "source_only":
        return [Phase("source", cfg.train.iters)]
    if cfg.train.schedule == "teacher":
        source = cfg.train.source_iters and not cfg.model.init_checkpoint
        return ([Phase("source", cfg.train.source_iters)] if source else []) + [Phase("teacher", cfg.train.iters)]
    phases = [] if cfg.model.init_checkpoint else [Phase("source", cfg.train.iters)]
    return phases + [Phase("round", cfg.train.iters_per_round, r) for r in range(cfg.train.rounds)]


def poly_lr(base_lr: float, it: int, max_iter: float, power: float) -> float:
    """Polynomial decay ``base * (1 - it / max_iter) ** power`` (clamped at 0)."""
    return base_lr * max(0.0, 1.0 - it / max_iter) ** power


def phase_base_lr(cfg: Config, phase: Phase) -> float:
    if phase.kind == "source":
        return cfg.train.lr
    base = cfg.train.adapt_lr if cfg.train.adapt_lr is not None else cfg.train.lr
    if phase.kind == "teacher":
        return base
    return base * cfg.train.round_lr_decay ** phase.round


def seed_everything(seed: int) -> None:
    """The one seeding call of a run (python, numpy, torch)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_revision() -> str | None:
    """The commit of the git checkout this package runs from; None when it does not run
    from one (an installed copy, no git, a timeout). Never raises.

    The checkout must be this package's own (``<top>/src/bida`` is this directory): an
    installed copy inside some other repository (a virtual environment in a project) would
    otherwise report that repository's commit.
    """
    here = Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str | None:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here)
            return out.stdout.strip() or None if out.returncode == 0 else None

        top = git("rev-parse", "--show-toplevel")
        if top is None or (Path(top) / "src" / "bida").resolve() != here:
            return None
        return git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`); None if unknown."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    try:
        return platform.processor() or platform.machine() or None
    except (OSError, ValueError):
        return None


def environment() -> dict[str, Any]:
    """What a measured figure depends on besides the config: git commit (None outside a git
    checkout), CPU model, CPU count, torch and Python versions."""
    import platform

    return {"git_commit": git_revision(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}


class LogAccumulator:
    """Step log values summed on the device, brought to the host once per log record.

    ``add`` takes a step's log dict (detached 0-dim tensors, or host floats) and launches a
    handful of small kernels (one stack, one masked add); :meth:`means` is the only host
    transfer: the mean of each value over the steps added since the last call, NaNs (e.g.
    an accuracy with no labelled pixel) left out of their key's mean.
    """

    def __init__(self) -> None:
        self._keys: tuple[str, ...] = ()
        self._sums: torch.Tensor | None = None  # (2, n_tensor_keys): finite sums, finite counts
        self._host: dict[str, list[float]] = {}  # host floats: [sum, count]
        self.steps = 0

    def add(self, logs: dict[str, Any]) -> None:
        tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
        for key, value in logs.items():
            if key not in tensors and math.isfinite(value):
                total = self._host.setdefault(key, [0.0, 0.0])
                total[0] += float(value)
                total[1] += 1.0
        if tensors:
            keys = tuple(sorted(tensors))
            values = torch.stack([tensors[k].detach().float().reshape(()) for k in keys])
            finite = torch.isfinite(values)
            step = torch.stack([torch.where(finite, values, torch.zeros_like(values)), finite.float()])
            if self._sums is None or keys != self._keys:
                if self._sums is not None:  # the keys changed mid-record: keep what was summed
                    self._fold_into_host()
                self._keys, self._sums = keys, step
            else:
                self._sums += step
        self.steps += 1

    def _fold_into_host(self) -> None:
        sums, counts = self._sums.tolist()  # the one device-to-host transfer of a record
        for key, s, n in zip(self._keys, sums, counts):
            total = self._host.setdefault(key, [0.0, 0.0])
            total[0] += s
            total[1] += n
        self._keys, self._sums = (), None

    def state_dict(self) -> dict[str, Any]:
        """The partial sums (a copy, device sums left on the device: no host sync)."""
        return {"keys": list(self._keys), "sums": self._sums.clone() if self._sums is not None else None,
                "host": {k: list(v) for k, v in self._host.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._keys = tuple(state["keys"])
        self._sums = state["sums"].clone() if state["sums"] is not None else None
        self._host = {k: [float(v[0]), float(v[1])] for k, v in state["host"].items()}
        self.steps = int(state["steps"])

    def means(self) -> dict[str, float]:
        """Mean of every value since the last call (NaN where no finite value came); resets."""
        if self._sums is not None:
            self._fold_into_host()
        out = {k: (s / n if n > 0 else math.nan) for k, (s, n) in self._host.items()}
        self._host, self.steps = {}, 0
        return out


class RunLogger:
    """``log.jsonl`` (one JSON object a line) and TensorBoard scalars; silent off rank 0."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        # Log values may be device tensors (a step never waits for them): read them only here.
        record = {"step": step, **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}}
        self._append((json.dumps(record, default=_json_default) + "\n").encode())
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def _append(self, line: bytes) -> None:
        """Append one record; a full disk gives one line naming the log and leaves no half record.

        Raises:
            RunDirError: naming ``log.jsonl`` and the reason.
        """
        try:
            with open(self.path, "ab", buffering=0) as fh:
                start = fh.tell()
                try:
                    done = 0
                    while done < len(line):
                        done += fh.write(line[done:])
                except OSError:
                    try:
                        fh.truncate(start)
                    except OSError:
                        pass
                    raise
        except OSError as err:
            raise RunDirError(f"cannot write {self.path}: {err.strerror or err}") from None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """Dotted name of the first floating tensor holding NaN or inf in a state tree, else None."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            found = _first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
            if found is not None:
                return found
    elif isinstance(tree, torch.Tensor) and tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
        return prefix
    return None


def _grad_max_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Largest absolute gradient entry (inf-norm; NaN or inf when any entry is), on the device."""
    return torch.stack(torch._foreach_norm(grads, float("inf"))).max()


def _step_is_finite(flags: torch.Tensor) -> tuple[bool, int]:
    """Read the step's flags on the host: the one sync of a steady-state step.

    ``flags`` is :meth:`~bida.distributed.DistContext.step_flags`'s: the finiteness flag in
    one process, (not finite on some rank, any rank's stop signal) under torchrun. Returns
    whether the step is finite on every rank and that stop signal (0: none).
    """
    if flags.dim() == 0:
        return bool(flags), 0
    bad, stop = flags.tolist()
    return bad == 0, int(stop)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


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
LOG_DISCARDED = "log.discarded.jsonl"  # records a resume dropped from log.jsonl (they are written again)


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


def compile_for_training(model: torch.nn.Module, train_cfg) -> torch.nn.Module:
    """``model`` under ``torch.compile`` as ``train.compile`` and ``train.compile_backend`` say.

    The trainer keeps the uncompiled module for checkpoints, evaluation and pseudo labels:
    its state-dict keys stay those of an eager run (no ``_orig_mod.`` prefix) and the
    compiled module shares its parameters, so resume is the same either way.
    ``train.compile: true`` is the ``default`` mode; modes apply to the inductor backend only.
    """
    mode = train_cfg.compile
    if mode is False:
        return model
    kwargs: dict[str, Any] = {"backend": train_cfg.compile_backend}
    if train_cfg.compile_backend == "inductor" and mode not in (True, "default"):
        kwargs["mode"] = mode
    return torch.compile(model, **kwargs)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Owns the model, the phases and the run directory of one training run."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, label_cache: Path | None = None):
        from . import distributed

        self.run_dir, self.dist = Path(run_dir), distributed.DistContext()
        self.is_main = distributed.is_main_process()
        self.step, self._pending_eval = 0, False
        self._stop_signal: int | None = None  # this process's SIGTERM/SIGINT
        self._stop_agreed: int | None = None  # under torchrun: the stop every rank has seen
        self._in_step = self._flags_sent = self._polling = self._exiting = False  # where a stop signal lands
        self._saved_step: int | None = None  # step of the last last.pt written by this process
        # Set-up handles stop signals too: a stop before the run directory exists leaves nothing,
        # one after its config is written leaves a run that --resume starts (never a silent death).
        self._setting_up, self._deferring, self._run_written = True, False, resume
        self._install_signal_handlers()
        try:
            self._open(cfg, Path(run_dir), resume, overwrite, quiet, label_cache)
        finally:  # fit() installs them again: a Trainer that is never fitted leaves no handler behind
            self._restore_signal_handlers()
            self._setting_up = False

    def _open(self, cfg: Config, run_dir: Path, resume: bool, overwrite: bool, quiet: bool,
              label_cache: Path | None) -> None:
        from . import distributed

        self.run_dir = Path(run_dir)
        # Round-0 static labels shared by runs that adapt from one checkpoint (bida demo/ablate).
        self.label_cache = Path(label_cache) if label_cache is not None else None
        check_run_dir(self.run_dir, resume, overwrite)
        if resume:
            cfg = load_config(self.run_dir / "config.yaml", ["train.quiet=true"] if quiet else [])
        self.cfg = cfg
        self.device = pick_device()
        self.rank, self.world_size = 0, 1
        self.dist = distributed.init_from_env()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        if self.dist.device is not None:
            self.device = self.dist.device
        self.is_main = self.rank == 0
        self._lock = RunLock(self.run_dir)
        if resume and self.is_main:  # before anything is read from the run: a live run is refused
            self._lock.acquire()
        try:
            self._setup(cfg, resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _setup(self, cfg: Config, resume: bool, overwrite: bool) -> None:
        seed_everything(cfg.seed)
        self.src: Domain = resolve_domain(cfg, "source")
        self.tgt: Domain = resolve_domain(cfg, "target")
        self.classes = check_same_classes(self.src, self.tgt)
        self.num_classes = self.classes.num_classes
        check_class_ids("data.eval_classes", cfg.data.eval_classes, self.num_classes)  # before the run dir exists
        if cfg.data.check:
            self._check_data()
        self.model: DeepLabV2 | MiTSegmentor = build_model(cfg.model, self.num_classes, cfg.method.feature).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.phases = plan_phases(cfg)
        self.calibration = None
        # The prototype moving averages: calibration's domain bias, memory_partners' fill-ins.
        distribution = cfg.method.contrast_design == "distribution"  # the source class Gaussians live here too
        if cfg.method.name == "bida" and (cfg.method.calibration or cfg.method.memory_partners or distribution):
            self.calibration = Calibration(self.num_classes, self.model.feature_dim, momentum=cfg.calibration.momentum,
                                           max_weight=cfg.calibration.max_weight, ramp_iters=cfg.calibration.ramp_iters,
                                           distribution=distribution)
            self.calibration.to(self.device)
        self.mean_teacher = self._build_mean_teacher(cfg)
        self.phase_idx, self.iter, self.step = 0, 0, 0
        self.data_pos = 0  # batches drawn: step + skipped steps (a skipped step's batch stays consumed)
        self._pending_eval = False  # stopped inside the evaluation after step ``step``
        self.best_miou, self.best_step, self.bad_steps = -1.0, -1, 0
        self.optimizer_state: dict | None = None
        self.scaler_state: dict | None = None
        self._log_state: dict | None = None  # a LogAccumulator's partial sums, restored by resume
        self._logs: LogAccumulator | None = None  # the current phase's, saved with each checkpoint
        self._step_buffers: list[torch.Tensor] = []  # what the current step's forward may change
        self._good: tuple[Path, int] | None = None  # a checkpoint known good: resumed from, or written
        # A run stopped before its first checkpoint restarts from step 0 with its saved config.
        resumed = self._resume_checkpoint() if resume else None
        if resume and self.is_main:  # a writer killed mid-write left its temporary file
            for d in (self.run_dir, self.run_dir / "checkpoints"):
                for tmp in remove_stale_temp_files(d):
                    self._info(f"removed {tmp}, left by a process killed while writing it")
        if resumed is not None:
            self._load_resume(*resumed)
        else:
            if cfg.model.pretrained:
                report = load_pretrained(self.model, cfg.model.pretrained)
                self._info(f"loaded {len(report['loaded'])} tensors from {cfg.model.pretrained} "
                           f"(skipped {len(report['skipped'])}, fresh {len(report['missing'])})")
            if cfg.model.init_checkpoint:
                trained_head = cfg.method.pretrain_head and cfg.method.name != "source_only"
                if trained_head:
                    check_trained_head(cfg.model.init_checkpoint)
                stem_copied = load_model_weights(self.model, cfg.model.init_checkpoint, fresh_projection=not trained_head)
                if stem_copied:  # a shared-stem checkpoint (docs/method.md, "Stem")
                    self._info(f"{cfg.model.init_checkpoint} has no target stem: it starts as a copy of the source stem")
            if not cfg.model.pretrained and not cfg.model.init_checkpoint:
                self._warn_random_init()
            self._deferring = True  # a stop signal waits until the run directory is complete
            if self.is_main and not resume:  # every input is valid: only now touch the disk
                self._lock = create_run_dir(self.run_dir, overwrite)
            self.dist.barrier()
            if self.is_main and resume:
                self._truncate_log(0)
                (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            elif self.is_main:
                dump_config(cfg, self.run_dir / "config.yaml")
                self._write_run_json()
            self._run_written, self._deferring = True, False
            if self._stop_signal is not None:
                self._exiting = True
                raise Interrupted(self._setup_stop_message(self._stop_signal), self._stop_signal)
        if self.is_main and resume and not (self.run_dir / "run.json").is_file():
            self._write_run_json()  # a run stopped between its config and run.json
        self.logger = RunLogger(self.run_dir, enabled=self.is_main)
        self.total_steps = sum(p.iters for p in self.phases)
        self._stop_after: int | None = None
        self._data_wait_s = 0.0

    def _write_run_json(self) -> None:
        atomic_write_text(self.run_dir / "run.json", json.dumps({
            "git_revision": git_revision(), "torch": torch.__version__, "device": str(self.device), "cpu": cpu_model(),
            "world_size": self.world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "classes": list(self.classes.names)}, indent=2))

    # ------------------------------------------------------------------ helpers
    def _info(self, msg: str) -> None:
        if self.is_main and not self.cfg.train.quiet:
            tqdm.write(msg)

    def _warn_random_init(self) -> None:
        """Random weights need many more iterations than ImageNet ones and reach far less on
        real photos; say so (even with --quiet; on stdout, as stderr is kept for the one-line
        errors), except for the embedded pair, which is designed to train from scratch."""
        if not self.is_main or (self.cfg.data.source.kind == "synthetic" and self.cfg.data.target.kind == "synthetic"):
            return
        tqdm.write(f"bida: warning: training {self.cfg.model.backbone} from random weights (model.pretrained and "
                   "model.init_checkpoint are not set); for real data start from ImageNet weights, e.g. "
                   "model.backbone=resnet101 model.pretrained=weights/DeepLab_init.pth data.normalize=caffe "
                   "(README, 'Initial weights')")

    def _check_data(self) -> None:
        from .data.data_check import check_domain

        t = self.cfg.data.target
        for name, dom, splits in (
            ("source", self.src, {self.cfg.data.source.train_split: True}),
            ("target", self.tgt, {t.train_split: False, **({t.val_split: True} if t.val_split else {}),
                                  **({test: True} if (test := target_test_split(self.cfg)) else {})}),
        ):
            report = check_domain(dom.kind, dom.root, splits, num_classes=self.num_classes, full=False, max_files=2)
            if not report.ok():
                raise DataError(f"data.{name}: {report.errors[0]}")

    def _autocast(self):
        amp = self.cfg.train.amp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def _state(self, optimizer: torch.optim.Optimizer, scaler) -> dict:
        return {
            "model": model_state_for_checkpoint(self.model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
            "phase": self.phase_idx, "iter": self.iter, "step": self.step, "data_pos": self.data_pos,
            "pending_eval": self._pending_eval,
            "best_miou": self.best_miou, "best_step": self.best_step, "bad_steps": self.bad_steps,
            "calibration": self.calibration.state_dict() if self.calibration is not None else {},
            "mean_teacher": self.mean_teacher.state_dict() if self.mean_teacher is not None else {},
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "num_classes": self.num_classes,
            "class_names": list(self.classes.names),
            "palette": [list(c) for c in self.classes.palette],  # bida predict colours with it
            "method": self.cfg.method.name,
            # the partial sums of the next log record: a resumed run averages the same steps
            "log_accumulator": self._logs.state_dict() if self._logs is not None else (self._log_state or {}),
        }

    def save(self, name: str, optimizer, scaler) -> None:
        """Write ``checkpoints/<name>.pt``; never one that holds a non-finite tensor.

        Every rank calls it: BatchNorm statistics are averaged over ranks first, so the
        file holds the model every rank goes on with (rank 0 writes it).
        """
        self.dist.average_bn_statistics(self.model)
        if self.is_main:
            state = self._state(optimizer, scaler)
            bad = _first_non_finite({"model": state["model"], "calibration": state["calibration"]})
            if bad is not None:
                raise TrainingDiverged(f"refusing to save {name}.pt at step {self.step}: {bad} holds non-finite "
                                       f"values; {self._last_good()}")
            self._saving = True  # a second Ctrl-C now waits for the rename
            try:
                if name == "last" and self._saved_step != self.step:  # keep the previous one, for a
                    rotate_checkpoint(self._ckpt("last"), self._ckpt("last.prev"))  # last.pt damaged later
                save_checkpoint(state, self._ckpt(name))
            finally:
                self._saving = False
            if name == "last":
                self._saved_step = self.step
                self._good = (self._ckpt("last"), self.step)
            if self._stop_now:
                self._exiting = True
                raise Interrupted(f"stopped by a second {signal.Signals(self._stop_signal).name} after saving step "
                                  f"{self.step}; continue with: bida train --resume {self.run_dir}", self._stop_signal)
        self.dist.barrier()

    def _last_good(self) -> str:
        """Which checkpoint a resume would start from: one that loads, matches its checksum
        and holds only finite model and calibration tensors."""
        if self._good is not None and self._good[0].is_file():
            return f"the last good checkpoint is {self._good[0]} (step {self._good[1]})"
        for path in (self._ckpt("last"), self._ckpt("last.prev")):
            if not path.is_file():
                continue
            try:
                state = load_checkpoint(path)
            except CheckpointError:
                continue
            if _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})}) is None:
                return f"the last good checkpoint is {path} (step {state.get('step')})"
        return "no good checkpoint was saved (start again with --overwrite)"

    def _ckpt(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def _resume_checkpoint(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its contents, or None to start from step 0.

        ``last.pt``, else (missing or damaged) the previous one, ``last.prev.pt``, saying so.
        Without either, a run that logged no trained step restarts from step 0, saying so; one
        that did is refused, and nothing is changed.
        """
        last, prev = self._ckpt("last"), self._ckpt("last.prev")
        why = None
        for path in (last, prev):
            if not path.is_file():
                why = why or f"{path.relative_to(self.run_dir)} is missing"
                continue
            try:
                state = load_checkpoint(path, map_location=self.device)
            except CheckpointError as err:
                why = why or f"{path.relative_to(self.run_dir)} cannot be used ({err})"
                continue
            bad = _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})})
            if bad is not None:  # written by an older bida, which checked less
                why = why or f"{path.relative_to(self.run_dir)} cannot be used ({bad} holds non-finite values)"
                continue
            self._good = (path, int(state["step"]))
            if path == prev:
                self._move_damaged(last)
                self._say(f"bida: warning: {why}; resuming from the previous checkpoint {path} (step {state['step']})")
            return path, state
        trained = self._trained_evidence()
        if trained:
            raise RunDirError(f"cannot resume {self.run_dir}: {why} and there is no checkpoints/last.prev.pt, but "
                              f"{trained}; nothing was changed (put the run's checkpoint back as "
                              f"checkpoints/last.pt, or start again with --overwrite)")
        self._move_damaged(last)
        self._say(f"bida: {why} and no step was trained yet: starting again from step 0 with the saved config")
        return None

    def _move_damaged(self, path: Path) -> None:
        """Keep a damaged checkpoint as ``<name>.damaged.pt`` (out of the way of the rotation)."""
        if self.is_main and path.is_file():
            os.replace(path, path.with_name(path.stem + ".damaged.pt"))

    def _trained_evidence(self) -> str | None:
        """What shows that this run trained steps (a restart from step 0 would lose them), or None."""
        logged = self._logged_steps()
        if logged:
            return f"log.jsonl records training up to step {max(logged)}"
        if (self.run_dir / "metrics.json").is_file():
            return "metrics.json holds its final results"
        labels = self.run_dir / "pseudo_labels"
        if self.phases[0].kind == "source" and labels.is_dir() and any(labels.iterdir()):
            return "pseudo_labels/ holds labels of its trained model"  # a restart would reuse them
        return None

    def _logged_steps(self) -> list[int]:
        """Steps > 0 of the records in log.jsonl (training happened up to the largest)."""
        log = self.run_dir / "log.jsonl"
        steps = []
        for line in log.read_text().splitlines() if log.is_file() else []:
            try:
                step = int(json.loads(line).get("step", 0))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
            if step > 0:
                steps.append(step)
        return steps

    def _snapshot(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]:
        """Buffers a forward can change (those of modules in training mode: BatchNorm running
        statistics; frozen BN has none) and the calibration state, before a step."""
        buffers = [(b, b.detach().clone()) for m in self.model.modules() if m.training
                   for b in m.buffers(recurse=False)]
        cal = self.calibration.state_dict() if self.calibration is not None else None  # already a copy
        self._step_buffers = [b for b, _ in buffers if b.is_floating_point()]
        return buffers, cal

    def _changed_state(self) -> list[torch.Tensor]:
        """Floating tensors the step's forward changed: running statistics of modules in
        training mode (listed by :meth:`_snapshot`) and the calibration memories."""
        changed = list(self._step_buffers)
        if self.calibration is not None:
            changed += [m.value for m in (self.calibration.source, self.calibration.target)]
        return [t for t in changed if t.numel()]

    def _restore(self, snapshot: tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]) -> None:
        """Undo what the forward of a skipped step changed: a NaN batch poisons BN running stats."""
        buffers, cal = snapshot
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        if cal is not None:
            self.calibration.load_state_dict(cal)

    def _load_resume(self, path: Path, state: dict) -> None:
        load_model_weights(self.model, path, checkpoint=state)
        self.phase_idx, self.iter, self.step = int(state["phase"]), int(state["iter"]), int(state["step"])
        self.data_pos = int(state.get("data_pos", self.step))
        self._pending_eval = bool(state.get("pending_eval", False))
        self.best_miou, self.best_step = float(state["best_miou"]), int(state["best_step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        if self.calibration is not None and state.get("calibration"):
            self.calibration.load_state_dict(state["calibration"])
        if self.mean_teacher is not None and state.get("mean_teacher"):
            self.mean_teacher.load_state_dict(state["mean_teacher"], self.model)
        self.optimizer_state = state["optimizer"] if self.iter > 0 else None
        self.scaler_state = state.get("scaler") or None
        set_rng_state(state["rng"])
        self._log_state = state.get("log_accumulator") or None
        self._truncate_log(self.step)

    def _round_logged(self, round_idx: int) -> bool:
        return self._logged(lambda rec: rec.get("round") == round_idx and "pseudo/static_accuracy" in rec)

    def _logged(self, match) -> bool:
        """Whether log.jsonl holds a record for which ``match(record)`` is true (a resumed run
        does not log again what the stopped one logged)."""
        log = self.run_dir / "log.jsonl"
        if not log.is_file():
            return False
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and match(rec):
                return True
        return False

    def _truncate_log(self, step: int) -> None:
        """Move log records written after the checkpoint (they will be produced again) to
        ``log.discarded.jsonl``: a record once written is never destroyed."""
        log = self.run_dir / "log.jsonl"
        if not self.is_main or not log.is_file():
            return
        kept, dropped = [], []
        for line in log.read_text().splitlines():
            try:
                (kept if json.loads(line).get("step", 0) <= step else dropped).append(line)
            except (json.JSONDecodeError, AttributeError, TypeError):  # a line cut by the crash
                dropped.append(line)
        dropped = [d for d in dropped if d.strip()]
        if not dropped:
            return
        with open(self.run_dir / LOG_DISCARDED, "a") as fh:  # first: a crash now duplicates, never loses
            fh.write("".join(d + "\n" for d in dropped))
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_text(log, "".join(k + "\n" for k in kept))
        self._info(f"moved {len(dropped)} log records after step {step} to {LOG_DISCARDED} (they are written again)")

    def _build_mean_teacher(self, cfg: Config) -> MeanTeacher | None:
        """The teacher schedule's state (EMA teacher, ClassMix generator, ImageNet model), or None."""
        if cfg.train.schedule != "teacher" or cfg.method.name == "source_only":
            return None
        if self.world_size > 1:
            raise BidaError("train.schedule=teacher runs in one process; start it without torchrun")
        imagenet = None
        if cfg.loss.feature_distance_weight > 0:
            classes = cfg.loss.feature_distance_classes or []
            if any(c >= self.num_classes for c in classes):
                raise BidaError(f"loss.feature_distance_classes: {list(classes)} names a class id >= {self.num_classes} "
                                f"(the number of classes)")
            imagenet = build_model(cfg.model, self.num_classes, cfg.method.feature)
            load_pretrained(imagenet, cfg.model.pretrained)
        return MeanTeacher(cfg, self.num_classes, self.device, imagenet)

    def _make_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        t = self.cfg.train
        # train.layer_decay is refused at load time for segmentors without ViT blocks
        decay = {"layer_decay": t.layer_decay} if t.layer_decay != 1.0 else {}
        groups = getattr(self.model, "module", self.model).param_groups(phase_base_lr(self.cfg, phase),
                                                                          t.head_lr_mult, **decay)
        return build_optimizer(groups, phase_base_lr(self.cfg, phase), t)

    def _set_lr(self, optimizer: torch.optim.Optimizer, phase: Phase) -> float:
        horizon = self.cfg.train.poly_horizon if phase.kind == "round" else 1.0
        lr = poly_lr(phase_base_lr(self.cfg, phase), self.iter, horizon * phase.iters, self.cfg.train.poly_power)
        if self.cfg.train.warmup_iters:
            lr *= warmup_factor(self.iter, self.cfg.train.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def _install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: say at once where the run will save, and stop there. A second
        one stops at once: right away, or just after a checkpoint being written (never a torn
        file); what is kept is the last checkpoint written. During set-up the first one stops
        at once (nothing to save), except while the run directory is being written. Once the
        run is stopping and exiting, further signals are ignored (no traceback, no death by
        signal: the exit code stays 130 or 143)."""

        def handler(signum, frame):  # noqa: ARG001 - signal API
            name = signal.Signals(signum).name
            if self._exiting:
                return
            if self._setting_up:
                self._stop_signal = signum
                if not self._deferring:
                    self._exiting = True
                    raise Interrupted(self._setup_stop_message(signum), signum)
                return
            if self._stop_signal is None:
                self._stop_signal = signum
                self._say(f"bida: stop requested ({name}): saving a checkpoint at step {self._stop_step()} and "
                          f"stopping; press Ctrl-C again to stop at once (keeps the last checkpoint written)")
                return
            self._stop_signal = signum
            if self._saving:  # let the checkpoint being written finish; save() stops after it
                self._stop_now = True
                return
            self._exiting = True
            raise Interrupted(self._stopped_at_once_message(signum), signum)

        self._old_handlers = {}
        self._saving = self._stop_now = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread (e.g. embedded use)
                pass

    def _stop_step(self) -> int:
        """The step whose checkpoint a stop requested now will save.

        Single process: the step being taken (the stop is seen after it), else the last one
        taken (seen in the evaluation, pseudo-label pass or checkpoint write under way, or
        right after it). Under torchrun, ranks act on a stop only where they meet: in the
        passes that poll it, the last step taken; otherwise at the next step's flags, one step
        later still if this step's flags are already exchanged.
        """
        if self.dist.enabled and not self._polling:
            return self.step + (2 if self._in_step and self._flags_sent else 1)
        return self.step + (1 if self._in_step else 0)

    def _setup_stop_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self._run_written:
            return f"stopped by {name} before training started; continue with: bida train --resume {self.run_dir}"
        return f"stopped by {name} before the run started; nothing was written to {self.run_dir}"

    def _say(self, msg: str) -> None:
        """A line on stderr from rank 0 at once, even with --quiet (stop messages)."""
        if self.is_main:
            # One write with its newline: print() writes the end separately, and a second
            # Ctrl-C landing between the two ran its own line onto this one.
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def _stopped_at_once_message(self, signum: int) -> str:
        kept = (f"the checkpoint of step {self._saved_step} is kept" if self._saved_step is not None
                else self._last_good())
        return (f"stopped at once by a second {signal.Signals(signum).name} during step {self.step + 1}; {kept}; "
                f"continue with: bida train --resume {self.run_dir}")

    def _restore_signal_handlers(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def _stop_seen(self) -> int | None:
        """The stop signal this rank acts on: its own in one process; under torchrun, the one
        every rank agreed on at the last point where they met (so all stop at the same point)."""
        return self._stop_agreed if self.dist.enabled else self._stop_signal

    def _sync_stop(self) -> None:
        """Under torchrun (a collective: every rank calls it at the same point): agree on any rank's stop."""
        if self.dist.enabled:
            stop, _ = self.dist.poll(self._stop_signal or 0)
            self._stop_agreed = stop or self._stop_agreed

    def _stop_poll(self) -> None:
        """``check_stop`` of passes that every rank runs in step (evaluation): give up together on a stop."""
        self._sync_stop()
        if self._stop_seen() is not None:
            raise _Stopping()

    def _on_rank0(self, work: Callable[[Callable[[], None]], Any]) -> Any:
        """``work(check_stop)`` on rank 0 alone, every rank stoppable: rank 0's result, None elsewhere.

        A barrier would hold the waiting ranks inside a collective, where a signal handler
        cannot run until rank 0 is done (possibly half an hour): they poll instead, once per
        item rank 0 finishes, so a stop on any rank reaches all of them within an item. A
        stop raises :class:`_Stopping` on every rank.
        """
        self._polling = True
        try:
            if not self.dist.enabled:
                return work(self._stop_poll)
            if self.is_main:
                result = work(self._stop_poll)
                stop, _ = self.dist.poll(self._stop_signal or 0, done=True)
                self._stop_agreed = stop or self._stop_agreed
                if stop:  # the waiting ranks see it with ``done``: all stop here
                    raise _Stopping()
                return result
            while True:
                stop, done = self.dist.poll(self._stop_signal or 0)
                self._stop_agreed = stop or self._stop_agreed
                if stop:
                    raise _Stopping()
                if done:
                    return None
        finally:
            self._polling = False

    def evaluate_target(self, stoppable: bool = False) -> dict | None:
        """Target-val metrics (None without a val split); see :meth:`_evaluate_split`."""
        t = self.cfg.data.target
        if not t.val_split:
            return None
        return self._evaluate_split(build_eval_dataset(self.cfg, self.tgt, t.val_split), stoppable)

    def evaluate_test(self, stoppable: bool = False) -> dict | None:
        """Target-test metrics (None without a test split, :func:`~bida.config.target_test_split`).

        Called once, on the final model, after every phase: no training step, pseudo label,
        best.pt or other choice ever reads the test images.
        """
        split = target_test_split(self.cfg)
        if not split:
            return None
        m = self._evaluate_split(build_eval_dataset(self.cfg, self.tgt, split), stoppable)
        return m | {"split": split, "checkpoint": "last"}

    def _evaluate_split(self, ds, stoppable: bool) -> dict:
        """Metrics of ``ds``, each rank evaluating its shard with BN statistics averaged over ranks.

        ``stoppable``: a stop on any rank abandons the evaluation on every rank
        (:class:`_Stopping`); every rank polls as often as the longest shard has images.
        """
        self.dist.average_bn_statistics(self.model)
        polls, n_polls = 0, -(-len(ds) // self.world_size)

        def check_stop() -> None:
            nonlocal polls
            polls += 1
            self._stop_poll()

        def reduce(conf: torch.Tensor) -> torch.Tensor:
            while stoppable and polls < n_polls:  # a shorter shard: the polls it did not make
                check_stop()
            return self.dist.all_reduce_sum(conf)

        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.amp)
        was_training, self._polling = self.model.training, stoppable
        try:
            return evaluate(self.model, self.dist.shard(ds), self.cfg.eval, self.classes.names,
                            self.cfg.data.eval_classes, quiet=self.cfg.train.quiet or not self.is_main,
                            ignore_index=self.classes.ignore_index, device=self.device, autocast_dtype=amp,
                            confusion_hook=reduce, check_stop=check_stop if stoppable else None)
        finally:
            self._polling = False
            self.model.train(was_training)

    def _evaluate_source_val(self) -> dict | None:
        """Source-val metrics of the final model, for runs that trained a source stage.

        A low source-val mIoU means the model did not learn; a high one with a low target
        mIoU means it did not transfer. None when ``data.source.val_split`` is not set.
        """
        s = self.cfg.data.source
        if not s.val_split or not any(p.kind == "source" for p in self.phases):
            return None
        try:
            ds = build_eval_dataset(self.cfg, self.src, s.val_split)
        except DataError as err:  # optional: a source without that split is not an error
            self._info(f"source val not evaluated (data.source.val_split={s.val_split}): {err}")
            return None
        try:
            m = self._evaluate_split(ds, stoppable=True)
        except _Stopping:
            self._check_stop(True)
        except DataError as err:
            raise self._bad_file(err) from None
        if not self._logged(lambda rec: rec.get("step") == self.step and "eval/source_mIoU" in rec):
            self.logger.log({"eval/source_mIoU": m["mIoU"], "eval/source_pixel_acc": m["pixel_acc"]}, self.step)
        self._info(f"step {self.step}: source val mIoU {100 * m['mIoU']:.2f} (how well the source was learnt)")
        return {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"], "per_class_iou": m["per_class_iou"],
                "split": s.val_split}

    # ------------------------------------------------------------------ main loop
    def fit(self, stop_after: int | None = None) -> dict | None:
        """Run (or continue) every phase; return the final target-val metrics.

        ``stop_after``: stop at that global step with a checkpoint, as a pre-empted job would
        (returns None; continue with ``--resume``).
        """
        self._stop_after = stop_after
        self._install_signal_handlers()
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, disable=cfg.train.quiet or not self.is_main,
                   desc=cfg.method.name, dynamic_ncols=True)
        # all_ranks: every rank decides before rank 0 can write the file (save() holds a barrier).
        no_checkpoint = not (self.run_dir / "checkpoints" / "last.pt").is_file()
        if self.dist.all_ranks(no_checkpoint) and self.phase_idx < len(self.phases):
            # Step 0 is a checkpoint too: a run stopped before its first periodic one resumes.
            self.save("last", self._make_optimizer(self.phases[self.phase_idx]),
                      torch.amp.GradScaler(self.device.type, enabled=False))
        try:
            while self.phase_idx < len(self.phases):
                self._sync_stop()
                self._check_stop(True)  # the state here is the checkpoint of the phase boundary
                phase = self.phases[self.phase_idx]
                # DDP per phase: it must know whether the losses use the contrast features.
                model = self.dist.wrap(self.model, uses_features=phase.kind != "source" and cfg.method.name == "bida")
                model = compile_for_training(model, cfg.train)
                self._run_phase(model, phase, bar)
            metrics = self._finish()
        except _StopRequested:
            return None
        finally:
            bar.close()
            self.logger.close()
            self._lock.release()
            self._restore_signal_handlers()  # last: a signal during this clean-up is still ignored
        return metrics

    def _target_labels_dir(self, phase: Phase) -> Path | None:
        if phase.kind != "round" or self.cfg.method.name not in ("self_training", "bida"):
            return None
        out = self.run_dir / "pseudo_labels" / f"round_{phase.round}"

        def label(check_stop) -> None:  # rank 0 only
            t = self.cfg.data.target
            full = build_eval_dataset(self.cfg, self.tgt, t.train_split, require_labels=False, limit=False)
            shared = self._shared_round_labels(phase)
            loaded = (out / "stats.json").is_file() or (shared is not None and (shared / "stats.json").is_file())
            if shared is not None and (shared / "stats.json").is_file() and not (out / "stats.json").is_file():
                _copy_dir(shared, out)
                self._info(f"round {phase.round}: loading static pseudo labels of round {phase.round} "
                           f"shared by runs from the same checkpoint ({shared})")
            elif (out / "stats.json").is_file():  # written before a stop: read, not generated again
                self._info(f"round {phase.round}: loading static pseudo labels of round {phase.round} from {out}")
            elif out.with_name(out.name + ".tmp").is_dir():
                self._info(f"round {phase.round}: continuing the static pseudo labels of {len(full)} target images")
            else:
                self._info(f"round {phase.round}: generating static pseudo labels for {len(full)} target images")
            start = time.perf_counter()
            try:
                source_pixels = None
                if not (out / "stats.json").is_file():  # classes the source never labels get no pseudo label
                    src_ds = build_train_dataset(self.cfg, self.src, self.cfg.data.source.train_split, require_labels=True)
                    source_pixels = cached_class_pixel_counts(src_ds, self.num_classes, self.run_dir, check_stop=check_stop,
                                                              quiet=self.cfg.train.quiet).sum(0)
                stats = generate_static_labels(self.model, full, self.cfg, out, self.classes.names,
                                               seed=self.cfg.seed + phase.round, device=self.device,
                                               quiet=self.cfg.train.quiet, check_stop=check_stop,
                                               source_pixels=source_pixels)
            except DataError as err:  # a bad target image: last.pt is this phase's start
                raise self._bad_file(err) from None
            if shared is not None and not (shared / "stats.json").is_file():
                _copy_dir(out, shared)
            speed = {} if loaded else {"time/pseudo_label_images_per_s": len(full) / max(time.perf_counter() - start, 1e-9)}
            if not self._round_logged(phase.round):  # a resumed round kept its record in the log
                self.logger.log({"round": phase.round, **speed,
                                 "pseudo/static_accuracy": stats["accuracy"],
                                 "pseudo/static_coverage": stats["coverage"],
                                 "pseudo/static_labelled_fraction": stats["labelled_fraction"],
                                 "pseudo/per_class": stats["per_class"]}, self.step)

        self.dist.average_bn_statistics(self.model)  # rank 0 labels with the model of every rank
        try:  # last.pt is this phase's start: a stop here resumes the pass from its finished images
            self._on_rank0(label)
        except _Stopping:
            self._check_stop(True)
        return out

    def _shared_round_labels(self, phase: Phase) -> Path | None:
        """Where round-0 labels live in ``label_cache``, keyed by everything they depend on.

        Round 0 labels the target with the init checkpoint itself, so runs that start from
        the same checkpoint file with the same seed, data, model, evaluation and pseudo-label
        settings get the same labels; they differ only from round 1 on.
        """
        if self.label_cache is None or phase.round != 0 or not self.cfg.model.init_checkpoint:
            return None
        digest = hashlib.sha256()
        with open(self.cfg.model.init_checkpoint, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        cfg = to_dict(self.cfg)
        key = {"checkpoint": digest.hexdigest(), "seed": self.cfg.seed, "data": cfg["data"], "eval": cfg["eval"],
               "pseudo": cfg["pseudo"], "model": {k: v for k, v in cfg["model"].items() if k != "init_checkpoint"}}
        name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.label_cache / f"round_0-{name}"

    def _run_phase(self, model: torch.nn.Module, phase: Phase, bar: tqdm) -> None:
        cfg = self.cfg
        label_dir = self._target_labels_dir(phase)
        src_ds = build_train_dataset(cfg, self.src, cfg.data.source.train_split, require_labels=True)
        pin = self.device.type == "cuda"  # page-locked batches: the host-to-device copy does not block
        if cfg.data.rare_class_sampling:
            try:  # rank 0 counts (a stop during the scan keeps last.pt, this phase's start), the others read
                counts = self._on_rank0(lambda check_stop: cached_class_pixel_counts(
                    src_ds, self.num_classes, self.run_dir, check_stop=check_stop, quiet=cfg.train.quiet))
            except _Stopping:
                self._check_stop(True)
            if counts is None:
                counts = cached_class_pixel_counts(src_ds, self.num_classes, self.run_dir)
            src_iter = rare_class_loader(src_ds, counts, cfg, cfg.seed, self.data_pos, self.rank, self.world_size,
                                         list(self.classes.names))
        else:
            src_iter = train_loader(src_ds, cfg.train.batch_size, cfg.seed, self.data_pos, cfg.data.num_workers,
                                    self.rank, self.world_size, pin_memory=pin)
        tgt_iter = None
        if phase.kind != "source":
            tgt_ds = build_train_dataset(cfg, self.tgt, cfg.data.target.train_split, require_labels=False, label_dir=label_dir)
            tgt_iter = train_loader(tgt_ds, cfg.train.batch_size, cfg.seed + 1, self.data_pos, cfg.data.num_workers,
                                    self.rank, self.world_size, pin_memory=pin)
        try:
            self._train_phase(model, phase, bar, src_iter, tgt_iter, label_dir)
        finally:  # workers ignore SIGTERM: they must be stopped through the loader, on every exit path
            close_loader(src_iter)
            close_loader(tgt_iter)

    def _train_phase(self, model: torch.nn.Module, phase: Phase, bar: tqdm, src_iter, tgt_iter,
                     label_dir: Path | None) -> None:
        cfg = self.cfg
        optimizer = self._make_optimizer(phase)
        use_scaler = cfg.train.amp == "fp16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
            if self.scaler_state and use_scaler:
                scaler.load_state_dict(self.scaler_state)
            self.optimizer_state = self.scaler_state = None
        model.train()
        if phase.kind == "teacher":
            self.mean_teacher.start(self.model)  # a copy of the student, unless restored
        if self._pending_eval and self._after_step(phase, optimizer, scaler):  # stopped inside that evaluation
            return
        self._sync_stop()  # a stop on any rank while the loaders were built
        t_last = time.time()
        logs = self._logs = LogAccumulator()
        if self._log_state:  # resumed between two log records: the steps before the stop count
            logs.load_state_dict(self._log_state)
            self._log_state = None
        self._data_wait_s = 0.0
        while self.iter < phase.iters:
            if self._stop_after is not None and self.step >= self._stop_after:
                self.save("last", optimizer, scaler)
                raise _StopRequested()
            if self._stop_seen() is not None:  # arrived while the loaders were built, or in a skipped step
                self.save("last", optimizer, scaler)
                self._check_stop(True)
            self._in_step, self._flags_sent = True, False  # a stop from here on saves after this step
            lr = self._set_lr(optimizer, phase)
            batch_src = {k: v.to(self.device, non_blocking=True) for k, v in self._next(src_iter, optimizer, scaler).items()}
            optimizer.zero_grad(set_to_none=True)
            snapshot = self._snapshot()
            with self._autocast():
                if phase.kind == "source":
                    result = source_step(model, batch_src, cfg, reduce_sums=self.dist.prototype_reducer(self.num_classes),
                                         num_classes=self.num_classes)
                elif phase.kind == "teacher":
                    batch_tgt = {k: v.to(self.device, non_blocking=True)
                                 for k, v in self._next(tgt_iter, optimizer, scaler).items()}
                    result = teacher_step(model, batch_src, batch_tgt, cfg, self.mean_teacher, self.calibration,
                                          self.num_classes, adapt_iter=self._adapt_iter())
                else:
                    batch_tgt = {k: v.to(self.device, non_blocking=True)
                                 for k, v in self._next(tgt_iter, optimizer, scaler).items()}
                    if label_dir is None:  # minent: no pseudo labels
                        batch_tgt["label"] = torch.full_like(batch_tgt["label"], 255)
                    result = adapt_step(model, batch_src, batch_tgt, cfg, self.calibration, self.num_classes,
                                        reduce_sums=self.dist.prototype_reducer(self.num_classes),
                                        adapt_iter=self._adapt_iter())
            self.data_pos += 1  # both loaders drew one batch
            if not self._backward_and_step(result.loss, optimizer, scaler):
                self._in_step = False
                self._restore(snapshot)  # a skipped step leaves no trace but its consumed batch
                if self.bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{self.bad_steps} non-finite steps in a row at step {self.step} (train.max_bad_steps); "
                        f"{self._last_good()}")
                continue
            if phase.kind == "source":  # the target stem gets no gradient here: it follows the source stem
                self.model.sync_target_stem()
            elif phase.kind == "teacher":
                self.mean_teacher.after_step(self.model)
            self.iter += 1
            self.step += 1
            self._in_step = False
            logs.add(result.logs)
            if self.step % cfg.train.log_every == 0 or self.iter == phase.iters:
                t_last = self._log_record(phase, lr, logs, bar, t_last)
            if self._after_step(phase, optimizer, scaler):
                return

    def _adapt_iter(self) -> int:
        """Iterations of the adaptation phase (all rounds) done before this step: a host count
        from the checkpointed step, read by the contrast warm-up."""
        return self.step - sum(p.iters for p in self.phases if p.kind == "source")

    def _log_record(self, phase: Phase, lr: float, logs: LogAccumulator, bar: tqdm, t_last: float) -> float:
        """One log record (means over the steps since the last one) and the progress bar; returns now.

        The only point of a steady-state step where log values reach the host.
        """
        steps = logs.steps
        means = self.dist.mean_logs(logs.means())
        now = time.time()
        rec = {"phase": phase.kind, "round": phase.round, "lr": lr, **means}
        rec["time/step_s"] = (now - t_last) / max(1, steps)
        rec["time/data_s"] = self._data_wait_s / max(1, steps)  # of it, waiting for batches
        self._data_wait_s = 0.0
        self.logger.log(rec, self.step)
        if not bar.disable:
            bar.update(self.step - bar.n)
        bar.set_postfix(loss=f"{means.get('loss/total', means.get('loss/seg_src', math.nan)):.3f}", lr=f"{lr:.2e}")
        return now

    def _next(self, batches, optimizer, scaler) -> dict:
        """The next batch; a bad file met mid-run gives one line naming it and a checkpoint.

        A worker process wraps the reader's DataError in a multi-line traceback: only its
        last line (the reader's message) is kept.
        """
        start = time.perf_counter()
        try:
            return next(batches)
        except DataError as err:
            bad = err
        finally:  # host time spent waiting for the loaders (logged as time/data_s)
            self._data_wait_s += time.perf_counter() - start
        raise self._bad_file(bad, optimizer, scaler)  # the batch was not consumed: resume retries it

    def _bad_file(self, err: DataError, optimizer=None, scaler=None) -> DataError:
        """The one-line error of a bad file met mid-run (a batch, the pseudo-label pass, an
        evaluation), saying how to continue. With ``optimizer`` the state is saved first;
        without, ``last.pt`` already holds it (a phase start, the end of the last phase).
        """
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        message = lines[-1].split("DataError: ", 1)[-1] if lines else "unreadable data"
        if self.world_size > 1:  # a save would wait for ranks that are inside a collective
            return DataError(f"{message} (fix or remove the file, then continue with: bida train --resume {self.run_dir})")
        if optimizer is not None:
            self.save("last", optimizer, scaler)
        return DataError(f"{message} (checkpoint saved at step {self.step}; fix or remove the file, then "
                         f"continue with: bida train --resume {self.run_dir})")

    def _after_step(self, phase: Phase, optimizer, scaler) -> bool:
        """Evaluation, checkpoint and stop check after step ``self.step``; True when the phase ended."""
        cfg = self.cfg
        last_of_phase = self.iter == phase.iters
        if self.step % cfg.train.eval_every == 0 or last_of_phase:
            self._evaluate_and_maybe_best(optimizer, scaler)
        if last_of_phase:
            self.phase_idx += 1
            self.iter = 0
            self.save("last", optimizer, scaler)
            self._check_stop(last_of_phase)
            return True
        elif self.step % cfg.train.checkpoint_every == 0:
            self.save("last", optimizer, scaler)
        if self._stop_seen() is not None:
            if self.step % cfg.train.checkpoint_every != 0:
                self.save("last", optimizer, scaler)
            self._check_stop(True)
        return False

    def _check_stop(self, saved: bool) -> None:
        """After a checkpoint: leave cleanly if SIGTERM/SIGINT arrived (under torchrun: on any rank)."""
        signum = self._stop_seen()
        if signum is not None and saved:
            self._exiting = True
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.step} (checkpoint saved); "
                              f"continue with: bida train --resume {self.run_dir}", signum)

    def _backward_and_step(self, loss: torch.Tensor, optimizer, scaler) -> bool:
        """Backward and step unless the loss or a gradient is not finite (then skip and count).

        The finiteness of the step is one device flag, read once (:func:`_step_is_finite`):
        the one host sync of a steady-state step. The host must know before it counts the
        step, sets the next step's learning rate, schedules checkpoints and restores what a
        skipped forward changed; the flag is read after backward, so the sync waits for
        work already queued and costs the launch gap before the optimizer step.
        """
        # Backward always runs (a NaN loss gives NaN gradients, caught below), so every rank
        # takes part in DDP's gradient all-reduce; the flag is then the same on every rank.
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            finite = finite & torch.isfinite(_grad_max_norm(grads))
        changed = self._changed_state()
        if changed:  # BN statistics pushed to inf by a finite loss: the step is not good either
            finite = finite & torch.isfinite(_grad_max_norm(changed))
        stop = self._stop_signal or 0  # under torchrun, a stop rides on the step's one all-reduce
        self._flags_sent = True
        finite, stop = _step_is_finite(self.dist.step_flags(finite, stop))
        self._stop_agreed = stop or self._stop_agreed
        if finite:
            scaler.step(optimizer)
            scaler.update()
            self.bad_steps = 0
            return True
        if scaler.is_enabled():  # fp16: no step is taken; the scale drops when the gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.logger.log({"numerics/skipped_step": 1, "numerics/bad_steps_in_row": self.bad_steps}, self.step)
        return False

    def _evaluate_and_maybe_best(self, optimizer, scaler) -> None:
        self._pending_eval = True  # saved with a stop: --resume evaluates this step first
        try:
            metrics = self.evaluate_target(stoppable=True)
        except _Stopping:
            self.save("last", optimizer, scaler)
            self._check_stop(True)
        except DataError as err:  # saved with the pending evaluation: --resume evaluates again
            raise self._bad_file(err, optimizer, scaler) from None
        self._pending_eval = False
        if metrics is None:
            return
        self.logger.log({"eval/mIoU": metrics["mIoU"], "eval/pixel_acc": metrics["pixel_acc"],
                         **{f"eval/iou/{k}": v for k, v in metrics["per_class_iou"].items() if v is not None}}, self.step)
        self._info(f"step {self.step}: target val mIoU {100 * metrics['mIoU']:.2f}")
        if metrics["mIoU"] > self.best_miou:
            self.best_miou, self.best_step = metrics["mIoU"], self.step
            self.save("best", optimizer, scaler)

    def _finish(self) -> dict:
        try:  # last.pt holds the end of the last phase: a stop here evaluates again on --resume
            metrics = self.evaluate_target(stoppable=True) or {
                "mIoU": float("nan"), "per_class_iou": {}, "pixel_acc": float("nan")}
        except _Stopping:
            self._check_stop(True)
        except DataError as err:
            raise self._bad_file(err) from None
        metrics = {k: v for k, v in metrics.items() if k != "confusion"} | {"confusion": metrics.get("confusion")}
        metrics["split"] = self.cfg.data.target.val_split  # the top-level figures: target val, as always
        try:
            test = self.evaluate_test(stoppable=True)
        except _Stopping:
            self._check_stop(True)
        except DataError as err:
            raise self._bad_file(err) from None
        if test is not None:
            metrics["test"] = test
            self._info(f"step {self.step}: target test mIoU {100 * test['mIoU']:.2f} "
                       f"(split '{test['split']}', last checkpoint; nothing selected on it)")
        source_val = self._evaluate_source_val()
        if source_val is not None:
            metrics["source_val"] = source_val
        metrics["checkpoint"] = "last"
        metrics["step"] = self.step
        metrics["method"] = self.cfg.method.name
        metrics["best"] = {"mIoU": self.best_miou, "step": self.best_step,
                           "note": "selected on target val (as the official code does); report 'last' as the main number"}
        if self.is_main:
            write_metrics(metrics, self.run_dir / "metrics.json")
            self._info(markdown_table(metrics))
            if "test" in metrics:
                self._info(markdown_table(metrics["test"], f"target {metrics['test']['split']}"))
        self.dist.barrier()
        return metrics


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a finished label directory: into ``<dst>.tmp``, then renamed (never half there)."""
    tmp = dst.with_name(dst.name + ".copy-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          label_cache: Path | None = None) -> dict:
    """Train according to ``cfg`` into ``run_dir``; returns the final metrics (``quiet``: with --resume).

    ``label_cache``: a directory where round-0 static pseudo labels are shared between runs
    that start from the same checkpoint (see ``Trainer._shared_round_labels``).
    """
    from . import distributed

    try:
        trainer = Trainer(cfg, Path(run_dir), resume=resume, overwrite=overwrite, quiet=quiet, label_cache=label_cache)
        return trainer.fit()
    finally:  # also on error: leave the process group so that the other ranks do not wait for this one
        distributed.shutdown()


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method.name}-{stamp}-{os.getpid()}"
