"""The schedules of a run: its phases, and what each kind of phase does.

A run is a list of :class:`Phase` (:func:`plan_phases`): a ``source`` stage, ``round`` phases of
self-training on static pseudo labels, or one ``teacher`` phase (the mean teacher). Each
kind is a small :class:`Schedule` that the training loop calls: what to build (a target
loader or not; the mean teacher's start), what one step does (the method's step function,
:mod:`bida.method.train_step` or :mod:`bida.method.teacher`), what follows a step, its
learning rate, and when it ends. The loop (:mod:`bida.engine.train`) owns the order of
everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import datasets
from ..data.datasets import train_loader
from ..data.rare_class import cached_class_pixel_counts, rare_class_loader
from ..method import teacher, train_step
from .distributed import DistContext
from .optim import warmup_factor
from .state import RunState
from .stop import StopControl, _Stopping


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


def rank_batch(cfg: Config, world_size: int) -> int:
    """Images per domain that this process trains on in a step.

    ``train.batch_size`` is the global batch on every schedule and stage, split evenly over
    the ranks (checked at set-up, :func:`~bida.engine.setup.check_batch_splits`); the samplers
    give rank r the r-th slice of each global batch, so the global sample order is that of
    one process.
    """
    return cfg.train.batch_size // world_size


class Schedule:
    """One phase: what it builds, what one step does, when it ends.

    Args:
        phase: the phase it runs. cfg: the run's config.
        model: the student (the uncompiled module: the step gets the one the loop trains).
        dist: the process group (prototype sums over ranks). num_classes: of the run.
        state: the run's progress (the step a warm-up reads).
        source_iters: iterations of the run's source stage (0: none), which the
            adaptation's warm-ups do not count.
        class_weights: (K,) weights of the source CE's classes (``loss.class_weights``), or None.
    """

    uses_target = True  # what to build: a target loader besides the source one
    keeps_bn_in_sync = False  # BN statistics averaged over ranks after every step (checkpoints leave them)
    label_dir = None  # the target's static pseudo labels (rounds only)

    def __init__(self, phase: Phase, cfg: Config, model: torch.nn.Module, dist: DistContext, num_classes: int,
                 state: RunState, source_iters: int = 0, class_weights: torch.Tensor | None = None):
        self.phase, self.cfg, self.model, self.dist = phase, cfg, model, dist
        self.num_classes, self.state, self.source_iters = num_classes, state, source_iters
        self.class_weights = class_weights

    @property
    def base_lr(self) -> float:
        return phase_base_lr(self.cfg, self.phase)

    def lr(self, it: int) -> float:
        """Learning rate of iteration ``it`` of the phase: poly decay (over ``train.poly_horizon``
        times a round), after ``train.warmup_iters`` of linear warm-up."""
        t = self.cfg.train
        horizon = t.poly_horizon if self.phase.kind == "round" else 1.0
        lr = poly_lr(self.base_lr, it, horizon * self.phase.iters, t.poly_power)
        if t.warmup_iters:
            lr *= warmup_factor(it, t.warmup_iters, t.warmup_ratio)
        return lr

    def adapt_iter(self) -> int:
        """Iterations of the adaptation phase (all rounds) done before this step: a host count
        from the checkpointed step, read by the contrast warm-up."""
        return self.state.step - self.source_iters

    def build_loaders(self, src, tgt, device: torch.device, stop: StopControl, run_dir: Path,
                      class_names: list[str]) -> tuple[Any, Any]:
        """The source loader and (if the phase uses one) the target loader, from batch ``state.data_pos`` on.

        ``src``, ``tgt``: the domains; ``run_dir``: where the rare-class pixel counts are cached.
        """
        cfg, dist, start = self.cfg, self.dist, self.state.data_pos
        src_ds = datasets.build_train_dataset(cfg, src, cfg.data.source.train_split, require_labels=True)
        pin = device.type == "cuda"  # page-locked batches: the host-to-device copy does not block
        batch = rank_batch(cfg, dist.world_size)
        if cfg.data.rare_class_sampling:
            try:  # rank 0 counts (a stop during the scan keeps last.pt, this phase's start), the others read
                counts = stop.on_rank0(lambda check_stop: cached_class_pixel_counts(
                    src_ds, self.num_classes, run_dir, check_stop=check_stop, quiet=cfg.train.quiet))
            except _Stopping:
                stop.check(True)
            if counts is None:
                counts = cached_class_pixel_counts(src_ds, self.num_classes, run_dir)
            src_iter = rare_class_loader(src_ds, counts, cfg, cfg.seed, start, dist.rank, dist.world_size,
                                         list(class_names), batch_size=batch)
        else:
            src_iter = train_loader(src_ds, batch, cfg.seed, start, cfg.data.num_workers,
                                    dist.rank, dist.world_size, pin_memory=pin)
        tgt_iter = None
        if self.uses_target:
            tgt_ds = datasets.build_train_dataset(cfg, tgt, cfg.data.target.train_split, require_labels=False,
                                                  label_dir=self.label_dir, target=True)
            tgt_iter = train_loader(tgt_ds, batch, cfg.seed + 1, start, cfg.data.num_workers,
                                    dist.rank, dist.world_size, pin_memory=pin)
        return src_iter, tgt_iter

    def ended(self, it: int) -> bool:
        """Whether the phase is over after ``it`` of its iterations."""
        return it >= self.phase.iters

    def start(self) -> None:
        """Once when the phase starts (or resumes), before its first step."""

    def step(self, model: torch.nn.Module, batch_src: dict, batch_tgt: dict | None):
        """The method's step on ``model`` (the module the loop trains: wrapped, compiled):
        forward and losses, a :class:`~bida.method.train_step.StepResult`."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After a step that was taken (not after a skipped one)."""


class SourceStage(Schedule):
    """Supervised source training; the target stem follows the source stem."""

    uses_target = False

    def step(self, model, batch_src, batch_tgt):
        return train_step.source_step(model, batch_src, self.cfg,
                                      reduce_sums=self.dist.prototype_reducer(self.num_classes),
                                      num_classes=self.num_classes, class_weights=self.class_weights)

    def after_step(self) -> None:
        self.model.sync_target_stem()  # the target stem gets no gradient here


class Rounds(Schedule):
    """A self-training round on the static pseudo labels in ``label_dir`` (None: no labels, minent),
    with the prototype ``calibration`` (None: none)."""

    def __init__(self, phase: Phase, cfg: Config, model, dist, num_classes: int, state: RunState,
                 source_iters: int = 0, class_weights=None, calibration=None, label_dir: Path | None = None):
        super().__init__(phase, cfg, model, dist, num_classes, state, source_iters, class_weights)
        self.calibration, self.label_dir = calibration, label_dir

    def step(self, model, batch_src, batch_tgt):
        if self.label_dir is None:  # minent: no pseudo labels
            batch_tgt["label"] = torch.full_like(batch_tgt["label"], 255)
        return train_step.adapt_step(model, batch_src, batch_tgt, self.cfg, self.calibration, self.num_classes,
                                     reduce_sums=self.dist.prototype_reducer(self.num_classes),
                                     adapt_iter=self.adapt_iter(), class_weights=self.class_weights)


class TeacherPhase(Schedule):
    """Mean-teacher self-training: online pseudo labels from the ``mean_teacher``, an EMA of the student."""

    keeps_bn_in_sync = True

    def __init__(self, phase: Phase, cfg: Config, model, dist, num_classes: int, state: RunState,
                 source_iters: int = 0, class_weights=None, calibration=None, mean_teacher=None):
        super().__init__(phase, cfg, model, dist, num_classes, state, source_iters, class_weights)
        self.calibration, self.mean_teacher = calibration, mean_teacher

    def start(self) -> None:
        """The student the same on every rank (rank 0's, as DDP makes it), then the teacher a
        copy of it, unless restored.

        The BN statistics are equal already (averaged by the checkpoint before this phase, or
        restored from one); from here on they are averaged after every step
        (:meth:`~bida.method.teacher.MeanTeacher.after_step`), so checkpoints and evaluations
        leave them as they are (:attr:`keeps_bn_in_sync`): averaging equal values again is not
        exact for 3 or more ranks, and a resumed run must go on with the values the
        uninterrupted one has.
        """
        self.dist.broadcast_module(self.model)
        self.mean_teacher.start(self.model)

    def step(self, model, batch_src, batch_tgt):
        return teacher.teacher_step(model, batch_src, batch_tgt, self.cfg, self.mean_teacher, self.calibration,
                                    self.num_classes, reduce_sums=self.dist.prototype_reducer(self.num_classes),
                                    adapt_iter=self.adapt_iter(), class_weights=self.class_weights)

    def after_step(self) -> None:
        # Under torchrun: BN statistics averaged where the EMA reads them.
        dist = self.dist
        self.mean_teacher.after_step(self.model, dist.average_bn_statistics if dist.enabled else None)


def build_schedule(phase: Phase, cfg: Config, model: torch.nn.Module, dist: DistContext, num_classes: int,
                   state: RunState, source_iters: int, calibration=None, mean_teacher=None,
                   label_dir: Path | None = None, class_weights: torch.Tensor | None = None) -> Schedule:
    """The schedule of ``phase``: a source stage, a round on the labels in ``label_dir``, or the teacher phase."""
    if phase.kind == "source":
        return SourceStage(phase, cfg, model, dist, num_classes, state, source_iters, class_weights)
    if phase.kind == "teacher":
        return TeacherPhase(phase, cfg, model, dist, num_classes, state, source_iters, class_weights, calibration,
                            mean_teacher)
    return Rounds(phase, cfg, model, dist, num_classes, state, source_iters, class_weights, calibration, label_dir)
