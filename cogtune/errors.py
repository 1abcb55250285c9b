"""Errors a user can cause or fix. The CLI prints each as one line (plus a hint) and exits with 1
(`cogtune.interrupt.Interrupted`, a stop the user asked for: 130)."""

from __future__ import annotations


class CogtuneError(Exception):
    """Base class: a failure with a message meant for the user, not a programming error."""

    # True where every process of a launch raises the same error at the same point (they agreed on it, as
    # on an interrupted run's stop, or decided it from the same settings and files): the main process says
    # it once (`report.error`). Otherwise each process says its own: a failure of one process alone is shown.
    shared = False

    def __init__(self, message: str, hint: str | None = None, *, shared: bool | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if shared is not None:
            self.shared = shared

    def __str__(self) -> str:
        return self.message


class ConfigError(CogtuneError):
    """A run configuration (TOML file or flags) is invalid."""


class ModelError(CogtuneError):
    """A model reference cannot be resolved or loaded, or does not fit the request."""


class DataError(CogtuneError):
    """A dataset or cache is missing, malformed, or does not fit the model."""


class TrainingError(CogtuneError):
    """Training stopped (non-finite loss, interrupted state that cannot resume, ...)."""


class StorageError(CogtuneError):
    """An output cannot be written: the disk is full, the folder is not writable, or another run holds it."""
