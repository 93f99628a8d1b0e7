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
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rdlm.config import Config, from_dict, to_dict
from rdlm.errors import CheckpointError, ConfigError

CHECKPOINTS_DIRNAME = "checkpoints"
PARAMS, CONFIG, OPT_STATE, TRAIN_META, DATA_ITER = (
    "params", "config", "opt_state", "train_meta", "data_iter")
# Step directories are named by the bare step number (``checkpoints/200``).
STEP_NAMES = ocp.path.step.standard_name_format()


# ---------------------------------------------------------------------------------------------
# Locating checkpoints.


def is_complete(path: Path) -> bool:
    """True for a finished checkpoint directory of this format: finalised by orbax, with the
    commit time orbax records in its step metadata just before finalising (a directory copied
    only in part has none), and a params item."""
    if not ocp.path.step.is_path_finalized(epath.Path(path)) or not (path / PARAMS).is_dir():
        return False
    # The step number plays no part in reading a directory's commit record.
    committed = ocp.path.step.Metadata(step=0, path=epath.Path(path)).commit_timestamp_nsecs
    return committed is not None


def _complete_steps(checkpoints_dir: Path) -> list[int]:
    """Steps with a complete checkpoint under ``checkpoints_dir``, ascending (orbax lists only
    finalised step directories; in-progress temporaries never appear)."""
    return sorted(m.step for m in STEP_NAMES.find_all(epath.Path(checkpoints_dir))
                  if is_complete(Path(m.path)))


def _interrupted_save_of(path: Path) -> bool:
    """Whether an unfinished orbax save of ``path`` lies beside it."""
    if not path.parent.is_dir():
        return False
    temporaries = ocp.path.step.all_temporary_paths(epath.Path(path.parent))
    return any(Path(t.get_final()) == path for t in temporaries)


def resolve(path: str | Path) -> Path:
    """The checkpoint directory meant by ``path``: itself, or the latest complete step of a
    training run directory (``<run>``) or of its ``<run>/checkpoints`` directory."""
    path = Path(path).expanduser().absolute()  # orbax wants absolute paths
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
    if is_complete(path):
        return path
    for root in (path / CHECKPOINTS_DIRNAME, path):
        steps = _complete_steps(root)
        if steps:
            return root / str(steps[-1])
    if (path / PARAMS).is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (orbax has no record of "
                              "its save finishing): it was interrupted or copied only in part; "
                              "re-create it, or load an earlier complete checkpoint.")
    raise CheckpointError(f"no complete checkpoint found at {str(path)!r}: expected a checkpoint "
                          f"directory with {PARAMS}/ inside, or a run directory with "
                          f"{CHECKPOINTS_DIRNAME}/<step>/ inside.")


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


def save_params(path: str | Path, cfg: Config, params: Any) -> None:
    """Write a params-only checkpoint (params + config) atomically; refuses to overwrite."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        raise CheckpointError(f"{str(path)!r} already exists; choose a new path or delete it first.")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(path, ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        CONFIG: ocp.args.JsonSave(to_dict(cfg))}))


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


def _restore_item(ckpt: Path, name: str, abstract_tree: Any) -> Any:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        restored = checkpointer.restore(
            ckpt, ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract_tree)}))
    except Exception as err:  # orbax raises many types; the user needs the path and the cause
        raise CheckpointError(f"could not restore {name!r} from {str(ckpt)!r}: "
                              f"{type(err).__name__}: {err}. The checkpoint may be corrupt or "
                              "written for a different model config.") from err
    return restored[name]


def load_params(path: str | Path, *, shardings: Any | None = None) -> tuple[Config, Any]:
    """(config, params) from a params-only checkpoint, a training checkpoint, or a run directory
    (its latest complete step). ``shardings``: a pytree of `jax.sharding.Sharding` mirroring the
    params (e.g. `rdlm.runtime.sharding.param_shardings`) or one sharding for all; the arrays are read
    straight into it. The tree structure is exactly `rdlm.abstract_params(config.model)`'s.
    """
    from rdlm.model import abstract_params
    ckpt = resolve(path)
    cfg = load_config(ckpt)
    target = _abstract_with_shardings(abstract_params(cfg.model), shardings)
    return cfg, _restore_item(ckpt, PARAMS, target)


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


class TrainCheckpointer:
    """Training checkpoints under ``<run_dir>/checkpoints``: async, atomic, keep last N + every K.

    ``save`` blocks only while device arrays are copied to host; the write finishes in the
    background (``wait`` joins it). Saves are always explicit (``should_save`` decides), so the
    policy lives in one readable place.
    """

    def __init__(self, run_dir: str | Path, *, save_every: int, keep_last: int, keep_every: int,
                 async_save: bool = True):
        self.directory = Path(run_dir).expanduser().absolute() / CHECKPOINTS_DIRNAME
        self.save_every = save_every
        keep: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        if keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            step_name_format=STEP_NAMES,
            create=True,
            cleanup_tmp_directories=True)  # an interrupted save is removed on the next start
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step whose checkpoint is complete on disk (a save still being written in
        the background is not one yet)."""
        steps = _complete_steps(self.directory)
        return steps[-1] if steps else None

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
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any
                ) -> tuple[Any, Any, dict[str, int], Any | None]:
        """(params, opt_state, meta, data-iterator state) of ``step``, into the given shardings."""
        ckpt = self.directory / str(step)
        if not is_complete(ckpt):
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete or missing; the "
                                  f"complete steps are {_complete_steps(self.directory)}.")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardRestore(abstract_params),
                OPT_STATE: ocp.args.StandardRestore(abstract_opt_state),
                TRAIN_META: ocp.args.JsonRestore()}))
        except Exception as err:
            raise CheckpointError(
                f"could not restore training state from {str(ckpt)!r}: {type(err).__name__}: "
                f"{err}. If the model or optimizer config changed since it was written, start a "
                "new run_dir (optionally with init_from= this checkpoint).") from err
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
