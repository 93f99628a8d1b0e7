"""Training: config errors, optimizers, micro-batching, the NaN guard, and — through the real
command line and data pipeline — SIGKILL during an async save, SIGTERM, and bitwise-exact resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rdlm
from rdlm.bench.train import synthetic_batch
from rdlm.cli.train import cli as train_cli
from rdlm.errors import TrainingDiverged
from rdlm.runtime import checkpoint
from rdlm.runtime.hostinfo import device_peak_flops
from rdlm.train import optim, train
from rdlm.train.state import init_state, state_shardings
from rdlm.train.stages import SINGLE_PHASE, StageSchedule
from rdlm.train.step import DepthPolicy, lm_objective, loss_and_grads, make_train_step
import dataclasses

from rdlm.config import ConfigError, TrainConfig
from tests.multihost import BASE_OVERRIDES, REPO, StepBatches, subprocess_env

TINY = REPO / "configs/tiny.yaml"


def tiny_cfg(*overrides: str) -> rdlm.Config:
    return rdlm.load_config(TINY, [*BASE_OVERRIDES, *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Configuration errors name the field, the value and the fix.


@pytest.mark.parametrize("override, needle", [
    ("train.optimizer=sgd", "train.optimizer='sgd' is invalid"),
    ("train.micro_batches=3", "train.micro_batches=3 is invalid: must divide train.batch_size=8"),
    ("train.schedule=linear", "train.schedule='linear'"),
    ("train.lrr=0.1", "did you mean 'lr'"),
    ("mesh.coordinator_address=localhost:1234", "mesh.num_processes"),
])
def test_config_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        tiny_cfg(override)
    assert needle in str(err.value)


def test_cli_reports_config_errors(capsys):
    assert train_cli([str(TINY), "train.steps=-1"]) == 2
    assert "train.steps=-1 is invalid: must be a positive integer" in capsys.readouterr().err
    # The mesh must fit the devices: 3-way data parallelism on 1 CPU device.
    assert train_cli([str(TINY), "mesh.data=3", "train.run_dir=/nonexistent/x"]) == 2
    assert "needs 3 devices but 1 are available" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Optimizers and schedules.


def test_schedules():
    base = dict(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    constant = optim.make_schedule(TrainConfig(**base, schedule="constant"))
    cosine = optim.make_schedule(TrainConfig(**base, schedule="cosine"))
    trapezoid = optim.make_schedule(TrainConfig(**base, schedule="trapezoid",
                                                decay_fraction=0.2))
    assert float(constant(0)) == pytest.approx(0.1)  # warm-up starts at lr / warmup, not 0
    assert float(constant(9)) == pytest.approx(0.91)
    assert float(constant(100)) == 1.0
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-3)  # halfway between 1 and 0.1
    assert float(cosine(110)) == pytest.approx(0.1)
    assert float(trapezoid(80)) == 1.0  # stable until the last 22 steps
    assert float(trapezoid(99)) == pytest.approx(1.0 - 0.9 * 11 / 22, abs=1e-3)
    assert float(trapezoid(110)) == pytest.approx(0.1)


def test_huginn_optimizer_masks_norms_and_bounds_updates():
    cfg = tiny_cfg("train.optimizer=huginn", "train.weight_decay=0.1", "train.update_clip=0.5",
                   "train.warmup_steps=0", "train.lr=1.0", "train.grad_clip=0")
    params = rdlm.init_params(cfg.model, jax.random.key(0))
    mask = optim.decay_mask(params)
    assert mask["wte"] and mask["core"]["blocks"][0]["attn"]["wqkv"]
    assert not mask["ln_f"]["weight"] and not mask["core"]["blocks"][0]["attn"]["qk_bias"]
    tx = optim.make_optimizer(cfg.train)
    # Gradients spanning 12 orders of magnitude: atan2 keeps each coordinate below 2 (no ε
    # needed), and the per-tensor clip caps the RMS at 0.5 (+ weight decay).
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    grads["ln_f"]["weight"] = jnp.full_like(grads["ln_f"]["weight"], 1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert float(jnp.sqrt(jnp.mean(u**2))) <= 0.5 + 0.1 * 2, jax.tree_util.keystr(path)
    # Norms get no decay: atan2(1e-6, 1e-6)·4/π = 1 per coordinate, clipped to RMS 0.5, × −lr.
    np.testing.assert_allclose(np.asarray(updates["ln_f"]["weight"]), -0.5, rtol=1e-5)


def test_micro_batches_give_the_full_batch_gradient():
    """Token-weighted accumulation: 2 micro-batches with unequal loss-token counts give the
    full-batch gradient (deterministic zero initial state, so only the split differs)."""
    cfg = rdlm.load_config(None, ["model.preset=tiny", "model.d_model=16", "model.n_heads=2", "train.init_scale=0.0",
                                  "model.mlp_dim=16", "model.n_core=1", "model.backprop_depth=1",
                                  "model.vocab_size=16", "train.batch_size=4", "train.seq_len=8"])
    params = rdlm.init_params(cfg.model, jax.random.key(0))
    batch = StepBatches(4, 8)
    b = {k: jnp.asarray(v) for k, v in next(batch).items()}
    b["loss_mask"] = b["loss_mask"].at[0, :5].set(0)  # micro-batch 0 has fewer loss tokens
    args = (jnp.int32(1), jnp.int32(1), jax.random.key(0))

    def grads_for(m):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batches=m))
        fn = jax.jit(lambda p, bb: loss_and_grads(p, bb, c, lm_objective(c), *args))
        return fn(params, b)

    (g1, m1), (g2, m2) = grads_for(1), grads_for(2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-7)


def test_peak_flops_table_and_override():
    cpu = jax.devices()[0]
    assert device_peak_flops(cpu, "float32") == 170e9
    assert device_peak_flops(cpu, "float32", override=1e12) == 1e12


# ---------------------------------------------------------------------------------------------
# What an objective and a schedule decide.


def test_depth_policies_and_stage_schedule():
    fixed = DepthPolicy(3, 2, fixed=True)
    assert [int(x) for x in fixed.draw(jax.random.key(0))] == [1, 2] and fixed.max_grad == 2
    assert DepthPolicy(4, 4, fixed=True).max_grad == 4  # a fixed r, every step with gradient
    sampled = DepthPolicy(6, 2)
    draws = {tuple(int(x) for x in sampled.draw(jax.random.key(i))) for i in range(20)}
    assert len(draws) > 1 and all(g <= 2 for _, g in draws) and sampled.max_grad == 2
    cfg = tiny_cfg("train.depth=fixed")
    assert lm_objective(cfg).depth == DepthPolicy.of(cfg) == DepthPolicy(
        cfg.model.mean_recurrence, cfg.model.backprop_depth, fixed=True)
    schedule = StageSchedule(((0, 2), (1, 3), (2, 1)))
    assert schedule.total_steps == 6
    # Asked before 0-based step k; labels and phase ends after 1-based step k.
    assert [k for k in range(6) if schedule.reset_optimizer(k)] == [2, 5]
    assert [schedule.annotations(k)["stage"] for k in range(1, 7)] == [0, 0, 1, 1, 1, 2]
    assert [k for k in range(1, 7) if schedule.phase_end(k)] == [2, 5]
    assert not any(SINGLE_PHASE.reset_optimizer(k) or SINGLE_PHASE.phase_end(k)
                   for k in range(6))


# ---------------------------------------------------------------------------------------------
# The loop: NaN guard.


def test_nan_guard_skips_counts_and_stops_with_last_good_checkpoint(tmp_path):
    """Batches with out-of-vocabulary ids give a NaN loss: step 3 is skipped and training goes
    on; steps 5-7 fail in a row and the run stops, with the checkpoints intact and finite. The
    save due at step 6 falls in the streak and is not made."""
    cfg = tiny_cfg(f"train.run_dir={tmp_path}", "train.steps=20", "train.checkpoint_every=2",
                   "train.max_bad_steps=3", "train.keep_last=10", "train.async_checkpoint=false")
    data = StepBatches(8, 64, bad_steps=(3, 5, 6, 7))
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row") as err:
        train(cfg, data_iterator=data)
    # The loss at step 4's params was NaN: the message offers the checkpoint before them, and
    # the same checkpoint again if the batches are at fault.
    assert "The last good step is 4" in str(err.value)
    assert "train.resume_step=2" in str(err.value) and "fix the data" in str(err.value)
    log = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert [log[s]["finite"] for s in range(1, 8)] == [True, True, False, True, False, False, False]
    assert log[3]["param_norm"] == log[2]["param_norm"]  # the bad step changed nothing
    assert log[4]["param_norm"] != log[3]["param_norm"]
    assert (log[3]["bad_steps"], log[3]["bad_streak"]) == (1, 1)
    assert (log[7]["bad_steps"], log[7]["bad_streak"]) == (4, 3)
    assert checkpoint.list_checkpoints(tmp_path) == [2, 4]
    _, params4 = checkpoint.load_params(tmp_path)
    for a in jax.tree.leaves(params4):
        assert np.all(np.isfinite(a))
    assert float(optax.global_norm(params4)) == log[7]["param_norm"]  # steps 5-7 were skipped


# ---------------------------------------------------------------------------------------------
# The command line, killed and preempted, resumes to the uninterrupted run bit for bit.


def _cli(run_dir: Path, steps: int, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rdlm", "train", str(TINY), *BASE_OVERRIDES,
           f"train.run_dir={run_dir}", f"train.steps={steps}", "train.checkpoint_every=1",
           "train.keep_last=2"]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(1, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def _read_until(proc: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"process ended before printing {prefix!r}:\n" + "".join(seen[-40:]))


def test_sigkill_during_async_save_then_sigterm_then_exact_resume(tmp_path):
    steps = 40
    run_dir, cache = tmp_path / "run", tmp_path / "jax-cache"
    ckpt_dir = run_dir / "checkpoints"

    # 1. SIGKILL while an asynchronous checkpoint is being written.
    proc, seen = _cli(run_dir, steps, cache), []
    _read_until(proc, "step 3/", seen)
    caught_mid_save, deadline = False, time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if any("orbax-checkpoint-tmp" in p.name for p in ckpt_dir.iterdir()):
            proc.kill()
            caught_mid_save = True
            break
    proc.kill()
    proc.wait()
    assert caught_mid_save, "never saw a checkpoint in flight"
    killed_at = checkpoint.list_checkpoints(run_dir)
    assert killed_at, "no complete checkpoint survived"
    cfg_saved, params = checkpoint.load_params(run_dir)  # the latest complete step loads
    assert cfg_saved.train.run_dir == str(run_dir)

    # 2. Restart: resumes from the latest complete step; SIGTERM saves and exits cleanly.
    proc, seen = _cli(run_dir, steps, cache), []
    resumed = _read_until(proc, "resumed from", seen)
    assert resumed.strip().endswith(f"(step {killed_at[-1]})")
    _read_until(proc, "step ", seen)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    seen.append(out)
    assert proc.returncode == 0, "".join(seen)[-3000:]
    assert "SIGTERM: saved step" in out
    term_step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert killed_at[-1] < term_step < steps
    assert checkpoint.list_checkpoints(run_dir)[-1] == term_step

    # 3. Resume in this process to the end; run the same config straight through.
    resumed_run = train(tiny_cfg(f"train.run_dir={run_dir}", f"train.steps={steps}",
                                           "train.checkpoint_every=1", "train.keep_last=2"))
    assert resumed_run.history[0]["step"] == term_step + 1
    straight = train(tiny_cfg(f"train.run_dir={tmp_path / 'straight'}",
                                        f"train.steps={steps}", "train.checkpoint_every=0"))
    for a, b in zip(jax.tree.leaves(resumed_run.state.params),
                    jax.tree.leaves(straight.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every loss the three interrupted processes logged equals the uninterrupted one.
    straight_loss = {h["step"]: h["loss"] for h in straight.history}
    # Each step is logged exactly once: a resumed run drops what the killed one logged past its
    # checkpoint (and any torn last line) before appending.
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for record in logged:
        assert record["loss"] == straight_loss[record["step"]], record["step"]
    # And the loss falls on this task.
    losses = [straight_loss[s] for s in range(1, steps + 1)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def test_init_from_starts_a_new_run_from_params(tmp_path):
    cfg = tiny_cfg(f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.lr=0.00001",
                   "train.checkpoint_every=0")
    source = rdlm.init_params(cfg.model, jax.random.key(123))  # not the run's seed
    checkpoint.save_params(tmp_path / "init", cfg, source)
    cfg = tiny_cfg(f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.lr=0.00001",
                   "train.checkpoint_every=0", f"train.init_from={tmp_path / 'init'}")
    result = train(cfg, data_iterator=StepBatches(8, 64))
    assert int(result.state.step) == 1
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(source)):
        np.testing.assert_allclose(a, b, atol=1e-4)  # one tiny step away from the source
    # A model of another shape is refused, naming the option.
    other = tiny_cfg(f"train.run_dir={tmp_path / 'other'}", f"train.init_from={tmp_path / 'init'}",
                     "model.d_model=64")
    with pytest.raises(ConfigError, match="train.init_from"):
        train(other, data_iterator=StepBatches(8, 64))


def test_resume_accepts_run_settings_of_the_model_but_not_another_model(tmp_path, capsys):
    run = f"train.run_dir={tmp_path / 'run'}"
    train(tiny_cfg(run, "train.steps=1", "model.remat=false"),
                    data_iterator=StepBatches(8, 64))
    # remat and the depth law change how the step runs, not the parameters: the run resumes.
    result = train(tiny_cfg(run, "train.steps=2", "model.remat=true",
                                      "model.mean_recurrence=6"), data_iterator=StepBatches(8, 64))
    assert int(result.state.step) == 2
    out = capsys.readouterr().out
    assert "resuming with model.remat=True (the checkpoint trained with False)" in out
    with pytest.raises(ConfigError, match="model.d_model 32 → 64.*use a new train.run_dir"):
        train(tiny_cfg(run, "train.steps=3", "model.d_model=64"),
                        data_iterator=StepBatches(8, 64))


def test_fixed_depth_runs_exactly_mean_recurrence_steps(tmp_path):
    cfg = tiny_cfg(f"train.run_dir={tmp_path / 'run'}", "train.steps=3", "train.depth=fixed",
                   "model.mean_recurrence=3", "model.backprop_depth=2",
                   "train.checkpoint_every=0", "train.log_every=1")
    train(cfg, data_iterator=StepBatches(8, 64))
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "r" in r]
    assert [(r["r"], r["n_grad"]) for r in rows] == [(3, 2)] * 3
    with pytest.raises(ConfigError, match="train.depth"):
        tiny_cfg("train.depth=constant")


def test_train_init_scale_zero_makes_the_step_independent_of_the_noise_key():
    """train.init_scale=0 trains from the zero state: two seeds' noise keys give the same loss."""
    from rdlm.runtime import sharding as shard_lib
    losses = []
    for seed in (0, 1):
        cfg = tiny_cfg("train.init_scale=0", "train.depth=fixed", f"seed={seed}")
        mesh = shard_lib.make_mesh(cfg.mesh)
        tx = optim.make_optimizer(cfg.train)
        shardings = state_shardings(cfg, tx, mesh)
        params = rdlm.init_params(cfg.model, jax.random.key(0))
        state = init_state(cfg, tx, shardings, params=params)
        batch = synthetic_batch(cfg, mesh)
        step = make_train_step(cfg, mesh, batch_keys=tuple(batch))
        _, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == losses[1]
    with pytest.raises(ConfigError, match="train.init_scale"):
        tiny_cfg("train.init_scale=-1")
