"""The error types of rdlm. Each message names the problem and the fix; the command line prints it
as one ``error:`` line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match; the message names path and fix."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left untouched."""


class RunDirLocked(ConfigError):
    """``train.run_dir`` is held by another training. A `ConfigError` because the fix is a
    setting (another run_dir) or stopping the holder: callers report it like a bad config."""


class StorageError(ConfigError):
    """An object store (``gs://``, ``s3://``) cannot be reached, has no such bucket, or refuses
    the credentials at hand. A `ConfigError` because the fix is a setting: the URL, the
    endpoint, or the credentials, which the message names."""
