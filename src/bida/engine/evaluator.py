"""Evaluations of a run (:class:`Evaluator`): target val after steps (and ``best.pt``), the final metrics.

It decides when an evaluation runs, what is logged and what ``metrics.json`` holds: target val
(the top-level figures), target test once on the final model, and source val. Each rank
evaluates its shard of a split (:func:`bida.engine.inference.evaluate`); the confusion
matrices are summed over ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..config import Config, target_test_split
from ..data import datasets
from ..errors import DataError
from . import inference
from .checkpointer import Checkpointer
from .distributed import BatchNormAverager, DistContext
from .runlog import RunLog, log_has
from .schedules import Phase
from .state import RunState
from .stop import StopControl, _Stopping


class Evaluator:
    """The evaluations of one run.

    Args:
        cfg: the run's config (``train.eval_every``, ``eval``, the splits).
        model: the student (the uncompiled module). classes: the run's classes.
        src, tgt: the source and target domains. phases: the run's phases.
        state: the run's progress (best mIoU and step, the evaluation under way).
        checkpointer: writes ``best.pt`` and the checkpoint of a stop inside an evaluation.
        log: the run log. dist, bn, stop: the process group, its BatchNorm averaging, the stop control.
        device: where the model runs. info: prints a progress message.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, classes, src, tgt, phases: list[Phase],
                 state: RunState, checkpointer: Checkpointer, log: RunLog, dist: DistContext,
                 bn: BatchNormAverager, stop: StopControl, device: torch.device, info: Callable[[str], None]):
        self.cfg, self.model, self.classes, self.src, self.tgt, self.phases = cfg, model, classes, src, tgt, phases
        self.state, self.checkpointer, self.log = state, checkpointer, log
        self.dist, self.bn, self.stop, self.device, self.info = dist, bn, stop, device, info

    @property
    def run_dir(self) -> Path:
        return self.checkpointer.run_dir

    def due(self, step: int, last_of_phase: bool) -> bool:
        """Whether target val is evaluated after ``step``: every ``train.eval_every`` and at each phase's end."""
        return step % self.cfg.train.eval_every == 0 or last_of_phase

    def split(self, ds, stoppable: bool) -> dict:
        """Metrics of ``ds``, each rank evaluating its shard with BN statistics averaged over ranks.

        ``stoppable``: a stop on any rank abandons the evaluation on every rank
        (:class:`_Stopping`); every rank polls as often as the longest shard has images.
        """
        self.bn.average()
        polls, n_polls = 0, -(-len(ds) // self.dist.world_size)

        def check_stop() -> None:
            nonlocal polls
            polls += 1
            self.stop.poll()

        def reduce(conf: torch.Tensor) -> torch.Tensor:
            while stoppable and polls < n_polls:  # a shorter shard: the polls it did not make
                check_stop()
            return self.dist.all_reduce_sum(conf)

        cfg = self.cfg
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        was_training, self.stop.polling = self.model.training, stoppable
        try:
            return inference.evaluate(self.model, self.dist.shard(ds), cfg.eval, self.classes.names,
                                      cfg.data.eval_classes, quiet=cfg.train.quiet or self.dist.rank != 0,
                                      ignore_index=self.classes.ignore_index, device=self.device,
                                      autocast_dtype=amp, confusion_hook=reduce,
                                      check_stop=check_stop if stoppable else None)
        finally:
            self.stop.polling = False
            self.model.train(was_training)

    def target(self, stoppable: bool = False) -> dict | None:
        """Target-val metrics (None without a val split); see :meth:`split`."""
        t = self.cfg.data.target
        if not t.val_split:
            return None
        return self.split(datasets.build_eval_dataset(self.cfg, self.tgt, t.val_split), stoppable)

    def test(self, stoppable: bool = False) -> dict | None:
        """Target-test metrics (None without a test split, :func:`~bida.config.target_test_split`).

        Called once, on the final model, after every phase: no training step, pseudo label,
        best.pt or other choice ever reads the test images.
        """
        split = target_test_split(self.cfg)
        if not split:
            return None
        m = self.split(datasets.build_eval_dataset(self.cfg, self.tgt, split), stoppable)
        return m | {"split": split, "checkpoint": "last"}

    def source_val(self) -> dict | None:
        """Source-val metrics of the final model, for runs that trained a source stage.

        A low source-val mIoU means the model did not learn; a high one with a low target
        mIoU means it did not transfer. None when ``data.source.val_split`` is not set.
        """
        s, step = self.cfg.data.source, self.state.step
        if not s.val_split or not any(p.kind == "source" for p in self.phases):
            return None
        try:
            ds = datasets.build_eval_dataset(self.cfg, self.src, s.val_split)
        except DataError as err:  # optional: a source without that split is not an error
            self.info(f"source val not evaluated (data.source.val_split={s.val_split}): {err}")
            return None
        try:
            m = self.split(ds, stoppable=True)
        except _Stopping:
            self.stop.check(True)
        except DataError as err:
            raise self.checkpointer.bad_file(err) from None
        if not log_has(self.run_dir, lambda rec: rec.get("step") == step and "eval/source_mIoU" in rec):
            self.log.log({"eval/source_mIoU": m["mIoU"], "eval/source_pixel_acc": m["pixel_acc"]}, step)
        self.info(f"step {step}: source val mIoU {100 * m['mIoU']:.2f} (how well the source was learnt)")
        return {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"], "per_class_iou": m["per_class_iou"],
                "split": s.val_split}

    def after_step(self, optimizer: torch.optim.Optimizer, scaler) -> None:
        """Target val after the current step: logged, and ``best.pt`` when it is the best so far."""
        state = self.state
        state.pending_eval = True  # saved with a stop: --resume evaluates this step first
        try:
            metrics = self.target(stoppable=True)
        except _Stopping:
            self.checkpointer.save("last", optimizer, scaler)
            self.stop.check(True)
        except DataError as err:  # saved with the pending evaluation: --resume evaluates again
            raise self.checkpointer.bad_file(err, optimizer, scaler) from None
        state.pending_eval = False
        if metrics is None:
            return
        self.log.log({"eval/mIoU": metrics["mIoU"], "eval/pixel_acc": metrics["pixel_acc"],
                      **{f"eval/iou/{k}": v for k, v in metrics["per_class_iou"].items() if v is not None}}, state.step)
        self.info(f"step {state.step}: target val mIoU {100 * metrics['mIoU']:.2f}")
        if metrics["mIoU"] > state.best_miou:
            state.best_miou, state.best_step = metrics["mIoU"], state.step
            self.checkpointer.save("best", optimizer, scaler)

    def finish(self) -> dict:
        """The final metrics (target val, test, source val, best), written to ``metrics.json``."""
        try:  # last.pt holds the end of the last phase: a stop here evaluates again on --resume
            metrics = self.target(stoppable=True) or {
                "mIoU": float("nan"), "per_class_iou": {}, "pixel_acc": float("nan")}
        except _Stopping:
            self.stop.check(True)
        except DataError as err:
            raise self.checkpointer.bad_file(err) from None
        metrics = {k: v for k, v in metrics.items() if k != "confusion"} | {"confusion": metrics.get("confusion")}
        metrics["split"] = self.cfg.data.target.val_split  # the top-level figures: target val, as always
        try:
            test = self.test(stoppable=True)
        except _Stopping:
            self.stop.check(True)
        except DataError as err:
            raise self.checkpointer.bad_file(err) from None
        state = self.state
        if test is not None:
            metrics["test"] = test
            self.info(f"step {state.step}: target test mIoU {100 * test['mIoU']:.2f} "
                      f"(split '{test['split']}', last checkpoint; nothing selected on it)")
        source_val = self.source_val()
        if source_val is not None:
            metrics["source_val"] = source_val
        metrics["checkpoint"] = "last"
        metrics["step"] = state.step
        metrics["method"] = self.cfg.method.name
        metrics["best"] = {"mIoU": state.best_miou, "step": state.best_step,
                           "note": "selected on target val (as the official code does); report 'last' as the main number"}
        if self.dist.rank == 0:
            if metrics.get("confusion") and (warn := inference.majority_collapse(
                    torch.tensor(metrics["confusion"]), self.classes.names, f"target {metrics['split']}")):
                tqdm.write(warn)  # even with --quiet, as the random-weights warning
            inference.write_metrics(metrics, self.run_dir / "metrics.json")
            self.info(inference.markdown_table(metrics))
            if "test" in metrics:
                self.info(inference.markdown_table(metrics["test"], f"target {metrics['test']['split']}"))
        self.dist.barrier()
        return metrics
