"""The error types of rdlm. Each message names the problem and the fix; the command line prints it
as one ``error:`` line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match; the message names path and fix."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left untouched."""
