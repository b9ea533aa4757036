"""The training loop (:class:`Trainer`): source-only stage and self-training rounds, resumable exactly.

A run is a list of phases: ``source`` (``train.iters`` iterations of source CE) and, for
the adaptation methods, ``train.rounds`` rounds of ``train.iters_per_round`` iterations.
Each phase builds a fresh optimizer (``train.optimizer``) with its own poly schedule; each round first
writes the static pseudo labels of the target training set with the current model and
halves the base LR of the previous round. With ``train.schedule: teacher`` the adaptation
is one phase of ``train.iters`` mean-teacher iterations (:mod:`bida.method.teacher`) after an
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

from ..checkpoint import remove_stale_temp_files
from ..config import Config, check_class_ids, dump_config, load_config
from ..data.datasets import check_same_classes, close_loader, resolve_domain
from ..data.rare_class import write_class_pixel_counts
from ..errors import DataError, Interrupted
from ..progress import progress_bar
from . import distributed, guard
from .checkpointer import Checkpointer
from .class_weights import source_class_weights
from .distributed import BatchNormAverager
from .evaluator import Evaluator
from .guard import StepGuard, TrainingDiverged
from .optim import phase_optimizer, set_lr
from .round_labels import RoundLabels
from .run_dir import RunLock, check_run_dir, create_run_dir
from .runlog import RunLog, info_printer
from .schedules import Phase, Schedule, build_schedule, phase_base_lr, plan_phases
from .setup import (build_calibration, build_mean_teacher, build_student, check_batch_splits, check_data,
                    check_rare_class_sampling, determinism_settings, deterministic_algorithms, init_weights,
                    pick_device, restore_determinism, seed_everything, seed_rank_stream, write_run_json)
from .state import RunState
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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """One training run: :meth:`fit` runs its phases, each a :class:`~bida.engine.schedules.Schedule`.

    Its parts are built once, here, from what each needs: the progress (:attr:`state`, a
    :class:`~bida.engine.state.RunState`), the stop control, the run log, the checkpointer,
    the evaluator and the round labels. One iteration reads top to bottom in
    :meth:`_train_phase`: learning rate, batches, the schedule's step (forward and losses),
    backward, unscale, the finiteness check, the optimizer step, the schedule's after-step,
    a log record, then evaluation and checkpoint (:meth:`_evaluate_and_save`).

    Nothing is written to ``run_dir`` before every check of config and data passed.
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, label_cache: Path | None = None):
        self.run_dir = Path(run_dir)
        self.state = RunState()
        self.stop = StopControl(self.run_dir, self.state)
        self.stop.setting_up, self.stop.run_written = True, resume
        self.stop.install()
        try:
            self._open(cfg, resume, overwrite, quiet, label_cache)
        finally:  # fit() installs them again: a Trainer that is never fitted leaves no handler behind
            self.stop.restore()
            self.stop.setting_up = False

    def _open(self, cfg: Config, resume: bool, overwrite: bool, quiet: bool, label_cache: Path | None) -> None:
        """Check the run directory, join the process group, lock a resumed run, then :meth:`_build`."""
        check_run_dir(self.run_dir, resume, overwrite)
        if resume:
            cfg = load_config(self.run_dir / "config.yaml", ["train.quiet=true"] if quiet else [])
        self.cfg = cfg
        self.dist = distributed.init_from_env()
        self.device = self.dist.device if self.dist.device is not None else pick_device()
        self.is_main = self.dist.rank == 0
        self.stop.connect(self.dist)
        self.lock = RunLock(self.run_dir)
        if resume and self.is_main:  # before anything is read from the run: a live run is refused
            self.lock.acquire()
        try:
            self._build(cfg, resume, overwrite, label_cache)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, cfg: Config, resume: bool, overwrite: bool, label_cache: Path | None) -> None:
        """Domains, model, method state and the run's parts; then the resumed state, or the
        initial weights and a new run directory."""
        dist, run_dir = self.dist, self.run_dir
        check_batch_splits(cfg, dist.world_size)  # before the run dir exists
        seed_everything(cfg.seed)
        deterministic_algorithms(cfg.train.deterministic)
        self.src, self.tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
        self.classes = check_same_classes(self.src, self.tgt)
        num_classes = self.classes.num_classes
        check_class_ids("data.eval_classes", cfg.data.eval_classes, num_classes)  # before the run dir exists
        if cfg.data.check:
            check_data(cfg, self.src, self.tgt, num_classes)
        # A resumed run was checked when it started (and keeps its counts in the run directory).
        class_pixels = None if resume else check_rare_class_sampling(cfg, self.src, self.classes, dist)
        self.model = build_student(cfg, num_classes, dist, self.device)
        self.phases: list[Phase] = plan_phases(cfg)
        self.calibration = build_calibration(cfg, num_classes, self.model.feature_dim, self.device)
        self.guard = StepGuard(self.model, self.calibration)
        self.mean_teacher = build_mean_teacher(cfg, num_classes, self.device, dist.rank, dist.world_size)
        info = info_printer(self.is_main and not cfg.train.quiet)
        self.log = RunLog(run_dir, dist)
        self.bn = BatchNormAverager(dist, self.model)
        self.checkpointer = Checkpointer(run_dir, cfg, self.classes, self.state, self.model, self.calibration,
                                         self.mean_teacher, self.log, dist, self.bn, self.stop, info)
        self.stop.connect(dist, self.checkpointer.kept)
        self.optimizer_state: dict | None = None  # the resumed phase's optimizer and scaler
        self.scaler_state: dict | None = None
        # A run stopped before its first checkpoint restarts from step 0 with its saved config.
        resumed = self.checkpointer.find_resume(self.device, self.phases[0].kind) if resume else None
        if resume and self.is_main:  # a writer killed mid-write left its temporary file
            for d in (run_dir, run_dir / "checkpoints"):
                for tmp in remove_stale_temp_files(d):
                    info(f"removed {tmp}, left by a process killed while writing it")
        if resumed is not None:
            self.optimizer_state, self.scaler_state = self.checkpointer.load(*resumed)
            self._say_resumed()
        else:
            init_weights(self.model, cfg, self.is_main, info)
            seed_rank_stream(dist, cfg.seed)
            self.stop.deferring = True  # a stop signal waits until the run directory is complete
            if self.is_main and not resume:  # every input is valid: only now touch the disk
                self.lock = create_run_dir(run_dir, overwrite)
            dist.barrier()
            if self.is_main and resume:
                self.checkpointer.truncate_log(0)
                (run_dir / "checkpoints").mkdir(exist_ok=True)
            elif self.is_main:
                dump_config(cfg, run_dir / "config.yaml")
                write_run_json(run_dir, self.device, dist.world_size, self.classes)
                if class_pixels is not None:  # counted before the run directory existed
                    write_class_pixel_counts(*class_pixels, run_dir)
            self.stop.run_written, self.stop.deferring = True, False
            if self.stop.signal is not None:
                self.stop.exiting = True
                raise Interrupted(self.stop.setup_message(self.stop.signal), self.stop.signal)
        if self.is_main and resume and not (run_dir / "run.json").is_file():
            write_run_json(run_dir, self.device, dist.world_size, self.classes)  # stopped between config and run.json
        self.log.open()
        # loss.class_weights (None: every class weighs 1), from the source labels' class pixels
        self.class_weights = source_class_weights(cfg, self.src, num_classes, run_dir, self.stop, self.device)
        self.evaluator = Evaluator(cfg, self.model, self.classes, self.src, self.tgt, self.phases, self.state,
                                   self.checkpointer, self.log, dist, self.bn, self.stop, self.device, info)
        self.round_labels = RoundLabels(run_dir, cfg, self.model, self.classes, self.src, self.tgt, self.log,
                                        self.checkpointer, dist, self.stop, self.device, info, label_cache)
        self.total_steps = sum(p.iters for p in self.phases)

    def _say_resumed(self) -> None:
        """One line (rank 0, even with --quiet): where a resumed run goes on."""
        s, phases = self.state, self.phases
        if s.phase < len(phases):
            where = f"phase {s.phase + 1} of {len(phases)}: {phases[s.phase].kind}, iteration {s.iter} of {phases[s.phase].iters}"
        else:
            where = "every phase done: the final evaluation"
        if self.is_main:
            print(f"bida: resuming from step {s.step} ({where}) in {self.run_dir}", flush=True)

    def _autocast(self):
        amp = self.cfg.train.amp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def close(self) -> None:
        """Release the run (its lock and log files) without training: what :meth:`fit` does when it ends."""
        self.log.close()
        self.lock.release()

    def fit(self, stop_after: int | None = None) -> dict | None:
        """Run (or continue) every phase; return the final target-val metrics.

        ``stop_after``: stop at that global step with a checkpoint, as a pre-empted job would
        (returns None; continue with ``--resume``).
        """
        self.stop.install()
        cfg, state = self.cfg, self.state
        bar = progress_bar(total=self.total_steps, initial=state.step, disable=cfg.train.quiet or not self.is_main,
                           desc=cfg.method.name)
        # all_ranks: every rank decides before rank 0 can write the file (save() holds a barrier).
        no_checkpoint = not self.checkpointer.path("last").is_file()
        if self.dist.all_ranks(no_checkpoint) and state.phase < len(self.phases):
            # Step 0 is a checkpoint too: a run stopped before its first periodic one resumes.
            phase = self.phases[state.phase]
            self.checkpointer.save("last", phase_optimizer(self.model, cfg.train, phase_base_lr(cfg, phase)),
                                   torch.amp.GradScaler(self.device.type, enabled=False))
        try:
            while state.phase < len(self.phases):
                self.stop.sync()
                self.stop.check(True)  # the state here is the checkpoint of the phase boundary
                phase = self.phases[state.phase]
                # DDP per phase: it must know whether the losses use the contrast features. The teacher
                # phase forwards the student several times a step, which DDP does not allow: its
                # gradients are averaged after the backward instead (_train_phase).
                average_gradients = phase.kind == "teacher" and self.dist.enabled
                model = (self.model if average_gradients else
                         self.dist.wrap(self.model, uses_features=phase.kind != "source" and cfg.method.name == "bida"))
                model = compile_for_training(model, cfg.train)
                self._run_phase(model, phase, bar, average_gradients, stop_after)
            metrics = self.evaluator.finish()
        except _StopRequested:
            return None
        finally:
            bar.close()
            self.close()
            self.stop.restore()  # last: a signal during this clean-up is still ignored
        return metrics

    def _run_phase(self, model: torch.nn.Module, phase: Phase, bar, average_gradients: bool,
                   stop_after: int | None) -> None:
        label_dir = self.round_labels.for_phase(phase, self.state.step)
        source_iters = sum(p.iters for p in self.phases if p.kind == "source")
        schedule = build_schedule(phase, self.cfg, self.model, self.dist, self.classes.num_classes, self.state,
                                  source_iters, self.calibration, self.mean_teacher, label_dir, self.class_weights)
        src_iter, tgt_iter = schedule.build_loaders(self.src, self.tgt, self.device, self.stop, self.run_dir,
                                                    self.classes.names)
        try:
            self._train_phase(model, schedule, bar, src_iter, tgt_iter, average_gradients, stop_after)
        finally:  # workers ignore SIGTERM: they must be stopped through the loader, on every exit path
            close_loader(src_iter)
            close_loader(tgt_iter)

    def _train_phase(self, model: torch.nn.Module, schedule: Schedule, bar, src_iter, tgt_iter,
                     average_gradients: bool, stop_after: int | None) -> None:
        """The iterations of one phase, from ``state.iter`` to its end.

        ``model``: the module trained (wrapped in DDP, compiled); ``average_gradients``: the
        teacher phase under torchrun (no DDP: the gradients are averaged here).
        """
        cfg, state, phase, stop, checkpointer = self.cfg, self.state, schedule.phase, self.stop, self.checkpointer
        optimizer = phase_optimizer(self.model, cfg.train, schedule.base_lr)
        use_scaler = cfg.train.amp == "fp16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
            if self.scaler_state and use_scaler:
                scaler.load_state_dict(self.scaler_state)
            self.optimizer_state = self.scaler_state = None
        model.train()
        schedule.start()
        self.bn.in_sync = self.bn.in_sync or schedule.keeps_bn_in_sync
        if state.pending_eval and self._evaluate_and_save(phase, optimizer, scaler):  # stopped inside that evaluation
            return
        stop.sync()  # a stop on any rank while the loaders were built
        self.log.start_phase()
        while not schedule.ended(state.iter):
            if stop_after is not None and state.step >= stop_after:
                checkpointer.save("last", optimizer, scaler)
                raise _StopRequested()
            if stop.seen() is not None:  # arrived while the loaders were built, or in a skipped step
                checkpointer.save("last", optimizer, scaler)
                stop.check(True)
            stop.in_step, stop.flags_sent = True, False  # a stop from here on saves after this step

            lr = schedule.lr(state.iter)  # learning rate of this iteration
            set_lr(optimizer, lr)

            # batches, then forward and losses: the method's step
            batch_src = _to(self._next(src_iter, optimizer, scaler), self.device)
            optimizer.zero_grad(set_to_none=True)
            snapshot = self.guard.snapshot()
            with self._autocast():
                batch_tgt = _to(self._next(tgt_iter, optimizer, scaler), self.device) if schedule.uses_target else None
                result = schedule.step(model, batch_src, batch_tgt)
            state.data_pos += 1  # both loaders drew one batch

            # backward (always, so every rank takes part in DDP's all-reduce), then unscale
            scaler.scale(result.loss).backward()
            grads = guard.gradients(optimizer)
            if average_gradients:  # before unscaling, as DDP averages in the backward: every
                self.dist.average_gradients(grads)  # rank's fp16 scaler sees the same gradients
            if scaler.is_enabled():
                scaler.unscale_(optimizer)

            # finiteness: one device flag (loss, gradients, state the forward changed), read once
            if not stop.agree_on_step(guard.finite_flag(result.loss, grads, self.guard.changed_state())):
                if scaler.is_enabled():  # fp16: no step is taken; the scale drops when the gradients overflowed
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    state.bad_steps += 1
                    self.log.log({"numerics/skipped_step": 1, "numerics/bad_steps_in_row": state.bad_steps}, state.step)
                stop.in_step = False
                self.guard.restore(snapshot)  # a skipped step leaves no trace but its consumed batch
                if state.bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{state.bad_steps} non-finite steps in a row at step {state.step} (train.max_bad_steps); "
                        f"{checkpointer.last_good()}")
                continue

            # optimizer step, then what follows it (the EMA teacher, the target stem)
            scaler.step(optimizer)
            scaler.update()
            state.bad_steps = 0
            schedule.after_step()
            state.iter += 1
            state.step += 1
            stop.in_step = False

            # log, evaluate, save
            self.log.add(result.logs)
            if state.step % cfg.train.log_every == 0 or state.iter == phase.iters:
                self.log.record(state.step, phase, lr, bar)
            if self._evaluate_and_save(phase, optimizer, scaler):
                return

    def _next(self, batches, optimizer, scaler) -> dict:
        """The next batch; a bad file met mid-run gives one line naming it and a checkpoint."""
        start = time.perf_counter()
        try:
            return next(batches)
        except DataError as err:
            bad = err
        finally:  # host time spent waiting for the loaders (logged as time/data_s)
            self.log.data_wait_s += time.perf_counter() - start
        raise self.checkpointer.bad_file(bad, optimizer, scaler)  # the batch was not consumed: resume retries it

    def _evaluate_and_save(self, phase: Phase, optimizer, scaler) -> bool:
        """Evaluation, checkpoint and stop check after step ``state.step``; True when the phase ended."""
        cfg, state, checkpointer = self.cfg, self.state, self.checkpointer
        last_of_phase = state.iter == phase.iters
        if self.evaluator.due(state.step, last_of_phase):
            self.evaluator.after_step(optimizer, scaler)
        if last_of_phase:
            state.phase += 1
            state.iter = 0
            checkpointer.save("last", optimizer, scaler)
            self.stop.check(last_of_phase)
            return True
        elif state.step % cfg.train.checkpoint_every == 0:
            checkpointer.save("last", optimizer, scaler)
        if self.stop.seen() is not None:
            if state.step % cfg.train.checkpoint_every != 0:
                checkpointer.save("last", optimizer, scaler)
            self.stop.check(True)
        return False


def train(cfg: Config, run_dir: str | Path, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          label_cache: Path | None = None) -> dict:
    """Train according to ``cfg`` into ``run_dir``; returns the final metrics (``quiet``: with --resume).

    ``label_cache``: a directory where round-0 static pseudo labels are shared between runs
    that start from the same checkpoint (see :meth:`~bida.engine.round_labels.RoundLabels.shared`).
    """
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
