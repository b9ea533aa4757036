"""The progress of a run (:class:`RunState`): what a checkpoint records about where the run is.

Everything else a checkpoint holds (weights, optimizer, calibration, mean teacher, generators,
partial log sums) belongs to the object that owns it; this is the loop's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunState:
    """Where a run is, and what it chose so far.

    ``data_pos`` counts the batches drawn (``step`` plus the skipped steps: a skipped step's
    batch stays consumed), so the samplers, addressed by it, continue exactly on resume.
    ``pending_eval``: stopped inside the evaluation after ``step`` (``--resume`` evaluates first).
    """

    phase: int = 0  # index into the run's phases
    iter: int = 0  # iterations done in that phase
    step: int = 0  # iterations done in the whole run
    data_pos: int = 0
    pending_eval: bool = False
    best_miou: float = -1.0  # target-val mIoU of best.pt (-1: none yet)
    best_step: int = -1
    bad_steps: int = 0  # non-finite steps in a row

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's progress keys (their names and order are the checkpoint format)."""
        return {"phase": self.phase, "iter": self.iter, "step": self.step, "data_pos": self.data_pos,
                "pending_eval": self.pending_eval, "best_miou": self.best_miou, "best_step": self.best_step,
                "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint; those of older versions lack ``data_pos``, ``pending_eval`` and ``bad_steps``."""
        self.phase, self.iter, self.step = int(state["phase"]), int(state["iter"]), int(state["step"])
        self.data_pos = int(state.get("data_pos", self.step))
        self.pending_eval = bool(state.get("pending_eval", False))
        self.best_miou, self.best_step = float(state["best_miou"]), int(state["best_step"])
        self.bad_steps = int(state.get("bad_steps", 0))
