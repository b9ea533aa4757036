"""Setting a run up: what the trainer builds before its first step, and the checks before the run directory.

Seeding and determinism, the student (:func:`build_student`), the method's state
(:func:`build_calibration`, :func:`build_mean_teacher`), the initial weights
(:func:`init_weights`), the checks of config and data that must pass before anything is
written (:func:`check_batch_splits`, :func:`check_data`, :func:`check_rare_class_sampling`)
and the run's ``run.json``. :class:`~bida.engine.train.Trainer` calls them in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write_text
from ..config import Config, target_test_split
from ..data.datasets import Domain, _mix
from ..errors import BidaError, ConfigError, DataError
from ..method.pseudo_labels import Calibration
from ..method.teacher import MeanTeacher
from ..models import build_model
from ..models.sync_bn import convert_sync_bn
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


def seed_rank_stream(dist, seed: int) -> None:
    """Under torchrun, once the model is built alike everywhere: a torch generator stream of
    each rank's own (rank 0 keeps the run's), so that dropout and stochastic depth draw
    independent masks for the images of different ranks, as one process would for the
    images of its batch. Checkpoints hold every rank's state (``rng_ranks``)."""
    if dist.enabled and dist.rank > 0:
        torch.manual_seed(_mix(seed, dist.rank, RANK_SEED_SALT))


def write_run_json(run_dir: Path, device: torch.device, world_size: int, classes) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps({
        "git_revision": git_revision(), "torch": torch.__version__, "device": str(device), "cpu": cpu_model(),
        "world_size": world_size, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes": list(classes.names)}, indent=2))


def warn_random_init(cfg: Config, is_main: bool) -> None:
    """Random weights need many more iterations than ImageNet ones and reach far less on
    real photos; say so (even with --quiet; on stdout, as stderr is kept for the one-line
    errors), except for the embedded pair, which is designed to train from scratch."""
    if not is_main or (cfg.data.source.kind == "synthetic" and cfg.data.target.kind == "synthetic"):
        return
    tqdm.write(random_init_warning(cfg.model.backbone))


def init_weights(model: torch.nn.Module, cfg: Config, is_main: bool, info: Callable[[str], None]) -> None:
    """The initial weights of a new run: ``model.pretrained`` (ImageNet), then ``model.init_checkpoint``
    (a trained model to adapt); a warning when neither is set (:func:`warn_random_init`)."""
    if cfg.model.pretrained:
        report = load_pretrained(model, cfg.model.pretrained)
        info(f"loaded {len(report['loaded'])} tensors from {cfg.model.pretrained} "
             f"(skipped {len(report['skipped'])}, fresh {len(report['missing'])})")
    if cfg.model.init_checkpoint:
        trained_head = cfg.method.pretrain_head and cfg.method.name != "source_only"
        if trained_head:
            check_trained_head(cfg.model.init_checkpoint)
        stem_copied = load_model_weights(model, cfg.model.init_checkpoint, fresh_projection=not trained_head)
        if stem_copied:  # a shared-stem checkpoint (docs/method.md, "Stem")
            info(f"{cfg.model.init_checkpoint} has no target stem: it starts as a copy of the source stem")
    if not cfg.model.pretrained and not cfg.model.init_checkpoint:
        warn_random_init(cfg, is_main)


def check_data(cfg: Config, src: Domain, tgt: Domain, num_classes: int) -> None:
    """``data.check``: a quick look at two files of every split the run reads.

    Raises:
        DataError: one line naming the domain and the first problem.
    """
    from ..data.check import check_domain

    t = cfg.data.target
    for name, dom, splits in (
        ("source", src, {cfg.data.source.train_split: True}),
        ("target", tgt, {t.train_split: False, **({t.val_split: True} if t.val_split else {}),
                         **({test: True} if (test := target_test_split(cfg)) else {})}),
    ):
        report = check_domain(dom.kind, dom.root, splits, num_classes=num_classes, full=False, max_files=2)
        if not report.ok():
            raise DataError(f"data.{name}: {report.errors[0]}")


def check_rare_class_sampling(cfg: Config, src: Domain, classes, dist) -> tuple[Any, np.ndarray] | None:
    """``data.rare_class_sampling``: the pixels of each class in each source label, checked
    against ``data.rcs_min_pixels`` before the run directory exists. Returns the source
    training set and its (N, K) counts on rank 0, to keep in the run directory once it exists
    (:func:`~bida.data.rare_class.write_class_pixel_counts`); None elsewhere or without
    rare-class sampling.

    Rank 0 counts (every source label at full resolution); the others learn its verdict.

    Raises:
        ConfigError: no source image holds enough pixels of some class (one line naming the key).
    """
    if not cfg.data.rare_class_sampling:
        return None
    from ..data.datasets import build_train_dataset
    from ..data.rare_class import RareClassSampler, class_pixel_counts

    src_ds, counts, error = None, None, None
    if dist.rank == 0:
        src_ds = build_train_dataset(cfg, src, cfg.data.source.train_split, require_labels=True)
        counts = class_pixel_counts(src_ds, classes.num_classes, quiet=cfg.train.quiet)
        try:
            RareClassSampler(counts, cfg.data.rcs_temperature, cfg.data.rcs_min_pixels, 1, cfg.seed,
                             class_names=list(classes.names))
        except ConfigError as err:
            error = str(err)
    if dist.enabled:
        error = dist.all_gather_object(error)[0]
    if error is not None:
        raise ConfigError(error)
    return (src_ds, counts) if counts is not None else None


def build_calibration(cfg: Config, num_classes: int, feature_dim: int, device: torch.device) -> Calibration | None:
    """The prototype moving averages (calibration's domain bias, memory_partners' fill-ins), or None."""
    if cfg.method.name != "bida" or not (cfg.method.calibration or cfg.method.memory_partners):
        return None
    calibration = Calibration(num_classes, feature_dim, momentum=cfg.calibration.momentum,
                              max_weight=cfg.calibration.max_weight, ramp_iters=cfg.calibration.ramp_iters)
    calibration.to(device)
    return calibration


def build_mean_teacher(cfg: Config, num_classes: int, device: torch.device, rank: int = 0,
                       world_size: int = 1) -> MeanTeacher | None:
    """The teacher schedule's state (EMA teacher, ClassMix generator, ImageNet model), or None."""
    if cfg.train.schedule != "teacher" or cfg.method.name == "source_only":
        return None
    imagenet = None
    if cfg.loss.feature_distance_weight > 0:
        classes = cfg.loss.feature_distance_classes or []
        if any(c >= num_classes for c in classes):
            raise BidaError(f"loss.feature_distance_classes: {list(classes)} names a class id >= {num_classes} "
                            f"(the number of classes)")
        imagenet = build_model(cfg.model, num_classes, cfg.method.feature)
        load_pretrained(imagenet, cfg.model.pretrained)
    return MeanTeacher(cfg, num_classes, device, imagenet, rank=rank, world_size=world_size)
