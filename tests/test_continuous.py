"""Depth-continuous batching (`rdlm.generation.continuous`): every row at its own token and
iteration, a queue of prompts; greedy output equals the lockstep engine's given the same exit
decisions (tiny config, zero initial state)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
import rdlm.generation as S
from rdlm.generation import cache as kvc
from rdlm.generation.continuous import continuous_jit
from rdlm.generation.plan import continuous_plan, default_stage_rows, make_plan
from rdlm.model import backend, pallas_decode, row_cache
from tests.test_sample import perturbed_params

CFG = rdlm.model_preset("tiny")
PROMPTS = [[5, 9, 13, 2, 40, 7], [33, 1, 8], [60, 61, 62, 63, 0, 12, 3, 19, 4], [7, 7],
           [21, 22, 23, 24]]


@pytest.fixture(scope="module")
def params():
    return perturbed_params(CFG)


def both(params, boundary_wait=None, **kwargs):
    """The lockstep engine over every prompt at once, and 2 rows working through the queue."""
    kwargs = {"max_new_tokens": 6, "num_steps": 8, "return_logits": True, **kwargs}
    return (S.generate(params, CFG, PROMPTS, **kwargs),
            S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=2,
                       boundary_wait=boundary_wait, **kwargs))


def assert_same(ref, out):
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.steps, ref.steps)
    for row, n in enumerate(ref.lengths):
        np.testing.assert_allclose(out.logits[row, :n], ref.logits[row, :n], atol=2e-5)


def test_fixed_r_with_stop_tokens_equals_lockstep_and_rows_take_the_next_prompt(params):
    ref, out = both(params, stop_tokens=(36,))
    assert ref.lengths.min() < 6 and ref.lengths.max() == 6  # some prompts stop early
    assert_same(ref, out)
    # Five prompts through two rows: after the first two, rows refill as sequences end.
    assert out.stats["iterations"] >= 8 * (ref.lengths.sum() - len(PROMPTS)) / 2
    assert 0.5 < out.stats["row_utilization"] <= 1.0
    # Rows fell idle one at a time; the prompts were prefilled two at a time (2, 2, 1 + padding).
    assert out.stats["prefills"] == 3


def test_staged_prefills_past_the_last_prompt_are_never_taken(params):
    """9 prompts on 8 rows, stop tokens ending rows at different iterations: two prefills of 8
    (the second holds one prompt and 7 padding slots), each prompt's output the lockstep
    engine's."""
    prompts = (PROMPTS * 2)[:9]
    kwargs = dict(max_new_tokens=5, num_steps=4, return_logits=True, stop_tokens=(36,))
    ref = S.generate(params, CFG, prompts, **kwargs)
    assert len(set(ref.lengths)) > 1
    out = S.generate(params, CFG, prompts, continuous_batching=True, batch_size=8, **kwargs)
    assert_same(ref, out)
    assert out.stats["prefills"] == 2


def test_fewer_staged_rows_compute_the_same_with_a_smaller_staging_cache(params):
    """9 prompts on 4 rows, staged 3 at a time (a stage that does not divide the rows): three
    prefills, every prompt's output the lockstep engine's, a staging cache of 3 rows."""
    prompts = (PROMPTS * 2)[:9]
    kwargs = dict(max_new_tokens=5, num_steps=4, return_logits=True, stop_tokens=(36,))
    ref = S.generate(params, CFG, prompts, **kwargs)
    whole, three = (S.generate(params, CFG, prompts, continuous_batching=True, batch_size=4,
                               stage_rows=stage, **kwargs) for stage in (4, 3))
    assert_same(ref, three)
    assert (whole.stats["prefills"], three.stats["prefills"]) == (3, 3)
    staging_row = kvc.cache_bytes(CFG, 1, 16, 4, False)  # prompt bucket 16, a slot per step
    assert whole.cache_bytes - three.cache_bytes == staging_row


def test_long_prompts_stage_fewer_rows_by_default():
    assert default_stage_rows(16, 8) == 16  # short prompts: a whole batch per prefill
    assert default_stage_rows(16, 256) == 4
    assert default_stage_rows(16, 2048) == 1
    cfg = dataclasses.replace(CFG, max_seq_len=1024)
    plan = continuous_plan(make_plan(cfg, [[1] * 300] * 5, max_new_tokens=4, num_steps=2,
                                     prompt_len=512), 5, 4)
    assert (plan.stage_rows, plan.queue) == (2, 8)


def test_adaptive_exit_with_shared_cache_and_continuous_cot_equals_lockstep(params):
    options = dict(exit="kl:1e-2", cache_budget=2, continuous_cot=True)
    ref, out = both(params, boundary_wait=0, **options)
    assert (ref.steps[:, 1:] < 8).any() and len(np.unique(ref.steps[:, 1:])) > 1  # exits vary
    assert_same(ref, out)
    np.testing.assert_allclose(out.exit_values, ref.exit_values, rtol=1e-3, atol=1e-6)
    # Without a wait every iteration advances every busy row: fewer iterations than lockstep
    # token steps would take on two rows, each waiting for the slower.
    assert out.stats["row_utilization"] > 0.8
    # One compilation for every r and exit threshold.
    before = continuous_jit._cache_size()
    for r, exit in ((3, "kl:1e-2"), (12, "kl:1e-9"), (5, "kl:0.5")):
        o = S.generate(params, CFG, PROMPTS, max_new_tokens=6, num_steps=r, return_logits=True,
                       continuous_batching=True, batch_size=2, exit=exit, cache_budget=2,
                       continuous_cot=True)
        assert o.steps[:, 1:].max() <= r and (o.steps[:, 0] == r).all()
        if exit == "kl:1e-9":
            assert (o.steps == r).all()
    assert continuous_jit._cache_size() == before


@pytest.mark.parametrize("exit", ["kl:1e-2", "latent-diff:0.5"])
def test_rows_at_a_boundary_wait_for_one_pass_and_compute_the_same(params, exit):
    """Rows whose token is done wait (their state, steps and block buffer untouched by the
    others' steps) until the wait is spent, then run their boundary work together: the same
    tokens, logits and exit values as the lockstep engine whatever the wait, with fewer
    passes. Under a latent criterion they wait for the coda and the prelude; under KL, whose
    check has run the coda, they emit at once and wait for the prelude."""
    options = dict(exit=exit, cache_budget=2, continuous_cot=True, max_new_tokens=6,
                   num_steps=8, return_logits=True)
    ref = S.generate(params, CFG, PROMPTS, **options)
    assert len(set(ref.steps[:, 1:].ravel())) > 1
    waits = (0, 1, 10_000)
    runs = {wait: S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=3,
                             boundary_wait=wait, **options) for wait in waits}
    for out in runs.values():
        assert_same(ref, out)
        np.testing.assert_allclose(out.exit_values, ref.exit_values, rtol=1e-3, atol=1e-6)
    preludes = [runs[w].stats["passes"]["prelude"] for w in waits]
    finishes = [runs[w].stats["boundary_passes"] for w in waits]
    busy = [runs[w].stats["row_utilization"] for w in waits]
    tokens_after_first = int(ref.lengths.sum()) - len(PROMPTS)
    # No wait: a pass at almost every iteration where some row finished, rows almost always
    # busy. An endless wait: a pass only when no row is left iterating (lockstep, three rows).
    assert preludes[0] > preludes[1] > preludes[2] and preludes[0] <= tokens_after_first
    assert busy[0] > busy[2]
    if exit.startswith("kl"):
        # Tokens are emitted as they are done, whatever the wait; the preludes wait.
        assert finishes[2] > preludes[2]
    else:  # the coda waits with the prelude: one pass of both per token step
        assert finishes[0] > finishes[1] > finishes[2] == preludes[2]
    # One compilation for every wait.
    before = continuous_jit._cache_size()
    S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=3, boundary_wait=2,
               **options)
    assert continuous_jit._cache_size() == before


def test_passes_count_the_weights_each_schedule_reads(params):
    """``stats["passes"]``: how often each stage's weights were read after the first tokens.
    Lockstep: per token step one prelude, the slowest row's core steps, one coda (and one per
    KL check). Continuous rows that finish together (an endless wait, one prompt per row) read
    what lockstep reads; without a wait a latent criterion runs the coda at every boundary
    pass."""
    options = dict(max_new_tokens=6, num_steps=8)
    fixed = S.generate(params, CFG, PROMPTS, **options)
    assert fixed.stats["passes"] == {"prelude": 5, "core": 40, "coda": 5}
    kl = S.generate(params, CFG, PROMPTS, exit="kl:1e-2", **options)
    slowest = kl.steps[:, 1:].max(0)
    assert len(set(kl.steps[:, 1:].ravel())) > 1
    assert kl.stats["passes"] == {"prelude": 5, "core": int(slowest.sum()),
                                  "coda": 5 + int(slowest.sum())}
    latent = dict(exit="latent-diff:0.5", **options)
    ref = S.generate(params, CFG, PROMPTS, **latent)
    assert len(set(ref.steps[:, 1:].ravel())) > 1
    together = S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=5,
                          boundary_wait=10_000, **latent)
    np.testing.assert_array_equal(together.tokens, ref.tokens)
    assert together.stats["passes"] == ref.stats["passes"]
    at_once = S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=2,
                         boundary_wait=0, **latent)
    passes = at_once.stats["passes"]
    assert passes["core"] == at_once.stats["iterations"]
    assert passes["coda"] == at_once.stats["boundary_passes"]
    # A pass whose rows all ended their sequences has no next token to run.
    assert 0 < passes["prelude"] <= at_once.stats["boundary_passes"]


@pytest.mark.parametrize("layers", [(1, 2, 1), (0, 1, 0)], ids=["stages", "core-only"])
def test_token_shift_equals_lockstep(layers):
    """With ``model.token_shift`` each row's new token sees its own predecessors' bases, read
    from the row's cache at its own position (the demo's model: every layer in the core)."""
    n_prelude, n_core, n_coda = layers
    cfg = dataclasses.replace(CFG, token_shift=2, n_prelude=n_prelude, n_core=n_core,
                              n_coda=n_coda)
    params = perturbed_params(cfg)  # the shift matrices too: not zero
    options = dict(max_new_tokens=6, num_steps=6, exit="kl:1e-2", return_logits=True)
    ref = S.generate(params, cfg, PROMPTS, **options)
    out = S.generate(params, cfg, PROMPTS, continuous_batching=True, batch_size=2, **options)
    assert len(np.unique(ref.steps[:, 1:])) > 1  # rows at different depths
    assert_same(ref, out)
    # Without the shift the tokens differ: the test sees it.
    no_shift = S.generate({**params, "token_shift": jnp.zeros_like(params["token_shift"])}, cfg,
                          PROMPTS, continuous_batching=True, batch_size=2, **options)
    assert not np.array_equal(no_shift.logits, out.logits)


def test_the_tpu_cache_writes_and_reads_compute_what_the_cpu_ones_do(monkeypatch):
    """On TPU the cache writes of each row at its own position, and the reads of each row's
    own slot or of a few rows, are a slice per row (`rdlm.model.row_cache.choose_row_access`);
    the attention reads each row's entries row by row or in the row-entries kernel
    (`row_cache.choose_row_attention`), lockstep's too; and the cache is held to its stored
    layout at every write (`row_cache.hold_cache_layout`: positions innermost, with heads of 8
    features). Forced here, they give the CPU's outputs, depth-continuous, lockstep and
    speculative, with every cache the engine writes and reads: stages, core slots with
    sharing, latest entries, shift bases."""
    cfg = dataclasses.replace(CFG, token_shift=2)
    params = perturbed_params(cfg)
    lockstep = dict(max_new_tokens=6, num_steps=6, exit="kl:1e-2", cache_budget=2,
                    continuous_cot=True, return_logits=True)
    options = dict(lockstep, continuous_batching=True, batch_size=2, boundary_wait=3)
    speculative = dict(max_new_tokens=6, num_steps=6, speculative=True, return_logits=True)
    scatter = S.generate(params, cfg, PROMPTS, **options)
    lockstep_cpu = S.generate(params, cfg, PROMPTS, **lockstep)
    speculative_cpu = S.generate(params, cfg, PROMPTS, **speculative)
    jax.clear_caches()  # trace again under the other choice
    monkeypatch.setattr(backend, "target_platform", lambda: "tpu")
    monkeypatch.setattr(row_cache, "choose_row_access", lambda platform: row_cache.SLICES)
    monkeypatch.setattr(pallas_decode, "row_entries_attention", functools.partial(
        pallas_decode.row_entries_attention, interpret=True))
    assert len(np.unique(scatter.steps[:, 1:])) > 1  # rows at different depths
    for how in (row_cache.SLICES, row_cache.ROWS_KERNEL):  # row by row, or in the Pallas kernel
        monkeypatch.setattr(row_cache, "choose_row_attention", lambda platform, per_shard: how)
        runs = [(S.generate(params, cfg, PROMPTS, **options), scatter),
                (S.generate(params, cfg, PROMPTS, **lockstep), lockstep_cpu)]
        if how == row_cache.ROWS_KERNEL:  # verifying drafts: several queries a row in the kernel
            runs.append((S.generate(params, cfg, PROMPTS, **speculative), speculative_cpu))
        jax.clear_caches()
        for got, want in runs:
            for name in ("tokens", "steps", "lengths"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
            # One row's dots are the same sums, which XLA:CPU or the kernel's online softmax
            # may add in another order (measured within 7e-7).
            np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5, err_msg=how)


def test_the_gpu_rows_kernel_computes_what_the_cpu_does(monkeypatch):
    """On GPU depth-continuous decoding attends over each row's own entries in the Triton
    row-entries kernel (`rdlm.model.pallas_decode.gpu_row_entries_attention`), where the CPU
    gathers them. Forced here, in Pallas' interpreter, it gives the CPU's tokens, steps and
    lengths, with cache sharing, latest entries and continuous thoughts."""
    cfg = dataclasses.replace(CFG, token_shift=2)
    params = perturbed_params(cfg)
    options = dict(max_new_tokens=6, num_steps=6, exit="kl:1e-2", cache_budget=2,
                   continuous_cot=True, return_logits=True, continuous_batching=True,
                   batch_size=2, boundary_wait=3)
    gathered = S.generate(params, cfg, PROMPTS, **options)
    jax.clear_caches()
    calls = []

    def interpreted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, interpret=True, **kwargs)

    kernel = pallas_decode.gpu_row_entries_attention
    monkeypatch.setattr(backend, "target_platform", lambda: "gpu")
    monkeypatch.setattr(pallas_decode, "gpu_row_entries_attention", interpreted)
    got = S.generate(params, cfg, PROMPTS, **options)
    jax.clear_caches()
    assert calls  # the kernel ran
    assert len(np.unique(gathered.steps[:, 1:])) > 1  # rows at different depths
    for name in ("tokens", "steps", "lengths"):
        np.testing.assert_array_equal(getattr(got, name), getattr(gathered, name))
    np.testing.assert_allclose(got.logits, gathered.logits, rtol=0, atol=1e-5)


def test_options_it_cannot_combine_are_refused(params):
    with pytest.raises(ValueError, match="speculative decoding"):
        S.generate(params, CFG, PROMPTS, max_new_tokens=4, num_steps=4,
                   continuous_batching=True, speculative=True)
    for option in (dict(batch_size=2), dict(boundary_wait=4), dict(stage_rows=2)):
        with pytest.raises(ValueError, match="options of continuous_batching=True"):
            S.generate(params, CFG, PROMPTS, max_new_tokens=4, num_steps=4, **option)
    with pytest.raises(ValueError, match="boundary_wait=-1 must be"):
        S.generate(params, CFG, PROMPTS, max_new_tokens=4, num_steps=4,
                   continuous_batching=True, boundary_wait=-1)
    with pytest.raises(ValueError, match="batch_size=0"):
        S.generate(params, CFG, PROMPTS, max_new_tokens=4, num_steps=4,
                   continuous_batching=True, batch_size=0)
    with pytest.raises(ValueError, match="stage_rows=0"):
        S.generate(params, CFG, PROMPTS, max_new_tokens=4, num_steps=4,
                   continuous_batching=True, stage_rows=0)


def test_evaluation_with_continuous_batching_gives_the_same_predictions():
    from rdlm.generation.evaluate import evaluate_accuracy
    cfg = rdlm.load_config("configs/tiny.yaml")
    params = rdlm.init_params(cfg.model, jax.random.key(0))
    kwargs = dict(num_steps_list=[2, 1], num_examples=5, batch_size=2)
    base = evaluate_accuracy(params, cfg, "chains", **kwargs)
    before = continuous_jit._cache_size()
    rows = evaluate_accuracy(params, cfg, "chains", continuous_batching=True, **kwargs)
    assert rows["predictions"] == base["predictions"]
    assert continuous_jit._cache_size() - before == 1  # one compilation for every r
