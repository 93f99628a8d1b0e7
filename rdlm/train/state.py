"""The train state: everything that changes from one step to the next and is checkpointed."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rdlm.config import Config, ConfigError, ModelConfig
from rdlm.model import abstract_params, init_params
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import sharding as shard_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes from one step to the next (and is checkpointed)."""

    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: Any
    opt_state: Any
    bad_steps: jax.Array  # int32: steps skipped for a non-finite loss/gradient, in total
    bad_streak: jax.Array  # int32: ... in a row, up to and including the last step

    def meta(self) -> dict[str, int]:
        return {"step": int(self.step), "bad_steps": int(self.bad_steps),
                "bad_streak": int(self.bad_streak)}


def state_shardings(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of a `TrainState`: params per the logical rules; optimizer moments mirror the
    params they belong to; scalars replicated."""
    p_shardings = shard_lib.param_shardings(cfg.model, mesh)
    rep = shard_lib.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params(cfg.model))
    # A frozen part (train.freeze) has no moments: its place holds an empty MaskedNode.
    masked = optax.transforms.MaskedNode
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda x, s: x if isinstance(x, masked) else s, abstract_opt, p_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, masked)))
    return TrainState(step=rep, params=p_shardings, opt_state=opt_shardings, bad_steps=rep,
                      bad_streak=rep)


def abstract_state(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState
                   ) -> TrainState:
    """`TrainState` of ShapeDtypeStructs carrying ``shardings`` (for restore and AOT lowering)."""
    params = abstract_params(cfg.model)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params),
                        bad_steps=jax.ShapeDtypeStruct((), jnp.int32),
                        bad_streak=jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def init_state(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState,
               params: Any | None = None) -> TrainState:
    """A fresh state created directly in its shardings (no full copy on one device)."""
    if params is None:
        params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(
            cfg.model, jax.random.key(cfg.seed))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    # Three distinct buffers: the state is donated, and one buffer may be donated only once.
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=zero(), params=params, opt_state=opt_state, bad_steps=zero(),
                      bad_streak=zero())



# Model fields that change how training runs, not what the parameters are: a run may resume
# with other values (e.g. turn on remat to fit memory, or raise the mean depth mid-run).
RESUMABLE_MODEL_FIELDS = ("remat", "remat_policy", "dtype", "backprop_depth", "mean_recurrence")


def resume_step(cfg: Config, checkpointer: ckpt_lib.TrainCheckpointer,
                log: Callable[[str], None]) -> int | None:
    """The step to resume from (None: start afresh): the newest complete checkpoint, or
    ``train.resume_step``, whose later checkpoints are deleted so that the run carries on from
    it (its new saves would otherwise collide with them, and a restart would pick them again)."""
    wanted = cfg.train.resume_step
    saved = list(ckpt_lib.list_checkpoints(checkpointer.directory.parent))
    latest = saved[-1] if saved else None
    if wanted < 0 or (latest is None and wanted == 0):
        return latest
    if wanted not in saved and wanted != 0:
        raise ConfigError(f"train.resume_step={wanted}: run_dir {cfg.train.run_dir!r} has no "
                          f"complete checkpoint of that step; its complete steps are {saved} "
                          "(0 starts afresh, -1 resumes from the newest).")
    # The same command runs again after a preemption: checkpoints written since the rollback
    # carry this resume_step in their config, and must not be rolled back a second time.
    if latest > wanted and ckpt_lib.load_config(
            checkpointer.directory / str(latest)).train.resume_step == wanted:
        log(f"train.resume_step={wanted} was applied before (step {latest} was trained after "
            f"it); resuming from step {latest}")
        return latest
    later = sorted(s for s in checkpointer.manager.all_steps() if s > wanted)
    for step in later:
        checkpointer.manager.delete(step)  # every process calls it: it ends in a barrier
    if later:
        log(f"train.resume_step={wanted}: deleted the later checkpoints {later} of "
            f"{checkpointer.directory}")
    return wanted if wanted in saved else None


def model_changes(old: ModelConfig, new: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (old value, new value)} of the model fields that differ."""
    return {f.name: (getattr(old, f.name), getattr(new, f.name))
            for f in dataclasses.fields(new) if getattr(old, f.name) != getattr(new, f.name)}


def restore_or_init(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState,
                     checkpointer: ckpt_lib.TrainCheckpointer, data_iterator: Any,
                     log: Callable[[str], None]) -> TrainState:
    """The checkpoint `resume_step` picks (the newest complete one by default), else fresh
    params (or ``train.init_from``)."""
    checkpointer.set_aside_damaged(log)  # a damaged newest step: resume before it, saying so
    latest = resume_step(cfg, checkpointer, log)
    if latest is not None:
        saved_cfg = ckpt_lib.load_config(checkpointer.directory / str(latest))
        changed = model_changes(saved_cfg.model, cfg.model)
        fixed = [name for name in changed if name not in RESUMABLE_MODEL_FIELDS]
        if fixed:
            diff = ", ".join(f"model.{n} {changed[n][0]!r} → {changed[n][1]!r}" for n in fixed)
            raise ConfigError(
                f"run_dir {cfg.train.run_dir!r} holds a checkpoint of a different model than "
                f"the config ({diff}); use a new train.run_dir, or train.init_from= to start "
                "from those weights.")
        for name, (old, new) in changed.items():
            log(f"resuming with model.{name}={new!r} (the checkpoint trained with {old!r})")
        if saved_cfg.train.freeze != cfg.train.freeze:  # the optimizer state differs in shape
            raise ConfigError(
                f"train.freeze={list(cfg.train.freeze)}: run_dir {cfg.train.run_dir!r} was "
                f"trained with train.freeze={list(saved_cfg.train.freeze)}, and its optimizer "
                "state holds moments for the trained parts only; resume with that value, or "
                "start a new train.run_dir with train.init_from= this one.")
        target = abstract_state(cfg, tx, shardings)
        params, opt_state, meta, data_state = checkpointer.restore(
            latest, abstract_params=target.params, abstract_opt_state=target.opt_state)
        if data_state is not None and hasattr(data_iterator, "set_state"):
            data_iterator.set_state(data_state)
        rep = shardings.step
        scalar = lambda v: jax.device_put(jnp.int32(v), rep)
        log(f"resumed from {checkpointer.directory / str(latest)} (step {latest})")
        return TrainState(step=scalar(meta["step"]), params=params, opt_state=opt_state,
                          bad_steps=scalar(meta["bad_steps"]), bad_streak=scalar(meta["bad_streak"]))
    params = None
    if cfg.train.init_from:
        init_cfg = ckpt_lib.load_config(cfg.train.init_from)
        if jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(init_cfg.model)) != \
                jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(cfg.model)):
            raise ConfigError(f"train.init_from={cfg.train.init_from!r} holds parameters of "
                              f"another shape ({init_cfg.model}); make the model config match.")
        _, params = ckpt_lib.load_params(cfg.train.init_from, shardings=shardings.params)
        log(f"initialised params from {cfg.train.init_from}")
        # Same shapes, other maths (RoPE, the norm's epsilon, ...) may be meant (a longer
        # context) or a slip (a retrofit config that does not match its conversion): say so.
        for name, (old, new) in model_changes(init_cfg.model, cfg.model).items():
            log(f"training with model.{name}={new!r}; train.init_from's params were made with "
                f"{old!r}")
    return init_state(cfg, tx, shardings, params)
