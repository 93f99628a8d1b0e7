"""The llama block family (`model.block: llama`): a NumPy transcription of the network as the
oracle, the retrofit adapter's exactness at r = 1, and generation, exits and continuous batching
on grouped-query attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
import rdlm.generation as S
from rdlm.errors import ConfigError

CFG = rdlm.model_preset("tiny", block="llama", qk_bias=False, n_kv_heads=2, attn_bias=True,
                        tie_embeddings=False, rope_scaling="llama3", rope_scaling_factor=4.0,
                        rope_original_max_len=16, norm_eps=1e-5, rope_base=10_000.0)
PROMPTS = [[5, 9, 13, 2, 40, 7], [33, 1, 8], [60, 61, 62, 63, 0, 12, 3, 19, 4]]


def perturbed(cfg, seed=0):
    """Random init with biases and norms moved off their trivial values."""
    p = rdlm.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def params():
    return perturbed(CFG)


# ---------------------------------------------------------------------------------------------
# The oracle: the Llama network written out in NumPy, float64, from the definitions.

def np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_inv_freq(cfg):
    e = cfg.head_dim
    inv = 1.0 / cfg.rope_base ** (np.arange(0, e, 2) / e)
    if cfg.rope_scaling == "llama3":
        old, lo, hi, f = (cfg.rope_original_max_len, cfg.rope_low_freq_factor,
                          cfg.rope_high_freq_factor, cfg.rope_scaling_factor)
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, (1 - smooth) * inv / f + smooth * inv, out)
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_scaling_factor
    return inv


def np_rope_half(x_the, cfg):
    t = x_the.shape[0]
    ang = np.arange(t)[:, None] * np_inv_freq(cfg)[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = np.split(x_the, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_block(x_td, p, cfg):
    h, kvh, e = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    t = x_td.shape[0]
    a = p["attn"]
    y = np_rms(x_td, p["norm_1"]["weight"], cfg.norm_eps)
    q = np.einsum("td,dhe->the", y, a["wq"])
    k = np.einsum("td,dhe->the", y, a["wkv"][:, 0])
    v = np.einsum("td,dhe->the", y, a["wkv"][:, 1])
    if "q_bias" in a:
        q, k, v = q + a["q_bias"], k + a["kv_bias"][0], v + a["kv_bias"][1]
    q, k = np_rope_half(q, cfg), np_rope_half(k, cfg)
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    s = np.einsum("the,she->hts", q, k) / np.sqrt(e)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hts,she->the", w, v).reshape(t, h * e) @ a["proj"]
    if "proj_bias" in a:
        o = o + a["proj_bias"]
    x_td = x_td + o
    y = np_rms(x_td, p["norm_2"]["weight"], cfg.norm_eps)
    gate, up = y @ p["mlp"]["fc"][:, 0], y @ p["mlp"]["fc"][:, 1]
    return x_td + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["proj"]


def np_forward(p, tokens_t, cfg, num_steps, state_td=None):
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    x = p["wte"][tokens_t]
    for i in range(cfg.n_prelude):
        x = np_block(x, p["prelude"][i], cfg)
    s = np.zeros_like(x) if state_td is None else np.asarray(state_td, np.float64)
    for _ in range(num_steps):
        s = np.concatenate([s, x], -1) @ p["core"]["adapter"]
        for i in range(cfg.n_core):
            s = np_block(s, p["core"]["blocks"][i], cfg)
    for i in range(cfg.n_coda):
        s = np_block(s, p["coda"][i], cfg)
    s = np_rms(s, p["ln_f"]["weight"], cfg.norm_eps)
    head = p["lm_head"] if "lm_head" in p else p["wte"].T
    return s @ head


def np_fixed_depth(p, tokens_t, cfg):
    """The same layers as one plain stack, no adapter: what a converted checkpoint computed."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    x = p["wte"][tokens_t]
    for block in [*p["prelude"].values(), *p["core"]["blocks"].values(), *p["coda"].values()]:
        x = np_block(x, block, cfg)
    head = p["lm_head"] if "lm_head" in p else p["wte"].T
    return np_rms(x, p["ln_f"]["weight"], cfg.norm_eps) @ head


# ---------------------------------------------------------------------------------------------

TOKENS = np.array([3, 17, 42, 5, 5, 60, 1, 29, 11, 7, 50, 2])


@pytest.mark.parametrize("changes", [
    {},  # GQA 4 → 2, biases, untied head, llama3 rope scaling
    {"n_kv_heads": 1, "attn_bias": False, "tie_embeddings": True, "rope_scaling": "linear"},
    {"n_kv_heads": 0, "rope_scaling": "none"},
])
def test_forward_equals_the_numpy_transcription(changes):
    cfg = dataclasses.replace(CFG, **changes)
    p = perturbed(cfg)
    logits, _ = rdlm.forward(p, jnp.asarray(TOKENS[None]), cfg, num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(np.asarray(logits[0]), np_forward(p, TOKENS, cfg, 3),
                               atol=2e-4, rtol=1e-4)


def test_embedding_adapter_makes_r1_the_plain_stack_from_any_initial_state():
    cfg = dataclasses.replace(CFG, adapter_init="embedding")
    p = perturbed(cfg)
    p["core"]["adapter"] = rdlm.init_params(cfg, jax.random.key(0))["core"]["adapter"]
    logits, _ = rdlm.forward(p, jnp.asarray(TOKENS[None]), cfg, num_steps=1,
                             key=jax.random.key(7), init_scale=1.0)
    np.testing.assert_allclose(np.asarray(logits[0]), np_fixed_depth(p, TOKENS, cfg),
                               atol=2e-4, rtol=1e-4)
    # Every r computes the same at conversion (the state is not read yet) ...
    more, _ = rdlm.forward(p, jnp.asarray(TOKENS[None]), cfg, num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(np.asarray(more), np.asarray(logits), atol=1e-5)
    # ... and training starts reading it: the adapter's state half gets gradient at r > 1.
    batch = {"inputs": jnp.asarray(TOKENS[None, :-1]), "targets": jnp.asarray(TOKENS[None, 1:])}
    grads = jax.grad(lambda q: rdlm.lm_loss(q, batch, cfg, n_no_grad=1, n_grad=2,
                                            key=jax.random.key(0))[0])(p)
    assert float(jnp.abs(grads["core"]["adapter"][:cfg.d_model]).max()) > 1e-6


def test_greedy_generation_with_grouped_cache_equals_full_recomputation(params):
    out = S.generate(params, CFG, PROMPTS, max_new_tokens=5, num_steps=3, return_logits=True)
    for row, prompt in enumerate(PROMPTS):
        seq = jnp.asarray([prompt + out.tokens[row, :-1].tolist()])
        logits, _ = rdlm.forward(params, seq, CFG, num_steps=3, init_scale=0.0)
        expected = np.asarray(logits[0, len(prompt) - 1:])
        np.testing.assert_allclose(out.logits[row], expected, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(out.tokens[row], expected.argmax(-1))


def test_exit_cache_sharing_and_continuous_batching_agree_with_lockstep(params):
    kwargs = dict(max_new_tokens=5, num_steps=8, cache_budget=2, exit="kl:1e-2",
                  continuous_cot=True)
    lockstep = S.generate(params, CFG, PROMPTS, **kwargs)
    rows = S.generate(params, CFG, PROMPTS, continuous_batching=True, batch_size=2, **kwargs)
    np.testing.assert_array_equal(rows.tokens, lockstep.tokens)
    np.testing.assert_array_equal(rows.steps, lockstep.steps)
    assert len(np.unique(lockstep.steps[:, 1:])) > 1  # the exit fired, at varying depths


def test_training_step_reduces_the_loss_and_reaches_every_parameter(params):
    batch = {"inputs": jnp.asarray(TOKENS[None, :-1]), "targets": jnp.asarray(TOKENS[None, 1:])}

    def loss(p):
        return rdlm.lm_loss(p, batch, CFG, n_no_grad=1, n_grad=2, key=jax.random.key(0))[0]

    value, grads = jax.value_and_grad(loss)(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(loss(stepped)) < float(value)


@pytest.mark.parametrize("changes, message", [
    ({"block": "llama"}, "model.qk_bias"),
    ({"n_kv_heads": 2}, "model.block=llama"),
    ({"attn_bias": True}, "model.block=llama"),
    ({"block": "llama", "qk_bias": False, "n_kv_heads": 3}, "divisor of model.n_heads"),
    ({"block": "mamba"}, "model.block"),
    ({"rope_scaling": "yarn"}, "model.rope_scaling"),
])
def test_bad_block_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        rdlm.model_preset("tiny", **changes)
