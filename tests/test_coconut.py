"""Continuous thought: substitution vs a step-by-step reference, masks, stages, batching, resume."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rdlm.cli import coconut as coconut_cli
from rdlm.coconut import curriculum, generation, thoughts
from rdlm.coconut import CoconutConfig, Depth
from rdlm.config import Config, DataConfig, TrainConfig, model_preset
from rdlm.data.tasks import Example
from rdlm.data.tokenizer import load_tokenizer
from rdlm.errors import TrainingDiverged
from rdlm.model import attention_context, forward, init_params, initial_state
from rdlm.runtime import checkpoint
from rdlm.train import read_metrics, train
from rdlm.train.stages import StageSchedule

TOK = load_tokenizer("chars")
LATENT = TOK.latent_id


def _cfg(mean_recurrence: int = 3, token_shift: int = 0, **block):
    return model_preset("tiny", mean_recurrence=mean_recurrence, max_seq_len=64,
                        token_shift=token_shift, **block)


def _params(cfg, seed: int):
    """Fresh params; the token-shift matrices (zero at init) made non-zero so that they count."""
    params = init_params(cfg, jax.random.key(seed))
    if cfg.token_shift:
        shape = params["token_shift"].shape
        params["token_shift"] = 0.3 * jax.random.normal(jax.random.key(seed + 100), shape)
    return params


def _tokens(question: str, n_latents: int, tail: str = "ab") -> list[int]:
    return ([TOK.bos_id] + TOK.encode(question) + [TOK.bot_id] + [LATENT] * n_latents
            + [TOK.eot_id] + TOK.encode(tail))


def reference_hidden(params, tokens: list[int], cfg, num_steps: int, state0_td,
                     shift_sees_thoughts: bool = False):
    """Position by position in a Python loop: the input at a latent is the hidden state the model
    produced at the previous position, each position computed by a fresh full pass over the
    inputs known so far (causal: the zeros after position t never reach it). With
    ``shift_sees_thoughts`` every position's token shift reads its predecessors' bases (a
    thought's base: its hidden state), and a thought gets the shift too."""
    t_len = len(tokens)
    ctx = attention_context(cfg, 1, t_len)
    depth = Depth(jnp.int32(num_steps), jnp.int32(0), 0)
    full_pass = jax.jit(lambda x: thoughts.hidden_states(params, x, cfg, ctx, state0_td[None], depth))
    wte = np.asarray(params["wte"]) * (1.0 if cfg.block == "llama" else np.sqrt(cfg.d_model))

    def base(t: int) -> np.ndarray:
        return np.asarray(hidden[t - 1]) if tokens[t] == LATENT else wte[tokens[t]]

    def embed(t: int) -> np.ndarray:  # own base + the previous positions' (token shift)
        if tokens[t] == LATENT and not shift_sees_thoughts:
            return base(t)
        out = base(t).copy()
        for k in range(1, cfg.token_shift + 1):
            if t - k >= 0:
                prev = base(t - k) if shift_sees_thoughts else wte[tokens[t - k]]
                out += prev @ np.asarray(params["token_shift"][k - 1])
        return out

    x = jnp.zeros((1, t_len, cfg.d_model))
    hidden = []
    for t in range(t_len):
        x = x.at[0, t].set(embed(t))
        hidden.append(full_pass(x)[0, t])
    return jnp.stack(hidden)


LLAMA = {"block": "llama", "qk_bias": False, "n_kv_heads": 2, "tie_embeddings": False}


@pytest.mark.parametrize("mean_r,num_steps,init_scale,token_shift,sees,block",
                         [(1, 1, 0.0, 0, False, {}), (3, 3, 1.0, 0, False, {}),
                          (2, 2, 0.0, 2, False, {}), (2, 2, 0.0, 2, True, {}),
                          (3, 3, 1.0, 0, False, LLAMA)])
def test_substitution_matches_step_by_step_reference(mean_r, num_steps, init_scale, token_shift,
                                                     sees, block):
    cfg = _cfg(mean_r, token_shift, **block)
    params = _params(cfg, 0)
    tokens = _tokens("x=1;y", 3)
    key = jax.random.key(5)
    state0 = initial_state(cfg, (1, len(tokens), cfg.d_model), key=key, init_scale=init_scale)
    ref = reference_hidden(params, tokens, cfg, num_steps, state0[0], shift_sees_thoughts=sees)
    depth = Depth(jnp.int32(num_steps), jnp.int32(0), 0)
    _, hidden = thoughts.continuous_forward(params, jnp.array([tokens]), cfg, latent_id=LATENT,
                                          max_latents=4, depth=depth, key=key,
                                          init_scale=init_scale, shift_sees_thoughts=sees)
    np.testing.assert_allclose(hidden[0], ref, atol=2e-5)
    if token_shift:  # the two ways of shifting differ right after the first thought
        other = reference_hidden(params, tokens, cfg, num_steps, state0[0],
                                 shift_sees_thoughts=not sees)
        first = tokens.index(LATENT)
        assert float(jnp.abs(other[first + 1] - ref[first + 1]).max()) > 1e-3
    # The thoughts matter: the pause baseline (no substitution) differs after the first latent.
    _, pause = thoughts.continuous_forward(params, jnp.array([tokens]), cfg, latent_id=LATENT,
                                         max_latents=4, depth=depth, key=key,
                                         init_scale=init_scale, substitute=False)
    first = tokens.index(LATENT)
    np.testing.assert_allclose(pause[0, :first], ref[:first], atol=2e-5)
    assert float(jnp.abs(pause[0, first:] - ref[first:]).max()) > 1e-3


def test_no_latents_is_the_ordinary_forward():
    cfg = _cfg(3)
    params = init_params(cfg, jax.random.key(1))
    tokens = jnp.array([_tokens("x=1;y", 0)])
    logits, _ = thoughts.continuous_forward(params, tokens, cfg, latent_id=LATENT, max_latents=2,
                                          depth=Depth(jnp.int32(3), jnp.int32(0), 0))
    expected, _ = forward(params, tokens, cfg, num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(logits, expected, atol=2e-5)


@pytest.mark.parametrize("token_shift,sees", [(0, False), (2, False), (2, True)])
def test_batch_equals_single_rows_with_latents_at_different_positions(token_shift, sees):
    cfg = _cfg(2, token_shift)
    params = _params(cfg, 2)
    rows = [_tokens("a=1;b=a;?b", 2), _tokens("q", 2, "xyz"), _tokens("k=3;?k", 1)]
    width = max(map(len, rows)) + 2
    buf = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        buf[i, :len(r)] = r
    depth = Depth(jnp.int32(2), jnp.int32(0), 0)
    batch_logits, _ = thoughts.continuous_forward(params, jnp.asarray(buf), cfg, latent_id=LATENT,
                                                max_latents=3, depth=depth,
                                                shift_sees_thoughts=sees)
    for i, r in enumerate(rows):
        single, _ = thoughts.continuous_forward(params, jnp.array([r]), cfg, latent_id=LATENT,
                                              max_latents=3, depth=depth,
                                              shift_sees_thoughts=sees)
        np.testing.assert_allclose(batch_logits[i, :len(r)], single[0], atol=3e-5)


def test_latent_ordinals():
    t = jnp.array([[1, LATENT, LATENT, 7, LATENT, 9], [LATENT, 8, 8, LATENT, LATENT, LATENT]])
    np.testing.assert_array_equal(thoughts.latent_ordinals(t, LATENT),
                                  [[-1, 0, 1, -1, 0, -1], [0, -1, -1, 0, 1, 2]])


def test_gradients_flow_through_thoughts():
    """The loss on the answer after the thoughts depends on the question through the thoughts
    only if hidden states are fed back; with the pause baseline the gradient path differs."""
    cfg = _cfg(2)
    params = init_params(cfg, jax.random.key(3))
    tokens = np.array([_tokens("x=1;y", 2, "zz")], np.int32)
    mask = np.zeros_like(tokens)
    mask[0, -2:] = 1
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.asarray(mask[:, 1:])}
    depth = Depth(jnp.int32(0), jnp.int32(2), 2)
    grad = lambda sub: jax.grad(lambda p: thoughts.coconut_loss(
        p, batch, cfg, latent_id=LATENT, max_latents=2, depth=depth, key=None, init_scale=0.0,
        substitute=sub)[0])(params)
    g_thought, g_pause = grad(True), grad(False)
    # ln_f's weight reaches the input of later positions only through fed-back thoughts.
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_thought, g_pause)
    assert max(jax.tree.leaves(diff)) > 1e-6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_thought))


# ---------------------------------------------------------------------------------------------
# Curriculum: masks and stages.

EXAMPLE = Example("tom is a bax. every bax is a kel. is tom a kel or pod?",
                  ("tom is a bax.", "tom is a kel."), "kel")


@pytest.mark.parametrize("stage,expected", [
    (0, "tom is a bax.\ntom is a kel.\n#kel<eos>"),
    (1, "tom is a kel.\n#kel<eos>"),
    (2, "#kel<eos>"),
    (3, "#kel<eos>"),
])
def test_loss_mask_covers_exactly_remaining_steps_and_answer(stage, expected):
    cc = CoconutConfig(max_latent_stage=2, latents_per_step=2)
    tokens, mask = curriculum.render_stage(EXAMPLE, TOK, cc, stage)
    assert TOK.decode(tokens[mask == 1]) == expected
    n_latent = int((tokens == LATENT).sum())
    assert n_latent == min(stage, 2) * 2
    # Nothing in the question or the latent block counts.
    assert mask[: list(tokens).index(TOK.eot_id) + 1].sum() == 0


def test_final_stage_drops_all_steps_even_with_longer_chains():
    cc = CoconutConfig(max_latent_stage=1)
    long = dataclasses.replace(EXAMPLE, steps=EXAMPLE.steps + ("tom is a zip.",))
    tokens, mask = curriculum.render_stage(long, TOK, cc, 2)
    assert TOK.decode(tokens[mask == 1]) == "#kel<eos>"
    assert int((tokens == LATENT).sum()) == 1
    tokens, mask = curriculum.render_stage(long, TOK, cc, 1)
    assert TOK.decode(tokens[mask == 1]) == "tom is a kel.\ntom is a zip.\n#kel<eos>"


def test_stage_schedule():
    cc = CoconutConfig(max_latent_stage=2)
    plan = curriculum.stage_plan(cc, 5)
    assert plan == [(0, 5), (1, 5), (2, 5), (3, 5)]
    assert [curriculum.stage_at(plan, s)[0] for s in (0, 4, 5, 9, 10, 15, 19)] == [0, 0, 1, 1, 2, 3, 3]
    assert [s for s in range(20) if curriculum.is_stage_start(plan, s)] == [5, 10, 15]
    assert curriculum.stage_plan(dataclasses.replace(cc, curriculum=False), 5) == [(3, 20)]
    assert curriculum.stage_plan(dataclasses.replace(cc, method="cot"), 5) == [(0, 20)]
    assert curriculum.stage_plan(dataclasses.replace(cc, method="pause"), 5) == plan


def test_uniform_stage_mixing_is_deterministic_and_mixes():
    cc = CoconutConfig(max_latent_stage=2, uniform_prob=0.5)
    examples = [EXAMPLE] * 4
    a = curriculum.curriculum_batch(examples, TOK, cc, 3, 7, 16, 128, 0)
    b = curriculum.curriculum_batch(examples, TOK, cc, 3, 7, 16, 128, 0)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    latents = set((a["inputs"] == LATENT).sum(1).tolist())
    assert len(latents) > 1  # some rows at earlier stages


def test_load_coconut_config_overrides():
    cfg, cc = curriculum.load_coconut_config("configs/coconut-prosqa.yaml",
                                         ["coconut.method=pause", "train.batch_size=4"])
    assert cc.method == "pause" and cfg.train.batch_size == 4


# ---------------------------------------------------------------------------------------------
# Training and resumption.


def _run_cfg(tmp_path, name: str) -> tuple[Config, CoconutConfig]:
    cfg = Config(model=model_preset("tiny", max_seq_len=96, mean_recurrence=2, backprop_depth=1),
                 train=TrainConfig(batch_size=4, seq_len=96, lr=3e-3, warmup_steps=0,
                                   run_dir=str(tmp_path / name), checkpoint_every=2,
                                   log_every=100, progress="lines"),
                 data=DataConfig(task="chains", difficulty=1))
    cc = CoconutConfig(max_latent_stage=1, steps_per_stage=2, num_train_examples=16,
                       train_num_steps=0, init_scale=1.0)
    return cfg, cc


def test_killed_mid_stage_and_resumed_ends_bitwise_equal(tmp_path):
    """Stopped twice as a kill would stop it — once with a checkpoint in the middle of a stage
    (the optimizer state is restored), once with its last checkpoint at a stage end (the resumed
    run resets the optimizer as the uninterrupted one did) — the run ends with the same bits."""
    cfg, cc = _run_cfg(tmp_path, "full")
    full = curriculum.train_coconut(cfg, cc, log=lambda *_: None)
    assert full.status == "done" and full.plan == [(0, 2), (1, 2), (2, 2)]
    assert [h["stage"] for h in full.history] == [0, 0, 1, 1, 2, 2]
    assert_shared_loop_records(full, tmp_path / "full")
    cfg_b, _ = _run_cfg(tmp_path, "killed")
    cfg_b = dataclasses.replace(cfg_b, train=dataclasses.replace(cfg_b.train, checkpoint_every=3))
    part = curriculum.train_coconut(cfg_b, cc, stop_after=3, log=lambda *_: None)
    assert int(part.state.step) == 3 and part.status == "stopped"
    messages = []
    part = curriculum.train_coconut(cfg_b, cc, stop_after=2, log=messages.append)
    assert "resumed" in messages[0] and "(step 3)" in messages[0]  # mid-stage 1
    assert int(part.state.step) == 5
    messages = []
    resumed = curriculum.train_coconut(cfg_b, cc, log=messages.append)
    assert "resumed" in messages[0] and "(step 4)" in messages[0]  # the end of stage 1
    assert int(resumed.state.step) == 6 and resumed.status == "done"
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The history survives the kills: every step of the run once, with the uninterrupted run's
    # losses, and a finished run returns it without training.
    steps = lambda h: [e["step"] for e in h]
    assert steps(resumed.history) == steps(full.history) == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in full.history]
    again = curriculum.train_coconut(cfg_b, cc, log=lambda *_: None)
    assert again.history == resumed.history and again.train_seconds > 0


def assert_shared_loop_records(out, run_dir):
    """What the shared loop adds: the NaN guard's counters, gradient norm, throughput and MFU
    counting every forward pass (stage 0 has no thoughts, then one thought: two passes), the
    stage in the log and in every checkpoint's meta, TensorBoard."""
    for record in out.history:
        assert record["finite"] and record["bad_steps"] == 0
        assert np.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert [h["forward_passes"] for h in out.history] == [1, 1, 2, 2, 2, 2]
    assert all(h["tokens_per_s"] > 0 and h["mfu"] > 0 for h in out.history if h["step"] > 1)
    assert list((run_dir / "tensorboard").iterdir())
    for step in checkpoint.list_checkpoints(run_dir):
        meta = json.loads((run_dir / "checkpoints" / str(step) / "train_meta" /
                           "metadata").read_text())
        assert meta["step"] == step and meta["stage"] == out.history[step - 1]["stage"]


@dataclasses.dataclass(frozen=True)
class NonFiniteGradient(curriculum.CoconutObjective):
    """The continuous-thought loss plus a term whose value is 0 but whose gradient is not finite
    (d√x at x = 0): the loss stays finite, the gradient norm does not."""

    def __call__(self, params, batch, n_no_grad, n_grad, key):
        loss, metrics = super().__call__(params, batch, n_no_grad, n_grad, key)
        w = params["ln_f"]["weight"]
        return loss + 0.0 * jnp.sqrt(w - w).sum(), metrics


def test_nan_guard_covers_the_gradient_norm_of_the_coconut_loss(tmp_path):
    """The curriculum's parts composed on `rdlm.train.train` by hand, with a loss whose gradient
    is not finite (and two micro-batches): every update is skipped and counted, and the run
    stops after train.max_bad_steps of them."""
    cfg, cc = _run_cfg(tmp_path, "nan")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_bad_steps=2,
                                                             micro_batches=2))
    schedule = StageSchedule(tuple(curriculum.stage_plan(cc, curriculum.steps_per_stage(cfg, cc))))
    cfg = curriculum.run_config(cfg, schedule)
    objective = NonFiniteGradient(**vars(curriculum.coconut_objective(cfg, cc, LATENT)))
    data = curriculum.CurriculumBatches(curriculum.training_examples(cfg, cc), TOK, cc, schedule,
                                        cfg.train.batch_size, cfg.train.seq_len, cfg.seed)
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
        train(cfg, data_iterator=data, loss_fn=objective, schedule=schedule,
              printer=lambda *_: None)
    log = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert np.isfinite(r["loss"]) and not np.isfinite(r["grad_norm"]) and not r["finite"]
    assert [(r["bad_steps"], r["bad_streak"]) for r in log] == [(1, 1), (2, 2)]
    initial = optax.global_norm(init_params(cfg.model, jax.random.key(cfg.seed)))
    assert log[0]["param_norm"] == log[1]["param_norm"] == pytest.approx(float(initial), rel=1e-6)


def test_evaluate_method_counts_thoughts_and_tokens(tmp_path):
    cfg, cc = _run_cfg(tmp_path, "eval")
    params = init_params(cfg.model, jax.random.key(0))
    cc = dataclasses.replace(cc, eval_examples=4, max_new_tokens=3)
    out = generation.evaluate_method(params, cfg, cc, batch_size=4)
    assert 0.0 <= out["accuracy"] <= 1.0
    # Untrained: each row generates up to 3 tokens, plus the K·c = 1 thought.
    assert 1.0 < out["generated_tokens"] <= 4.0


_TWO_DEVICES = """
import dataclasses, json, sys
import jax
from rdlm.coconut import curriculum, generation, thoughts
from rdlm.config import Config, DataConfig, MeshConfig, TrainConfig, model_preset
cfg = Config(model=model_preset("tiny", max_seq_len=96, mean_recurrence=2, backprop_depth=1),
             train=TrainConfig(batch_size=4, seq_len=96, lr=3e-3, warmup_steps=0,
                               run_dir=sys.argv[1], checkpoint_every=2, log_every=100,
                               progress="lines"),
             data=DataConfig(task="chains", difficulty=1), mesh=MeshConfig(cpu_devices=2))
cc = curriculum.CoconutConfig(max_latent_stage=1, steps_per_stage=2, num_train_examples=16,
                          train_num_steps=0, init_scale=1.0)
out = curriculum.train_coconut(cfg, cc, log=lambda *_: None)
devices = {d for leaf in jax.tree.leaves(out.params) for d in leaf.sharding.device_set}
print(json.dumps({"devices": jax.device_count(), "param_devices": len(devices),
                  "losses": [h["loss"] for h in out.history]}))
"""


def test_cpu_devices_split_coconut_training_with_the_same_losses(tmp_path):
    """`mesh.cpu_devices` reaches the curriculum trainer: two CPU devices share each step (the
    batch split over `data`) and train to the one-device losses."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "device_count" not in f)
    result = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    two = json.loads(result.stdout.strip().splitlines()[-1])
    assert two["devices"] == 2 and two["param_devices"] == 2
    # The same settings as the resume test above, so that its compiled step is reused.
    cfg, cc = _run_cfg(tmp_path, "one")
    one = curriculum.train_coconut(cfg, cc, log=lambda *_: None)
    assert len(two["losses"]) == len(one.history) == 6
    np.testing.assert_allclose(two["losses"], [h["loss"] for h in one.history], rtol=1e-4)


def test_cli_reports_a_missing_checkpoint_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no_run"
    code = coconut_cli.cli(["configs/coconut-prosqa.yaml", "--eval-only", f"train.run_dir={missing}"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
