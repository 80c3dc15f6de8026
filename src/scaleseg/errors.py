"""Exceptions with single-line messages that name the offending file, key or value.

The CLI prints ``str(err)`` of any :class:`ScalesegError` as one line and exits with its ``exit_code``.
"""
from __future__ import annotations

from pathlib import Path


class ScalesegError(Exception):
    """Base class. ``str(err)`` is one line that says what was wrong and what was expected."""

    exit_code = 2


class ConfigError(ScalesegError, ValueError):
    """A config key or value is unknown or invalid."""


class DataError(ScalesegError, ValueError):
    """A dataset file is missing, unreadable, or holds unexpected values.

    ``path`` (the file) and ``reason`` (what is wrong with it, without the path) are set by the
    readers in ``scaleseg.data.base`` so that ``check-data`` can tabulate them."""

    def __init__(self, message: str, *, path: str | Path | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.reason = reason


class CheckpointError(ScalesegError, ValueError):
    """A checkpoint does not exist or belongs to another model."""


class RunError(ScalesegError):
    """The run folder is in use by another process, already finished, or a resume would change the run."""


class DiskFullError(ScalesegError):
    """A file could not be written because the device is full (or over quota / the file size limit)."""

    exit_code = 1


class DivergedError(ScalesegError):
    """Training produced a non-finite loss or gradient."""

    exit_code = 1


class Interrupted(ScalesegError):
    """The user pressed Ctrl-C; the message says which checkpoint to resume from."""

    exit_code = 130
