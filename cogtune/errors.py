"""Errors a user can cause or fix. The CLI prints each as one line (plus a hint) and exits with 1
(`cogtune.interrupt.Interrupted`, a stop the user asked for: 130)."""

from __future__ import annotations


class CogtuneError(Exception):
    """Base class: a failure with a message meant for the user, not a programming error."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

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
