"""The resumable, observable train loop.

    python -m rdlm train configs/tiny.yaml train.steps=200 train.run_dir=runs/tiny

The same command runs on every host of a pod. A run directory that already holds a checkpoint
resumes from its latest complete step, bit-for-bit: parameters, optimizer state, step, NaN-guard
counters and the data iterator's position are all in the checkpoint, and every random draw comes
from ``fold_in(key(seed), step)``.

The objective is a parameter (default: the plain LM loss), and so is a `Schedule` of phases
(default: one) that may reset the optimizer state at phase changes and label the steps: a
curriculum such as continuous thought (`rdlm.coconut`) is a loss plus a schedule on this loop.

One optimizer step (`rdlm.train.step`):
  1. draw the recurrence count (n_no_grad, n_grad) by the objective's depth policy from
     ``fold_in(key(seed), step)``: every device and host gets the same r without communicating;
  2. loss and gradients, accumulated over ``train.micro_batches`` with a `lax.scan` (token-weighted,
     so 4 micro-batches give the gradient of the whole batch);
  3. the optax update, kept only if the loss, the gradient norm and the updated params' norm are
     finite; a bad update is dropped on device (params and optimizer state stay as they were)
     and counted. No checkpoint is written while bad steps run in a row, so every checkpoint
     holds the params of a good step.

One training per run directory: process 0 holds ``<run_dir>/.lock`` (`rdlm.runtime.lock`) from
before the directory is touched until the last write is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from rdlm.config import Config
from rdlm.errors import ConfigError
from rdlm.model import flops as flops_lib
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import lock as lock_lib
from rdlm.runtime import sharding as shard_lib
from rdlm.runtime import storage
from rdlm.runtime.distributed import maybe_initialize_distributed
from rdlm.runtime.hostinfo import device_peak_flops
from rdlm.train.divergence import check_divergence, loss_or_gradient_failed
from rdlm.train.eval import latent_telemetry, make_eval_fn, run_eval
from rdlm.train.metrics import MetricsLogger, closing_summary, plain, plain_dict
from rdlm.train.optim import make_optimizer
from rdlm.train.stages import SINGLE_PHASE, Schedule
from rdlm.train.state import TrainState, restore_or_init, state_shardings
from rdlm.train.step import (FORWARD_PASSES, Batch, LossFn, check_layout, global_batch,
                             make_train_step)


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
    status: str  # "done", "preempted" (SIGTERM), "stopped" (``stop_after`` steps run)


class _Preemption:
    """SIGTERM or Ctrl-C (SIGINT) → finish the current step, save it, exit cleanly; a second
    Ctrl-C goes to the SIGINT handler from before the call (Python's raises `KeyboardInterrupt`)
    and aborts without saving. Installed for the whole call, so a signal during start-up stops
    the run after its first step. Restores the old handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the first signal's name once one arrived
        self.interrupts = 0  # Ctrl-Cs so far
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Preemption":
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = self.requested or signal.Signals(signum).name
        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts > 1:
            # The handler from before the call takes over, for this Ctrl-C and any later one:
            # Python's raises KeyboardInterrupt (a notebook's cell stops); `rdlm train` exits.
            previous = self._old.get(signal.SIGINT)
            previous = previous if callable(previous) else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            raise KeyboardInterrupt
        # os.write, not print: a handler that prints while the interrupted code is printing to
        # the same buffered stream fails with a re-entrant call error.
        os.write(2, b"\nCtrl-C: stopping after the current step and saving it; "
                    b"Ctrl-C again aborts without saving.\n")

    def agreed(self) -> bool:
        """True on every process as soon as any process got the signal (one tiny all-gather)."""
        if jax.process_count() == 1:
            return self.requested is not None
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
        return bool(np.any(flags))

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _run_dir_lock(run_dir: storage.StoragePath, note: Callable[[str], None]) -> Iterator[None]:
    """Process 0 holds ``<run_dir>/.lock`` for the duration; the other processes of a multi-host
    run share the directory by design and only learn process 0's verdict, so that all of them
    stop when it is refused instead of waiting for it in the first collective."""
    held = error = None
    if jax.process_index() == 0:
        try:
            held = lock_lib.acquire(run_dir, note=note)
        except lock_lib.RunDirLocked as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = lock_lib.RunDirLocked(f"process 0 could not lock train.run_dir {str(run_dir)!r}"
                                          "; its error names the holder and the fix.")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if held is not None:
            lock_lib.release(run_dir, held)


def train(cfg: Config, *, data_iterator: Iterator[dict[str, np.ndarray]] | None = None,
          eval_batches: list[dict[str, np.ndarray]] | None = None,
          mesh: Mesh | None = None, loss_fn: LossFn | None = None,
          schedule: Schedule = SINGLE_PHASE, stop_after: int | None = None,
          printer: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``cfg`` up to ``cfg.train.steps``, resuming from ``cfg.train.run_dir`` if it holds a
    checkpoint. ``data_iterator`` (default: `rdlm.data.make_train_iterator`) yields this process's
    rows as numpy dicts; give it ``get_state``/``set_state`` (grain iterators have them) for exact
    resumption. Raises `TrainingDiverged` after ``train.max_bad_steps`` bad steps in a row, and
    `rdlm.runtime.lock.RunDirLocked` (a `ConfigError`) when another training holds the run
    directory. SIGTERM or one Ctrl-C saves the current step and returns "preempted"; a second
    Ctrl-C is left to the SIGINT handler in place before the call (Python's raises
    `KeyboardInterrupt` at once).

    ``loss_fn``: the objective (default `rdlm.train.step.lm_objective`; the held-out eval still
    measures the LM loss). ``schedule``: phases with optimizer resets (`rdlm.train.stages`).
    ``stop_after``: return after that many steps of this call without a final save, leaving the
    run as a kill there would (it resumes from its last checkpoint). ``printer`` takes the
    messages and progress lines instead of stdout.
    """
    maybe_initialize_distributed(cfg.mesh)
    tc = cfg.train
    mesh = mesh or shard_lib.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    storage.check_access(tc.run_dir, "train.run_dir")  # before any step: one clear error
    run_dir = storage.as_path(tc.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={tc.run_dir!r} is a file; give a directory (new or a "
                          "run's) for checkpoints and logs.")
    tx = make_optimizer(tc)
    shardings = state_shardings(cfg, tx, mesh)
    data_iterator = data_iterator if data_iterator is not None else default_data_iterator(cfg)
    if tc.eval_every and eval_batches is None:
        eval_batches = default_eval_batches(cfg)
    note = printer or (lambda text: print(text, flush=True))
    with _run_dir_lock(run_dir, note), _Preemption() as preemption:
        checkpointer = ckpt_lib.TrainCheckpointer(run_dir, save_every=tc.checkpoint_every,
                                                  keep_last=tc.keep_last,
                                                  keep_every=tc.keep_every,
                                                  async_save=tc.async_checkpoint)
        log = MetricsLogger(run_dir, cfg, enabled=jax.process_index() == 0, printer=printer)
        try:
            state = restore_or_init(cfg, tx, shardings, checkpointer, data_iterator, log.message)
            start = int(state.step)
            log.open(start)
            end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
            if start >= tc.steps:
                log.message(f"nothing to do: step {start} >= train.steps={tc.steps}")
            if start >= end:
                return TrainResult(state, [], "done" if start >= tc.steps else "stopped")
            run = _Run(cfg, mesh, tx, shardings, data_iterator, eval_batches, checkpointer, log,
                       schedule, loss_fn)
            return _loop(run, state, end, preemption)
        finally:
            checkpointer.close()  # the last write finishes before the lock is released
            log.close()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed while the loop runs."""

    cfg: Config
    mesh: Mesh
    tx: optax.GradientTransformation
    shardings: TrainState
    data_iterator: Any
    eval_batches: Any
    checkpointer: ckpt_lib.TrainCheckpointer
    log: MetricsLogger
    schedule: Schedule
    loss_fn: LossFn | None


@dataclasses.dataclass
class _Clock:
    """Step wall times. Host work that is not training (eval, telemetry, checkpoint copies) is
    taken out; the first step, compilation included, is timed apart and gives no throughput."""

    last: float = 0.0
    loop_start: float = 0.0
    excluded_s: float = 0.0
    first_step_s: float = 0.0

    def start(self) -> None:
        self.last = self.loop_start = time.perf_counter()

    def exclude_since(self, t0: float) -> None:
        self.excluded_s += time.perf_counter() - t0

    def lap(self) -> float:
        """Seconds of training since the previous lap."""
        now = time.perf_counter()
        dt, self.last, self.excluded_s = now - self.last - self.excluded_s, now, 0.0
        return dt


def step_rates(cfg: Config, m: dict[str, Any], dt: float, total_peak: float | None
               ) -> dict[str, float]:
    """Step time, tokens/s and (with a known peak) MFU of a step that took ``dt`` seconds, from
    its metrics ``m`` (r, n_grad and, for multi-pass objectives, the forward passes)."""
    tc = cfg.train
    tokens_per_step = tc.batch_size * tc.seq_len
    out = {"step_time_s": dt, "tokens_per_s": tokens_per_step / dt}
    if total_peak:
        per_token = flops_lib.train_flops_per_token(cfg.model, tc.seq_len, m["r"] - m["n_grad"],
                                                    m["n_grad"])
        out["mfu"] = per_token * m.get(FORWARD_PASSES, 1.0) * tokens_per_step / dt / total_peak
    return out


class _Recorder:
    """The host side of each step, one step behind the device so that dispatch never waits:
    the step's metrics, timings and labels into the history and the log, and the NaN guard's
    verdict."""

    def __init__(self, run: _Run, start: int, clock: _Clock):
        self.run, self.start, self.clock = run, start, clock
        cfg = run.cfg
        peak = device_peak_flops(jax.devices()[0], cfg.model.dtype, cfg.train.peak_flops)
        self.total_peak = peak * jax.device_count() if peak else None
        self.history: list[dict[str, float]] = []
        self.side_metrics: dict[int, dict[str, float]] = {}  # eval/telemetry, by step
        self.pending: tuple[int, dict] | None = None

    def defer(self, step: int, metrics_dev: dict) -> None:
        """Record the previous step (its metrics are ready by now) and hold this one."""
        self.flush()
        self.pending = (step, metrics_dev)

    def flush(self) -> None:
        if self.pending is not None:
            self.finish(*self.pending)
            self.pending = None

    def finish(self, step: int, metrics_dev: dict) -> None:
        cfg, log, schedule = self.run.cfg, self.run.log, self.run.schedule
        tc = cfg.train
        m = {k: plain(v) for k, v in jax.device_get(metrics_dev).items()}
        dt = self.clock.lap()
        m["r"] = int(m.pop("n_no_grad")) + int(m["n_grad"])
        if step == self.start + 1:
            m["step_time_s"] = self.clock.first_step_s
        else:
            m.update(step_rates(cfg, m, dt, self.total_peak))
        done = step - self.start
        elapsed = self.clock.last - self.clock.loop_start
        m["eta_s"] = elapsed / done * (tc.steps - step) if done else 0.0
        if not m["finite"]:
            log.message(f"step {step}: non-finite loss, gradient or updated params "
                        f"(loss={m['loss']}, grad_norm={m['grad_norm']}, updated "
                        f"param_norm={m['proposed_param_norm']}); update skipped "
                        f"({m['bad_streak']} in a row, {m['bad_steps']} in total)")
        m.update(schedule.annotations(step))
        m.update(self.side_metrics.pop(step, {}))
        self.history.append({"step": step, **m})
        log.log(step, m, print_line=(step % tc.log_every == 0 or step == tc.steps
                                     or schedule.phase_end(step)
                                     or any(k.startswith("eval/") for k in m)))
        streak = self.history[len(self.history) - m["bad_streak"]:] if m["bad_streak"] else []
        check_divergence(m, step, cfg, self.run.checkpointer, loss_or_gradient_failed(streak))


class _SideWork:
    """Telemetry and eval on the params right after a step, before the next step donates them;
    the time beyond waiting for the step itself is excluded from its step time."""

    def __init__(self, run: _Run, clock: _Clock, recorder: _Recorder):
        self.run, self.clock, self.recorder = run, clock, recorder
        tc = run.cfg.train
        self.eval_fn = (make_eval_fn(run.cfg, run.mesh) if tc.eval_every and run.eval_batches
                        else None)
        self.telemetry_fn = (jax.jit(latent_telemetry, static_argnums=(2, 3))
                             if tc.telemetry_every else None)

    def __call__(self, step: int, params: Any, step_batch: Batch) -> None:
        cfg = self.run.cfg
        tc = cfg.train
        wants_telemetry = self.telemetry_fn is not None and step % tc.telemetry_every == 0
        # The last step too, so that a run always ends with a held-out number.
        wants_eval = self.eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps)
        if not (wants_telemetry or wants_eval):
            return
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        m: dict[str, float] = {}
        if wants_telemetry:
            rows = step_batch["inputs"][: min(4, tc.batch_size)]
            m.update(plain_dict(self.telemetry_fn(params, rows, cfg,
                                                  max(2, cfg.model.mean_recurrence))))
        if wants_eval:
            m.update(run_eval(self.eval_fn, params, self.run.eval_batches, cfg, self.run.mesh))
        self.recorder.side_metrics[step] = m
        self.clock.exclude_since(t0)


def _first_step(step_fn: Any, state: TrainState, batch: Batch, clock: _Clock,
                log: MetricsLogger) -> tuple[TrainState, dict]:
    """The first step of a call, waited for: its time is mostly compilation."""
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    clock.first_step_s = time.perf_counter() - t0
    log.message(f"first step (compilation included): {clock.first_step_s:.1f}s")
    clock.start()
    return state, metrics


def _save(run: _Run, state: TrainState, step: int, clock: _Clock) -> None:
    t0 = time.perf_counter()
    run.checkpointer.save(step, cfg=run.cfg, params=state.params, opt_state=state.opt_state,
                          meta={**state.meta(), **run.schedule.annotations(step)},
                          data_iterator=run.data_iterator)
    clock.exclude_since(t0)


class _Saver:
    """Writes the checkpoints the loop asks for (the config's steps, phase ends, preemption),
    never while bad steps run in a row: their params are the last good step's, but a saved
    streak would resume as a streak, and the run may be about to stop on it. A save that falls
    in a streak is made at the next good step instead."""

    def __init__(self, run: _Run, clock: _Clock, recorder: _Recorder):
        self.run, self.clock, self.recorder = run, clock, recorder
        self.owed = False

    def __call__(self, state: TrainState, step: int, due: bool) -> bool:
        """Save ``state`` (after ``step``) if ``due`` or owed and the step was good; saved?"""
        if not (due or self.owed):
            return False
        self.recorder.flush()  # the previous step's verdict, which may stop the run, comes first
        streak = int(state.bad_streak)  # waits for the step, as the save's copy would
        if streak:
            if due and not self.owed:  # once per streak
                self.run.log.message(f"step {step}: not saved, being one of {streak} bad steps "
                                     "in a row (the next good step is saved instead)")
            self.owed = True
            return False
        _save(self.run, state, step, self.clock)
        self.owed = False
        return True


def _stop_message(signal_name: str, step: int, saved: bool,
                  checkpointer: ckpt_lib.TrainCheckpointer) -> str:
    if saved:
        return f"{signal_name}: saved step {step} to {checkpointer.directory}; exiting."
    return (f"{signal_name}: step {step} is one of a streak of bad steps, so it was not saved; "
            f"the run resumes from step {checkpointer.latest_step() or 0}; exiting.")


def _loop(run: _Run, state: TrainState, end: int, preemption: _Preemption) -> TrainResult:
    cfg, mesh, schedule, checkpointer = run.cfg, run.mesh, run.schedule, run.checkpointer
    tc = cfg.train
    start = int(state.step)
    run.log.message(f"mesh {dict(mesh.shape)} on {jax.device_count()} "
                    f"{jax.devices()[0].device_kind} device(s), {jax.process_count()} "
                    f"process(es); steps {start} → {tc.steps}"
                    + (f" (this call stops after step {end})" if end < tc.steps else ""))
    began = time.perf_counter()
    data = iter(run.data_iterator)
    batch: Batch | None = global_batch(next(data), cfg, mesh)
    step_fn = make_train_step(cfg, mesh, batch_keys=tuple(batch), loss_fn=run.loss_fn)
    init_opt = jax.jit(run.tx.init, out_shardings=run.shardings.opt_state)
    clock = _Clock()
    recorder = _Recorder(run, start, clock)
    side_work = _SideWork(run, clock, recorder)
    saver = _Saver(run, clock, recorder)
    status = "done" if end == tc.steps else "stopped"
    for step in range(start + 1, end + 1):
        # Asked before every step, the first of a resumed run included: a run resumed exactly
        # at a phase change resets the optimizer as the uninterrupted one did.
        if schedule.reset_optimizer(step - 1):
            state = dataclasses.replace(state, opt_state=init_opt(state.params))
        if batch is None:
            batch = global_batch(next(data), cfg, mesh)
        if step == start + 1:
            state, metrics = _first_step(step_fn, state, batch, clock, run.log)
        else:
            state, metrics = step_fn(state, batch)
        recorder.defer(step, metrics)
        side_work(step, state.params, batch)
        batch = None
        stop = preemption.agreed()
        saved = saver(state, step, checkpointer.should_save(step, tc.steps)
                      or schedule.phase_end(step) or stop)
        if stop:
            checkpointer.wait()
            run.log.message(_stop_message(preemption.requested or "preempted on another process",
                                          step, saved, checkpointer))
            status = "preempted"
            break
    recorder.flush()
    checkpointer.wait()
    saved = checkpointer.latest_step()
    run.log.message(closing_summary(recorder.history, status,
                                    None if saved is None else f"{checkpointer.directory}/{saved}",
                                    time.perf_counter() - began))
    return TrainResult(state, recorder.history, status)

