"""Faults a training run must survive, injected for real: a learning rate that destroys the
weights, a second training on the same run directory, a lock left by a dead process, Ctrl-C once
and twice. Each ends in one ``error:`` line or a clean exit, and a rerun that trains on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import rdlm
from rdlm.cli.train import cli as train_cli
from rdlm.config import ConfigError
from rdlm.errors import TrainingDiverged
from rdlm.runtime import checkpoint
from rdlm.runtime import lock as lock_lib
from rdlm.train import read_metrics, train
from tests.multihost import BASE_OVERRIDES, REPO, StepBatches, subprocess_env

TINY = REPO / "configs/tiny.yaml"
HOST = socket.gethostname()


def tiny_cfg(*overrides: str) -> rdlm.Config:
    return rdlm.load_config(TINY, [*BASE_OVERRIDES, *overrides])


def quiet(_: str) -> None:
    pass


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_params_usable(run_dir: Path) -> None:
    """Every checkpoint's params are finite and their norm is too (no overflowing weights)."""
    for step in checkpoint.list_checkpoints(run_dir):
        _, params = checkpoint.load_params(run_dir / "checkpoints" / str(step))
        assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params)), step
        assert np.isfinite(float(optax.global_norm(params))), step



# ---------------------------------------------------------------------------------------------
# The NaN guard keeps no poisoned weights.


def test_lr_1e30_stops_at_step_0_saves_nothing_and_a_sane_lr_trains_on(tmp_path, capsys):
    """The command-line repro: lr 1e30 makes the first update's weights ~5e28 (finite, but their
    norm overflows). The guard drops every such update, nothing is checkpointed, the error names
    step 0 as the last good one, and the same run dir then trains with lr 1e-3."""
    run = [str(TINY), *BASE_OVERRIDES, f"train.run_dir={tmp_path}", "train.checkpoint_every=1"]
    assert train_cli([*run, "train.steps=100", "train.lr=1e30"]) == 3
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert "5 non-finite steps in a row" in err and "The last good step is 0" in err, err
    assert "rerun the same command to start afresh" in err, err
    assert checkpoint.list_checkpoints(tmp_path) == []
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["finite"] for r in log] == [False] * 5
    assert all(np.isfinite(r["loss"]) and r["proposed_param_norm"] == np.inf for r in log)

    assert train_cli([*run, "train.steps=3", "train.lr=0.001"]) == 0
    assert checkpoint.list_checkpoints(tmp_path) == [2, 3]  # tiny.yaml keeps the last 2
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["finite"] for r in log)
    assert_params_usable(tmp_path)


def test_overflowing_update_after_good_steps_is_never_checkpointed(tmp_path):
    """Three good steps, then lr 1e30: the update's params overflow, so steps 4-6 are dropped,
    the saves due at them are not made, and a lower lr resumes from step 3."""
    common = [f"train.run_dir={tmp_path}", "train.checkpoint_every=1", "train.keep_last=10",
              "train.max_bad_steps=3"]
    train(tiny_cfg(*common, "train.steps=3"), data_iterator=StepBatches(8, 64), printer=quiet)
    with pytest.raises(TrainingDiverged) as err:
        train(tiny_cfg(*common, "train.steps=20", "train.lr=1e30"),
              data_iterator=StepBatches(8, 64), printer=quiet)
    message = str(err.value)
    assert "steps 4-6" in message and "The last good step is 3." in message, message
    assert f"rerun the same command to resume from checkpoint {tmp_path}/checkpoints/3" in message
    assert checkpoint.list_checkpoints(tmp_path) == [1, 2, 3]
    assert_params_usable(tmp_path)

    result = train(tiny_cfg(*common, "train.steps=5", "train.lr=0.001"),
                   data_iterator=StepBatches(8, 64), printer=quiet)
    assert [h["step"] for h in result.history] == [4, 5]
    assert all(h["finite"] and np.isfinite(h["loss"]) for h in result.history)


def test_finite_but_useless_params_send_the_rerun_back_with_resume_step(tmp_path):
    """lr 1e6 leaves step 3's weights finite but useless (every later gradient is NaN), and its
    checkpoint exists. The error sends the rerun to the checkpoint before it; train.resume_step
    deletes the later ones and trains on; the same command again resumes normally."""
    common = [f"train.run_dir={tmp_path}", "train.checkpoint_every=1", "train.keep_last=10",
              "train.max_bad_steps=3"]
    train(tiny_cfg(*common, "train.steps=2"), data_iterator=StepBatches(8, 64), printer=quiet)
    with pytest.raises(TrainingDiverged) as err:
        train(tiny_cfg(*common, "train.steps=20", "train.lr=1000000.0"),
              data_iterator=StepBatches(8, 64), printer=quiet)
    assert "The last good step is 3; the loss or gradient" in str(err.value), str(err.value)
    assert "rerun with train.resume_step=2 to resume from checkpoint" in str(err.value)
    assert checkpoint.list_checkpoints(tmp_path) == [1, 2, 3]
    diverged_loss_3 = read_metrics(tmp_path / "metrics.jsonl")[2]["loss"]  # on step 2's params

    with pytest.raises(ConfigError, match=r"train.resume_step=7: .* complete steps are \[1, 2, 3\]"):
        train(tiny_cfg(*common, "train.steps=5", "train.resume_step=7"),
              data_iterator=StepBatches(8, 64), printer=quiet)

    notes: list[str] = []
    rolled = tiny_cfg(*common, "train.steps=5", "train.lr=0.001", "train.resume_step=2")
    result = train(rolled, data_iterator=StepBatches(8, 64), printer=notes.append)
    assert any("deleted the later checkpoints [3]" in n for n in notes), notes
    assert [h["step"] for h in result.history] == [3, 4, 5]
    assert all(h["finite"] for h in result.history)
    assert checkpoint.list_checkpoints(tmp_path) == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert result.history[0]["loss"] == diverged_loss_3  # resumed exactly from step 2

    # A preempted job reruns the same command: the rollback is not made twice.
    notes.clear()
    again = dataclasses.replace(rolled, train=dataclasses.replace(rolled.train, steps=6))
    result = train(again, data_iterator=StepBatches(8, 64), printer=notes.append)
    assert any("was applied before" in n for n in notes), notes
    assert [h["step"] for h in result.history] == [6]


# ---------------------------------------------------------------------------------------------
# One training per run directory.


def _cli(run_dir: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rdlm", "train", str(TINY), *BASE_OVERRIDES,
           f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(1, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def _read_until(proc: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"process ended before printing {prefix!r}:\n" + "".join(seen[-40:]))


def test_second_training_on_a_held_run_dir_exits_at_once_naming_the_holder(tmp_path, jax_cache):
    """A trains; B on the same run dir stops before compiling anything, with one error line
    naming A's pid and host, and leaves A's run alone. Then A is aborted by a double Ctrl-C: one
    error line, no traceback, and the lock is released."""
    run_dir = tmp_path / "run"
    # Lines every 10 steps: the pipe must not fill while B runs.
    first, seen = _cli(run_dir, jax_cache, "train.steps=100000", "train.checkpoint_every=2",
                       "train.log_every=10"), []
    try:
        _read_until(first, "step 10/", seen)
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "rdlm", "train", str(TINY), *BASE_OVERRIDES,
             f"train.run_dir={run_dir}", "train.steps=100"],
            cwd=REPO, env=subprocess_env(1, jax_cache), capture_output=True, text=True,
            timeout=120)
        elapsed = time.monotonic() - t0
        assert second.returncode == 2, second.stdout + second.stderr
        errors = error_lines(second.stderr)
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"pid {first.pid} on host {HOST}" in errors[0], errors[0]
        assert "choose another train.run_dir" in errors[0]
        assert "first step" not in second.stdout, second.stdout  # stopped before compiling
        assert elapsed < 60
        holder = lock_lib.read_lock(run_dir / lock_lib.LOCK_NAME)
        assert holder is not None and holder.pid == first.pid

        # A carries on and keeps checkpointing: nothing of its run was touched.
        step = int(_read_until(first, "step ", seen).split()[1].split("/")[0])
        _read_until(first, f"step {step + 10}/", seen)
        assert checkpoint.list_checkpoints(run_dir)

        first.send_signal(signal.SIGINT)
        _read_until(first, "Ctrl-C: stopping after the current step", seen)
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    seen.append(out)
    assert first.returncode == 130, "".join(seen)[-3000:]
    assert "Traceback" not in out and len(error_lines(out)) == 1, out
    assert "aborted by Ctrl-C" in out
    assert not (run_dir / lock_lib.LOCK_NAME).exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid runs nothing now
    return proc.pid


def _write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dict(pid=1, host=HOST, started="2000-01-01T00:00:00Z", pid_start=None, command="x")
    path = run_dir / lock_lib.LOCK_NAME
    path.write_text(json.dumps({**info, **fields}))
    return path


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = _dead_pid()
    path = _write_lock(tmp_path, pid=dead)
    notes: list[str] = []
    result = train(tiny_cfg(f"train.run_dir={tmp_path}", "train.steps=1"),
                   data_iterator=StepBatches(8, 64), printer=notes.append)
    assert int(result.state.step) == 1
    assert any("took over the lock" in n and f"pid {dead} on host {HOST}" in n for n in notes)
    assert not path.exists()  # released on the way out


def test_lock_holders_that_may_be_alive_are_not_taken_over(tmp_path):
    """Another host cannot be checked: refused, naming the file to delete. A live pid here is
    refused; the same pid with another start tick is a reused pid, hence stale."""
    other = _write_lock(tmp_path / "a", pid=_dead_pid(), host="elsewhere")
    with pytest.raises(lock_lib.RunDirLocked, match=f"on host elsewhere.*delete {other}"):
        lock_lib.acquire(tmp_path / "a", note=quiet)

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = lock_lib.process_start_tick(sleeper.pid)
        _write_lock(tmp_path / "b", pid=sleeper.pid, pid_start=start)
        with pytest.raises(lock_lib.RunDirLocked, match=f"pid {sleeper.pid} on host {HOST}"):
            lock_lib.acquire(tmp_path / "b", note=quiet)
        if start is not None:  # Linux: a pid now held by a later process keeps no lock
            _write_lock(tmp_path / "c", pid=sleeper.pid, pid_start=start - 1)
            notes: list[str] = []
            me = lock_lib.acquire(tmp_path / "c", note=notes.append)
            assert me.pid != sleeper.pid and notes
            lock_lib.release(tmp_path / "c", me)
            assert not (tmp_path / "c" / lock_lib.LOCK_NAME).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------
# Ctrl-C behaves like SIGTERM.


def test_in_python_a_second_ctrl_c_raises_keyboard_interrupt():
    """Outside the command line (a notebook), the first Ctrl-C asks for a save and the second is
    Python's own KeyboardInterrupt; the handlers from before are back afterwards."""
    from rdlm.train.loop import _Preemption
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs in this thread between bytecodes
            assert preemption.agreed() and preemption.requested == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_saves_the_current_step_and_the_run_resumes_exactly(tmp_path, jax_cache):
    run_dir = tmp_path / "run"
    proc, seen = _cli(run_dir, jax_cache, "train.steps=100000", "train.checkpoint_every=0"), []
    try:
        _read_until(proc, "step 3/", seen)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    seen.append(out)
    assert proc.returncode == 0, "".join(seen)[-3000:]
    assert "Traceback" not in out and not error_lines(out), out
    saved = int(out.split("SIGINT: saved step ")[1].split()[0])
    assert saved >= 3 and checkpoint.list_checkpoints(run_dir) == [saved]
    assert not (run_dir / lock_lib.LOCK_NAME).exists()

    steps = saved + 3
    resumed = train(tiny_cfg(f"train.run_dir={run_dir}", f"train.steps={steps}",
                             "train.checkpoint_every=0"), printer=quiet)
    assert resumed.history[0]["step"] == saved + 1
    straight = train(tiny_cfg(f"train.run_dir={tmp_path / 'straight'}", f"train.steps={steps}",
                              "train.checkpoint_every=0"), printer=quiet)
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    logged = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert [r["loss"] for r in logged] == [h["loss"] for h in straight.history]
