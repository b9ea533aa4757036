"""Logging of a run: step values summed on the device, ``log.jsonl`` and TensorBoard.

:class:`LogAccumulator` keeps a record's step values on the device until the record is
written (one host transfer a record); :class:`RunLogger` appends records to ``log.jsonl``
and TensorBoard. The functions below read ``log.jsonl`` back: what a resumed run already
logged, and moving records a resume will write again to ``log.discarded.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write_text
from ..errors import RunDirError
from .schedules import Phase


LOG_DISCARDED = "log.discarded.jsonl"  # records a resume dropped from log.jsonl (they are written again)


class LogAccumulator:
    """Step log values summed on the device, brought to the host once per log record.

    ``add`` takes a step's log dict (detached 0-dim tensors, or host floats) and launches a
    handful of small kernels (one stack, one masked add); :meth:`means` is the only host
    transfer: the mean of each value over the steps added since the last call, NaNs (e.g.
    an accuracy with no labelled pixel) left out of their key's mean.
    """

    def __init__(self) -> None:
        self._keys: tuple[str, ...] = ()
        self._sums: torch.Tensor | None = None  # (2, n_tensor_keys): finite sums, finite counts
        self._host: dict[str, list[float]] = {}  # host floats: [sum, count]
        self.steps = 0

    def add(self, logs: dict[str, Any]) -> None:
        tensors = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
        for key, value in logs.items():
            if key not in tensors and math.isfinite(value):
                total = self._host.setdefault(key, [0.0, 0.0])
                total[0] += float(value)
                total[1] += 1.0
        if tensors:
            keys = tuple(sorted(tensors))
            values = torch.stack([tensors[k].detach().float().reshape(()) for k in keys])
            finite = torch.isfinite(values)
            step = torch.stack([torch.where(finite, values, torch.zeros_like(values)), finite.float()])
            if self._sums is None or keys != self._keys:
                if self._sums is not None:  # the keys changed mid-record: keep what was summed
                    self._fold_into_host()
                self._keys, self._sums = keys, step
            else:
                self._sums += step
        self.steps += 1

    def _fold_into_host(self) -> None:
        sums, counts = self._sums.tolist()  # the one device-to-host transfer of a record
        for key, s, n in zip(self._keys, sums, counts):
            total = self._host.setdefault(key, [0.0, 0.0])
            total[0] += s
            total[1] += n
        self._keys, self._sums = (), None

    def state_dict(self) -> dict[str, Any]:
        """The partial sums (a copy, device sums left on the device: no host sync)."""
        return {"keys": list(self._keys), "sums": self._sums.clone() if self._sums is not None else None,
                "host": {k: list(v) for k, v in self._host.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._keys = tuple(state["keys"])
        self._sums = state["sums"].clone() if state["sums"] is not None else None
        self._host = {k: [float(v[0]), float(v[1])] for k, v in state["host"].items()}
        self.steps = int(state["steps"])

    def means(self) -> dict[str, float]:
        """Mean of every value since the last call (NaN where no finite value came); resets."""
        if self._sums is not None:
            self._fold_into_host()
        out = {k: (s / n if n > 0 else math.nan) for k, (s, n) in self._host.items()}
        self._host, self.steps = {}, 0
        return out


class RunLogger:
    """``log.jsonl`` (one JSON object a line) and TensorBoard scalars; silent off rank 0."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        # Log values may be device tensors (a step never waits for them): read them only here.
        record = {"step": step, **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in record.items()}}
        self._append((json.dumps(record, default=_json_default) + "\n").encode())
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def _append(self, line: bytes) -> None:
        """Append one record; a full disk gives one line naming the log and leaves no half record.

        Raises:
            RunDirError: naming ``log.jsonl`` and the reason.
        """
        try:
            with open(self.path, "ab", buffering=0) as fh:
                start = fh.tell()
                try:
                    done = 0
                    while done < len(line):
                        done += fh.write(line[done:])
                except OSError:
                    try:
                        fh.truncate(start)
                    except OSError:
                        pass
                    raise
        except OSError as err:
            raise RunDirError(f"cannot write {self.path}: {err.strerror or err}") from None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def logged_steps(run_dir: Path) -> list[int]:
    """Steps > 0 of the records in ``log.jsonl`` (training happened up to the largest)."""
    log = run_dir / "log.jsonl"
    steps = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            step = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue
        if step > 0:
            steps.append(step)
    return steps


def log_has(run_dir: Path, match: Callable[[dict], bool]) -> bool:
    """Whether ``log.jsonl`` holds a record for which ``match(record)`` is true (a resumed run
    does not log again what the stopped one logged)."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return False
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and match(rec):
            return True
    return False


def truncate_log(run_dir: Path, step: int) -> int:
    """Move the records of ``log.jsonl`` written after ``step`` (a resume produces them again)
    to ``log.discarded.jsonl``: a record once written is never destroyed. Returns how many."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return 0
    kept, dropped = [], []
    for line in log.read_text().splitlines():
        try:
            (kept if json.loads(line).get("step", 0) <= step else dropped).append(line)
        except (json.JSONDecodeError, AttributeError, TypeError):  # a line cut by the crash
            dropped.append(line)
    dropped = [d for d in dropped if d.strip()]
    if not dropped:
        return 0
    with open(run_dir / LOG_DISCARDED, "a") as fh:  # first: a crash now duplicates, never loses
        fh.write("".join(d + "\n" for d in dropped))
        fh.flush()
        os.fsync(fh.fileno())
    atomic_write_text(log, "".join(k + "\n" for k in kept))
    return len(dropped)


def info_printer(enabled: bool) -> Callable[[str], None]:
    """A progress message printer: a line through tqdm (between progress bars) when ``enabled``
    (rank 0, not quiet), else nothing."""
    return tqdm.write if enabled else _silent


def _silent(msg: str) -> None:  # noqa: ARG001 - the printer of a quiet run
    return None


class RunLog:
    """The log of the run in ``run_dir``: ``log.jsonl`` and TensorBoard (rank 0), the step
    values summed since the last record, and the host time spent waiting for batches.

    :meth:`open` creates the files once the run directory exists; until then only the partial
    sums (restored from a checkpoint) are kept.
    """

    def __init__(self, run_dir: Path, dist):
        self.run_dir, self.dist = Path(run_dir), dist
        self.logger: RunLogger | None = None
        self.accumulator: LogAccumulator | None = None  # the current phase's sums, saved with each checkpoint
        self._restored: dict | None = None  # partial sums from a checkpoint, for the phase that resumes
        self.data_wait_s = 0.0
        self.t_last = 0.0

    def open(self) -> None:
        self.logger = RunLogger(self.run_dir, enabled=self.dist.rank == 0)

    def log(self, record: dict, step: int) -> None:
        self.logger.log(record, step)

    def close(self) -> None:
        self.logger.close()

    def restore(self, state: dict | None) -> None:
        """The partial sums of a resumed run, stopped between two log records (None: none)."""
        self._restored = state

    def state_dict(self) -> dict:
        """The partial sums of the next record ({} before the first phase started)."""
        if self.accumulator is not None:
            return self.accumulator.state_dict()
        return self._restored or {}

    def start_phase(self) -> None:
        """A phase starts (or resumes): fresh sums, or those the stopped run had not logged yet."""
        self.t_last = time.time()
        self.accumulator = LogAccumulator()
        if self._restored:  # resumed between two log records: the steps before the stop count
            self.accumulator.load_state_dict(self._restored)
            self._restored = None
        self.data_wait_s = 0.0

    def add(self, logs: dict[str, Any]) -> None:
        """A taken step's log values (device tensors stay on the device)."""
        self.accumulator.add(logs)

    def record(self, step: int, phase: Phase, lr: float, bar) -> None:
        """One log record (means over the steps since the last one) and the progress bar.

        The only point of a steady-state step where log values reach the host.
        """
        logs = self.accumulator
        steps = logs.steps
        means = self.dist.mean_logs(logs.means())
        now = time.time()
        rec = {"phase": phase.kind, "round": phase.round, "lr": lr, **means}
        rec["time/step_s"] = (now - self.t_last) / max(1, steps)
        rec["time/data_s"] = self.data_wait_s / max(1, steps)  # of it, waiting for batches
        self.data_wait_s = 0.0
        self.log(rec, step)
        if not bar.disable:
            bar.update(step - bar.n)
        bar.set_postfix(loss=f"{means.get('loss/total', means.get('loss/seg_src', math.nan)):.3f}", lr=f"{lr:.2e}")
        self.t_last = now
