"""Exceptions with single-line messages that name the offending file, key or value."""


class ScalesegError(Exception):
    """Base class. ``str(err)`` is one line that says what was wrong and what was expected."""


class ConfigError(ScalesegError, ValueError):
    """A config key or value is unknown or invalid."""


class DataError(ScalesegError, ValueError):
    """A dataset file is missing, unreadable, or holds unexpected values."""


class CheckpointError(ScalesegError, ValueError):
    """A checkpoint does not exist or belongs to another model."""
