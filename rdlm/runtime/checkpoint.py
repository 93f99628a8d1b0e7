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
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rdlm.config import Config
from rdlm.config_files import from_dict, to_dict
from rdlm.errors import CheckpointError, ConfigError
from rdlm.runtime import integrity, storage
from rdlm.runtime.storage import StoragePath, as_path
from rdlm.runtime.steps import (  # noqa: F401 (the locating half of the API, re-exported)
    CHECKPOINTS_DIRNAME, PARAMS, CONFIG, OPT_STATE, TRAIN_META, DATA_ITER, STEP_NAMES,
    DAMAGED_DIRNAME, Report, say_on_stderr, damage, is_complete, carries_checksums, resolve,
    complete_steps, newest_intact, loaded_line)

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


def _seal(final: StoragePath) -> None:
    """Write the checksum manifest of the save of ``final`` that orbax is finalising. orbax calls
    this on process 0 once every process has written its files, and before it renames the
    temporary directory into place, so the manifest goes into the temporary and is committed
    with the rest; should a later orbax call it after the rename, it goes into ``final``."""
    temporaries = [as_path(t.get())
                   for t in ocp.path.step.all_temporary_paths(epath.Path(final.parent))
                   if as_path(t.get_final()) == final]
    target = max(temporaries, key=storage.modified_ns) if temporaries else final
    if not target.is_dir():
        raise CheckpointError(f"cannot write the checksums of checkpoint {str(final)!r}: neither "
                              "it nor its orbax temporary directory exists.")
    integrity.write_manifest(target)


def _sealing_options(final: Callable[[], StoragePath]) -> ocp.AsyncOptions:
    """orbax options that seal each save (``final()`` names the checkpoint being saved)."""
    return ocp.AsyncOptions(post_finalization_callback=lambda: _seal(final()))


def save_params(path: str | StoragePath, cfg: Config, params: Any) -> None:
    """Write a params-only checkpoint (params + config + checksums) atomically; refuses to
    overwrite. ``path`` may be a bucket URL."""
    storage.check_access(str(path), "the checkpoint path")
    storage.require_array_store(str(path), "the checkpoint path")
    path = as_path(path)
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


def load_config(path: str | StoragePath) -> Config:
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


def _restore_item(ckpt: StoragePath, name: str, abstract_tree: Any) -> Any:
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


PARAM_DTYPES = ("float32", "bfloat16")


def load_params(path: str | StoragePath, *, shardings: Any | None = None, report: Report | None = None,
                dtype: str = "float32") -> tuple[Config, Any]:
    """(config, params) from a params-only checkpoint, a training checkpoint, or a run directory
    (its newest intact step). ``shardings``: a pytree of `jax.sharding.Sharding` mirroring the
    params (e.g. `rdlm.runtime.sharding.param_shardings`) or one sharding for all; the arrays are read
    straight into it. The tree structure is exactly `rdlm.abstract_params(config.model)`'s.
    ``report`` (e.g. `say_on_stderr`) gets one line per damaged step passed over and one naming
    the checkpoint loaded. ``dtype``: the arrays' dtype whatever the checkpoint stores, float32
    (rdlm's parameters, what training takes) or bfloat16 (half the memory, for generation and
    evaluation; a model computing in bfloat16 rounds its matmul weights to it anyway).
    """
    from rdlm.model import abstract_params
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"dtype={dtype!r}: parameters load as one of {', '.join(PARAM_DTYPES)}.")
    ckpt = resolve(path, report=report)
    cfg = load_config(ckpt)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                            abstract_params(cfg.model))
    target = _abstract_with_shardings(abstract, shardings)
    params = _restore_item(ckpt, PARAMS, target)
    if report is not None:
        report(loaded_line(ckpt))
    return cfg, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints.


def _data_state_file(item_dir: StoragePath, process_index: int, process_count: int
                     ) -> StoragePath:
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
        path = _data_state_file(as_path(directory), jax.process_index(), jax.process_count())
        path.write_text(json.dumps(_encode_state(args.state)))

    def restore(self, directory: epath.Path, args: Any = None) -> Any:
        return read_data_state(as_path(directory).parent, jax.process_index(),
                               jax.process_count())


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


def read_data_state(ckpt: StoragePath, process_index: int, process_count: int) -> Any | None:
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


def _aside_path(damaged_dir: StoragePath, step: int) -> StoragePath:
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

    def __init__(self, run_dir: str | StoragePath, *, save_every: int, keep_last: int, keep_every: int,
                 async_save: bool = True):
        storage.require_array_store(str(run_dir), "train.run_dir")
        self.directory = as_path(run_dir) / CHECKPOINTS_DIRNAME
        self.save_every = save_every
        self.async_save = async_save
        self._saving: StoragePath | None = None  # the step directory orbax is writing, for `_seal`
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
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def set_aside_damaged(self, report: Report = print) -> int | None:
        """Before resuming: the newest step whose every file matches its checksums (None when
        there is none). Each newer step that is damaged (incomplete, an item missing, a checksum
        mismatch) is moved to ``<run_dir>/damaged-checkpoints/`` with a line to ``report``
        naming it and why, so that `latest_step` is the intact one and the run can save that
        step number again."""
        intact, skipped = newest_intact(self.directory, None, None)
        if not skipped:
            return None if intact is None else int(intact.name)
        damaged_dir = self.directory.parent / DAMAGED_DIRNAME
        _sync_processes("rdlm-resume-verdicts")  # every process has read them before any moves
        for step, path, reason in skipped:
            aside = _aside_path(damaged_dir, step)
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                storage.move_tree(path, aside)
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
                                  f"The complete steps are {complete_steps(self.directory)}; "
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


def list_checkpoints(run_dir: str | StoragePath) -> Iterable[int]:
    """Complete steps of a run directory, ascending (for scripts and tests)."""
    return complete_steps(as_path(run_dir) / CHECKPOINTS_DIRNAME)


def finished_step(run_dir: str | StoragePath) -> int | None:
    """The step of the newest complete checkpoint in ``run_dir``, or None."""
    steps = list(list_checkpoints(run_dir))
    return steps[-1] if steps else None
