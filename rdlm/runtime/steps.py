"""Locating checkpoints, and what makes one loadable: finished by orbax's public step API,
structurally whole, and equal to its integrity manifest (`rdlm.runtime.integrity`). A run
directory resolves to its newest intact step; damaged steps are named with the reason.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence

import orbax.checkpoint as ocp
from etils import epath

from rdlm.errors import CheckpointError
from rdlm.runtime import integrity
from rdlm.runtime.storage import StoragePath, as_path, check_access, is_remote

CHECKPOINTS_DIRNAME = "checkpoints"
PARAMS, CONFIG, OPT_STATE, TRAIN_META, DATA_ITER = (
    "params", "config", "opt_state", "train_meta", "data_iter")
# Step directories are named by the bare step number (``checkpoints/200``).
STEP_NAMES = ocp.path.step.standard_name_format()



# Where a training run puts the steps it found damaged, beside (not inside) its checkpoints
# directory, so that orbax never lists them and the run can write those step numbers again.
DAMAGED_DIRNAME = "damaged-checkpoints"
# What `load_params` reads, and so what must be intact for it.
LOADED_ITEMS = (PARAMS, CONFIG)
Report = Callable[[str], None]


def say_on_stderr(message: str) -> None:
    """A `Report` for the command line: one line on stderr, beside the command's own output."""
    print(message, file=sys.stderr)


class _NoMissingMetadataWarning(logging.Filter):
    """Drops orbax's warning about a missing step-metadata file: here that is a verdict
    (incomplete), which the caller reports in its own words, not a problem to log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


def _step_metadata(path: StoragePath) -> Any | None:
    """orbax's step metadata of a checkpoint directory (its commit record), or None when it is
    missing or unreadable."""
    absl_logger, quiet = logging.getLogger("absl"), _NoMissingMetadataWarning()
    absl_logger.addFilter(quiet)
    try:
        return ocp.metadata.get_step_metadata(epath.Path(path))
    except (ValueError, TypeError, KeyError, OSError):
        return None
    finally:
        absl_logger.removeFilter(quiet)


def _structural_damage(path: StoragePath) -> str | None:
    """Why ``path`` is not a complete checkpoint, from its layout alone (no file contents
    read); None when it is one."""
    if not ocp.path.step.is_path_finalized(epath.Path(path)):
        return "it is an unfinished orbax temporary directory (its save never finished)"
    meta = _step_metadata(path)
    if meta is None or meta.commit_timestamp_nsecs is None:
        return ("it is incomplete: orbax has no record of its save finishing (an interrupted "
                "save, a partial copy, or _CHECKPOINT_METADATA deleted)")
    if not (path / PARAMS).is_dir():
        return f"it is incomplete: its {PARAMS}/ item is missing"
    if integrity.carries_checksums(meta.custom_metadata) and \
            not (path / integrity.MANIFEST).is_file():
        return f"it was saved with checksums but its {integrity.MANIFEST} is missing"
    return None


def damage(path: StoragePath, items: Sequence[str] | None = LOADED_ITEMS) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted, or None when it can: incomplete
    (see `is_complete`), or a file of ``items`` (all items when None) missing or different from
    the checksums saved with it. Checkpoints saved before rdlm wrote checksums are judged by
    their layout alone."""
    reason = _structural_damage(path)
    if reason is not None or not carries_checksums(path):
        return reason
    try:
        manifest = integrity.read_manifest(path)
    except ValueError as err:
        return f"its {integrity.MANIFEST} is unreadable ({err})"
    assert manifest is not None  # `_structural_damage` saw it
    mismatch = integrity.first_mismatch(path, manifest, items)
    return None if mismatch is None else f"it is corrupt: {mismatch}"


def is_complete(path: StoragePath) -> bool:
    """True for a finished checkpoint directory of this format: finalised by orbax, with the
    commit time orbax records in its step metadata just before finalising (a directory copied
    only in part has none), a params item, and the checksum manifest if it was saved with one.
    File contents are not read (`damage` compares them with the checksums)."""
    return _structural_damage(path) is None


def carries_checksums(path: StoragePath) -> bool:
    """Whether the checkpoint ``path`` was saved with a checksum manifest (rdlm's own saves
    have one since checksums were introduced; earlier ones load unverified)."""
    meta = _step_metadata(path)
    return meta is not None and integrity.carries_checksums(meta.custom_metadata)


def _step_dirs(checkpoints_dir: StoragePath) -> list[tuple[int, StoragePath]]:
    """(step, directory) of every finalised step directory, complete or not, newest first
    (orbax lists only finalised ones; in-progress temporaries never appear)."""
    if not checkpoints_dir.is_dir():
        return []
    found = STEP_NAMES.find_all(epath.Path(checkpoints_dir))
    return sorted(((m.step, as_path(m.path)) for m in found), reverse=True)


def complete_steps(checkpoints_dir: StoragePath) -> list[int]:
    """Steps with a complete checkpoint under ``checkpoints_dir``, ascending."""
    return sorted(step for step, path in _step_dirs(checkpoints_dir) if is_complete(path))


def newest_intact(checkpoints_dir: StoragePath, items: Sequence[str] | None, report: Report | None
                   ) -> tuple[StoragePath | None, list[tuple[int, StoragePath, str]]]:
    """The newest step directory whose ``items`` are intact (None when no step is), and the
    newer ones passed over as (step, directory, why), newest first."""
    skipped = []
    for step, path in _step_dirs(checkpoints_dir):
        reason = damage(path, items)
        if reason is None:
            return path, skipped
        skipped.append((step, path, reason))
        if report is not None:
            report(f"skipped step {step} ({path}): {reason}")
    return None, skipped


def _interrupted_save_of(path: StoragePath) -> bool:
    """Whether an unfinished orbax save of ``path`` lies beside it."""
    if not path.parent.is_dir():
        return False
    temporaries = ocp.path.step.all_temporary_paths(epath.Path(path.parent))
    return any(as_path(t.get_final()) == path for t in temporaries)


def _looks_like_checkpoint(path: StoragePath) -> bool:
    """A checkpoint directory (complete or damaged) rather than a run or checkpoints directory:
    it holds an item or orbax's commit record."""
    return (path / PARAMS).exists() or (path / CONFIG).exists() or \
        _step_metadata(path) is not None


def _refusal(path: StoragePath, reason: str) -> str:
    """The one-line error for a damaged checkpoint: the path, why, and what to do instead."""
    return (f"checkpoint {str(path)!r} cannot be loaded: {reason}. Load another checkpoint: "
            "for a training run, pass the run directory to use its newest intact step (rdlm "
            "train resumes from it by itself); otherwise restore this one from a copy or write "
            "it again.")


def _checked_path(path: StoragePath) -> StoragePath:
    """``path`` made absolute (orbax wants absolute paths) or a bucket URL, after the checks
    that need no reading: not a temporary, and there."""
    check_access(str(path), "the checkpoint path")
    path = as_path(path)
    # On GCS orbax marks a finished save with a commit file, so every folder without one (a
    # run directory too) counts as "temporary" there: only a checkpoint-looking one is.
    if ocp.path.step.is_path_temporary(epath.Path(path)) and \
            (not is_remote(path) or _looks_like_checkpoint(path)):
        raise CheckpointError(f"{str(path)!r} is a half-written checkpoint (an orbax temporary "
                              "directory); load the run directory instead to get its latest "
                              "complete step.")
    if not path.exists():
        if _interrupted_save_of(path):
            raise CheckpointError(f"checkpoint {str(path)!r} was never finished: its save was "
                                  "interrupted (only an orbax temporary directory is there); "
                                  "write it again.")
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist; pass a checkpoint "
                              "directory, a run directory, or its checkpoints/ directory.")
    return path


def resolve(path: str | StoragePath, *, items: Sequence[str] | None = LOADED_ITEMS,
            report: Report | None = None) -> StoragePath:
    """The checkpoint directory meant by ``path``, with ``items`` verified against its checksums:
    ``path`` itself, refused by name when damaged; or, for a training run directory (``<run>``)
    or its ``<run>/checkpoints``, its newest intact step, each newer damaged step passed over
    with a line to ``report``."""
    path = _checked_path(path)
    if _looks_like_checkpoint(path):
        reason = damage(path, items)
        if reason is not None:
            raise CheckpointError(_refusal(path, reason))
        return path
    for root in (path / CHECKPOINTS_DIRNAME, path):
        intact, skipped = newest_intact(root, items, report)
        if intact is not None:
            return intact
        if skipped:
            why = "; ".join(f"step {step}: {reason}" for step, _, reason in skipped)
            raise CheckpointError(f"no intact checkpoint in {str(root)!r} ({why}); restore one "
                                  "from a copy or start the run again.")
    raise CheckpointError(f"no complete checkpoint found at {str(path)!r}: expected a checkpoint "
                          f"directory with {PARAMS}/ inside, or a run directory with "
                          f"{CHECKPOINTS_DIRNAME}/<step>/ inside.")


def loaded_line(path: StoragePath) -> str:
    """How a loaded checkpoint is named to the user: its step and path, and a note when it
    carries no checksums."""
    name = f"step {path.name} from {path}" if path.name.isdigit() else str(path)
    if not carries_checksums(path):
        name += (" (saved by an earlier rdlm without checksums: its files could not be "
                 "verified)")
    return f"loaded {name}"
