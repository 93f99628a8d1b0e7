"""Generation: cache vs recomputation, slot sharing, adaptive exit, continuous CoT, speculative
decoding, batching and input checks (tiny config, zero initial state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
import rdlm.generation as S
from rdlm.generation.engine import filter_logits
from rdlm.generation.plan import PAD_ID
from rdlm.generation.programs import generate_jit
from rdlm.generation.exits import DEFAULT_THRESHOLDS, ExitConfig

CFG = rdlm.model_preset("tiny")
PROMPTS = [[5, 9, 13, 2, 40, 7], [33, 1, 8], [60, 61, 62, 63, 0, 12, 3, 19, 4]]


def perturbed_params(cfg):
    """Random init, perturbed so that biases and norms are not at their trivial init values."""
    p = rdlm.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def params():
    return perturbed_params(CFG)


def gen(params, prompts=PROMPTS, **kwargs):
    """Shared defaults, so that most tests reuse one compiled program."""
    kwargs = {"max_new_tokens": 6, "num_steps": 4, "return_logits": True, **kwargs}
    return S.generate(params, CFG, prompts, **kwargs)


def full_forward(params, seq, num_steps, init_state=None):
    """Logits [length, V] and final states [1, length, d] of one sequence, no cache."""
    logits, aux = rdlm.forward(params, jnp.asarray([seq]), CFG, num_steps=num_steps,
                               init_scale=0.0, init_state=init_state)
    return np.asarray(logits[0]), aux["state"]


def test_greedy_with_cache_equals_full_recomputation(params):
    out = gen(params)
    assert out.tokens.shape == (3, 6) and (out.steps == 4).all()
    for row, prompt in enumerate(PROMPTS):
        # Causal: one pass over prompt + generated tokens gives every step's logits.
        logits, _ = full_forward(params, prompt + out.tokens[row, :-1].tolist(), 4)
        expected = logits[len(prompt) - 1:]
        np.testing.assert_allclose(out.logits[row], expected, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(out.tokens[row], expected.argmax(-1))


def test_cache_budget_at_least_r_equals_no_sharing_and_memory_is_independent_of_r(params):
    base = gen(params)
    for budget in (4, 7):
        out = gen(params, cache_budget=budget)
        np.testing.assert_array_equal(out.tokens, base.tokens)
        np.testing.assert_allclose(out.logits, base.logits, atol=1e-6)
    shared = [gen(params, num_steps=r, cache_budget=2) for r in (3, 9)]
    assert shared[0].cache_bytes == shared[1].cache_bytes < base.cache_bytes
    assert shared[0].num_slots == 2


def test_one_compilation_serves_every_r(params):
    gen(params, cache_budget=2)
    before = generate_jit._cache_size()
    for r in (1, 3, 5, 8):
        assert (gen(params, num_steps=r, cache_budget=2).steps == r).all()
    assert generate_jit._cache_size() == before


# One criterion that needs the coda's logits and one on the latent; every criterion's arithmetic
# is covered in tests/test_exits.py.
@pytest.mark.parametrize("criterion", ["kl", "cosine"])
def test_exit_that_never_fires_equals_fixed_r(params, criterion):
    base = gen(params)
    out = gen(params, exit=ExitConfig(criterion, threshold=1e-30))
    np.testing.assert_array_equal(out.tokens, base.tokens)
    np.testing.assert_allclose(out.logits, base.logits, atol=1e-6)
    assert (out.steps == 4).all()
    assert np.isnan(out.exit_values[:, 0]).all()  # the prompt never exits
    assert np.isfinite(out.exit_values[:, 1:]).all()


def test_adaptive_exit_uses_fewer_steps_and_respects_min_steps_and_check_every(params):
    out = gen(params, max_new_tokens=8, num_steps=24, exit="kl")
    later = out.steps[:, 1:]
    assert (out.steps[:, 0] == 24).all()  # prefill at the full r
    assert later.min() >= 1 and later.max() <= 24 and later.mean() < 20
    early = later < 24
    assert (out.exit_values[:, 1:][early] < DEFAULT_THRESHOLDS["kl"]).all()
    out = gen(params, max_new_tokens=8, num_steps=24,
              exit=ExitConfig("kl", min_steps=7, check_every=3))
    later = out.steps[:, 1:]
    assert later.min() >= 7
    assert ((later % 3 == 0) | (later == 24)).all()


def _reference_adaptive(params, prompt, new_tokens, depths, num_steps, budget):
    """Token-by-token recomputation with per-token depths, from the model's public modules.

    Position q ran depths[q] steps. At step i a later token reads q's keys/values of the latest
    step j < depths[q] stored in slot i mod budget, or q's last step when q stopped before i.
    Prompt positions are one parallel pass (no exit), so among themselves step i reads step i.
    Returns the logits after every generated token.
    """
    model = rdlm.bind(params, CFG)
    seq = list(prompt) + list(new_tokens[:-1])  # the last token is never fed back
    kv = {}  # (stage, layer, step or None, position) -> (k [1, h, 1, e], v)

    def ctx_for(pos):
        cos, sin = rdlm.model.rope_angles(jnp.asarray([[pos]]), CFG)
        return rdlm.AttentionContext(cos, sin, jnp.ones((1, 1, 1, pos + 1), bool))

    def prefix(stage, layer, step, pos):
        keys, values = [], []
        for q in range(pos):
            if step is None:
                k, v = kv[(stage, layer, None, q)]
            elif pos < len(prompt):  # the prompt is one parallel pass: step i sees step i
                k, v = kv[(stage, layer, step, q)]
            elif depths[q] > step:
                j = max(j for j in range(depths[q]) if j % budget == step % budget)
                k, v = kv[(stage, layer, j, q)]
            else:
                k, v = kv[(stage, layer, depths[q] - 1, q)]
            keys.append(k)
            values.append(v)
        if not keys:
            shape = (1, CFG.n_heads, 0, CFG.head_dim)
            return jnp.zeros(shape), jnp.zeros(shape)
        return jnp.concatenate(keys, 2), jnp.concatenate(values, 2)

    logits_out = []
    for pos, token in enumerate(seq):
        ctx = ctx_for(pos)
        e, kvs = model.apply_prelude(jnp.asarray([[token]]), ctx,
                             [prefix("pre", l, None, pos) for l in range(CFG.n_prelude)])
        for l, x in enumerate(kvs):
            kv[("pre", l, None, pos)] = x
        state = jnp.zeros((1, 1, CFG.d_model))
        for step in range(depths[pos]):
            state, kvs = model.core(state, e, ctx,
                                    [prefix("core", l, step, pos) for l in range(CFG.n_core)])
            for l, x in enumerate(kvs):
                kv[("core", l, step, pos)] = x
        logits, kvs = model.apply_coda(state, ctx,
                                   [prefix("coda", l, None, pos) for l in range(CFG.n_coda)])
        for l, x in enumerate(kvs):
            kv[("coda", l, None, pos)] = x
        if pos >= len(prompt) - 1:
            logits_out.append(np.asarray(logits[0, 0]))
    return logits_out[:len(new_tokens)]


@pytest.mark.parametrize("budget", [None, 3])
def test_adaptive_exit_reads_exited_tokens_at_their_latest_entry(params, budget):
    r = 8
    prompts = [PROMPTS[1], PROMPTS[0][:4]]
    out = gen(params, prompts, num_steps=r, cache_budget=budget, exit="latent-diff:0.2",
              max_new_tokens=5)
    assert (out.steps[:, 1:] < r).any() and len(set(out.steps[:, 1:].ravel())) > 2
    for row, prompt in enumerate(prompts):
        # Position P-1+n produced token n with out.steps[row, n] steps (prompt positions: r).
        depths = [r] * (len(prompt) - 1) + list(out.steps[row])
        ref = _reference_adaptive(params, prompt, out.tokens[row], depths, r, budget or r)
        np.testing.assert_allclose(np.stack(ref), out.logits[row], atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, budget", [(S.SpeculativeConfig(num_draft=3, draft_steps=1), None),
                                          (S.SpeculativeConfig(num_draft=2, draft_steps=3), 2)])
def test_greedy_speculative_equals_plain_greedy(params, spec, budget):
    base = gen(params, max_new_tokens=9, cache_budget=budget, return_logits=False)
    out = gen(params, max_new_tokens=9, cache_budget=budget, return_logits=False,
              speculative=spec)
    np.testing.assert_array_equal(out.tokens, base.tokens)
    assert 0.0 <= out.stats["acceptance_rate"] <= 1.0 and out.stats["rounds"] >= 1
    if spec.draft_steps == 1:  # one draft iteration against four disagrees: roll-back exercised
        assert out.stats["acceptance_rate"] < 1.0


def test_drafts_never_run_more_iterations_than_the_verifier(params):
    """Drafting with more iterations than r runs r: the drafts are the verifier's own tokens."""
    base = gen(params, max_new_tokens=9, return_logits=False)
    out = gen(params, max_new_tokens=9, return_logits=False,
              speculative=S.SpeculativeConfig(num_draft=3, draft_steps=50))
    np.testing.assert_array_equal(out.tokens, base.tokens)
    assert out.stats["acceptance_rate"] == 1.0
    rounds = out.stats["rounds"]
    assert out.stats["core_steps"] == 4 + rounds * (4 + 3 * 4)  # gen's num_steps is 4


@pytest.mark.parametrize("options", [{}, {"exit": "kl", "cache_budget": 2, "continuous_cot": True}])
def test_batch_equals_rows_alone(params, options):
    batch = gen(params, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = gen(params, [prompt], **options)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_array_equal(batch.steps[row], alone.steps[0])
        np.testing.assert_allclose(batch.logits[row], alone.logits[0], atol=2e-5)


def test_continuous_cot_starts_from_the_previous_state(params):
    r, prompt = 4, PROMPTS[0]
    out = gen(params, [prompt], continuous_cot=True)
    plain = gen(params, [prompt])
    assert not np.allclose(out.logits[0, 1:], plain.logits[0, 1:], atol=1e-3)
    # Reference without a cache: every generated position starts from the final state of the
    # position before it (prompt positions from zero, as in the prefill). Position p's state only
    # depends on positions <= p, so n passes over the whole sequence settle the chain.
    seq = prompt + out.tokens[0, :-1].tolist()
    p0 = len(prompt)
    init = jnp.zeros((1, len(seq), CFG.d_model))
    for _ in range(len(seq) - p0 + 1):
        logits, state = full_forward(params, seq, r, init_state=init)
        init = init.at[:, p0:].set(state[:, p0 - 1:-1])
    np.testing.assert_allclose(out.logits[0], logits[p0 - 1:], atol=3e-5, rtol=1e-5)
    np.testing.assert_array_equal(out.tokens[0], logits[p0 - 1:].argmax(-1))


def test_stop_tokens_end_rows(params):
    base = gen(params)
    stop = int(base.tokens[0, 2])
    out = gen(params, stop_tokens=(stop,))
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(base.tokens[row] == stop)
        n = hits[0] + 1 if hits.size else 6
        assert out.lengths[row] == n
        assert out.rows()[row] == base.tokens[row, :n].tolist()
        assert (out.tokens[row, n:] == PAD_ID).all() and (out.steps[row, n:] == 0).all()


def test_sampling_is_reproducible_and_filters_work(params):
    a = gen(params, temperature=1.0, key=jax.random.key(1))
    b = gen(params, temperature=1.0, key=jax.random.key(1))
    c = gen(params, temperature=1.0, key=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    greedy = gen(params)
    top1 = gen(params, temperature=1.0, key=jax.random.key(1), top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda **f: np.isfinite(np.asarray(filter_logits(logits, **f)))[0].tolist()
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.8) == [True, True, False, False]
    assert keep(top_p=0.81) == [True, True, True, False]
    assert keep(min_p=0.5) == [True, True, False, False]


def test_padded_array_prompts(params):
    array = np.zeros((3, 11), np.int32)
    for row, prompt in enumerate(PROMPTS):
        array[row, :len(prompt)] = prompt
    a = gen(params, array, prompt_lengths=[len(p) for p in PROMPTS])
    b = gen(params)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert rdlm.generate is S.generate


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_tokens": []}, "empty"),
    ({"prompt_tokens": [[1, 2], []]}, "prompt 1 is empty"),
    ({"prompt_tokens": [[1, 2, CFG.vocab_size]]}, "outside the vocabulary"),
    ({"prompt_tokens": [[1, -3]]}, "outside the vocabulary"),
    ({"max_new_tokens": CFG.max_seq_len - 8}, "max_seq_len"),
    ({"cache_budget": 0}, "cache_budget"),
    ({"exit": "klx"}, "unknown exit criterion 'klx' \\(did you mean 'kl'\\?\\)"),
    ({"exit": "kl:abc"}, "not a number"),
    ({"num_steps": 0}, "num_steps"),
    ({"temperature": 0.7}, "key="),
    ({"stop_tokens": (CFG.vocab_size,)}, "stop_tokens"),
    ({"speculative": True, "exit": "kl"}, "speculative"),
])
def test_bad_input_fails_before_compiling(params, kwargs, message):
    call = {"prompt_tokens": PROMPTS, "max_new_tokens": 4, "num_steps": 2, **kwargs}
    before = generate_jit._cache_size()
    with pytest.raises(ValueError, match=message):
        S.generate(params, CFG, call.pop("prompt_tokens"), **call)
    assert generate_jit._cache_size() == before


def test_token_shift_engine_matches_recomputation_speculation_and_rows_alone():
    """With model.token_shift the engine reads each block's previous tokens from its cache: the
    cached, speculative and batched paths must see exactly the neighbours a full pass sees."""
    cfg = rdlm.model_preset("tiny", token_shift=2)
    p = rdlm.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                  for x, k in zip(leaves, keys)])
    p["token_shift"] = 0.3 * jax.random.normal(jax.random.key(2), p["token_shift"].shape)
    kwargs = {"max_new_tokens": 7, "num_steps": 4, "return_logits": True}
    out = S.generate(p, cfg, PROMPTS, **kwargs)
    for row, prompt in enumerate(PROMPTS):
        logits, _ = rdlm.forward(p, jnp.asarray([prompt + out.tokens[row, :-1].tolist()]), cfg,
                                 num_steps=4, init_scale=0.0)
        np.testing.assert_allclose(out.logits[row], np.asarray(logits[0, len(prompt) - 1:]),
                                   atol=3e-5, rtol=1e-5)
    spec = S.generate(p, cfg, PROMPTS, **kwargs,
                      speculative=S.SpeculativeConfig(num_draft=3, draft_steps=1))
    np.testing.assert_array_equal(spec.tokens, out.tokens)
    assert spec.stats["acceptance_rate"] < 1.0  # roll-backs happened
    batch = S.generate(p, cfg, PROMPTS, **kwargs, exit="kl", cache_budget=2)
    for row, prompt in enumerate(PROMPTS):
        alone = S.generate(p, cfg, [prompt], **kwargs, exit="kl", cache_budget=2)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(batch.logits[row], alone.logits[0], atol=2e-5)
