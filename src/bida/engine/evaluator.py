"""Evaluations of a run: target val after steps (and ``best.pt``), the final metrics.

The evaluation itself (:meth:`~bida.engine.train.Trainer._evaluate_split`) stays with the
loop; these decide when it runs, what is logged and what ``metrics.json`` holds: target val
(the top-level figures), target test once on the final model, and source val.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..config import target_test_split
from ..data.datasets import build_eval_dataset
from ..errors import DataError
from .inference import majority_collapse, markdown_table, write_metrics
from .runlog import log_has
from .stop import _Stopping


def evaluate_source_val(trainer) -> dict | None:
    """Source-val metrics of the final model, for runs that trained a source stage.

    A low source-val mIoU means the model did not learn; a high one with a low target
    mIoU means it did not transfer. None when ``data.source.val_split`` is not set.
    """
    s = trainer.cfg.data.source
    if not s.val_split or not any(p.kind == "source" for p in trainer.phases):
        return None
    try:
        ds = build_eval_dataset(trainer.cfg, trainer.src, s.val_split)
    except DataError as err:  # optional: a source without that split is not an error
        trainer._info(f"source val not evaluated (data.source.val_split={s.val_split}): {err}")
        return None
    try:
        m = trainer._evaluate_split(ds, stoppable=True)
    except _Stopping:
        trainer.stop.check(True)
    except DataError as err:
        raise trainer._bad_file(err) from None
    if not log_has(trainer.run_dir, lambda rec: rec.get("step") == trainer.step and "eval/source_mIoU" in rec):
        trainer.logger.log({"eval/source_mIoU": m["mIoU"], "eval/source_pixel_acc": m["pixel_acc"]}, trainer.step)
    trainer._info(f"step {trainer.step}: source val mIoU {100 * m['mIoU']:.2f} (how well the source was learnt)")
    return {"mIoU": m["mIoU"], "pixel_acc": m["pixel_acc"], "per_class_iou": m["per_class_iou"],
            "split": s.val_split}


def evaluate_and_maybe_best(trainer, optimizer, scaler) -> None:
    trainer._pending_eval = True  # saved with a stop: --resume evaluates this step first
    try:
        metrics = trainer.evaluate_target(stoppable=True)
    except _Stopping:
        trainer.save("last", optimizer, scaler)
        trainer.stop.check(True)
    except DataError as err:  # saved with the pending evaluation: --resume evaluates again
        raise trainer._bad_file(err, optimizer, scaler) from None
    trainer._pending_eval = False
    if metrics is None:
        return
    trainer.logger.log({"eval/mIoU": metrics["mIoU"], "eval/pixel_acc": metrics["pixel_acc"],
                     **{f"eval/iou/{k}": v for k, v in metrics["per_class_iou"].items() if v is not None}}, trainer.step)
    trainer._info(f"step {trainer.step}: target val mIoU {100 * metrics['mIoU']:.2f}")
    if metrics["mIoU"] > trainer.best_miou:
        trainer.best_miou, trainer.best_step = metrics["mIoU"], trainer.step
        trainer.save("best", optimizer, scaler)


def finish(trainer) -> dict:
    try:  # last.pt holds the end of the last phase: a stop here evaluates again on --resume
        metrics = trainer.evaluate_target(stoppable=True) or {
            "mIoU": float("nan"), "per_class_iou": {}, "pixel_acc": float("nan")}
    except _Stopping:
        trainer.stop.check(True)
    except DataError as err:
        raise trainer._bad_file(err) from None
    metrics = {k: v for k, v in metrics.items() if k != "confusion"} | {"confusion": metrics.get("confusion")}
    metrics["split"] = trainer.cfg.data.target.val_split  # the top-level figures: target val, as always
    try:
        test = trainer.evaluate_test(stoppable=True)
    except _Stopping:
        trainer.stop.check(True)
    except DataError as err:
        raise trainer._bad_file(err) from None
    if test is not None:
        metrics["test"] = test
        trainer._info(f"step {trainer.step}: target test mIoU {100 * test['mIoU']:.2f} "
                   f"(split '{test['split']}', last checkpoint; nothing selected on it)")
    source_val = evaluate_source_val(trainer)
    if source_val is not None:
        metrics["source_val"] = source_val
    metrics["checkpoint"] = "last"
    metrics["step"] = trainer.step
    metrics["method"] = trainer.cfg.method.name
    metrics["best"] = {"mIoU": trainer.best_miou, "step": trainer.best_step,
                       "note": "selected on target val (as the official code does); report 'last' as the main number"}
    if trainer.is_main and metrics.get("confusion") and (warn := majority_collapse(
            torch.tensor(metrics["confusion"]), trainer.classes.names, f"target {metrics['split']}")):
        tqdm.write(warn)  # even with --quiet, as the random-weights warning
    if trainer.is_main:
        write_metrics(metrics, trainer.run_dir / "metrics.json")
        trainer._info(markdown_table(metrics))
        if "test" in metrics:
            trainer._info(markdown_table(metrics["test"], f"target {metrics['test']['split']}"))
    trainer.dist.barrier()
    return metrics


def evaluate_split(trainer, ds, stoppable: bool, evaluate) -> dict:
    """Metrics of ``ds``, each rank evaluating its shard with BN statistics averaged over ranks.

    ``stoppable``: a stop on any rank abandons the evaluation on every rank
    (:class:`_Stopping`); every rank polls as often as the longest shard has images.
    ``evaluate``: :func:`bida.engine.inference.evaluate`, as the loop calls it.
    """
    trainer._average_bn_statistics()
    polls, n_polls = 0, -(-len(ds) // trainer.world_size)

    def check_stop() -> None:
        nonlocal polls
        polls += 1
        trainer.stop.poll()

    def reduce(conf: torch.Tensor) -> torch.Tensor:
        while stoppable and polls < n_polls:  # a shorter shard: the polls it did not make
            check_stop()
        return trainer.dist.all_reduce_sum(conf)

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.cfg.train.amp)
    was_training, trainer.stop.polling = trainer.model.training, stoppable
    try:
        return evaluate(trainer.model, trainer.dist.shard(ds), trainer.cfg.eval, trainer.classes.names,
                        trainer.cfg.data.eval_classes, quiet=trainer.cfg.train.quiet or not trainer.is_main,
                        ignore_index=trainer.classes.ignore_index, device=trainer.device, autocast_dtype=amp,
                        confusion_hook=reduce, check_stop=check_stop if stoppable else None)
    finally:
        trainer.stop.polling = False
        trainer.model.train(was_training)


def evaluate_target(trainer, stoppable: bool = False) -> dict | None:
    """Target-val metrics (None without a val split); see :meth:`_evaluate_split`."""
    t = trainer.cfg.data.target
    if not t.val_split:
        return None
    return trainer._evaluate_split(build_eval_dataset(trainer.cfg, trainer.tgt, t.val_split), stoppable)


def evaluate_test(trainer, stoppable: bool = False) -> dict | None:
    """Target-test metrics (None without a test split, :func:`~bida.config.target_test_split`).

    Called once, on the final model, after every phase: no training step, pseudo label,
    best.pt or other choice ever reads the test images.
    """
    split = target_test_split(trainer.cfg)
    if not split:
        return None
    m = trainer._evaluate_split(build_eval_dataset(trainer.cfg, trainer.tgt, split), stoppable)
    return m | {"split": split, "checkpoint": "last"}
