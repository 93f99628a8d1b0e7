"""One optimizer step, sharded and jitted; the loss it differentiates is a parameter.

  1. draw the recurrence count (n_no_grad, n_grad) by the objective's `DepthPolicy` from
     ``fold_in(key(seed), step)``: every device and host gets the same r without communicating;
     a recurrence curriculum sets the mean from the step number;
  2. loss and gradients, accumulated over ``train.micro_batches`` with a `lax.scan` (token-weighted,
     so 4 micro-batches give the gradient of the whole batch), none for the ``train.freeze`` parts;
  3. the optax update, kept only if `update_is_good`: the loss, the gradient norm and the
     updated params' norm are finite. Otherwise it is dropped on device (params and optimizer
     state stay as they were) and counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rdlm.config import Config, ConfigError, DataConfig, MeshConfig, SampleConfig, TrainConfig
from rdlm.model import backend, lm_loss
from rdlm.model.recurrence import sample_depth
from rdlm.runtime import sharding as shard_lib
from rdlm.train.optim import apply_updates, make_optimizer, make_schedule, stop_frozen
from rdlm.train.state import TrainState, state_shardings

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask", "branch_ids")

# (params, batch, n_no_grad, n_grad, key) → (mean loss over the batch's loss tokens, metrics with
# at least "accuracy"). The step differentiates it; `lm_objective` is the plain LM's. A loss
# function must be hashable (a frozen dataclass, or one function object reused) because the
# compiled step is memoised on it. An objective that carries a `DepthPolicy` as ``depth`` decides
# the recurrence of each step; a bare function gets the config's (`DepthPolicy.of`).
LossFn = Callable[[Any, Batch, jax.Array, jax.Array, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]

# An objective that runs the model several times per step (continuous thought: one pass per
# thought, then one for the logits) reports how many under this key of its metrics, so that the
# loop's FLOP count (MFU) covers them. Without it a step is one pass.
FORWARD_PASSES = "forward_passes"


@dataclasses.dataclass(frozen=True)
class DepthPolicy:
    """The recurrence of a training step: ``sampled`` from the Huginn law around
    ``mean_recurrence`` with truncated backprop ``backprop_depth``, or ``fixed`` at
    r = mean_recurrence, the last min(k, r) steps with gradient.

    With ``curriculum_steps`` > 0 the mean (or the fixed r) climbs from ``curriculum_start`` to
    ``mean_recurrence`` over the first ``curriculum_steps`` optimizer steps (`mean_at`). The mean
    is computed from the traced step number, so one compiled step serves the whole curriculum,
    and a resumed run draws what the uninterrupted one drew."""

    mean_recurrence: int
    backprop_depth: int
    fixed: bool = False
    curriculum_steps: int = 0
    curriculum_start: int = 1

    @classmethod
    def of(cls, cfg: Config) -> "DepthPolicy":
        """The policy of ``cfg.model`` and ``cfg.train`` (what `rdlm train` runs)."""
        tc = cfg.train
        return cls(cfg.model.mean_recurrence, cfg.model.backprop_depth,
                   fixed=tc.depth == "fixed", curriculum_steps=tc.recurrence_curriculum_steps,
                   curriculum_start=tc.recurrence_curriculum_start)

    @property
    def max_grad(self) -> int:
        """The static bound of n_grad: the length of the gradient scan (the curriculum never
        goes above ``mean_recurrence``, so it needs no longer one)."""
        if self.fixed:
            return min(self.backprop_depth, self.mean_recurrence)
        return self.backprop_depth

    def mean_at(self, step: jax.Array | int | None) -> jax.Array:
        """int32 mean recurrence of the step after ``step`` optimizer steps (None: the full
        mean): ``start + ceil((mean - start) · min(step, N) / N)``, rounded up as McLeish et al.
        (2025) do, so that every step of the ramp has a whole mean and a fixed r."""
        if not self.curriculum_steps or step is None:
            return jnp.int32(self.mean_recurrence)
        n = self.curriculum_steps
        done = jnp.minimum(jnp.asarray(step, jnp.int32), n).astype(jnp.float32)
        climb = jnp.ceil((self.mean_recurrence - self.curriculum_start) * done / n)
        return jnp.int32(self.curriculum_start) + climb.astype(jnp.int32)

    def draw(self, key: jax.Array, step: jax.Array | int | None = None
             ) -> tuple[jax.Array, jax.Array]:
        """(n_no_grad, n_grad) of the step whose depth key is ``key``, taken after ``step``
        optimizer steps (which places it on the curriculum)."""
        mean = self.mean_at(step)
        k = self.backprop_depth
        if self.fixed:
            return jnp.maximum(mean - k, 0), jnp.minimum(mean, k)
        return sample_depth(key, mean, k)


@dataclasses.dataclass(frozen=True)
class LMObjective:
    """Next-token cross-entropy under truncated backprop (`rdlm.model.lm_loss`)."""

    model: Any  # ModelConfig
    init_scale: float
    depth: DepthPolicy
    # Pins the latent state to the logical activation rules at every recurrence step
    # (`rdlm.runtime.sharding.state_constraint`); None on one device.
    constrain: Any = None

    def __call__(self, params: Any, batch: Batch, n_no_grad: jax.Array, n_grad: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        return lm_loss(params, batch, self.model, n_no_grad=n_no_grad, n_grad=n_grad, key=key,
                       init_scale=self.init_scale, constrain=self.constrain)


def lm_objective(cfg: Config, mesh: Mesh | None = None) -> LossFn:
    """The plain language-model loss of ``cfg`` (what `rdlm train` optimises); with ``mesh``,
    the latent state keeps the mesh's activation sharding through the recurrence."""
    constrain = None if mesh is None else shard_lib.state_constraint(mesh)
    return LMObjective(cfg.model, cfg.train.init_scale, DepthPolicy.of(cfg), constrain)


def depth_policy(loss_fn: LossFn, cfg: Config) -> DepthPolicy:
    """The objective's own depth policy, else the config's."""
    policy = getattr(loss_fn, "depth", None)
    return policy if isinstance(policy, DepthPolicy) else DepthPolicy.of(cfg)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The step's key; the same on every host because it depends only on (seed, step)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[B, T] → [M, B/M, T], micro-batch m taking rows m, m+M, …: each data-parallel shard
    contributes equally to every micro-batch, so no resharding is needed."""
    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // micro_batches, micro_batches, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _token_count(batch: Batch) -> jax.Array:
    mask = batch.get("loss_mask")
    if mask is None:
        return jnp.float32(math.prod(batch["targets"].shape))
    return mask.astype(jnp.float32).sum()


def loss_and_grads(params: Any, batch: Batch, cfg: Config, loss_fn: LossFn, n_no_grad: jax.Array,
                   n_grad: jax.Array, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the batch's mean token loss, accumulated over ``cfg.train.micro_batches``.

    Each micro-batch's mean loss is weighted by its share of the batch's loss tokens, so the sum
    equals the full-batch mean whatever the split. Gradients accumulate in float32.
    """
    total_tokens = jnp.maximum(_token_count(batch), 1.0)
    m = cfg.train.micro_batches

    def micro(mb: Batch, mb_key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        weight = _token_count(mb) / total_tokens
        def weighted_loss(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            loss, metrics = loss_fn(stop_frozen(p, cfg.train.freeze), mb, n_no_grad, n_grad,
                                    mb_key)
            return loss * weight, metrics
        (loss_w, metrics), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params)
        out = {"loss": loss_w, "accuracy": metrics["accuracy"] * weight}
        if FORWARD_PASSES in metrics:  # micro-batches have equal rows: the mean over them
            out[FORWARD_PASSES] = metrics[FORWARD_PASSES] / m
        return grads, out

    if m == 1:
        return micro(batch, key)
    micro_batch_keys = jax.random.split(key, m)
    micro_batches = split_micro_batches(batch, m)

    def body(acc: tuple[Any, dict], xs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, dict], None]:
        grads, metrics = micro(*xs)
        acc_grads, acc_metrics = acc
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        acc_metrics = jax.tree.map(jnp.add, acc_metrics, metrics)
        return (acc_grads, acc_metrics), None

    # The metrics' keys depend on the objective: take them from an abstract trace of one micro.
    metric_shapes = jax.eval_shape(lambda mb, k: micro(mb, k)[1],
                                   jax.tree.map(lambda x: x[0], micro_batches),
                                   micro_batch_keys[0])
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
             jax.tree.map(lambda _: jnp.float32(0), metric_shapes))
    (grads, metrics), _ = jax.lax.scan(body, zeros, (micro_batches, micro_batch_keys))
    return grads, metrics


def update_is_good(loss: jax.Array, grad_norm: jax.Array, new_param_norm: jax.Array
                   ) -> jax.Array:
    """The NaN guard's verdict on one update: loss, gradient norm and the norm of the params it
    would produce are all finite.

    The params' test is on their global L2 norm (float32, like the params), not element by
    element: a far too large learning rate first makes the weights huge but finite (lr 1e30 on
    configs/tiny.yaml: |w| = 5e28 after one step), and only the next step's loss is NaN. Such
    weights are useless, yet they would pass an element-wise test and be checkpointed. Their
    squares overflow, so the norm is inf as soon as any |w| exceeds ~1.8e19 (or the whole norm
    does); a weight that large would overflow the next matmul anyway.
    """
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_param_norm)


def train_step(state: TrainState, batch: Batch, cfg: Config, tx: optax.GradientTransformation,
               loss_fn: LossFn | None = None, depth: jax.Array | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of ``loss_fn`` (default: `lm_objective`); pure, `make_train_step` jits
    it with shardings and donation.

    ``depth`` = [n_no_grad, n_grad] overrides the objective's depth policy (benchmarks use it).
    """
    key = step_key(cfg.seed, state.step)
    depth_key, noise_key = jax.random.split(key)
    loss_fn = lm_objective(cfg) if loss_fn is None else loss_fn
    drawn: dict[str, jax.Array] = {}  # the depth policy's current mean
    if depth is None:
        policy = depth_policy(loss_fn, cfg)
        n_no_grad, n_grad = policy.draw(depth_key, state.step)
        drawn["mean_recurrence"] = policy.mean_at(state.step)
    else:
        n_no_grad, n_grad = depth[0], depth[1]
    grads, metrics = loss_and_grads(state.params, batch, cfg, loss_fn, n_no_grad, n_grad,
                                    noise_key)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = apply_updates(state.params, updates, cfg.train.freeze)

    # NaN guard, on device: a bad update leaves params and optimizer state untouched.
    proposed_param_norm = optax.global_norm(new_params)
    finite = update_is_good(metrics["loss"], grad_norm, proposed_param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad = (~finite).astype(jnp.int32)
    new_state = TrainState(step=state.step + 1,
                           params=keep(new_params, state.params),
                           opt_state=keep(new_opt_state, state.opt_state),
                           bad_steps=state.bad_steps + bad,
                           bad_streak=(state.bad_streak + 1) * bad)
    metrics = dict(metrics, **drawn, grad_norm=grad_norm,
                   lr=make_schedule(cfg.train)(state.step), n_no_grad=n_no_grad, n_grad=n_grad,
                   finite=finite, bad_steps=new_state.bad_steps, bad_streak=new_state.bad_streak,
                   proposed_param_norm=proposed_param_norm,
                   param_norm=jnp.where(finite, proposed_param_norm,
                                        optax.global_norm(state.params)))
    return new_state, metrics


def batch_shardings(mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, NamedSharding]:
    return {k: shard_lib.batch_sharding(mesh) for k in keys}


# Train-config fields that never reach the compiled step: runs that differ only in these share it.
_HOST_ONLY_FIELDS = ("run_dir", "init_from", "resume_step", "checkpoint_every", "keep_last", "keep_every",
                     "async_checkpoint", "log_every", "eval_every", "eval_batches", "eval_steps",
                     "telemetry_every", "max_bad_steps", "peak_flops", "progress")


def _step_identity(cfg: Config) -> Config:
    defaults = TrainConfig()
    host_only = list(_HOST_ONLY_FIELDS)
    if cfg.train.schedule == "constant":
        host_only.append("steps")  # only cosine and trapezoid schedules read the run length
    train = dataclasses.replace(cfg.train, **{f: getattr(defaults, f) for f in host_only})
    # The mesh itself is a separate key; its config (and the data/sample sections) never
    # reach the step.
    return dataclasses.replace(cfg, train=train, data=DataConfig(), sample=SampleConfig(),
                               mesh=MeshConfig())


def make_train_step(cfg: Config, mesh: Mesh, *, fixed_depth: bool = False,
                    batch_keys: tuple[str, ...] = BATCH_KEYS,
                    loss_fn: LossFn | None = None) -> Callable:
    """`train_step` under `jax.jit` with explicit in/out shardings and the state donated.

    ``fixed_depth``: the step takes a third argument, int32[2] = (n_no_grad, n_grad).
    Memoised on what the step depends on, so repeated runs in one process (notebooks, tests,
    benchmarks) compile once.
    """
    step_cfg = _step_identity(cfg)
    loss_fn = lm_objective(step_cfg, mesh) if loss_fn is None else loss_fn
    return _make_train_step(step_cfg, mesh, fixed_depth, tuple(batch_keys), loss_fn)


@functools.lru_cache(maxsize=16)
def _make_train_step(cfg: Config, mesh: Mesh, fixed_depth: bool, batch_keys: tuple[str, ...],
                     loss_fn: LossFn) -> Callable:
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, tx, mesh)
    rep = shard_lib.replicated(mesh)
    in_shardings: tuple[Any, ...] = (shardings, batch_shardings(mesh, batch_keys))
    if fixed_depth:
        in_shardings += (rep,)

    def fn(state: TrainState, batch: Batch, *depth: jax.Array) -> tuple[TrainState, dict]:
        # Named as the program's context, the mesh is where the attention kernels that XLA
        # cannot partition run per shard, whatever the objective (`rdlm.model.backend`).
        with backend.names_mesh(mesh):
            return train_step(state, batch, cfg, tx, loss_fn, *depth)

    return jax.jit(fn, in_shardings=in_shardings, out_shardings=(shardings, rep),
                   donate_argnums=(0,))



def global_batch(local: dict[str, np.ndarray], cfg: Config, mesh: Mesh) -> Batch:
    """This process's rows → one global [batch, seq_len] array per key, sharded over the mesh."""
    local_rows = cfg.train.batch_size // jax.process_count()
    out = {}
    for k in BATCH_KEYS:
        if k not in local:
            continue
        x = np.asarray(local[k])
        if x.shape != (local_rows, cfg.train.seq_len):
            raise ValueError(f"data batch {k!r} has shape {x.shape}; expected "
                             f"({local_rows}, {cfg.train.seq_len}) = (train.batch_size / "
                             f"{jax.process_count()} processes, train.seq_len).")
        out[k] = jax.make_array_from_process_local_data(
            shard_lib.batch_sharding(mesh), x.astype(np.int32),
            (cfg.train.batch_size, cfg.train.seq_len))
    return out


def check_layout(cfg: Config, mesh: Mesh) -> None:
    """Batch divisibility by processes, micro-batches and data-parallel shards, with the fix."""
    tc = cfg.train
    dp = shard_lib.data_parallel_size(mesh)
    micro_rows = tc.batch_size // tc.micro_batches
    if tc.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the "
                          f"{jax.process_count()} processes.")
    if micro_rows % dp:
        raise ConfigError(f"train.batch_size / train.micro_batches = {micro_rows} must be "
                          f"divisible by the {dp} data-parallel devices (mesh.data × mesh.fsdp).")
    if tc.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len="
                          f"{cfg.model.max_seq_len}.")
