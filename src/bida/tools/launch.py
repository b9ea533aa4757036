"""``bida launch``: torchrun for bida, with clean stops.

``bida launch [torchrun options] COMMAND ...`` runs ``torchrun [torchrun options] -m bida
COMMAND ...`` in this process (``torch.distributed.run``), e.g.::

    bida launch --standalone --nproc_per_node=2 train -c configs/x.yaml --out runs/x

What it adds is the end of a stopped job. torchrun forwards a SIGTERM or SIGINT it gets
(Kubernetes, a terminal's Ctrl-C, ``timeout``) to every rank, waits for them (30 s), then
raises ``SignalException`` with a traceback and exits 1. The ranks save one checkpoint
and rank 0 prints the one "stopped by" line; this launcher then exits 128 + the signal
(130 or 143) without a traceback, and keeps torchrun's routine log lines (workers being
closed) off the terminal. A job whose ranks all stopped cleanly (a signal to one rank
only) exits with their code too. ``LOGLEVEL`` set in the environment keeps every torchrun
log line.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import BidaError

COMMANDS = ("train", "evaluate", "predict", "demo", "ablate", "report", "data", "check-data")
USAGE = ("usage: bida launch [torchrun options] COMMAND [bida options]\n"
         "  e.g. bida launch --standalone --nproc_per_node=2 train -c configs/x.yaml --out runs/x\n"
         "torchrun options: see torchrun --help (do not pass -m or a script: the command runs bida)")
_KEPT = ("Unable to shutdown process",)  # torchrun lines that still say something (a rank killed)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, the bida command line): split at the first bida command name."""
    for i, word in enumerate(argv):
        if word in COMMANDS:
            return argv[:i], argv[i:]
    raise BidaError(f"bida launch: no bida command given (one of {', '.join(COMMANDS)}); {USAGE.splitlines()[1].strip()}")


class _RoutineTorchrunLines(logging.Filter):
    """Drops torchrun's informational and warning lines, except those in ``_KEPT``, and its
    per-rank failure line (:func:`main` says which ranks failed, when they did not say why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("failed (exitcode"):
            return False
        return record.levelno >= logging.ERROR or str(record.msg).startswith(_KEPT)


def _quiet_torchrun_logs() -> None:
    """A filter on every torch.distributed logger (torchrun's log through their own handlers)."""
    if os.environ.get("LOGLEVEL"):
        return
    routine = _RoutineTorchrunLines()
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).addFilter(routine)


def main(argv: list[str]) -> int:
    """Run torchrun on ``bida COMMAND ...``; the exit code (128 + signal after a stop)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        torchrun_args, command = split_args(argv)
    except BidaError as err:
        print(f"bida: error: {err}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args([*torchrun_args, "-m", "bida", *command])
    _quiet_torchrun_logs()
    try:
        run(args)
    except SignalException as err:  # torchrun was signalled; the ranks were stopped with that signal
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        if len(codes) == 1 and codes <= {2, 130, 143}:  # every rank said why (rank 0 printed it)
            return codes.pop()
        for rank, failure in sorted(err.failures.items()):
            how = (f"killed by signal {failure.signal_name()}" if failure.exitcode < 0
                   else f"exit code {failure.exitcode}")
            print(f"bida launch: rank {rank} failed ({how}); its output is above", file=sys.stderr)
        return 1
    return 0
