"""The schedules of a run: its phases, and what each kind of phase does.

A run is a list of :class:`Phase` (:func:`plan_phases`): a ``source`` stage, ``round`` phases of
self-training on static pseudo labels, or one ``teacher`` phase (the mean teacher). Each
kind is a small :class:`Schedule` that the training loop calls: what to build (a target
loader or not; the mean teacher's start), what one step does, what follows a step, its
learning rate, and when it ends. The step functions themselves come from the loop
(:mod:`bida.engine.train`), which owns the order of everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import Config
from ..data.datasets import train_loader
from ..data.rare_class import cached_class_pixel_counts, rare_class_loader
from .optim import warmup_factor
from .stop import _Stopping


def adapt_iter(trainer) -> int:
    """Iterations of the adaptation phase (all rounds) done before this step: a host count
    from the checkpointed step, read by the contrast warm-up."""
    return trainer.step - sum(p.iters for p in trainer.phases if p.kind == "source")


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

    ``step_fn`` is the method's step of this kind of phase (:mod:`bida.method.train_step`,
    :mod:`bida.method.teacher`); ``trainer`` is the run (its model, calibration, mean teacher,
    number of classes and distributed context).
    """

    uses_target = True  # what to build: a target loader besides the source one
    label_dir = None  # the target's static pseudo labels (rounds only)

    def __init__(self, phase: Phase, cfg: Config, step_fn: Callable[..., Any]):
        self.phase, self.cfg, self.step_fn = phase, cfg, step_fn

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

    def build_loaders(self, trainer, build_train_dataset) -> tuple[Any, Any]:
        """The source loader and (if the phase uses one) the target loader, from batch ``trainer.data_pos`` on.

        ``build_train_dataset``: that of :mod:`bida.data.datasets`, as the loop calls it.
        """
        cfg, t = self.cfg, trainer
        src_ds = build_train_dataset(cfg, t.src, cfg.data.source.train_split, require_labels=True)
        pin = t.device.type == "cuda"  # page-locked batches: the host-to-device copy does not block
        batch = rank_batch(cfg, t.world_size)
        if cfg.data.rare_class_sampling:
            try:  # rank 0 counts (a stop during the scan keeps last.pt, this phase's start), the others read
                counts = t.stop.on_rank0(lambda check_stop: cached_class_pixel_counts(
                    src_ds, t.num_classes, t.run_dir, check_stop=check_stop, quiet=cfg.train.quiet))
            except _Stopping:
                t.stop.check(True)
            if counts is None:
                counts = cached_class_pixel_counts(src_ds, t.num_classes, t.run_dir)
            src_iter = rare_class_loader(src_ds, counts, cfg, cfg.seed, t.data_pos, t.rank, t.world_size,
                                         list(t.classes.names), batch_size=batch)
        else:
            src_iter = train_loader(src_ds, batch, cfg.seed, t.data_pos, cfg.data.num_workers,
                                    t.rank, t.world_size, pin_memory=pin)
        tgt_iter = None
        if self.uses_target:
            tgt_ds = build_train_dataset(cfg, t.tgt, cfg.data.target.train_split, require_labels=False,
                                         label_dir=self.label_dir, target=True)
            tgt_iter = train_loader(tgt_ds, batch, cfg.seed + 1, t.data_pos, cfg.data.num_workers,
                                    t.rank, t.world_size, pin_memory=pin)
        return src_iter, tgt_iter

    def ended(self, it: int) -> bool:
        """Whether the phase is over after ``it`` of its iterations."""
        return it >= self.phase.iters

    def start(self, trainer) -> None:
        """Once when the phase starts (or resumes), before its first step."""

    def step(self, trainer, model, batch_src: dict, batch_tgt: dict | None):
        raise NotImplementedError

    def after_step(self, trainer) -> None:
        """After a step that was taken (not after a skipped one)."""


class SourceStage(Schedule):
    """Supervised source training; the target stem follows the source stem."""

    uses_target = False

    def step(self, trainer, model, batch_src, batch_tgt):
        return self.step_fn(model, batch_src, self.cfg, reduce_sums=trainer.dist.prototype_reducer(trainer.num_classes),
                            num_classes=trainer.num_classes, class_weights=trainer.class_weights)

    def after_step(self, trainer) -> None:
        trainer.model.sync_target_stem()  # the target stem gets no gradient here


class Rounds(Schedule):
    """A self-training round on the static pseudo labels in ``label_dir`` (None: no labels, minent)."""

    def __init__(self, phase: Phase, cfg: Config, step_fn, label_dir):
        super().__init__(phase, cfg, step_fn)
        self.label_dir = label_dir

    def step(self, trainer, model, batch_src, batch_tgt):
        import torch

        if self.label_dir is None:  # minent: no pseudo labels
            batch_tgt["label"] = torch.full_like(batch_tgt["label"], 255)
        return self.step_fn(model, batch_src, batch_tgt, self.cfg, trainer.calibration, trainer.num_classes,
                            reduce_sums=trainer.dist.prototype_reducer(trainer.num_classes),
                            adapt_iter=adapt_iter(trainer), class_weights=trainer.class_weights)


class TeacherPhase(Schedule):
    """Mean-teacher self-training: online pseudo labels from an EMA of the student."""

    def start(self, trainer) -> None:
        """The student the same on every rank (rank 0's, as DDP makes it), then the teacher a
        copy of it, unless restored.

        The BN statistics are equal already (averaged by the checkpoint before this phase, or
        restored from one); from here on they are averaged after every step
        (:meth:`~bida.method.teacher.MeanTeacher.after_step`), so checkpoints and evaluations
        leave them as they are: averaging equal values again is not exact for 3 or more ranks,
        and a resumed run must go on with the values the uninterrupted one has.
        """
        trainer.dist.broadcast_module(trainer.model)
        trainer._bn_in_sync = True
        trainer.mean_teacher.start(trainer.model)

    def step(self, trainer, model, batch_src, batch_tgt):
        return self.step_fn(model, batch_src, batch_tgt, self.cfg, trainer.mean_teacher, trainer.calibration,
                            trainer.num_classes, reduce_sums=trainer.dist.prototype_reducer(trainer.num_classes),
                            adapt_iter=adapt_iter(trainer), class_weights=trainer.class_weights)

    def after_step(self, trainer) -> None:
        # Under torchrun: BN statistics averaged where the EMA reads them.
        dist = trainer.dist
        trainer.mean_teacher.after_step(trainer.model, dist.average_bn_statistics if dist.enabled else None)
