"""Setting a run up: its configuration, data, model, method state and run directory.

:func:`open_run` checks the run directory (nothing is written before every input is valid),
joins the process group and locks a resumed run; :func:`setup_run` builds the domains, the
model, the calibration and the mean teacher, then resumes from the last good checkpoint or
initialises the weights and creates the run directory. Stop signals during set-up are
handled by :mod:`bida.engine.stop` (the run directory is never left half written).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write_text, remove_stale_temp_files
from ..config import Config, check_class_ids, load_config, target_test_split
from ..data.datasets import Domain, _mix, check_same_classes, resolve_domain
from ..errors import BidaError, ConfigError, DataError, Interrupted
from ..method.pseudo_labels import Calibration
from ..method.teacher import MeanTeacher
from ..models import DeepLabV2, MiTSegmentor, build_model
from ..models.sync_bn import convert_sync_bn
from .guard import StepGuard
from .resume import load_resume, resume_checkpoint, truncate_run_log
from .run_dir import RunLock, check_run_dir, create_run_dir
from .runlog import LogAccumulator, RunLogger
from .schedules import plan_phases
from .class_weights import source_class_weights
from ..models.weights import check_trained_head, load_model_weights, load_pretrained, random_init_warning


def seed_everything(seed: int) -> None:
    """The one seeding call of a run (python, numpy, torch)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deterministic_algorithms(enabled: bool) -> None:
    """``train.deterministic``: on CUDA, cuDNN's deterministic kernels (no benchmark autotuning),
    a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, unless already set) and
    PyTorch's deterministic implementations wherever it has them. Ops that have none (on CUDA
    some backward passes of interpolation, ``index_add_`` and the losses' scatter sums) warn
    once instead of failing, so a run never stops for it; those stay run-to-run variable.

    On CPU the kernels bida uses are deterministic already: a config repeats bit-identically
    on the same CPU model with the same torch build and the same thread count (the switch
    changes no result there; it only also fills uninitialised memory). Results differ across
    CPU kinds (MKL and oneDNN choose kernels by vendor and model) and across thread counts.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GEMM
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def determinism_settings() -> tuple[bool, bool, bool, bool]:
    """The process-wide switches :func:`deterministic_algorithms` sets, to restore them after a run."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def restore_determinism(settings: tuple[bool, bool, bool, bool]) -> None:
    enabled, warn_only, cudnn_deterministic, cudnn_benchmark = settings
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark


def git_revision() -> str | None:
    """The commit of the git checkout this package runs from; None when it does not run
    from one (an installed copy, no git, a timeout). Never raises.

    The checkout must be this package's own (``<top>/src/bida`` holds this module): an
    installed copy inside some other repository (a virtual environment in a project) would
    otherwise report that repository's commit.
    """
    here = Path(__file__).resolve().parents[1]  # the package directory, src/bida
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
    checkout), CPU model, CPU count, torch's thread count, torch and Python versions."""
    import platform

    return {"git_commit": git_revision(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


RANK_SEED_SALT = 41  # the torch seed of rank r > 0 under torchrun: _mix(seed, r, salt)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_run(trainer, cfg: Config, run_dir: Path, resume: bool, overwrite: bool, quiet: bool,
             label_cache: Path | None, dump_config) -> None:
    """Check the run directory, join the process group, lock a resumed run, then :func:`setup_run`.

    ``dump_config``: :func:`bida.config.dump_config`, as the loop calls it.
    """
    from . import distributed

    trainer.run_dir = Path(run_dir)
    # Round-0 static labels shared by runs that adapt from one checkpoint (bida demo/ablate).
    trainer.label_cache = Path(label_cache) if label_cache is not None else None
    check_run_dir(trainer.run_dir, resume, overwrite)
    if resume:
        cfg = load_config(trainer.run_dir / "config.yaml", ["train.quiet=true"] if quiet else [])
    trainer.cfg = cfg
    trainer.device = pick_device()
    trainer.rank, trainer.world_size = 0, 1
    trainer.dist = distributed.init_from_env()
    trainer.rank, trainer.world_size = trainer.dist.rank, trainer.dist.world_size
    if trainer.dist.device is not None:
        trainer.device = trainer.dist.device
    trainer.is_main = trainer.rank == 0
    trainer._lock = RunLock(trainer.run_dir)
    if resume and trainer.is_main:  # before anything is read from the run: a live run is refused
        trainer._lock.acquire()
    try:
        setup_run(trainer, cfg, resume, overwrite, dump_config)
    except BaseException:
        trainer._lock.release()
        raise


def setup_run(trainer, cfg: Config, resume: bool, overwrite: bool, dump_config) -> None:
    """Domains, model, calibration and mean teacher; then the resumed state, or the initial
    weights and a new run directory (its config written with ``dump_config``)."""
    check_batch_splits(cfg, trainer.world_size)  # before the run dir exists
    seed_everything(cfg.seed)
    deterministic_algorithms(cfg.train.deterministic)
    trainer.src: Domain = resolve_domain(cfg, "source")
    trainer.tgt: Domain = resolve_domain(cfg, "target")
    trainer.classes = check_same_classes(trainer.src, trainer.tgt)
    trainer.num_classes = trainer.classes.num_classes
    check_class_ids("data.eval_classes", cfg.data.eval_classes, trainer.num_classes)  # before the run dir exists
    if cfg.data.check:
        check_data(trainer)
    trainer.model: DeepLabV2 | MiTSegmentor = build_student(cfg, trainer.num_classes, trainer.dist, trainer.device)
    trainer.phases = plan_phases(cfg)
    trainer.calibration = None
    # The prototype moving averages: calibration's domain bias, memory_partners' fill-ins.
    if cfg.method.name == "bida" and (cfg.method.calibration or cfg.method.memory_partners):
        trainer.calibration = Calibration(trainer.num_classes, trainer.model.feature_dim, momentum=cfg.calibration.momentum,
                                          max_weight=cfg.calibration.max_weight, ramp_iters=cfg.calibration.ramp_iters)
        trainer.calibration.to(trainer.device)
    trainer.guard = StepGuard(trainer.model, trainer.calibration)
    trainer.mean_teacher = build_mean_teacher(trainer, cfg)
    trainer.phase_idx, trainer.iter, trainer.step = 0, 0, 0
    trainer.data_pos = 0  # batches drawn: step + skipped steps (a skipped step's batch stays consumed)
    trainer._pending_eval = False  # stopped inside the evaluation after step ``step``
    trainer.best_miou, trainer.best_step, trainer.bad_steps = -1.0, -1, 0
    trainer.optimizer_state: dict | None = None
    trainer.scaler_state: dict | None = None
    trainer._log_state: dict | None = None  # a LogAccumulator's partial sums, restored by resume
    trainer._logs: LogAccumulator | None = None  # the current phase's, saved with each checkpoint
    trainer._average_gradients = False  # the teacher phase under torchrun: no DDP, gradients averaged here
    trainer._bn_in_sync = False  # BN statistics equal on every rank (teacher phase): no averaging at saves
    trainer._good: tuple[Path, int] | None = None  # a checkpoint known good: resumed from, or written
    # A run stopped before its first checkpoint restarts from step 0 with its saved config.
    resumed = resume_checkpoint(trainer) if resume else None
    if resume and trainer.is_main:  # a writer killed mid-write left its temporary file
        for d in (trainer.run_dir, trainer.run_dir / "checkpoints"):
            for tmp in remove_stale_temp_files(d):
                trainer._info(f"removed {tmp}, left by a process killed while writing it")
    if resumed is not None:
        load_resume(trainer, *resumed)
    else:
        if cfg.model.pretrained:
            report = load_pretrained(trainer.model, cfg.model.pretrained)
            trainer._info(f"loaded {len(report['loaded'])} tensors from {cfg.model.pretrained} "
                       f"(skipped {len(report['skipped'])}, fresh {len(report['missing'])})")
        if cfg.model.init_checkpoint:
            trained_head = cfg.method.pretrain_head and cfg.method.name != "source_only"
            if trained_head:
                check_trained_head(cfg.model.init_checkpoint)
            stem_copied = load_model_weights(trainer.model, cfg.model.init_checkpoint, fresh_projection=not trained_head)
            if stem_copied:  # a shared-stem checkpoint (docs/method.md, "Stem")
                trainer._info(f"{cfg.model.init_checkpoint} has no target stem: it starts as a copy of the source stem")
        if not cfg.model.pretrained and not cfg.model.init_checkpoint:
            warn_random_init(trainer)
        seed_rank_stream(trainer)
        trainer.stop.deferring = True  # a stop signal waits until the run directory is complete
        if trainer.is_main and not resume:  # every input is valid: only now touch the disk
            trainer._lock = create_run_dir(trainer.run_dir, overwrite)
        trainer.dist.barrier()
        if trainer.is_main and resume:
            truncate_run_log(trainer, 0)
            (trainer.run_dir / "checkpoints").mkdir(exist_ok=True)
        elif trainer.is_main:
            dump_config(cfg, trainer.run_dir / "config.yaml")
            write_run_json(trainer)
        trainer.stop.run_written, trainer.stop.deferring = True, False
        if trainer.stop.signal is not None:
            trainer.stop.exiting = True
            raise Interrupted(trainer.stop.setup_message(trainer.stop.signal), trainer.stop.signal)
    if trainer.is_main and resume and not (trainer.run_dir / "run.json").is_file():
        write_run_json(trainer)  # a run stopped between its config and run.json
    trainer.logger = RunLogger(trainer.run_dir, enabled=trainer.is_main)
    trainer.class_weights = source_class_weights(trainer)  # loss.class_weights (None: every class weighs 1)
    trainer.total_steps = sum(p.iters for p in trainer.phases)
    trainer._stop_after: int | None = None
    trainer._data_wait_s = 0.0


def build_student(cfg: Config, num_classes: int, dist, device: torch.device) -> torch.nn.Module:
    """The model a run trains, on ``device``: under torchrun (``dist``, a
    :class:`~bida.engine.distributed.DistContext` of 2 or more processes) with ``model.sync_bn``,
    its BatchNorms that train are synchronised (:func:`~bida.models.sync_bn.convert_sync_bn`);
    one process gets the plain model. Converted here, before anything copies the model (the
    EMA teacher) or loads a state into it; the state dict stays BatchNorm's, so checkpoints
    load with any number of processes."""
    model = build_model(cfg.model, num_classes, cfg.method.feature).to(device)
    if cfg.model.sync_bn and dist.enabled:
        convert_sync_bn(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_batch_splits(cfg: Config, world_size: int) -> None:
    """``train.batch_size`` is the global batch of every schedule and stage: it must split evenly
    over the ``world_size`` processes (each trains on ``batch_size / world_size`` images per domain).

    Raises:
        ConfigError: one line naming the key, its value and the number of processes.
    """
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is the global batch and must be a multiple of "
                          f"the world size, {world_size} processes (each trains on batch_size / {world_size} images "
                          "per domain)")


def seed_rank_stream(trainer) -> None:
    """Under torchrun, once the model is built alike everywhere: a torch generator stream of
    each rank's own (rank 0 keeps the run's), so that dropout and stochastic depth draw
    independent masks for the images of different ranks, as one process would for the
    images of its batch. Checkpoints hold every rank's state (``rng_ranks``)."""
    if trainer.dist.enabled and trainer.rank > 0:
        torch.manual_seed(_mix(trainer.cfg.seed, trainer.rank, RANK_SEED_SALT))


def write_run_json(trainer) -> None:
    atomic_write_text(trainer.run_dir / "run.json", json.dumps({
        "git_revision": git_revision(), "torch": torch.__version__, "device": str(trainer.device), "cpu": cpu_model(),
        "world_size": trainer.world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes": list(trainer.classes.names)}, indent=2))


def warn_random_init(trainer) -> None:
    """Random weights need many more iterations than ImageNet ones and reach far less on
    real photos; say so (even with --quiet; on stdout, as stderr is kept for the one-line
    errors), except for the embedded pair, which is designed to train from scratch."""
    if not trainer.is_main or (trainer.cfg.data.source.kind == "synthetic" and trainer.cfg.data.target.kind == "synthetic"):
        return
    tqdm.write(random_init_warning(trainer.cfg.model.backbone))


def check_data(trainer) -> None:
    from ..data.check import check_domain

    t = trainer.cfg.data.target
    for name, dom, splits in (
        ("source", trainer.src, {trainer.cfg.data.source.train_split: True}),
        ("target", trainer.tgt, {t.train_split: False, **({t.val_split: True} if t.val_split else {}),
                              **({test: True} if (test := target_test_split(trainer.cfg)) else {})}),
    ):
        report = check_domain(dom.kind, dom.root, splits, num_classes=trainer.num_classes, full=False, max_files=2)
        if not report.ok():
            raise DataError(f"data.{name}: {report.errors[0]}")


def build_mean_teacher(trainer, cfg: Config) -> MeanTeacher | None:
    """The teacher schedule's state (EMA teacher, ClassMix generator, ImageNet model), or None."""
    if cfg.train.schedule != "teacher" or cfg.method.name == "source_only":
        return None
    imagenet = None
    if cfg.loss.feature_distance_weight > 0:
        classes = cfg.loss.feature_distance_classes or []
        if any(c >= trainer.num_classes for c in classes):
            raise BidaError(f"loss.feature_distance_classes: {list(classes)} names a class id >= {trainer.num_classes} "
                            f"(the number of classes)")
        imagenet = build_model(cfg.model, trainer.num_classes, cfg.method.feature)
        load_pretrained(imagenet, cfg.model.pretrained)
    return MeanTeacher(cfg, trainer.num_classes, trainer.device, imagenet, rank=trainer.rank, world_size=trainer.world_size)
