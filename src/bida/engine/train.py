"""The training loop (:class:`Trainer`): source-only stage and self-training rounds, resumable exactly.

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

import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..config import Config, dump_config
from ..data.datasets import build_train_dataset, close_loader
from ..errors import DataError
from ..method.teacher import teacher_step
from ..method.train_step import adapt_step, source_step
from .inference import evaluate
from .evaluator import evaluate_and_maybe_best, evaluate_split, evaluate_target, evaluate_test, finish
from .guard import TrainingDiverged, backward_and_step
from .optim import build_optimizer
from .resume import last_good, save
from .round_cache import target_labels_dir
from .round_labels import generate_static_labels
from .runlog import LogAccumulator, log_record
from .schedules import Phase, Rounds, Schedule, SourceStage, TeacherPhase, phase_base_lr
from .setup import determinism_settings, open_run, restore_determinism
from .stop import StopControl, _StopRequested



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


class Trainer:
    """One training run: :meth:`fit` runs its phases, each a :class:`~bida.engine.schedules.Schedule`.

    One iteration, top to bottom (:meth:`_train_phase`): learning rate, batches, guard snapshot,
    the schedule's step (the method), :meth:`_backward_and_step` (one finiteness flag), the
    schedule's after-step, a log record, then :meth:`_after_step` (evaluation, checkpoint, stop).
    Set-up, resume, evaluations, the round-label cache, stops, logging, the step guard and the
    run directory are modules of their own in :mod:`bida.engine`.
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, label_cache: Path | None = None):
        from . import distributed

        self.run_dir, self.dist = Path(run_dir), distributed.DistContext()
        self.is_main = distributed.is_main_process()
        self.step, self._pending_eval = 0, False
        self._saved_step: int | None = None  # step of the last last.pt written by this process
        self.stop = StopControl(self)
        self.stop.setting_up, self.stop.run_written = True, resume
        self.stop.install()
        try:
            open_run(self, cfg, Path(run_dir), resume, overwrite, quiet, label_cache, dump_config)
        finally:  # fit() installs them again: a Trainer that is never fitted leaves no handler behind
            self.stop.restore()
            self.stop.setting_up = False

    def _info(self, msg: str) -> None:
        if self.is_main and not self.cfg.train.quiet:
            tqdm.write(msg)

    def _autocast(self):
        amp = self.cfg.train.amp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def save(self, name: str, optimizer, scaler) -> None:
        """Write ``checkpoints/<name>.pt``; never one that holds a non-finite tensor."""
        save(self, name, optimizer, scaler, save_checkpoint)

    def _average_bn_statistics(self) -> None:
        """BN running statistics averaged over ranks, unless the teacher phase already keeps them
        equal (it averages them after every step: :meth:`~bida.engine.schedules.TeacherPhase.start`)."""
        if not self._bn_in_sync:
            self.dist.average_bn_statistics(self.model)

    def _last_good(self) -> str:
        return last_good(self)

    def _ckpt(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def _make_optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        t = self.cfg.train
        # train.layer_decay is refused at load time for segmentors without ViT blocks
        decay = {"layer_decay": t.layer_decay} if t.layer_decay != 1.0 else {}
        if t.decay_norms_biases:  # refused at load time for segmentors other than DINOv2's
            decay["decay_norms_biases"] = True
        groups = getattr(self.model, "module", self.model).param_groups(phase_base_lr(self.cfg, phase),
                                                                          t.head_lr_mult, **decay)
        return build_optimizer(groups, phase_base_lr(self.cfg, phase), t)

    def _schedule(self, phase: Phase, label_dir: Path | None = None) -> Schedule:
        """The schedule of ``phase``, with the method's step of its kind."""
        if phase.kind == "source":
            return SourceStage(phase, self.cfg, source_step)
        if phase.kind == "teacher":
            return TeacherPhase(phase, self.cfg, teacher_step)
        return Rounds(phase, self.cfg, adapt_step, label_dir)

    def _set_lr(self, optimizer: torch.optim.Optimizer, phase: Phase) -> float:
        lr = self._schedule(phase).lr(self.iter)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def evaluate_target(self, stoppable: bool = False) -> dict | None:
        """Target-val metrics (None without a val split); see :meth:`_evaluate_split`."""
        return evaluate_target(self, stoppable)

    def evaluate_test(self, stoppable: bool = False) -> dict | None:
        """Target-test metrics (None without a test split, :func:`~bida.config.target_test_split`)."""
        return evaluate_test(self, stoppable)

    def _evaluate_split(self, ds, stoppable: bool) -> dict:
        """Metrics of ``ds``, each rank evaluating its shard with BN statistics averaged over ranks."""
        return evaluate_split(self, ds, stoppable, evaluate)

    def fit(self, stop_after: int | None = None) -> dict | None:
        """Run (or continue) every phase; return the final target-val metrics.

        ``stop_after``: stop at that global step with a checkpoint, as a pre-empted job would
        (returns None; continue with ``--resume``).
        """
        self._stop_after = stop_after
        self.stop.install()
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
                self.stop.sync()
                self.stop.check(True)  # the state here is the checkpoint of the phase boundary
                phase = self.phases[self.phase_idx]
                # DDP per phase: it must know whether the losses use the contrast features. The teacher
                # phase forwards the student several times a step, which DDP does not allow: its
                # gradients are averaged after the backward instead (_backward_and_step).
                self._average_gradients = phase.kind == "teacher" and self.dist.enabled
                model = (self.model if self._average_gradients else
                         self.dist.wrap(self.model, uses_features=phase.kind != "source" and cfg.method.name == "bida"))
                model = compile_for_training(model, cfg.train)
                self._run_phase(model, phase, bar)
            metrics = finish(self)
        except _StopRequested:
            return None
        finally:
            bar.close()
            self.logger.close()
            self._lock.release()
            self.stop.restore()  # last: a signal during this clean-up is still ignored
        return metrics

    def _run_phase(self, model: torch.nn.Module, phase: Phase, bar: tqdm) -> None:
        label_dir = target_labels_dir(self, phase, generate_static_labels, build_train_dataset)
        schedule = self._schedule(phase, label_dir)
        src_iter, tgt_iter = schedule.build_loaders(self, build_train_dataset)
        try:
            self._train_phase(model, schedule, bar, src_iter, tgt_iter)
        finally:  # workers ignore SIGTERM: they must be stopped through the loader, on every exit path
            close_loader(src_iter)
            close_loader(tgt_iter)

    def _train_phase(self, model: torch.nn.Module, schedule: Schedule, bar: tqdm, src_iter, tgt_iter) -> None:
        cfg, phase = self.cfg, schedule.phase
        optimizer = self._make_optimizer(phase)
        use_scaler = cfg.train.amp == "fp16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
            if self.scaler_state and use_scaler:
                scaler.load_state_dict(self.scaler_state)
            self.optimizer_state = self.scaler_state = None
        model.train()
        schedule.start(self)
        if self._pending_eval and self._after_step(phase, optimizer, scaler):  # stopped inside that evaluation
            return
        self.stop.sync()  # a stop on any rank while the loaders were built
        t_last = time.time()
        logs = self._logs = LogAccumulator()
        if self._log_state:  # resumed between two log records: the steps before the stop count
            logs.load_state_dict(self._log_state)
            self._log_state = None
        self._data_wait_s = 0.0
        while not schedule.ended(self.iter):
            if self._stop_after is not None and self.step >= self._stop_after:
                self.save("last", optimizer, scaler)
                raise _StopRequested()
            if self.stop.seen() is not None:  # arrived while the loaders were built, or in a skipped step
                self.save("last", optimizer, scaler)
                self.stop.check(True)
            self.stop.in_step, self.stop.flags_sent = True, False  # a stop from here on saves after this step
            lr = self._set_lr(optimizer, phase)
            batch_src = {k: v.to(self.device, non_blocking=True) for k, v in self._next(src_iter, optimizer, scaler).items()}
            optimizer.zero_grad(set_to_none=True)
            snapshot = self.guard.snapshot()
            with self._autocast():
                batch_tgt = None
                if schedule.uses_target:
                    batch_tgt = {k: v.to(self.device, non_blocking=True)
                                 for k, v in self._next(tgt_iter, optimizer, scaler).items()}
                result = schedule.step(self, model, batch_src, batch_tgt)
            self.data_pos += 1  # both loaders drew one batch
            if not self._backward_and_step(result.loss, optimizer, scaler):
                self.stop.in_step = False
                self.guard.restore(snapshot)  # a skipped step leaves no trace but its consumed batch
                if self.bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{self.bad_steps} non-finite steps in a row at step {self.step} (train.max_bad_steps); "
                        f"{last_good(self)}")
                continue
            schedule.after_step(self)
            self.iter += 1
            self.step += 1
            self.stop.in_step = False
            logs.add(result.logs)
            if self.step % cfg.train.log_every == 0 or self.iter == phase.iters:
                t_last = log_record(self, phase, lr, logs, bar, t_last)
            if self._after_step(phase, optimizer, scaler):
                return

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
            evaluate_and_maybe_best(self, optimizer, scaler)
        if last_of_phase:
            self.phase_idx += 1
            self.iter = 0
            self.save("last", optimizer, scaler)
            self.stop.check(last_of_phase)
            return True
        elif self.step % cfg.train.checkpoint_every == 0:
            self.save("last", optimizer, scaler)
        if self.stop.seen() is not None:
            if self.step % cfg.train.checkpoint_every != 0:
                self.save("last", optimizer, scaler)
            self.stop.check(True)
        return False

    def _backward_and_step(self, loss: torch.Tensor, optimizer, scaler) -> bool:
        """Backward and step unless the loss or a gradient is not finite (then skip and count)."""
        return backward_and_step(self, loss, optimizer, scaler)

def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          label_cache: Path | None = None) -> dict:
    """Train according to ``cfg`` into ``run_dir``; returns the final metrics (``quiet``: with --resume).

    ``label_cache``: a directory where round-0 static pseudo labels are shared between runs
    that start from the same checkpoint (see ``Trainer._shared_round_labels``).
    """
    from . import distributed

    determinism = determinism_settings()
    try:
        trainer = Trainer(cfg, Path(run_dir), resume=resume, overwrite=overwrite, quiet=quiet, label_cache=label_cache)
        return trainer.fit()
    finally:  # also on error: leave the process group so that the other ranks do not wait for this one
        distributed.shutdown()
        restore_determinism(determinism)  # train.deterministic is process-wide: the next run starts clean


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method.name}-{stamp}-{os.getpid()}"
