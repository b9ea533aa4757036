"""Stopping a run: SIGINT/SIGTERM handling, where a run stops, and the messages it gives.

A first signal asks the run to save a checkpoint and stop at the next safe point (said at
once on stderr); a second stops at once (after a checkpoint being written, never a torn
file). Under torchrun the ranks agree on a stop where they meet (:meth:`StopControl.sync`,
the step's flags, :meth:`StopControl.on_rank0`), so that all stop at the same point.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import Interrupted
from .distributed import DistContext, is_main_process
from .guard import _step_is_finite
from .state import RunState


class _StopRequested(Exception):
    """Internal: ``stop_after`` reached."""


class _Stopping(Exception):
    """Internal: a signal arrived during evaluation or the pseudo-label pass."""


class StopControl:
    """The stop state of the run in ``run_dir``, whose progress is ``state`` (its messages name the step).

    It exists before the process group is joined (a signal during set-up is handled too):
    :meth:`connect` gives it the process group and what a stop at once keeps, once known.
    """

    def __init__(self, run_dir: Path, state: RunState, dist: DistContext | None = None,
                 kept: Callable[[], str] | None = None):
        self.run_dir, self.state = Path(run_dir), state
        self.dist = dist if dist is not None else DistContext()
        # rank 0 says the stop messages; before the group is joined, torchrun's RANK tells
        self.is_main = dist.rank == 0 if dist is not None else is_main_process()
        self.kept = kept  # what a stop at once keeps: the checkpointer's word (None: nothing yet)
        self.signal: int | None = None  # this process's SIGTERM/SIGINT
        self.agreed: int | None = None  # under torchrun: the stop every rank has seen
        self.in_step = self.flags_sent = self.polling = self.exiting = False  # where a stop signal lands
        self.saving = self.now = False  # a checkpoint being written; a second signal waiting for it
        # Set-up handles stop signals too: a stop before the run directory exists leaves nothing,
        # one after its config is written leaves a run that --resume starts (never a silent death).
        self.setting_up = self.deferring = self.run_written = False
        self._old_handlers: dict = {}

    def connect(self, dist: DistContext, kept: Callable[[], str] | None = None) -> None:
        """The process group (once joined) and what a stop at once keeps (once checkpoints exist)."""
        self.dist, self.is_main = dist, dist.rank == 0
        if kept is not None:
            self.kept = kept

    def install(self) -> None:
        """First SIGINT/SIGTERM: say at once where the run will save, and stop there. A second
        one stops at once: right away, or just after a checkpoint being written (never a torn
        file); what is kept is the last checkpoint written. During set-up the first one stops
        at once (nothing to save), except while the run directory is being written. Once the
        run is stopping and exiting, further signals are ignored (no traceback, no death by
        signal: the exit code stays 130 or 143)."""

        def handler(signum, frame):  # noqa: ARG001 - signal API
            name = signal.Signals(signum).name
            if self.exiting:
                return
            if self.setting_up:
                self.signal = signum
                if not self.deferring:
                    self.exiting = True
                    raise Interrupted(self.setup_message(signum), signum)
                return
            if self.signal is None:
                self.signal = signum
                self.say(f"bida: stop requested ({name}): saving a checkpoint at step {self.stop_step()} and "
                         f"stopping; press Ctrl-C again to stop at once (keeps the last checkpoint written)")
                return
            self.signal = signum
            if self.saving:  # let the checkpoint being written finish; save() stops after it
                self.now = True
                return
            self.exiting = True
            raise Interrupted(self._stopped_at_once_message(signum), signum)

        self._old_handlers = {}
        self.saving = self.now = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread (e.g. embedded use)
                pass

    def stop_step(self) -> int:
        """The step whose checkpoint a stop requested now will save.

        Single process: the step being taken (the stop is seen after it), else the last one
        taken (seen in the evaluation, pseudo-label pass or checkpoint write under way, or
        right after it). Under torchrun, ranks act on a stop only where they meet: in the
        passes that poll it, the last step taken; otherwise at the next step's flags, one step
        later still if this step's flags are already exchanged.
        """
        if self.dist.enabled and not self.polling:
            return self.state.step + (2 if self.in_step and self.flags_sent else 1)
        return self.state.step + (1 if self.in_step else 0)

    def setup_message(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self.run_written:
            return f"stopped by {name} before training started; continue with: bida train --resume {self.run_dir}"
        return f"stopped by {name} before the run started; nothing was written to {self.run_dir}"

    def say(self, msg: str) -> None:
        """A line on stderr from rank 0 at once, even with --quiet (stop messages)."""
        if self.is_main:
            # One write with its newline: print() writes the end separately, and a second
            # Ctrl-C landing between the two ran its own line onto this one.
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def _stopped_at_once_message(self, signum: int) -> str:
        kept = self.kept() if self.kept is not None else "no good checkpoint was saved (start again with --overwrite)"
        return (f"stopped at once by a second {signal.Signals(signum).name} during step {self.state.step + 1}; {kept}; "
                f"continue with: bida train --resume {self.run_dir}")

    def restore(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, old)
        self._old_handlers = {}

    def seen(self) -> int | None:
        """The stop signal this rank acts on: its own in one process; under torchrun, the one
        every rank agreed on at the last point where they met (so all stop at the same point)."""
        return self.agreed if self.dist.enabled else self.signal

    def sync(self) -> None:
        """Under torchrun (a collective: every rank calls it at the same point): agree on any rank's stop."""
        if self.dist.enabled:
            stop, _ = self.dist.poll(self.signal or 0)
            self.agreed = stop or self.agreed

    def agree_on_step(self, finite: torch.Tensor) -> bool:
        """The step's one meeting of the ranks: whether the step is finite on every rank; under
        torchrun any rank's stop rides on the same all-reduce.

        ``finite``: this rank's 0-dim bool flag on the device. Reading it is the one host sync
        of a steady-state step (:func:`~bida.engine.guard._step_is_finite`).
        """
        own = self.signal or 0
        self.flags_sent = True
        finite_everywhere, stop = _step_is_finite(self.dist.step_flags(finite, own))
        self.agreed = stop or self.agreed
        return finite_everywhere

    def poll(self) -> None:
        """``check_stop`` of passes that every rank runs in step (evaluation): give up together on a stop."""
        self.sync()
        if self.seen() is not None:
            raise _Stopping()

    def on_rank0(self, work: Callable[[Callable[[], None]], Any]) -> Any:
        """``work(check_stop)`` on rank 0 alone, every rank stoppable: rank 0's result, None elsewhere.

        A barrier would hold the waiting ranks inside a collective, where a signal handler
        cannot run until rank 0 is done (possibly half an hour): they poll instead, once per
        item rank 0 finishes, so a stop on any rank reaches all of them within an item. A
        stop raises :class:`_Stopping` on every rank.
        """
        self.polling = True
        try:
            if not self.dist.enabled:
                return work(self.poll)
            if self.is_main:
                result = work(self.poll)
                stop, _ = self.dist.poll(self.signal or 0, done=True)
                self.agreed = stop or self.agreed
                if stop:  # the waiting ranks see it with ``done``: all stop here
                    raise _Stopping()
                return result
            while True:
                stop, done = self.dist.poll(self.signal or 0)
                self.agreed = stop or self.agreed
                if stop:
                    raise _Stopping()
                if done:
                    return None
        finally:
            self.polling = False

    def check(self, saved: bool) -> None:
        """After a checkpoint: leave cleanly if SIGTERM/SIGINT arrived (under torchrun: on any rank)."""
        signum = self.seen()
        if signum is not None and saved:
            self.exiting = True
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.state.step} (checkpoint saved); "
                              f"continue with: bida train --resume {self.run_dir}", signum)
