"""A run's checkpoints (:class:`Checkpointer`): writing them, choosing the one a resume starts from, restoring it.

``checkpoints/last.pt`` holds everything stateful of a run (model, optimizer, scaler, the
:class:`~bida.engine.state.RunState`, calibration, mean teacher, every rank's generators, the
partial log sums); the previous one is kept as ``last.prev.pt`` and ``best.pt`` is the
checkpoint of the best target-val evaluation. A resume starts from ``last.pt``, else
``last.prev.pt``, else from step 0 when nothing was trained; no file holding a non-finite
tensor is ever written or resumed from.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import load_checkpoint, rotate_checkpoint
from .. import checkpoint as checkpoint_files
from ..config import Config, to_dict
from ..errors import CheckpointError, DataError, Interrupted, RunDirError
from ..models import model_state_for_checkpoint
from ..models.weights import load_model_weights
from .distributed import BatchNormAverager, DistContext
from .guard import TrainingDiverged, _first_non_finite
from .runlog import LOG_DISCARDED, RunLog, logged_steps, truncate_log
from .state import RunState
from .stop import StopControl


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


class Checkpointer:
    """The checkpoints of the run in ``run_dir``: what they hold, where they go, which one is good.

    Args:
        run_dir: the run directory (``checkpoints/`` inside it).
        cfg: the run's config (saved in every checkpoint). classes: its class names and palette.
        state: the run's progress. model: the student (the uncompiled module).
        calibration, mean_teacher: the method's state (None: the run has none).
        log: the run log, whose partial sums a checkpoint keeps.
        dist: the process group (every rank calls :meth:`save`; rank 0 writes).
        bn: averages BatchNorm statistics over ranks before a save.
        stop: the stop control (a second signal during a write waits for the rename).
        info: prints a progress message (rank 0, unless quiet).
    """

    def __init__(self, run_dir: Path, cfg: Config, classes, state: RunState, model: torch.nn.Module,
                 calibration, mean_teacher, log: RunLog, dist: DistContext, bn: BatchNormAverager,
                 stop: StopControl, info: Callable[[str], None]):
        self.run_dir, self.cfg, self.classes, self.state = Path(run_dir), cfg, classes, state
        self.model, self.calibration, self.mean_teacher, self.log = model, calibration, mean_teacher, log
        self.dist, self.bn, self.stop, self.info = dist, bn, stop, info
        self.saved_step: int | None = None  # step of the last last.pt written by this process
        self.good: tuple[Path, int] | None = None  # a checkpoint known good: resumed from, or written

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def path(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def contents(self, optimizer: torch.optim.Optimizer, scaler, rng_ranks: list[dict]) -> dict[str, Any]:
        """What a checkpoint holds (its keys and their order are the file format)."""
        return {
            "model": model_state_for_checkpoint(self.model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
            **self.state.state_dict(),
            "calibration": self.calibration.state_dict() if self.calibration is not None else {},
            "mean_teacher": self.mean_teacher.state_dict() if self.mean_teacher is not None else {},
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,  # every rank's generators (each draws its own dropout masks)
            "config": to_dict(self.cfg),
            "num_classes": self.classes.num_classes,
            "class_names": list(self.classes.names),
            "palette": [list(c) for c in self.classes.palette],  # bida predict colours with it
            "method": self.cfg.method.name,
            # the partial sums of the next log record: a resumed run averages the same steps
            "log_accumulator": self.log.state_dict(),
        }

    def save(self, name: str, optimizer: torch.optim.Optimizer, scaler) -> None:
        """Write ``checkpoints/<name>.pt``; never one that holds a non-finite tensor.

        Every rank calls it: BatchNorm statistics are averaged over ranks first (unless the
        teacher phase keeps them equal), so the file holds the model every rank goes on with
        (rank 0 writes it).
        """
        self.bn.average()
        rng_ranks = self.dist.all_gather_object(rng_state())
        step = self.state.step
        if self.is_main:
            state = self.contents(optimizer, scaler, rng_ranks)
            bad = _first_non_finite({"model": state["model"], "calibration": state["calibration"]})
            if bad is not None:
                raise TrainingDiverged(f"refusing to save {name}.pt at step {step}: {bad} holds non-finite "
                                       f"values; {self.last_good()}")
            self.stop.saving = True  # a second Ctrl-C now waits for the rename
            try:
                if name == "last" and self.saved_step != step:  # keep the previous one, for a
                    rotate_checkpoint(self.path("last"), self.path("last.prev"))  # last.pt damaged later
                checkpoint_files.save_checkpoint(state, self.path(name))
            finally:
                self.stop.saving = False
            if name == "last":
                self.saved_step = step
                self.good = (self.path("last"), step)
            if self.stop.now:
                self.stop.exiting = True
                raise Interrupted(f"stopped by a second {signal.Signals(self.stop.signal).name} after saving step "
                                  f"{step}; continue with: bida train --resume {self.run_dir}", self.stop.signal)
        self.dist.barrier()

    def last_good(self) -> str:
        """Which checkpoint a resume would start from: one that loads, matches its checksum
        and holds only finite model and calibration tensors."""
        if self.good is not None and self.good[0].is_file():
            return f"the last good checkpoint is {self.good[0]} (step {self.good[1]})"
        for path in (self.path("last"), self.path("last.prev")):
            if not path.is_file():
                continue
            try:
                state = load_checkpoint(path)
            except CheckpointError:
                continue
            if _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})}) is None:
                return f"the last good checkpoint is {path} (step {state.get('step')})"
        return "no good checkpoint was saved (start again with --overwrite)"

    def kept(self) -> str:
        """What a stop at once keeps: this process's last checkpoint, else the last good one."""
        if self.saved_step is not None:
            return f"the checkpoint of step {self.saved_step} is kept"
        return self.last_good()

    def bad_file(self, err: DataError, optimizer=None, scaler=None) -> DataError:
        """The one-line error of a bad file met mid-run (a batch, the pseudo-label pass, an
        evaluation), saying how to continue. With ``optimizer`` the state is saved first;
        without, ``last.pt`` already holds it (a phase start, the end of the last phase).

        A worker process wraps the reader's DataError in a multi-line traceback: only its
        last line (the reader's message) is kept.
        """
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        message = lines[-1].split("DataError: ", 1)[-1] if lines else "unreadable data"
        if self.dist.world_size > 1:  # a save would wait for ranks that are inside a collective
            return DataError(f"{message} (fix or remove the file, then continue with: bida train --resume {self.run_dir})")
        if optimizer is not None:
            self.save("last", optimizer, scaler)
        return DataError(f"{message} (checkpoint saved at step {self.state.step}; fix or remove the file, then "
                         f"continue with: bida train --resume {self.run_dir})")

    def find_resume(self, device: torch.device, first_phase_kind: str) -> tuple[Path, dict] | None:
        """The checkpoint to resume from and its contents, or None to start from step 0.

        ``last.pt``, else (missing or damaged) the previous one, ``last.prev.pt``, saying so.
        Without either, a run that logged no trained step restarts from step 0, saying so; one
        that did is refused, and nothing is changed. ``first_phase_kind``: the kind of the
        run's first phase (a source stage's pseudo labels show that it trained).
        """
        last, prev = self.path("last"), self.path("last.prev")
        why = None
        for path in (last, prev):
            if not path.is_file():
                why = why or f"{path.relative_to(self.run_dir)} is missing"
                continue
            try:
                state = load_checkpoint(path, map_location=device)
            except CheckpointError as err:
                why = why or f"{path.relative_to(self.run_dir)} cannot be used ({err})"
                continue
            bad = _first_non_finite({"model": state.get("model", {}), "calibration": state.get("calibration", {})})
            if bad is not None:  # written by an older bida, which checked less
                why = why or f"{path.relative_to(self.run_dir)} cannot be used ({bad} holds non-finite values)"
                continue
            self.good = (path, int(state["step"]))
            if path == prev:
                self._move_damaged(last)
                self.stop.say(f"bida: warning: {why}; resuming from the previous checkpoint {path} (step {state['step']})")
            return path, state
        trained = self._trained_evidence(first_phase_kind)
        if trained:
            raise RunDirError(f"cannot resume {self.run_dir}: {why} and there is no checkpoints/last.prev.pt, but "
                              f"{trained}; nothing was changed (put the run's checkpoint back as "
                              f"checkpoints/last.pt, or start again with --overwrite)")
        self._move_damaged(last)
        self.stop.say(f"bida: {why} and no step was trained yet: starting again from step 0 with the saved config")
        return None

    def _move_damaged(self, path: Path) -> None:
        """Keep a damaged checkpoint as ``<name>.damaged.pt`` (out of the way of the rotation)."""
        if self.is_main and path.is_file():
            os.replace(path, path.with_name(path.stem + ".damaged.pt"))

    def _trained_evidence(self, first_phase_kind: str) -> str | None:
        """What shows that this run trained steps (a restart from step 0 would lose them), or None."""
        logged = logged_steps(self.run_dir)
        if logged:
            return f"log.jsonl records training up to step {max(logged)}"
        if (self.run_dir / "metrics.json").is_file():
            return "metrics.json holds its final results"
        labels = self.run_dir / "pseudo_labels"
        if first_phase_kind == "source" and labels.is_dir() and any(labels.iterdir()):
            return "pseudo_labels/ holds labels of its trained model"  # a restart would reuse them
        return None

    def load(self, path: Path, state: dict) -> tuple[dict | None, dict | None]:
        """Restore the model, the progress, the method's state, this rank's generators and the
        partial log sums from ``state`` (the contents of ``path``); move the log records written
        after its step aside. Returns the optimizer and scaler states the current phase goes on
        with (None: the phase starts afresh)."""
        load_model_weights(self.model, path, checkpoint=state)
        self.state.load_state_dict(state)
        if self.calibration is not None and state.get("calibration"):
            self.calibration.load_state_dict(state["calibration"])
        if self.mean_teacher is not None and state.get("mean_teacher"):
            self.mean_teacher.load_state_dict(state["mean_teacher"], self.model)
        optimizer_state = state["optimizer"] if self.state.iter > 0 else None
        scaler_state = state.get("scaler") or None
        # This rank's own generators; a checkpoint of fewer ranks (or of an older bida) has
        # none for it, and it goes on with rank 0's stream.
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[self.dist.rank] if self.dist.rank < len(ranks) else state["rng"])
        self.log.restore(state.get("log_accumulator") or None)
        self.truncate_log(self.state.step)
        return optimizer_state, scaler_state

    def truncate_log(self, step: int) -> None:
        """On rank 0: move the log records written after ``step`` to ``log.discarded.jsonl``, saying so."""
        if self.is_main and (moved := truncate_log(self.run_dir, step)):
            self.info(f"moved {moved} log records after step {step} to {LOG_DISCARDED} (they are written again)")
