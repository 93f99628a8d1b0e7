"""The resumable, observable train loop.

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

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from rdlm.config import Config
from rdlm.errors import TrainingDiverged
from rdlm.model import flops as flops_lib
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import sharding as shard_lib
from rdlm.runtime.distributed import maybe_initialize_distributed
from rdlm.runtime.hostinfo import device_peak_flops
from rdlm.train.eval import latent_telemetry, make_eval_fn, run_eval
from rdlm.train.metrics import MetricsLogger, plain, plain_dict
from rdlm.train.optim import make_optimizer
from rdlm.train.state import TrainState, restore_or_init, state_shardings
from rdlm.train.step import Batch, check_layout, global_batch, make_train_step


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
        state = restore_or_init(cfg, tx, shardings, checkpointer, data_iterator, log.message)
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
            m.update(plain_dict(telemetry_fn(state.params, rows, cfg,
                                              max(2, cfg.model.mean_recurrence))))
        if wants_eval:
            m.update(run_eval(eval_fn, state.params, eval_batches, cfg, mesh))
        side_metrics[step] = m
        excluded_s += time.perf_counter() - t0

    def finish(step: int, metrics_dev: dict) -> None:
        """Host side of a step, one step behind the device so dispatch is never blocked."""
        nonlocal last_time, excluded_s
        m = {k: plain(v) for k, v in jax.device_get(metrics_dev).items()}
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
