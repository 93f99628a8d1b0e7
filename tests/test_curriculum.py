"""Training a retrofitted model: the recurrence curriculum (the mean r climbs over the first
steps, drawn from the step number inside one compiled step) and frozen parts (bitwise unchanged,
no optimizer moments), on the tiny preset, resumed exactly after a stop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rdlm
from rdlm.cli.train import parse_args
from rdlm.config import ConfigError
from rdlm.config_files import bundled_configs
from rdlm.runtime import sharding as shard_lib
from rdlm.train import train
from rdlm.train.optim import apply_updates, freeze_labels, param_part
from rdlm.train.step import DepthPolicy, make_train_step
from tests.test_train import read_jsonl, tiny_cfg
from tests.multihost import StepBatches, params_to_numpy

# The llama block with an untied head, every part but the adapter and the core frozen: the
# retrofit recipe of configs/retrofit-llama.yaml at the tiny size.
LLAMA = ("model.block=llama", "model.qk_bias=false", "model.n_kv_heads=2",
         "model.tie_embeddings=false", "model.adapter_init=embedding")
RETROFIT_FREEZE = "train.freeze=[embeddings,prelude,coda,head]"


def ramp(step: int, start: int, mean: int, steps: int) -> int:
    """The curriculum's mean after ``step`` optimizer steps, in exact integer arithmetic."""
    return start + math.ceil((mean - start) * min(step, steps) / steps)


def test_the_mean_follows_the_schedule_and_the_sampled_draws_rise():
    policy = DepthPolicy(6, 2, curriculum_steps=10, curriculum_start=2)
    assert [int(policy.mean_at(s)) for s in range(14)] == [ramp(s, 2, 6, 10) for s in range(14)]
    assert int(policy.mean_at(None)) == int(DepthPolicy(6, 2).mean_at(7)) == 6  # off: the mean
    fixed = DepthPolicy(6, 2, fixed=True, curriculum_steps=10, curriculum_start=1)
    draws = [tuple(int(x) for x in fixed.draw(jax.random.key(0), s)) for s in (0, 3, 10)]
    assert draws == [(0, 1), (1, 2), (4, 2)] and fixed.max_grad == 2
    # The sampled law takes the mean as a traced value: one compilation for every step, and the
    # mean r of 2,000 draws tracks mean + 1 (the law's offset) as the ramp climbs.
    sampled = DepthPolicy(16, 4, curriculum_steps=100, curriculum_start=1)
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.jit(jax.vmap(sampled.draw, in_axes=(0, None)))
    for step in (0, 50, 100):
        n_no_grad, n_grad = draw(keys, step)
        r = np.asarray(n_no_grad + n_grad)
        assert abs(r.mean() - (ramp(step, 1, 16, 100) + 1)) < 0.1 * r.mean(), step
        assert r.min() >= 1 and np.asarray(n_grad).max() <= 4
    assert draw._cache_size() == 1


def test_every_parameter_has_a_freezable_part_in_both_block_families():
    for overrides in ((), LLAMA, ("model.token_shift=1",)):
        params = rdlm.abstract_params(tiny_cfg(*overrides).model)
        parts = jax.tree_util.tree_map_with_path(lambda path, _: param_part(path), params)
        assert set(jax.tree.leaves(parts)) == set(rdlm.config.TrainConfig.FREEZABLE)
    labels = freeze_labels(params, ("adapter",))
    assert labels["core"]["adapter"] == "frozen" and labels["core"]["blocks"][0]["attn"]["proj"] \
        == labels["token_shift"] == "trained"
    # A frozen array is passed through, not added to: a zero update keeps even -0.0's sign bit.
    tree = {"prelude": {0: jnp.array([-0.0, 2.0])}, "coda": {0: jnp.array([-0.0, 2.0])}}
    new = apply_updates(tree, jax.tree.map(jnp.zeros_like, tree), ("prelude",))
    assert np.signbit(new["prelude"][0][0]) and not np.signbit(new["coda"][0][0])


def test_fixed_curriculum_on_a_frozen_llama_compiles_once_and_logs_the_mean(tmp_path):
    """depth=fixed: r of every step is the schedule; the adapter and the core move, every
    frozen part keeps its bits, and the optimizer holds moments for the trained parts only."""
    cfg = tiny_cfg(*LLAMA, RETROFIT_FREEZE, f"train.run_dir={tmp_path}", "train.steps=6",
                   "train.depth=fixed", "train.recurrence_curriculum_steps=4",
                   "train.recurrence_curriculum_start=1", "train.checkpoint_every=0")
    start = rdlm.init_params(cfg.model, jax.random.key(cfg.seed))
    result = train(cfg, data_iterator=StepBatches(8, 64))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    expected = [ramp(s, 1, cfg.model.mean_recurrence, 4) for s in range(6)]
    assert [r["mean_recurrence"] for r in rows] == [r["r"] for r in rows] == expected
    assert [r["n_grad"] for r in rows] == [min(m, cfg.model.backprop_depth) for m in expected]
    mesh = shard_lib.make_mesh(cfg.mesh)
    assert make_train_step(cfg, mesh, batch_keys=tuple(StepBatches(8, 64).__next__()))\
        ._cache_size() == 1  # one compiled step served r = 1, 2, 3, 4
    before, after = params_to_numpy(start), params_to_numpy(result.state.params)
    moved = {k for k in before if before[k].tobytes() != after[k].tobytes()}
    assert moved and all(k.startswith("['core']") for k in moved), moved
    assert {k for k in before if k.startswith("['core']")} == moved
    moments = optax.tree_utils.tree_get(result.state.opt_state, "mu")
    assert len(jax.tree.leaves(moments)) == len(moved)
    # A run started from these params with other maths of the same shapes is told so.
    messages: list[str] = []
    train(tiny_cfg(*LLAMA, f"train.run_dir={tmp_path / 'next'}", f"train.init_from={tmp_path}",
                   "model.rope_base=10000"), data_iterator=StepBatches(8, 64), stop_after=0,
          printer=messages.append)
    assert "training with model.rope_base=10000.0; train.init_from's params were made with " \
        "50000.0" in messages


def test_a_frozen_curriculum_run_stopped_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path):
    """Huginn's block, tied embeddings, the sampled law: stopped mid-curriculum (resuming from
    the checkpoint of step 2, as after a kill) and resumed, the run draws the same depths and
    ends with the same bits; the frozen prelude and coda never moved. Resuming with other frozen
    parts is refused."""
    def cfg(name: str, freeze: str = "[prelude,coda]") -> rdlm.Config:
        return tiny_cfg(f"train.run_dir={tmp_path / name}", "train.steps=6",
                        f"train.freeze={freeze}", "train.recurrence_curriculum_steps=5",
                        "train.checkpoint_every=2", "train.async_checkpoint=false")
    full = train(cfg("full"), data_iterator=StepBatches(8, 64))
    assert train(cfg("killed"), data_iterator=StepBatches(8, 64), stop_after=3).status == "stopped"
    # Other frozen parts would need another optimizer state: refused, naming the fix.
    with pytest.raises(ConfigError, match=r"trained with train.freeze=\['prelude', 'coda'\]"):
        train(cfg("killed", "[coda]"), data_iterator=StepBatches(8, 64))
    resumed = train(cfg("killed"), data_iterator=StepBatches(8, 64))
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]
    drawn = lambda history: [(h["mean_recurrence"], h["r"]) for h in history]
    assert drawn(resumed.history) == drawn(full.history[2:])
    assert [h["mean_recurrence"] for h in full.history] == [ramp(s, 1, 4, 5) for s in range(6)]
    a, b = params_to_numpy(full.state.params), params_to_numpy(resumed.state.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    start = params_to_numpy(rdlm.init_params(cfg("full").model, jax.random.key(0)))
    for key in a:
        frozen = key.startswith(("['prelude']", "['coda']"))
        assert (a[key].tobytes() == start[key].tobytes()) == frozen, key


@pytest.mark.parametrize("overrides, needle", [
    (("train.recurrence_curriculum_steps=-1",), "train.recurrence_curriculum_steps=-1 is invalid"),
    (("train.recurrence_curriculum_start=0",), "train.recurrence_curriculum_start=0 is invalid"),
    (("train.recurrence_curriculum_steps=10", "train.recurrence_curriculum_start=5"),
     "must be <= model.mean_recurrence=4"),
    (("train.freeze=[prelude,lm_head]",), "every entry must be one of ('embeddings'"),
    (("train.freeze=[embeddings,prelude,adapter,core,coda,head]",), "leaves nothing to train"),
])
def test_bad_curriculum_and_freeze_values_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        tiny_cfg(*overrides)
    assert needle in str(err.value)


def test_the_shipped_retrofit_config_passes_rdlm_train_checks():
    assert "retrofit-llama" in bundled_configs()
    _, cfg = parse_args(["retrofit-llama"], "rdlm train")
    assert cfg.model.block == "llama" and cfg.model.adapter_init == "embedding"
    assert cfg.train.recurrence_curriculum_steps > 0 and cfg.train.init_from
    assert DepthPolicy.of(cfg).curriculum_start == cfg.train.recurrence_curriculum_start

