"""Progress bars: tqdm on a terminal, a few plain lines on a file or a pipe.

A tqdm bar redraws itself with carriage returns; written to a log file that is one long line
growing by the bar's width at every redraw (a demo's output filled 128 KB). On a stream that is
not a terminal, :func:`progress_bar` gives a :class:`PlainProgress` instead: one line at each
tenth of the total (every 30 s when the total is unknown) and one at the end. A transient bar
(``leave=False``: an evaluation, a pseudo-label pass, a scan), which vanishes from a terminal
when done, writes a line only every 30 s: a short pass leaves nothing, a long one shows it lives.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm

PLAIN_FRACTION = 0.1  # a plain line at each tenth of the total
PLAIN_INTERVAL_S = 30.0  # ... or this often when the total is unknown


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None,
                 initial: int = 0, disable: bool = False, leave: bool = True):
    """A progress bar over ``iterable`` (or one updated by hand, of ``total`` steps) on stderr:
    tqdm when stderr is a terminal, else :class:`PlainProgress`. Both have ``update``,
    ``set_postfix``, ``close``, ``n`` and ``disable``."""
    if disable or _is_terminal(sys.stderr):
        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, leave=leave,
                    dynamic_ncols=True)
    return PlainProgress(iterable, desc=desc, total=total, initial=initial, transient=not leave)


class PlainProgress:
    """Progress as plain lines (``desc: n/total (p%), elapsed, rate, postfix``) on stderr, for logs.

    ``transient``: only a line every :data:`PLAIN_INTERVAL_S` seconds, none at the end.
    """

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
                 initial: int = 0, stream: Any = None, transient: bool = False):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.n, self.disable = total, desc, initial, False
        self.stream, self.transient = stream, transient
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._initial, self._written_n = initial, None
        self._every = max(1, math.ceil(total * PLAIN_FRACTION)) if total and not transient else None

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.monotonic()
        if self._every is not None:
            due = self.n // self._every > before // self._every
        else:
            due = now - self._last >= PLAIN_INTERVAL_S
        if due:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """The last line, unless the last update wrote it."""
        if not self.transient and self._written_n != self.n and self.n > self._initial:
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        elapsed = now - self._start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(f"{self.desc or 'progress'}: {done}, {elapsed:.0f}s, {rate:.2f} it/s{extra}\n")
        stream.flush()
        self._last, self._written_n = now, self.n
