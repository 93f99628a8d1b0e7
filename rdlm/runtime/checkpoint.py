"""The one checkpoint format of rdlm (orbax), for training, sampling, conversion and notebooks.

A checkpoint is an orbax composite directory::

    <ckpt>/params/      the params pytree (OCDBT/tensorstore; restores straight into any sharding)
    <ckpt>/config/      the full `rdlm.Config` as JSON
    # training checkpoints add:
    <ckpt>/opt_state/   the optax state
    <ckpt>/train_meta/  step and NaN-guard counters (JSON)
    <ckpt>/data_iter/   the data iterator's state, one JSON file per process (grain's layout)

A params-only checkpoint (`save_params`: conversion, ``init_from=``) is just ``params`` + ``config``.
A training run keeps its checkpoints under ``<run_dir>/checkpoints/<step>/``. Orbax writes every
checkpoint to a temporary directory and finalises it when complete (an atomic rename on local and
POSIX file systems, a commit file on GCS), so a kill at any moment leaves either the finished
checkpoint or a temporary that every reader here ignores. What counts as finished is asked of
orbax's public `orbax.checkpoint.path.step` API, never read from its file names.

Every checkpoint also carries ``<ckpt>/integrity.json``, the sha256 of each of its files
(`rdlm.runtime.integrity`), written by process 0 into orbax's temporary directory once every
process has written its part and before orbax renames it into place, so it is committed with the
checkpoint. Loading compares the files with it and refuses a checkpoint that differs by name;
a run directory resolves to its newest intact step. Checkpoints saved before checksums existed
load unverified, with a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rdlm.config import Config, from_dict, to_dict
from rdlm.errors import CheckpointError, ConfigError
from rdlm.runtime import integrity

CHECKPOINTS_DIRNAME = "checkpoints"
PARAMS, CONFIG, OPT_STATE, TRAIN_META, DATA_ITER = (
    "params", "config", "opt_state", "train_meta", "data_iter")
# Step directories are named by the bare step number (``checkpoints/200``).
STEP_NAMES = ocp.path.step.standard_name_format()


# ---------------------------------------------------------------------------------------------
# Locating checkpoints, and what makes one loadable.

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


def _step_metadata(path: Path) -> Any | None:
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


def _structural_damage(path: Path) -> str | None:
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


def damage(path: Path, items: Sequence[str] | None = LOADED_ITEMS) -> str | None:
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


def is_complete(path: Path) -> bool:
    """True for a finished checkpoint directory of this format: finalised by orbax, with the
    commit time orbax records in its step metadata just before finalising (a directory copied
    only in part has none), a params item, and the checksum manifest if it was saved with one.
    File contents are not read (`damage` compares them with the checksums)."""
    return _structural_damage(path) is None


def carries_checksums(path: Path) -> bool:
    """Whether the checkpoint ``path`` was saved with a checksum manifest (rdlm's own saves
    have one since checksums were introduced; earlier ones load unverified)."""
    meta = _step_metadata(path)
    return meta is not None and integrity.carries_checksums(meta.custom_metadata)


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finalised step directory, complete or not, newest first
    (orbax lists only finalised ones; in-progress temporaries never appear)."""
    if not checkpoints_dir.is_dir():
        return []
    found = STEP_NAMES.find_all(epath.Path(checkpoints_dir))
    return sorted(((m.step, Path(m.path)) for m in found), reverse=True)


def _complete_steps(checkpoints_dir: Path) -> list[int]:
    """Steps with a complete checkpoint under ``checkpoints_dir``, ascending."""
    return sorted(step for step, path in _step_dirs(checkpoints_dir) if is_complete(path))


def _newest_intact(checkpoints_dir: Path, items: Sequence[str] | None, report: Report | None
                   ) -> tuple[Path | None, list[tuple[int, Path, str]]]:
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


def _interrupted_save_of(path: Path) -> bool:
    """Whether an unfinished orbax save of ``path`` lies beside it."""
    if not path.parent.is_dir():
        return False
    temporaries = ocp.path.step.all_temporary_paths(epath.Path(path.parent))
    return any(Path(t.get_final()) == path for t in temporaries)


def _looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint directory (complete or damaged) rather than a run or checkpoints directory:
    it holds an item or orbax's commit record."""
    return (path / PARAMS).exists() or (path / CONFIG).exists() or \
        _step_metadata(path) is not None


def _refusal(path: Path, reason: str) -> str:
    """The one-line error for a damaged checkpoint: the path, why, and what to do instead."""
    return (f"checkpoint {str(path)!r} cannot be loaded: {reason}. Load another checkpoint: "
            "for a training run, pass the run directory to use its newest intact step (rdlm "
            "train resumes from it by itself); otherwise restore this one from a copy or write "
            "it again.")


def _checked_path(path: Path) -> Path:
    """``path`` made absolute (orbax wants absolute paths), after the checks that need no
    reading: not a temporary, and there."""
    path = Path(path).expanduser().absolute()
    if ocp.path.step.is_path_temporary(epath.Path(path)):
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


def resolve(path: str | Path, *, items: Sequence[str] | None = LOADED_ITEMS,
            report: Report | None = None) -> Path:
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
        intact, skipped = _newest_intact(root, items, report)
        if intact is not None:
            return intact
        if skipped:
            why = "; ".join(f"step {step}: {reason}" for step, _, reason in skipped)
            raise CheckpointError(f"no intact checkpoint in {str(root)!r} ({why}); restore one "
                                  "from a copy or start the run again.")
    raise CheckpointError(f"no complete checkpoint found at {str(path)!r}: expected a checkpoint "
                          f"directory with {PARAMS}/ inside, or a run directory with "
                          f"{CHECKPOINTS_DIRNAME}/<step>/ inside.")


def _loaded_line(path: Path) -> str:
    """How a loaded checkpoint is named to the user: its step and path, and a note when it
    carries no checksums."""
    name = f"step {path.name} from {path}" if path.name.isdigit() else str(path)
    if not carries_checksums(path):
        name += (" (saved by an earlier rdlm without checksums: its files could not be "
                 "verified)")
    return f"loaded {name}"


# ---------------------------------------------------------------------------------------------
# Params-only checkpoints and loading params from any checkpoint.


def config_from_json(data: dict[str, Any]) -> Config:
    """The saved `Config`. Keys that this version of rdlm no longer knows (a renamed data or
    train option) are dropped with a warning instead of making old checkpoints unreadable; the
    model section must still match exactly, since it decides the parameter shapes."""
    try:
        return from_dict(Config, data)
    except ConfigError:
        pass
    known = {f.name: f for f in dataclasses.fields(Config)}
    cleaned: dict[str, Any] = {}
    for section, value in data.items():
        if section not in known:
            warnings.warn(f"checkpoint config: ignoring unknown section {section!r}")
            continue
        section_cls = known[section].default.__class__ if isinstance(value, dict) else None
        if section != "model" and section_cls is not None and dataclasses.is_dataclass(section_cls):
            names = {f.name for f in dataclasses.fields(section_cls)}
            dropped = sorted(set(value) - names)
            if dropped:
                warnings.warn(f"checkpoint config: ignoring unknown {section} keys {dropped}")
            value = {k: v for k, v in value.items() if k in names}
        cleaned[section] = value
    return from_dict(Config, cleaned)


def _seal(final: Path) -> None:
    """Write the checksum manifest of the save of ``final`` that orbax is finalising. orbax calls
    this on process 0 once every process has written its files, and before it renames the
    temporary directory into place, so the manifest goes into the temporary and is committed
    with the rest; should a later orbax call it after the rename, it goes into ``final``."""
    temporaries = [Path(t.get())
                   for t in ocp.path.step.all_temporary_paths(epath.Path(final.parent))
                   if Path(t.get_final()) == final]
    target = max(temporaries, key=lambda p: p.stat().st_mtime_ns) if temporaries else final
    if not target.is_dir():
        raise CheckpointError(f"cannot write the checksums of checkpoint {str(final)!r}: neither "
                              "it nor its orbax temporary directory exists.")
    integrity.write_manifest(target)


def _sealing_options(final: Callable[[], Path]) -> ocp.AsyncOptions:
    """orbax options that seal each save (``final()`` names the checkpoint being saved)."""
    return ocp.AsyncOptions(post_finalization_callback=lambda: _seal(final()))


def save_params(path: str | Path, cfg: Config, params: Any) -> None:
    """Write a params-only checkpoint (params + config + checksums) atomically; refuses to
    overwrite."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        raise CheckpointError(f"{str(path)!r} already exists; choose a new path or delete it first.")
    # Asynchronous only to get orbax's finalisation hook (`_seal`); the save is waited for.
    checkpointer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(),
                                         async_options=_sealing_options(lambda: path))
    try:
        checkpointer.save(path, ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            CONFIG: ocp.args.JsonSave(to_dict(cfg))}), custom_metadata=integrity.CUSTOM_METADATA)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def load_config(path: str | Path) -> Config:
    """The `Config` saved with a checkpoint (any of the paths `resolve` accepts)."""
    ckpt = resolve(path)
    # Read as a file, not restored: an orbax restore is a barrier across processes, and any one
    # process may ask for the config. "metadata" is `JsonCheckpointHandler`'s documented default.
    config_file = ckpt / CONFIG / "metadata"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no config ({config_file} missing); "
                              "it was not written by rdlm.checkpoint.")
    try:
        return config_from_json(json.loads(config_file.read_text()))
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"config of checkpoint {str(ckpt)!r} is unreadable: {err}") from err


def _default_sharding() -> jax.sharding.Sharding:
    """Where unsharded restores go: one device, or replicated over all devices when multi-process."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_with_shardings(abstract_tree: Any, shardings: Any | None) -> Any:
    """ShapeDtypeStructs carrying the target shardings (a pytree, one sharding, or None)."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        sharding = shardings or _default_sharding()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            abstract_tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def short_cause(err: BaseException) -> str:
    """An orbax or tensorstore error in one short line: theirs run to many lines of specs and
    source locations, which bury the path and the fix of the message they end up in."""
    lines = str(err).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


@contextlib.contextmanager
def _quiet_closed_event_loops() -> Iterator[None]:
    """When one read of a restore fails, orbax closes its event loop while tensorstore still
    completes the other reads, and each completion prints an "Event loop is closed" traceback
    that says nothing about the checkpoint (the error raised does). Those tracebacks are
    dropped; after a failure the filter stays, since the last reads finish after the raise."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    yield
    sys.unraisablehook = previous


def _restore_item(ckpt: Path, name: str, abstract_tree: Any) -> Any:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        with _quiet_closed_event_loops():
            restored = checkpointer.restore(
                ckpt, ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract_tree)}))
    except Exception as err:  # orbax raises many types; the user needs the path and the cause
        raise CheckpointError(f"could not restore {name!r} from {str(ckpt)!r} "
                              f"({short_cause(err)}); it may be corrupt or written for a "
                              "different model config: load another checkpoint, or match the "
                              "model config.") from err
    return restored[name]


def load_params(path: str | Path, *, shardings: Any | None = None, report: Report | None = None
                ) -> tuple[Config, Any]:
    """(config, params) from a params-only checkpoint, a training checkpoint, or a run directory
    (its newest intact step). ``shardings``: a pytree of `jax.sharding.Sharding` mirroring the
    params (e.g. `rdlm.runtime.sharding.param_shardings`) or one sharding for all; the arrays are read
    straight into it. The tree structure is exactly `rdlm.abstract_params(config.model)`'s.
    ``report`` (e.g. `say_on_stderr`) gets one line per damaged step passed over and one naming
    the checkpoint loaded.
    """
    from rdlm.model import abstract_params
    ckpt = resolve(path, report=report)
    cfg = load_config(ckpt)
    target = _abstract_with_shardings(abstract_params(cfg.model), shardings)
    params = _restore_item(ckpt, PARAMS, target)
    if report is not None:
        report(_loaded_line(ckpt))
    return cfg, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints.


def _data_state_file(item_dir: Path, process_index: int, process_count: int) -> Path:
    # grain's own orbax handler's file name and content, so grain can restore a same-size run.
    return item_dir / f"process_{process_index}-of-{process_count}.json"


def _encode_state(state: Any) -> Any:
    """grain `DatasetIterator` states are dicts; `DataLoader` iterators return JSON bytes."""
    return {"__bytes__": state.decode()} if isinstance(state, bytes) else state


def _decode_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode()
    return state


class DataStateHandler(ocp.CheckpointHandler):
    """Every process writes its own data-iterator state (JSON) into the checkpoint.

    grain's `grain.checkpoint.CheckpointHandler` writes the same files but does not fit twice:
    its restore reads only the file of the current process count (rdlm's pipelines save the same
    global position on every process, so a run resumes on any number of hosts: `read_data_state`),
    and it accepts only grain's own iterators, where `rdlm.train.train` takes any iterator with
    ``get_state``/``set_state``. The state is taken when `TrainCheckpointer.save` is called (on
    the training thread), so the background write can never record an iterator that has moved on.
    """

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        path = _data_state_file(Path(directory), jax.process_index(), jax.process_count())
        path.write_text(json.dumps(_encode_state(args.state)))

    def restore(self, directory: epath.Path, args: Any = None) -> Any:
        return read_data_state(Path(directory).parent, jax.process_index(), jax.process_count())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


# Never constructed here (`TrainCheckpointer.restore` reads the files with `read_data_state`),
# but orbax refuses to save an item whose handler has no registered restore arguments.
@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def read_data_state(ckpt: Path, process_index: int, process_count: int) -> Any | None:
    """This process's saved data-iterator state, or None when the checkpoint has none.

    When the checkpoint was written with a different number of processes, a state that every
    writer saved identically (pipelines that index a global order by step) is still usable;
    per-process states that differ cannot be re-split and raise a clear error.
    """
    item_dir = ckpt / DATA_ITER
    if not item_dir.is_dir():
        return None
    own = _data_state_file(item_dir, process_index, process_count)
    if own.is_file():
        return _decode_state(json.loads(own.read_text()))
    saved = sorted(item_dir.glob("process_*-of-*.json"))
    states = [json.loads(f.read_text()) for f in saved]
    if states and all(s == states[0] for s in states):
        return _decode_state(states[0])
    raise CheckpointError(
        f"checkpoint {str(ckpt)!r} holds data-iterator states for {len(saved)} processes that "
        f"differ from each other, so they cannot be re-split over {process_count} processes; "
        "resume with the original process count, or start a new run with init_from=.")


def _aside_path(damaged_dir: Path, step: int) -> Path:
    """A free name for a damaged step under ``damaged_dir``: ``<step>``, else ``<step>-1``, …"""
    candidate, n = damaged_dir / str(step), 0
    while candidate.exists():
        n += 1
        candidate = damaged_dir / f"{step}-{n}"
    return candidate


def _sync_processes(name: str) -> None:
    """Wait for every process (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class TrainCheckpointer:
    """Training checkpoints under ``<run_dir>/checkpoints``: async, atomic, checksummed, keep last
    N + every K.

    ``save`` blocks only while device arrays are copied to host; the write finishes in the
    background (``wait`` joins it), and the checksum manifest is written as orbax commits it.
    Saves are always explicit (``should_save`` decides), so the policy lives in one readable
    place. ``set_aside_damaged`` moves damaged steps out of the way of a resumed run.
    """

    def __init__(self, run_dir: str | Path, *, save_every: int, keep_last: int, keep_every: int,
                 async_save: bool = True):
        self.directory = Path(run_dir).expanduser().absolute() / CHECKPOINTS_DIRNAME
        self.save_every = save_every
        self.async_save = async_save
        self._saving: Path | None = None  # the step directory orbax is writing, for `_seal`
        keep: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            # Always orbax's asynchronous path: only it has the finalisation hook that writes the
            # checksums inside the commit. ``async_save=False`` waits for each save instead.
            enable_async_checkpointing=True,
            async_options=_sealing_options(lambda: self._saving),
            step_name_format=STEP_NAMES,
            create=True,
            cleanup_tmp_directories=True)  # an interrupted save is removed on the next start
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint is complete on disk (a save still being written in
        the background is not one yet). File contents are not checked: see `set_aside_damaged`."""
        steps = _complete_steps(self.directory)
        return steps[-1] if steps else None

    def set_aside_damaged(self, report: Report = print) -> int | None:
        """Before resuming: the newest step whose every file matches its checksums (None when
        there is none). Each newer step that is damaged (incomplete, an item missing, a checksum
        mismatch) is moved to ``<run_dir>/damaged-checkpoints/`` with a line to ``report``
        naming it and why, so that `latest_step` is the intact one and the run can save that
        step number again."""
        intact, skipped = _newest_intact(self.directory, None, None)
        if not skipped:
            return None if intact is None else int(intact.name)
        damaged_dir = self.directory.parent / DAMAGED_DIRNAME
        _sync_processes("rdlm-resume-verdicts")  # every process has read them before any moves
        for step, path, reason in skipped:
            aside = _aside_path(damaged_dir, step)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, aside)
            report(f"skipped step {step}: {reason}; moved it to {aside}")
        _sync_processes("rdlm-resume-moved")
        self.manager.reload()  # orbax forgets the steps it may have listed
        return None if intact is None else int(intact.name)

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, *, cfg: Config, params: Any, opt_state: Any,
             meta: dict[str, int], data_iterator: Any | None) -> None:
        items: dict[str, Any] = {
            PARAMS: ocp.args.StandardSave(params),
            OPT_STATE: ocp.args.StandardSave(opt_state),
            CONFIG: ocp.args.JsonSave(to_dict(cfg)),
            TRAIN_META: ocp.args.JsonSave(meta),
        }
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            items[DATA_ITER] = DataStateSave(data_iterator.get_state())
        # orbax writes one save at a time; once the previous one is done, `_saving` is ours.
        self.manager.wait_until_finished()
        self._saving = self.directory / str(step)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                          custom_metadata=integrity.CUSTOM_METADATA)
        if not self.async_save:
            self.manager.wait_until_finished()

    def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any
                ) -> tuple[Any, Any, dict[str, int], Any | None]:
        """(params, opt_state, meta, data-iterator state) of ``step``, into the given shardings;
        every file of the step is checked against its checksums first."""
        ckpt = self.directory / str(step)
        reason = damage(ckpt, None) if ckpt.is_dir() else "it is missing"
        if reason is not None:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} cannot be resumed from: {reason}. "
                                  f"The complete steps are {_complete_steps(self.directory)}; "
                                  "set_aside_damaged() moves damaged ones aside.")
        try:
            with _quiet_closed_event_loops():
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    PARAMS: ocp.args.StandardRestore(abstract_params),
                    OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
                    TRAIN_META: ocp.args.JsonRestore()}))
        except Exception as err:
            raise CheckpointError(
                f"could not restore training state from {str(ckpt)!r} ({short_cause(err)}); if "
                "the model or optimizer config changed since it was written, start a new "
                "run_dir (optionally with init_from= this checkpoint).") from err
        data_state = read_data_state(ckpt, jax.process_index(), jax.process_count())
        return restored[PARAMS], restored[OPT_STATE], dict(restored[TRAIN_META]), data_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def list_checkpoints(run_dir: str | Path) -> Iterable[int]:
    """Complete steps of a run directory, ascending (for scripts and tests)."""
    return _complete_steps(Path(run_dir).expanduser().absolute() / CHECKPOINTS_DIRNAME)


def finished_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir``, or None."""
    steps = list(list_checkpoints(run_dir))
    return steps[-1] if steps else None
