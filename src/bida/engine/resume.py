"""A run's checkpoint state and exact resume.

:func:`checkpoint_state` is everything stateful of a run (model, optimizer, scaler, phase,
iteration, data position, calibration, mean teacher, every rank's generators, the partial
log sums); :func:`resume_checkpoint` finds the checkpoint a resume starts from (``last.pt``,
else ``last.prev.pt``, else step 0 when nothing was trained) and :func:`load_resume` restores
it. :func:`last_good` names the checkpoint a resume would start from.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, rotate_checkpoint, save_checkpoint
from ..config import to_dict
from ..errors import CheckpointError, Interrupted, RunDirError
from ..models import model_state_for_checkpoint
from ..models.weights import load_model_weights
from .guard import TrainingDiverged, _first_non_finite
from .runlog import LOG_DISCARDED, logged_steps, truncate_log


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain data (loadable with weights_only).

    With CUDA, also the generator of the current device (``cuda``): dropout and stochastic
    depth on a GPU draw from it, not from the CPU generator.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (the CUDA one on the current device, when both have CUDA).

    The tensors may come from a checkpoint loaded onto a GPU (``map_location``): the
    generators take host tensors.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def checkpoint_state(trainer, optimizer: torch.optim.Optimizer, scaler, rng_ranks: list[dict]) -> dict:
    return {
        "model": model_state_for_checkpoint(trainer.model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "phase": trainer.phase_idx, "iter": trainer.iter, "step": trainer.step, "data_pos": trainer.data_pos,
        "pending_eval": trainer._pending_eval,
        "best_miou": trainer.best_miou, "best_step": trainer.best_step, "bad_steps": trainer.bad_steps,
        "calibration": trainer.calibration.state_dict() if trainer.calibration is not None else {},
        "mean_teacher": trainer.mean_teacher.state_dict() if trainer.mean_teacher is not None else {},
        "rng": rng_ranks[0],
        "rng_ranks": rng_ranks,  # every rank's generators (each draws its own dropout masks)
        "config": to_dict(trainer.cfg),
        "num_classes": trainer.num_classes,
        "class_names": list(trainer.classes.names),
        "palette": [list(c) for c in trainer.classes.palette],  # bida predict colours with it
        "method": trainer.cfg.method.name,
        # the partial sums of the next log record: a resumed run averages the same steps
        "log_accumulator": trainer._logs.state_dict() if trainer._logs is not None else (trainer._log_state or {}),
    }


def last_good(trainer) -> str:
    """Which checkpoint a resume would start from: one that loads, matches its checksum
    and holds only finite model and calibration tensors."""
    if trainer._good is not None and trainer._good[0].is_file():
        return f"the last good checkpoint is {trainer._good[0]} (step {trainer._good[1]})"
    for path in (trainer._ckpt("last"), trainer._ckpt("last.prev")):
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})}) is None:
            return f"the last good checkpoint is {path} (step {state.get('step')})"
    return "no good checkpoint was saved (start again with --overwrite)"


def resume_checkpoint(trainer) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its contents, or None to start from step 0.

    ``last.pt``, else (missing or damaged) the previous one, ``last.prev.pt``, saying so.
    Without either, a run that logged no trained step restarts from step 0, saying so; one
    that did is refused, and nothing is changed.
    """
    last, prev = trainer._ckpt("last"), trainer._ckpt("last.prev")
    why = None
    for path in (last, prev):
        if not path.is_file():
            why = why or f"{path.relative_to(trainer.run_dir)} is missing"
            continue
        try:
            state = load_checkpoint(path, map_location=trainer.device)
        except CheckpointError as err:
            why = why or f"{path.relative_to(trainer.run_dir)} cannot be used ({err})"
            continue
        bad = _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})})
        if bad is not None:  # written by an older bida, which checked less
            why = why or f"{path.relative_to(trainer.run_dir)} cannot be used ({bad} holds non-finite values)"
            continue
        trainer._good = (path, int(state["step"]))
        if path == prev:
            move_damaged(trainer, last)
            trainer.stop.say(f"bida: warning: {why}; resuming from the previous checkpoint {path} (step {state['step']})")
        return path, state
    trained = trained_evidence(trainer)
    if trained:
        raise RunDirError(f"cannot resume {trainer.run_dir}: {why} and there is no checkpoints/last.prev.pt, but "
                          f"{trained}; nothing was changed (put the run's checkpoint back as "
                          f"checkpoints/last.pt, or start again with --overwrite)")
    move_damaged(trainer, last)
    trainer.stop.say(f"bida: {why} and no step was trained yet: starting again from step 0 with the saved config")
    return None


def move_damaged(trainer, path: Path) -> None:
    """Keep a damaged checkpoint as ``<name>.damaged.pt`` (out of the way of the rotation)."""
    if trainer.is_main and path.is_file():
        os.replace(path, path.with_name(path.stem + ".damaged.pt"))


def trained_evidence(trainer) -> str | None:
    """What shows that this run trained steps (a restart from step 0 would lose them), or None."""
    logged = logged_steps(trainer.run_dir)
    if logged:
        return f"log.jsonl records training up to step {max(logged)}"
    if (trainer.run_dir / "metrics.json").is_file():
        return "metrics.json holds its final results"
    labels = trainer.run_dir / "pseudo_labels"
    if trainer.phases[0].kind == "source" and labels.is_dir() and any(labels.iterdir()):
        return "pseudo_labels/ holds labels of its trained model"  # a restart would reuse them
    return None


def load_resume(trainer, path: Path, state: dict) -> None:
    load_model_weights(trainer.model, path, checkpoint=state)
    trainer.phase_idx, trainer.iter, trainer.step = int(state["phase"]), int(state["iter"]), int(state["step"])
    trainer.data_pos = int(state.get("data_pos", trainer.step))
    trainer._pending_eval = bool(state.get("pending_eval", False))
    trainer.best_miou, trainer.best_step = float(state["best_miou"]), int(state["best_step"])
    trainer.bad_steps = int(state.get("bad_steps", 0))
    if trainer.calibration is not None and state.get("calibration"):
        trainer.calibration.load_state_dict(state["calibration"])
    if trainer.mean_teacher is not None and state.get("mean_teacher"):
        trainer.mean_teacher.load_state_dict(state["mean_teacher"], trainer.model)
    trainer.optimizer_state = state["optimizer"] if trainer.iter > 0 else None
    trainer.scaler_state = state.get("scaler") or None
    # This rank's own generators; a checkpoint of fewer ranks (or of an older bida) has
    # none for it, and it goes on with rank 0's stream.
    ranks = state.get("rng_ranks") or []
    set_rng_state(ranks[trainer.rank] if trainer.rank < len(ranks) else state["rng"])
    trainer._log_state = state.get("log_accumulator") or None
    truncate_run_log(trainer, trainer.step)


def save(trainer, name: str, optimizer, scaler, save_checkpoint) -> None:
    """Write ``checkpoints/<name>.pt``; never one that holds a non-finite tensor.

    Every rank calls it: BatchNorm statistics are averaged over ranks first (unless the
    teacher phase keeps them equal), so the file holds the model every rank goes on with
    (rank 0 writes it).
    ``save_checkpoint``: :func:`bida.checkpoint.save_checkpoint`, as the loop calls it.
    """
    trainer._average_bn_statistics()
    rng_ranks = trainer.dist.all_gather_object(rng_state())
    if trainer.is_main:
        state = checkpoint_state(trainer, optimizer, scaler, rng_ranks)
        bad = _first_non_finite({"model": state["model"], "calibration": state["calibration"]})
        if bad is not None:
            raise TrainingDiverged(f"refusing to save {name}.pt at step {trainer.step}: {bad} holds non-finite "
                                   f"values; {last_good(trainer)}")
        trainer.stop.saving = True  # a second Ctrl-C now waits for the rename
        try:
            if name == "last" and trainer._saved_step != trainer.step:  # keep the previous one, for a
                rotate_checkpoint(trainer._ckpt("last"), trainer._ckpt("last.prev"))  # last.pt damaged later
            save_checkpoint(state, trainer._ckpt(name))
        finally:
            trainer.stop.saving = False
        if name == "last":
            trainer._saved_step = trainer.step
            trainer._good = (trainer._ckpt("last"), trainer.step)
        if trainer.stop.now:
            trainer.stop.exiting = True
            raise Interrupted(f"stopped by a second {signal.Signals(trainer.stop.signal).name} after saving step "
                              f"{trainer.step}; continue with: bida train --resume {trainer.run_dir}", trainer.stop.signal)
    trainer.dist.barrier()


def truncate_run_log(trainer, step: int) -> None:
    """On rank 0: move the log records written after ``step`` to ``log.discarded.jsonl``, saying so."""
    if trainer.is_main and (moved := truncate_log(trainer.run_dir, step)):
        trainer._info(f"moved {moved} log records after step {step} to {LOG_DISCARDED} (they are written again)")
