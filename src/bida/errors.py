"""Errors that the command line turns into one clear line and exit code 2."""

from __future__ import annotations


class BidaError(Exception):
    """Base class of every user-facing error (bad config, data, checkpoint, path)."""


class ConfigError(BidaError):
    """An unknown config key, a wrong value type or a malformed override."""


class DataError(BidaError):
    """A dataset that is missing, empty, unreadable or inconsistent."""


class CheckpointError(BidaError):
    """A checkpoint or weight file that cannot be loaded safely or does not fit."""


class RunDirError(BidaError):
    """A run directory that exists, is not writable, or cannot be resumed."""


class Interrupted(BidaError):
    """SIGTERM/SIGINT: a checkpoint was saved and the run can be resumed.

    The command line exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the
    codes a scheduler reads as "stopped by that signal", not 2 (bad input).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
