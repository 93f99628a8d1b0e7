"""Training: train state, the sharded train step, and the resumable, observable train loop.

    python -m rdlm train configs/tiny.yaml train.steps=200 train.run_dir=runs/tiny

The same command runs on every host of a pod. A run directory that already holds a checkpoint
resumes from its latest complete step, bit-for-bit: parameters, optimizer state, step, NaN-guard
counters and the data iterator's position are all in the checkpoint, and every random draw comes
from ``fold_in(key(seed), step)``.

One optimizer step:
  1. draw the recurrence count (n_no_grad, n_grad) from ``fold_in(key(seed), step)``: every device
     and host gets the same r without communicating;
  2. loss and gradients, accumulated over ``train.micro_batches`` with a `lax.scan` (token-weighted,
     so 4 micro-batches give the gradient of the whole batch);
  3. the optax update; if the loss or the gradient norm is not finite the update is dropped on
     device (params and optimizer state stay as they were) and counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rdlm import checkpoint as ckpt_lib
from rdlm import flops as flops_lib
from rdlm import sharding as shard_lib
from rdlm.config import (Config, ConfigError, DataConfig, MeshConfig, SampleConfig, TrainConfig,
                         load_config)
from rdlm.model import abstract_params, forward, init_params, lm_loss
from rdlm.optim import make_optimizer, make_schedule
from rdlm.recurrence import sample_depth

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask", "branch_ids")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left untouched."""


# ---------------------------------------------------------------------------------------------
# Train state.


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
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, p_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
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


# ---------------------------------------------------------------------------------------------
# Train step.


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


def loss_and_grads(params: Any, batch: Batch, cfg: Config, n_no_grad: jax.Array,
                   n_grad: jax.Array, key: jax.Array, init_scale: float = 1.0
                   ) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the batch's mean token loss, accumulated over ``cfg.train.micro_batches``.

    Each micro-batch's mean loss is weighted by its share of the batch's loss tokens, so the sum
    equals the full-batch mean whatever the split. Gradients accumulate in float32.
    """
    total_tokens = jnp.maximum(_token_count(batch), 1.0)

    def micro(mb: Batch, mb_key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        weight = _token_count(mb) / total_tokens
        def weighted_loss(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            loss, metrics = lm_loss(p, mb, cfg.model, n_no_grad=n_no_grad, n_grad=n_grad,
                                    key=mb_key, init_scale=init_scale)
            return loss * weight, metrics
        (loss_w, metrics), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params)
        return grads, {"loss": loss_w, "accuracy": metrics["accuracy"] * weight}

    m = cfg.train.micro_batches
    if m == 1:
        return micro(batch, key)
    micro_batch_keys = jax.random.split(key, m)

    def body(acc: tuple[Any, dict], xs: tuple[Batch, jax.Array]) -> tuple[tuple[Any, dict], None]:
        grads, metrics = micro(*xs)
        acc_grads, acc_metrics = acc
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc_grads, grads)
        acc_metrics = jax.tree.map(jnp.add, acc_metrics, metrics)
        return (acc_grads, acc_metrics), None

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
             {"loss": jnp.float32(0), "accuracy": jnp.float32(0)})
    (grads, metrics), _ = jax.lax.scan(body, zeros, (split_micro_batches(batch, m),
                                                     micro_batch_keys))
    return grads, metrics


def train_step(state: TrainState, batch: Batch, cfg: Config, tx: optax.GradientTransformation,
               depth: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (pure; `make_train_step` jits it with shardings and donation).

    ``depth`` = [n_no_grad, n_grad] overrides the sampled recurrence (benchmarks use it).
    """
    key = step_key(cfg.seed, state.step)
    depth_key, noise_key = jax.random.split(key)
    if depth is None and cfg.train.depth == "fixed":
        r, k = cfg.model.mean_recurrence, cfg.model.backprop_depth
        n_no_grad, n_grad = jnp.int32(max(r - k, 0)), jnp.int32(min(k, r))
    elif depth is None:
        n_no_grad, n_grad = sample_depth(depth_key, cfg.model.mean_recurrence,
                                         cfg.model.backprop_depth)
    else:
        n_no_grad, n_grad = depth[0], depth[1]
    grads, metrics = loss_and_grads(state.params, batch, cfg, n_no_grad, n_grad, noise_key,
                                    init_scale=cfg.train.init_scale)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    # NaN guard, on device: a non-finite step leaves params and optimizer state untouched.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    bad = (~finite).astype(jnp.int32)
    new_state = TrainState(step=state.step + 1,
                           params=keep(new_params, state.params),
                           opt_state=keep(new_opt_state, state.opt_state),
                           bad_steps=state.bad_steps + bad,
                           bad_streak=(state.bad_streak + 1) * bad)
    metrics = dict(metrics, grad_norm=grad_norm, lr=make_schedule(cfg.train)(state.step),
                   n_no_grad=n_no_grad, n_grad=n_grad, finite=finite,
                   bad_steps=new_state.bad_steps, bad_streak=new_state.bad_streak,
                   param_norm=optax.global_norm(new_state.params))
    return new_state, metrics


def batch_shardings(mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, NamedSharding]:
    return {k: shard_lib.batch_sharding(mesh) for k in keys}


# Train-config fields that never reach the compiled step: runs that differ only in these share it.
_HOST_ONLY_FIELDS = ("run_dir", "init_from", "checkpoint_every", "keep_last", "keep_every",
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
                    batch_keys: tuple[str, ...] = BATCH_KEYS) -> Callable:
    """`train_step` under `jax.jit` with explicit in/out shardings and the state donated.

    ``fixed_depth``: the step takes a third argument, int32[2] = (n_no_grad, n_grad).
    Memoised on what the step depends on, so repeated runs in one process (notebooks, tests,
    benchmarks) compile once.
    """
    return _make_train_step(_step_identity(cfg), mesh, fixed_depth, tuple(batch_keys))


@functools.lru_cache(maxsize=16)
def _make_train_step(cfg: Config, mesh: Mesh, fixed_depth: bool, batch_keys: tuple[str, ...]
                     ) -> Callable:
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, tx, mesh)
    rep = shard_lib.replicated(mesh)
    in_shardings: tuple[Any, ...] = (shardings, batch_shardings(mesh, batch_keys))
    if fixed_depth:
        in_shardings += (rep,)
    fn = lambda state, batch, *depth: train_step(state, batch, cfg, tx, *depth)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=(shardings, rep),
                   donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Evaluation and latent telemetry (both jitted once; r is data).


def make_eval_fn(cfg: Config, mesh: Mesh) -> Callable:
    """(params, batch, r) → (summed token loss, token count); one compilation for every r."""
    def eval_loss(params: Any, batch: Batch, num_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = forward(params, batch["inputs"], cfg.model, num_steps=num_steps,
                            key=jax.random.key(cfg.seed + 1), segment_ids=batch.get("segment_ids"),
                            branch_ids=batch.get("branch_ids"))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch.get("loss_mask")
        mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
        return (nll * mask).sum(), mask.sum()
    return jax.jit(eval_loss)


def latent_telemetry(params: Any, tokens_bt: jax.Array, cfg: Config, num_steps: int
                     ) -> dict[str, jax.Array]:
    """Health of the recurrence (SPEC §1): convergence ‖s_k − s_{k−1}‖/‖s_k‖ at the last step and
    on average, ‖s_k‖ per token, and the mean cosine similarity between different tokens' final
    states (→ 1 means the states collapsed)."""
    _, aux = forward(params, tokens_bt, cfg.model, num_steps=num_steps,
                     key=jax.random.key(cfg.seed + 2), return_trajectory=True)
    traj_rbtd = aux["trajectory"].astype(jnp.float32)
    norm_rbt = jnp.linalg.norm(traj_rbtd, axis=-1)
    delta_rbt = jnp.linalg.norm(traj_rbtd[1:] - traj_rbtd[:-1], axis=-1) / (norm_rbt[1:] + 1e-9)
    final_btd = aux["state"].astype(jnp.float32)
    unit_btd = final_btd / (jnp.linalg.norm(final_btd, axis=-1, keepdims=True) + 1e-9)
    cos_btt = jnp.einsum("btd,bsd->bts", unit_btd, unit_btd)
    t = cos_btt.shape[-1]
    off_diag = (cos_btt.sum((-1, -2)) - jnp.trace(cos_btt, axis1=-2, axis2=-1)) / max(t * (t - 1), 1)
    return {"latent/rel_change_last": delta_rbt[-1].mean(),
            "latent/rel_change_mean": delta_rbt.mean(),
            "latent/state_norm": jnp.linalg.norm(final_btd, axis=-1).mean(),
            "latent/token_correlation": off_diag.mean()}


# ---------------------------------------------------------------------------------------------
# Device peak FLOP/s for MFU.

# Dense peak per device (one jax.Device), (bfloat16, float32). GPU float32 is the TF32 tensor-core
# rate, what XLA uses for float32 matmuls by default. CPU: the measured float32 matmul peak of a
# 2-core CI-class machine (DESIGN.md); pass train.peak_flops for another CPU.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 495e12),
    "h100": (989e12, 495e12),
    "a100": (312e12, 156e12),
    "l4": (121e12, 60e12),
    "tpu v6": (918e12, 918e12),
    "tpu v5 lite": (197e12, 197e12),  # v5e; checked before "tpu v5", which it contains
    "tpu v5e": (197e12, 197e12),
    "tpu v5p": (459e12, 459e12),
    "tpu v5": (459e12, 459e12),  # v5p reports its device_kind as "TPU v5"
    "tpu v4": (275e12, 275e12),
    "tpu v3": (123e12, 123e12),
    "cpu": (170e9, 170e9),
}


def device_peak_flops(device: jax.Device, dtype: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` from `PEAK_FLOPS` (``override`` wins)."""
    if override > 0:
        return override
    kind = f"{device.platform} {device.device_kind}".lower()
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if name in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


# ---------------------------------------------------------------------------------------------
# Multi-host start-up and data.


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def maybe_initialize_distributed(mesh_cfg: MeshConfig) -> None:
    """`jax.distributed.initialize` for multi-host runs and ``mesh.cpu_devices`` (call before
    anything touches devices).

    Explicit coordinator in the config → use it; a TPU pod or SLURM job → JAX detects everything;
    otherwise this is a single-process run and only the CPU device count may change.
    """
    _initialize_distributed(mesh_cfg)
    shard_lib.request_cpu_devices(mesh_cfg.cpu_devices)


def _initialize_distributed(mesh_cfg: MeshConfig) -> None:
    if mesh_cfg.distributed == "off" or jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend to talk to each other; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mesh_cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=mesh_cfg.coordinator_address,
                                   num_processes=mesh_cfg.num_processes,
                                   process_id=mesh_cfg.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def default_data_iterator(cfg: Config) -> Any:
    """This process's grain iterator from `rdlm.data` (the library's data pipelines)."""
    try:
        from rdlm.data import make_train_iterator
    except ImportError as err:
        raise RuntimeError("rdlm.data.make_train_iterator is not available; pass data_iterator= "
                           "to rdlm.train.train().") from err
    return make_train_iterator(cfg, process_index=jax.process_index(),
                               process_count=jax.process_count())


def default_eval_batches(cfg: Config) -> list[dict[str, np.ndarray]] | None:
    try:
        from rdlm.data import make_eval_batches
    except ImportError:
        return None
    return list(make_eval_batches(cfg, num_batches=cfg.train.eval_batches,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count()))


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


# ---------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, TensorBoard, a progress bar or plain lines. Process 0 only.


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl ([] if there is none), skipping a line that a killed
    writer left half-written."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn line from a killed writer
        records.append(record)
    return records


def _truncate_jsonl(path: Path, start_step: int) -> list[dict[str, Any]]:
    """Keep the records of steps <= start_step: a resumed run re-logs the steps after its
    checkpoint, and a SIGKILL may have left half a line at the end. Returns the kept records."""
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path) if r["step"] <= start_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLogger:
    """metrics.jsonl, TensorBoard event files and a progress bar (or plain lines); process 0.

    Messages before `open` (restore, init) go straight to stdout."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.cfg = cfg
        self.bar = None
        self.opened = False

    def open(self, start_step: int) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter
        # purge_step hides events a killed run wrote past the checkpoint we resume from.
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                purge_step=start_step + 1 if start_step else None)
        self.opened = True
        cfg = self.cfg
        mode = cfg.train.progress
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], *, print_line: bool) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                     mfu=f"{metrics.get('mfu', 0):.1%}", r=metrics.get("r"))
        elif print_line:
            self.message(format_line(step, self.cfg.train.steps, metrics))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.opened:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()


def _plain(v: Any) -> Any:
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def format_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("grad_norm", "gnorm {:.3f}"), ("lr", "lr {:.2e}"),
                     ("r", "r {}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"),
                     ("eta_s", "eta {:.0f}s")):
        if key in m:
            parts.append(fmt.format(m[key]))
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, float]]  # one record per step run in this call
    status: str  # "done", "preempted"


class _Preemption:
    """SIGTERM → finish the current step, save, exit cleanly. Restores the old handler on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "_Preemption":
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every process as soon as any process got SIGTERM (one tiny all-gather)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# Model fields that change how training runs, not what the parameters are: a run may resume
# with other values (e.g. turn on remat to fit memory, or raise the mean depth mid-run).
RESUMABLE_MODEL_FIELDS = ("remat", "dtype", "backprop_depth", "mean_recurrence")


def _restore_or_init(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState,
                     checkpointer: ckpt_lib.TrainCheckpointer, data_iterator: Any,
                     log: MetricsLogger) -> TrainState:
    latest = checkpointer.latest_step()
    if latest is not None:
        saved_cfg = ckpt_lib.load_config(checkpointer.directory / str(latest))
        changed = {f.name: (getattr(saved_cfg.model, f.name), getattr(cfg.model, f.name))
                   for f in dataclasses.fields(cfg.model)
                   if getattr(saved_cfg.model, f.name) != getattr(cfg.model, f.name)}
        fixed = [name for name in changed if name not in RESUMABLE_MODEL_FIELDS]
        if fixed:
            diff = ", ".join(f"model.{n} {changed[n][0]!r} → {changed[n][1]!r}" for n in fixed)
            raise ConfigError(
                f"run_dir {cfg.train.run_dir!r} holds a checkpoint of a different model than "
                f"the config ({diff}); use a new train.run_dir, or train.init_from= to start "
                "from those weights.")
        for name, (old, new) in changed.items():
            log.message(f"resuming with model.{name}={new!r} (the checkpoint trained with {old!r})")
        target = abstract_state(cfg, tx, shardings)
        params, opt_state, meta, data_state = checkpointer.restore(
            latest, abstract_params=target.params, abstract_opt_state=target.opt_state)
        if data_state is not None and hasattr(data_iterator, "set_state"):
            data_iterator.set_state(data_state)
        rep = shardings.step
        scalar = lambda v: jax.device_put(jnp.int32(v), rep)
        log.message(f"resumed from {checkpointer.directory / str(latest)} (step {latest})")
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
        log.message(f"initialised params from {cfg.train.init_from}")
    return init_state(cfg, tx, shardings, params)


def train(cfg: Config, *, data_iterator: Iterator[dict[str, np.ndarray]] | None = None,
          eval_batches: list[dict[str, np.ndarray]] | None = None,
          mesh: Mesh | None = None) -> TrainResult:
    """Train ``cfg`` up to ``cfg.train.steps``, resuming from ``cfg.train.run_dir`` if it holds a
    checkpoint. ``data_iterator`` (default: `rdlm.data.make_train_iterator`) yields this process's
    rows as numpy dicts; give it ``get_state``/``set_state`` (grain iterators have them) for exact
    resumption. Raises `TrainingDiverged` after ``train.max_bad_steps`` non-finite steps in a row.
    """
    maybe_initialize_distributed(cfg.mesh)
    tc = cfg.train
    mesh = mesh or shard_lib.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    run_dir = Path(tc.run_dir).expanduser().absolute()
    tx = make_optimizer(tc)
    shardings = state_shardings(cfg, tx, mesh)
    data_iterator = data_iterator if data_iterator is not None else default_data_iterator(cfg)
    if tc.eval_every and eval_batches is None:
        eval_batches = default_eval_batches(cfg)
    checkpointer = ckpt_lib.TrainCheckpointer(run_dir, save_every=tc.checkpoint_every,
                                              keep_last=tc.keep_last, keep_every=tc.keep_every,
                                              async_save=tc.async_checkpoint)
    log = MetricsLogger(run_dir, cfg, enabled=jax.process_index() == 0)
    try:
        state = _restore_or_init(cfg, tx, shardings, checkpointer, data_iterator, log)
        start = int(state.step)
        log.open(start)
        if start >= tc.steps:
            log.message(f"nothing to do: step {start} >= train.steps={tc.steps}")
            return TrainResult(state, [], "done")
        with _Preemption() as preemption:
            return _loop(cfg, mesh, tx, shardings, state, data_iterator, eval_batches,
                         checkpointer, log, preemption)
    finally:
        checkpointer.close()
        log.close()


def _loop(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: TrainState,
          state: TrainState, data_iterator: Any, eval_batches: Any,
          checkpointer: ckpt_lib.TrainCheckpointer, log: MetricsLogger,
          preemption: _Preemption) -> TrainResult:
    tc = cfg.train
    start = int(state.step)
    tokens_per_step = tc.batch_size * tc.seq_len
    peak = device_peak_flops(jax.devices()[0], cfg.model.dtype, tc.peak_flops)
    total_peak = peak * jax.device_count() if peak else None
    log.message(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} "
                f"device(s), {jax.process_count()} process(es); steps {start} → {tc.steps}")

    data = iter(data_iterator)
    first = global_batch(next(data), cfg, mesh)
    step_fn = make_train_step(cfg, mesh, batch_keys=tuple(first))
    eval_fn = make_eval_fn(cfg, mesh) if tc.eval_every and eval_batches else None
    telemetry_fn = (jax.jit(latent_telemetry, static_argnums=(2, 3)) if tc.telemetry_every
                    else None)

    history: list[dict[str, float]] = []
    pending: tuple[int, dict] | None = None
    batch: Batch | None = first
    last_time = time.perf_counter()
    loop_start = last_time

    side_metrics: dict[int, dict[str, float]] = {}
    excluded_s = 0.0
    first_step_s = 0.0

    def side_work(step: int, step_batch: Batch) -> None:
        """Telemetry and eval on the params right after ``step`` (before the next step donates
        them); the time beyond waiting for the step itself is excluded from its step time."""
        nonlocal excluded_s
        wants_telemetry = telemetry_fn is not None and step % tc.telemetry_every == 0
        wants_eval = eval_fn is not None and step % tc.eval_every == 0
        if not (wants_telemetry or wants_eval):
            return
        jax.block_until_ready(state.params)
        t0 = time.perf_counter()
        m: dict[str, float] = {}
        if wants_telemetry:
            rows = step_batch["inputs"][: min(4, tc.batch_size)]
            m.update(_plain_dict(telemetry_fn(state.params, rows, cfg,
                                              max(2, cfg.model.mean_recurrence))))
        if wants_eval:
            m.update(run_eval(eval_fn, state.params, eval_batches, cfg, mesh))
        side_metrics[step] = m
        excluded_s += time.perf_counter() - t0

    def finish(step: int, metrics_dev: dict) -> None:
        """Host side of a step, one step behind the device so dispatch is never blocked."""
        nonlocal last_time, excluded_s
        m = {k: _plain(v) for k, v in jax.device_get(metrics_dev).items()}
        now = time.perf_counter()
        # Host work that is not training (eval, telemetry, checkpoint copies) is taken out.
        dt, last_time, excluded_s = now - last_time - excluded_s, now, 0.0
        m["r"] = int(m.pop("n_no_grad")) + int(m["n_grad"])
        if step == start + 1:
            m["step_time_s"] = first_step_s  # compilation included: no throughput from it
        else:
            m["step_time_s"] = dt
            m["tokens_per_s"] = tokens_per_step / dt
            step_flops = flops_lib.train_flops_per_token(
                cfg.model, tc.seq_len, m["r"] - m["n_grad"], m["n_grad"]) * tokens_per_step
            if total_peak:
                m["mfu"] = step_flops / dt / total_peak
        done = step - start
        m["eta_s"] = (now - loop_start) / done * (tc.steps - step) if done else 0.0
        if not m["finite"]:
            log.message(f"step {step}: non-finite loss or gradient (loss={m['loss']}, "
                        f"grad_norm={m['grad_norm']}); update skipped "
                        f"({m['bad_streak']} in a row, {m['bad_steps']} in total)")
        m.update(side_metrics.pop(step, {}))
        history.append({"step": step, **m})
        log.log(step, m, print_line=(step % tc.log_every == 0 or step == tc.steps))
        if m["bad_streak"] >= tc.max_bad_steps:
            good = checkpointer.latest_step()
            raise TrainingDiverged(
                f"{m['bad_streak']} non-finite steps in a row (train.max_bad_steps="
                f"{tc.max_bad_steps}) at step {step}; stopping. The last good checkpoint is "
                f"{checkpointer.directory / str(good) if good is not None else '(none)'}; lower "
                "train.lr or raise train.warmup_steps and resume from it.")

    status = "done"
    for step in range(start + 1, tc.steps + 1):
        if batch is None:
            batch = global_batch(next(data), cfg, mesh)
        if step == start + 1:
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - t0
            log.message(f"first step (compilation included): {first_step_s:.1f}s")
            last_time = loop_start = time.perf_counter()
        else:
            state, metrics = step_fn(state, batch)
        if pending is not None:
            finish(*pending)
        pending = (step, metrics)
        side_work(step, batch)
        batch = None
        stop = preemption.agreed()
        if checkpointer.should_save(step, tc.steps) or stop:
            # A streak of bad steps means the params did not move: saving them is still "good",
            # but never save past the point where the guard stops the run.
            finish(*pending)
            pending = None
            t0 = time.perf_counter()
            checkpointer.save(step, cfg=cfg, params=state.params, opt_state=state.opt_state,
                              meta=state.meta(), data_iterator=data_iterator)
            excluded_s += time.perf_counter() - t0
        if stop:
            checkpointer.wait()
            log.message(f"SIGTERM: saved step {step} to {checkpointer.directory}; exiting.")
            status = "preempted"
            break
    if pending is not None:
        finish(*pending)
    checkpointer.wait()
    return TrainResult(state, history, status)


def _plain_dict(d: dict[str, jax.Array]) -> dict[str, float]:
    return {k: _plain(v) for k, v in jax.device_get(d).items()}


def run_eval(eval_fn: Callable, params: Any, eval_batches: list[dict[str, np.ndarray]],
             cfg: Config, mesh: Mesh) -> dict[str, float]:
    """Mean token loss over ``eval_batches`` at each r in ``train.eval_steps``."""
    out = {}
    batches = [global_batch(b, cfg, mesh) for b in eval_batches]
    for r in cfg.train.eval_steps:
        total = count = 0.0
        for b in batches:
            s, n = eval_fn(params, b, jnp.int32(r))
            total, count = total + float(s), count + float(n)
        out[f"eval/loss_r{r}"] = total / max(count, 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: train.steps=100 …")
    args, extra = parser.parse_known_args(argv)
    return args, load_config(args.config, [*args.overrides, *extra])


def cli(argv: list[str]) -> int:
    """``python -m rdlm train CONFIG [section.key=value ...]``."""
    try:
        _, cfg = parse_args(argv, "python -m rdlm train")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (ConfigError, ckpt_lib.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0 if result.status in ("done", "preempted") else 1


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m rdlm bench train CONFIG


def synthetic_batch(cfg: Config, mesh: Mesh, seed: int = 0) -> Batch:
    """Random tokens in the global batch's shape and sharding (speed does not depend on data)."""
    rng = np.random.default_rng(seed + jax.process_index())
    rows = cfg.train.batch_size // jax.process_count()
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, cfg.train.seq_len + 1), np.int32)
    return global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, cfg, mesh)


def _peak_memory_bytes(compiled: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = float(stats["peak_bytes_in_use"])
    mem = compiled.memory_analysis()
    if mem is not None:
        out["compiled_temp_bytes"] = float(mem.temp_size_in_bytes)
        out["compiled_argument_bytes"] = float(mem.argument_size_in_bytes)
    import resource
    out["host_max_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def measured_matmul_flops(cfg: Config, repeats: int = 10) -> float:
    """FLOP/s of one [tokens, d] × [d, mlp] matmul in the model dtype on the first device: the
    practical peak right now (on a shared CPU, load changes it several-fold)."""
    tokens = cfg.train.batch_size * cfg.train.seq_len
    dtype = jnp.dtype(cfg.model.dtype)
    a = jnp.ones((tokens, cfg.model.d_model), dtype)
    b = jnp.ones((cfg.model.d_model, cfg.model.mlp_dim), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))
    t = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, b)
    jax.block_until_ready(out)
    return 2 * tokens * cfg.model.d_model * cfg.model.mlp_dim * repeats / (time.perf_counter() - t)


def bench_train(cfg: Config, recurrences: tuple[int, ...] = (4, 32, 64), steps: int = 5,
                warmup: int = 2) -> dict[str, Any]:
    """Time the real train step (shardings, donation, optimizer) at fixed depths.

    Depth r means max(r − k, 0) steps without and min(k, r) steps with gradient (k = backprop
    depth); the depth is an input of the compiled step, so one compilation serves every r — the
    result records the compile count to prove it. The config's own mean depth comes first.
    """
    maybe_initialize_distributed(cfg.mesh)
    mesh = shard_lib.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, tx, mesh)
    state = init_state(cfg, tx, shardings)
    batch = synthetic_batch(cfg, mesh)
    step_jit = make_train_step(cfg, mesh, fixed_depth=True, batch_keys=tuple(batch))
    rep = shard_lib.replicated(mesh)
    depth_of = lambda r: jax.device_put(
        np.array([max(r - cfg.model.backprop_depth, 0), min(cfg.model.backprop_depth, r)],
                 np.int32), rep)
    t0 = time.perf_counter()
    compiled = step_jit.lower(state, batch, depth_of(1)).compile()
    compile_s = time.perf_counter() - t0
    device = jax.devices()[0]
    peak = device_peak_flops(device, cfg.model.dtype, cfg.train.peak_flops)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    k = cfg.model.backprop_depth
    results = []
    for r in (cfg.model.mean_recurrence, *recurrences):
        depth = depth_of(r)
        for _ in range(warmup):
            state, metrics = compiled(state, batch, depth)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, depth)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        flops = flops_lib.train_flops_per_token(cfg.model, cfg.train.seq_len, max(r - k, 0),
                                                min(k, r)) * tokens
        row = {"r": r, "n_no_grad": max(r - k, 0), "n_grad": min(k, r), "step_s": step_s,
               "tokens_per_s": tokens / step_s, "tflops_per_s": flops / step_s / 1e12,
               "loss": float(metrics["loss"])}
        if peak:
            row["mfu"] = flops / step_s / (peak * jax.device_count())
        row["matmul_flops_per_s"] = measured_matmul_flops(cfg)  # measured right after this r
        row["of_matmul_peak"] = flops / step_s / (row["matmul_flops_per_s"] * jax.device_count())
        results.append(row)
    from rdlm.sample import host_info

    return {"device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
            **host_info(), "jax": jax.__version__,
            "dtype": cfg.model.dtype, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
            "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "peak_flops_per_device": peak, "compile_s": compile_s,
            # One `Compiled` executable ran every r: it cannot recompile, so this is exact.
            "compilations": 1, "memory": _peak_memory_bytes(compiled),
            "results": results}


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}  dtype {report['dtype']}  params {report['params']:,}  "
             f"batch {report['batch']} x {report['seq_len']}",
             f"compile: {report['compile_s']:.1f}s, {report['compilations']} compilation(s) for "
             f"all r",
             "memory: " + ", ".join(f"{k} {v / 2**20:,.0f} MiB"
                                    for k, v in report["memory"].items()),
             f"{'r':>4} {'no-grad':>7} {'grad':>4} {'step s':>9} {'tokens/s':>10} "
             f"{'TFLOP/s':>8} {'MFU':>6} {'matmul TFLOP/s':>14} {'of matmul':>9}"]
    for row in report["results"]:
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
        lines.append(f"{row['r']:>4} {row['n_no_grad']:>7} {row['n_grad']:>4} "
                     f"{row['step_s']:>9.4f} {row['tokens_per_s']:>10,.0f} "
                     f"{row['tflops_per_s']:>8.3f} {mfu:>6} "
                     f"{row['matmul_flops_per_s'] / 1e12:>14.3f} {row['of_matmul_peak']:>9.1%}")
    lines.append("MFU: model FLOPs / step time / table peak; 'of matmul': the same against one "
                 "[tokens, d] x [d, mlp] matmul measured after each r (the peak the machine "
                 "gives right now).")
    return "\n".join(lines)


def bench_cli(argv: list[str]) -> int:
    """``python -m rdlm bench train CONFIG [key=value ...] [--steps N] [--recurrence 4,32,64]
    [--out FILE.json]``."""
    parser = argparse.ArgumentParser(prog="python -m rdlm bench train")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per r (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recurrence", default="4,32,64", help="comma-separated depths r")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    report = bench_train(cfg, tuple(int(r) for r in args.recurrence.split(",") if r),
                         steps=args.steps, warmup=args.warmup)
    report["config"] = args.config
    report["overrides"] = args.overrides
    print(format_bench(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
