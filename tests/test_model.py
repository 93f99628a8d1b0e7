"""Model core: shapes, determinism, loops vs unrolled references, truncated backprop, masks."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.model import attention as M_attention, functional as F, kernels as M_kernels
from tests import huginn_reference

CFG = rdlm.model_preset("tiny")


@pytest.fixture(scope="module")
def params():
    # Perturb every leaf so that q/k biases and norm weights are not their trivial init values:
    # a bug that ignores them must show up.
    p = rdlm.init_params(CFG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def tokens(batch=2, length=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def test_shapes_and_dtypes(params):
    logits, aux = rdlm.forward(params, tokens(), CFG, num_steps=3, init_scale=0.0)
    assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
    assert aux["state"].shape == (2, 12, CFG.d_model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    logits16, aux16 = rdlm.forward(params, tokens(), bf16, num_steps=3, init_scale=0.0)
    assert logits16.dtype == jnp.float32 and aux16["state"].dtype == jnp.bfloat16
    # bf16 compute tracks float32 closely on this scale.
    assert jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits, -1)) > 0.8


def test_param_axes_cover_every_leaf():
    params = rdlm.abstract_params(CFG)
    axes = rdlm.param_axes(CFG)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(names) == leaf.ndim


def test_init_statistics():
    cfg = dataclasses.replace(CFG, d_model=256, n_heads=4, mlp_dim=512)
    p = rdlm.init_params(cfg, jax.random.key(0))
    std = (2 / (5 * 256)) ** 0.5
    assert abs(float(jnp.std(p["wte"])) - std * 0.986) < 0.05 * std  # ±3σ truncation shrinks std
    out_std = std / (2 * cfg.effective_depth) ** 0.5
    assert abs(float(jnp.std(p["core"]["blocks"][0]["mlp"]["proj"])) - out_std * 0.986) < 0.05 * out_std
    assert float(jnp.abs(p["core"]["blocks"][0]["attn"]["qk_bias"]).max()) == 0.0
    assert float(p["ln_f"]["weight"].min()) == 1.0


def test_zero_state_is_deterministic_and_noise_is_not(params):
    a, _ = rdlm.forward(params, tokens(), CFG, num_steps=4, init_scale=0.0)
    b, _ = rdlm.forward(params, tokens(), CFG, num_steps=4, init_scale=0.0)
    np.testing.assert_array_equal(a, b)
    c, _ = rdlm.forward(params, tokens(), CFG, num_steps=4, key=jax.random.key(5))
    d, _ = rdlm.forward(params, tokens(), CFG, num_steps=4, key=jax.random.key(6))
    assert not np.allclose(c, d)
    with pytest.raises(ValueError, match="init_scale=0.0"):
        rdlm.forward(params, tokens(), CFG, num_steps=4)


def test_initial_state_scale():
    cfg = dataclasses.replace(CFG, d_model=512, n_heads=4)
    s = rdlm.initial_state(cfg, (4, 64, 512), key=jax.random.key(0))
    assert abs(float(jnp.std(s)) - (2 / 5) ** 0.5 * 0.986) < 0.02


@functools.partial(jax.jit, static_argnums=2)
def _unrolled(params, toks, num_steps, state=None):
    """The recurrence as an explicit Python loop over `core_step`."""
    model = rdlm.bind(params, CFG)
    ctx = rdlm.attention_context(CFG, *toks.shape)
    e, _ = model.apply_prelude(toks, ctx)
    s = jnp.zeros_like(e) if state is None else state
    for _ in range(num_steps):
        s = rdlm.core_step(params, s, e, CFG, ctx)
    logits, _ = model.apply_coda(s, ctx)
    return logits, s


@pytest.mark.parametrize("r", [0, 1, 5])
def test_loop_equals_unrolled_reference(params, r):
    logits, aux = rdlm.forward(params, tokens(), CFG, num_steps=r, init_scale=0.0)
    ref_logits, ref_state = _unrolled(params, tokens(), r)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["state"], ref_state, rtol=1e-5, atol=1e-5)


def test_trajectory_is_normed_state_after_every_step(params):
    _, aux = rdlm.forward(params, tokens(), CFG, num_steps=5, init_scale=0.0, return_trajectory=True)
    traj = aux["trajectory"]
    assert traj.shape == (5, 2, 12, CFG.d_model)
    for i in (1, 3, 5):
        _, s = _unrolled(params, tokens(), i)
        np.testing.assert_allclose(traj[i - 1], rdlm.bind(params, CFG).ln_f(s), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="Python int"):
        rdlm.forward(params, tokens(), CFG, num_steps=jnp.int32(5), init_scale=0.0,
                     return_trajectory=True)


def test_matches_numpy_reference_in_huginn_layout(params):
    """An independent NumPy transcription of SPEC §1 over the Hugging Face tensor layout."""
    d, m = CFG.d_model, CFG.mlp_dim
    tensors = {"transformer.wte.weight": params["wte"],
               "transformer.adapter.weight": params["core"]["adapter"].T,
               "transformer.ln_f.weight": params["ln_f"]["weight"]}
    stacks = [("prelude", params["prelude"]), ("core_block", params["core"]["blocks"]),
              ("coda", params["coda"])]
    for name, blocks in stacks:
        for i, b in blocks.items():
            pre = f"transformer.{name}.{i}."
            for n in range(1, 5):
                tensors[pre + f"norm_{n}.weight"] = b[f"norm_{n}"]["weight"]
            tensors[pre + "attn.Wqkv.weight"] = b["attn"]["wqkv"].reshape(d, 3 * d).T
            tensors[pre + "attn.qk_bias"] = b["attn"]["qk_bias"]
            tensors[pre + "attn.proj.weight"] = b["attn"]["proj"].T
            tensors[pre + "mlp.fc.weight"] = b["mlp"]["fc"].reshape(d, 2 * m).T
            tensors[pre + "mlp.proj.weight"] = b["mlp"]["proj"].T
    config = {"n_embd": d, "n_heads": CFG.n_heads, "norm_eps": CFG.norm_eps,
              "rope_base": CFG.rope_base, "n_layers_in_prelude": CFG.n_prelude,
              "n_layers_in_recurrent_block": CFG.n_core, "n_layers_in_coda": CFG.n_coda}
    toks = tokens(batch=2, length=16)
    logits, _ = rdlm.forward(params, toks, CFG, num_steps=4, init_scale=0.0)
    for row in range(2):
        ref = huginn_reference.forward({k: np.asarray(v) for k, v in tensors.items()}, config,
                                       np.asarray(toks[row]), num_steps=4)
        np.testing.assert_allclose(logits[row], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_one_compilation_for_every_r(params):
    # A function of its own: jit wrappers of one function share its cache (the README's example,
    # run by tests/test_docs.py, jits rdlm.forward too).
    fwd = jax.jit(lambda p, t, r: rdlm.forward(p, t, CFG, num_steps=r, init_scale=0.0))
    outs = [fwd(params, tokens(), r)[0] for r in (1, 4, 32, 64)]
    assert fwd._cache_size() == 1
    ref, _ = rdlm.forward(params, tokens(), CFG, num_steps=4, init_scale=0.0)
    np.testing.assert_allclose(outs[1], ref, rtol=1e-5, atol=1e-5)


def _loss(params, toks, n_no_grad, n_grad, init_state=None):
    logits, _ = rdlm.forward_train(params, toks, CFG, n_no_grad=n_no_grad, n_grad=n_grad,
                                   init_scale=0.0, init_state=init_state)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0])


def _reference_loss_impl(params, toks, n_no_grad, n_grad, init_state=None):
    """Unrolled Python reference: the first steps under stop_gradient, the rest differentiable."""
    model = rdlm.bind(params, CFG)
    ctx = rdlm.attention_context(CFG, *toks.shape)
    e, _ = model.apply_prelude(toks, ctx)
    s = jnp.zeros_like(e) if init_state is None else init_state
    for _ in range(n_no_grad):
        s = jax.lax.stop_gradient(rdlm.core_step(jax.lax.stop_gradient(params), s,
                                                 jax.lax.stop_gradient(e), CFG, ctx))
    for _ in range(n_grad):
        s = rdlm.core_step(params, s, e, CFG, ctx)
    logits, _ = model.apply_coda(s, ctx)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0])


_grad = jax.jit(jax.grad(_loss), static_argnums=())
_grad_state = jax.jit(jax.grad(_loss, argnums=4))
_reference_grad = jax.jit(jax.grad(_reference_loss_impl), static_argnums=(2, 3))


@pytest.mark.parametrize("n_no_grad,n_grad", [(0, 2), (2, 2), (3, 1)])
def test_truncated_backprop_gradient_equals_reference(params, n_no_grad, n_grad):
    toks = tokens()
    grad = _grad(params, toks, n_no_grad, n_grad)
    ref = _reference_grad(params, toks, n_no_grad, n_grad)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    # The prelude gets gradient through e, which enters every differentiable step.
    assert float(jnp.abs(grad["prelude"][0]["attn"]["wqkv"]).sum()) > 0


def test_no_gradient_leaks_through_no_grad_steps(params):
    toks = tokens()
    s0 = 0.3 * jax.random.normal(jax.random.key(9), (2, 12, CFG.d_model))
    g_state = _grad_state(params, toks, 2, 2, s0)
    assert float(jnp.abs(g_state).max()) == 0.0
    g_state_direct = _grad_state(params, toks, 0, 2, s0)
    assert float(jnp.abs(g_state_direct).max()) > 0.0
    # Perturbing the state before the no-gradient steps changes the loss but the gradient still
    # only reflects the differentiable steps: it equals the reference with stop_gradient.
    s1 = s0 + 0.5
    grad = _grad(params, toks, 2, 2, s1)
    ref = _reference_grad(params, toks, 2, 2, s1)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mask_skipped", [False, True])
def test_skipped_grad_steps_leave_value_and_gradient_unchanged(mask_skipped):
    """Both ways of skipping the steps past n_grad (cond, or compute and discard) give the values
    and gradients of exactly n_grad steps."""
    w = jax.random.normal(jax.random.key(1), (6, 6)) / 3.0
    s0 = jax.random.normal(jax.random.key(2), (6,))
    step = lambda consts, s: jnp.tanh(consts @ s) + s

    def looped(w, s, n):
        return jnp.sum(rdlm.model.recurrence.iterate_with_grad(step, w, s, n, 4, remat=False,
                                                         mask_skipped=mask_skipped) ** 2)

    def reference(w, s, n):
        for _ in range(n):
            s = step(w, s)
        return jnp.sum(s ** 2)

    grad_fn = jax.jit(jax.value_and_grad(looped, argnums=(0, 1)))
    for n in range(5):
        (value, grads), (ref_value, ref_grads) = (
            grad_fn(w, s0, n), jax.value_and_grad(reference, argnums=(0, 1))(w, s0, n))
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert rdlm.model.recurrence.mostly_full_backprop(32, 8)  # Huginn: n_grad = 8 nearly always
    assert not rdlm.model.recurrence.mostly_full_backprop(2, 4)


@pytest.mark.parametrize("x_shape", [(5, 6), (2, 3, 6)])
def test_dense_gradients_equal_the_plain_matmul(x_shape):
    x = jax.random.normal(jax.random.key(3), x_shape)
    w = jax.random.normal(jax.random.key(4), (6, 7))
    probe = jax.random.normal(jax.random.key(5), (*x_shape[:-1], 7))
    ours = jax.grad(lambda x, w: jnp.sum(rdlm.model.kernels.dense(x, w) * probe), argnums=(0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum((x @ w) * probe), argnums=(0, 1))(x, w)
    for got, want in zip(ours, plain):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_backprop_compiles_once(params):
    grad_fn = jax.jit(jax.grad(_loss))
    toks = tokens()
    for n_no_grad, n_grad in [(0, 1), (5, 2), (30, 2), (1, 1)]:
        grad_fn(params, toks, n_no_grad, n_grad)
    assert grad_fn._cache_size() == 1


def test_lm_loss_masks_and_metrics(params):
    toks = tokens()
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, axis=1)}
    loss, metrics = rdlm.lm_loss(params, batch, CFG, n_no_grad=1, n_grad=2, init_scale=0.0)
    assert metrics["num_tokens"] == toks.size and np.isfinite(loss)
    mask = jnp.zeros(toks.shape).at[:, :4].set(1)
    masked, m2 = rdlm.lm_loss(params, {**batch, "loss_mask": mask}, CFG, n_no_grad=1, n_grad=2,
                              init_scale=0.0)
    logits, _ = rdlm.forward(params, toks, CFG, num_steps=3, init_scale=0.0)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(masked, nll[:, :4].mean(), rtol=1e-5)
    assert m2["num_tokens"] == 8


def test_right_padded_batch_equals_rows_alone(params):
    a = tokens(1, 12, seed=1)
    b = tokens(1, 7, seed=2)
    batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 5)))], axis=0)
    seg = jnp.array([[1] * 12, [1] * 7 + [0] * 5])
    logits, _ = rdlm.forward(params, batch, CFG, num_steps=4, init_scale=0.0, segment_ids=seg)
    la, _ = rdlm.forward(params, a, CFG, num_steps=4, init_scale=0.0)
    lb, _ = rdlm.forward(params, b, CFG, num_steps=4, init_scale=0.0)
    np.testing.assert_allclose(logits[0], la[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1, :7], lb[0], rtol=1e-5, atol=1e-5)


def test_packed_sequences_equal_documents_alone(params):
    a, b, c = tokens(1, 5, seed=3), tokens(1, 4, seed=4), tokens(1, 3, seed=5)
    packed = jnp.concatenate([a, b, c], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 4 + [3] * 3])
    logits, _ = rdlm.forward(params, packed, CFG, num_steps=3, init_scale=0.0, segment_ids=seg)
    start = 0
    for doc in (a, b, c):
        alone, _ = rdlm.forward(params, doc, CFG, num_steps=3, init_scale=0.0)
        n = doc.shape[1]
        np.testing.assert_allclose(logits[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
        start += n


def test_token_shift_mixes_in_the_previous_visible_tokens_only():
    cfg = rdlm.model_preset("tiny", token_shift=2)
    p = rdlm.init_params(cfg, jax.random.key(0))
    seq = tokens(1, 10, seed=6)
    # Zero-initialised: a fresh model computes what the plain architecture computes.
    plain = {k: v for k, v in p.items() if k != "token_shift"}
    np.testing.assert_allclose(rdlm.forward(p, seq, cfg, num_steps=3, init_scale=0.0)[0],
                               rdlm.forward(plain, seq, CFG, num_steps=3, init_scale=0.0)[0],
                               atol=1e-6)
    p["token_shift"] = 0.3 * jax.random.normal(jax.random.key(1), p["token_shift"].shape)
    logits, _ = rdlm.forward(p, seq, cfg, num_steps=3, init_scale=0.0)
    # Position 4 now depends on tokens 2 and 3 directly: change token 3 and its logits move.
    changed, _ = rdlm.forward(p, seq.at[0, 3].set((seq[0, 3] + 1) % 64), cfg, num_steps=3,
                              init_scale=0.0)
    assert float(jnp.abs(changed[0, 4] - logits[0, 4]).max()) > 1e-3
    # Packed documents still equal documents alone: the shift never crosses a segment.
    a, b = tokens(1, 5, seed=7), tokens(1, 6, seed=8)
    seg = jnp.array([[1] * 5 + [2] * 6])
    packed, _ = rdlm.forward(p, jnp.concatenate([a, b], 1), cfg, num_steps=3, init_scale=0.0,
                             segment_ids=seg)
    alone, _ = rdlm.forward(p, b, cfg, num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(packed[0, 5:], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        M_attention.previous_tokens(jnp.array([[7, 8, 9, 10]]), 2, None), [[[-1, 7, 8, 9]], [[-1, -1, 7, 8]]])


def test_identity_adapter_init_adds_state_and_embedding():
    cfg = rdlm.model_preset("tiny", adapter_init="identity")
    p = rdlm.init_params(cfg, jax.random.key(0))
    d = cfg.d_model
    np.testing.assert_array_equal(p["core"]["adapter"], np.concatenate([np.eye(d), np.eye(d)]))
    # The core's first block sees s + e: zeroing the adapter and adding e to the state gives the
    # same step.
    s = jax.random.normal(jax.random.key(1), (1, 5, d))
    e = jax.random.normal(jax.random.key(2), (1, 5, d))
    ctx = M_attention.attention_context(cfg, 1, 5)
    summed = dict(p, core=dict(p["core"], adapter=jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])))
    np.testing.assert_allclose(F.core_step(p, s, e, cfg, ctx),
                               F.core_step(summed, s + e, jnp.zeros_like(e), cfg, ctx), atol=1e-5)
    with pytest.raises(rdlm.ConfigError, match="adapter_init"):
        rdlm.model_preset("tiny", adapter_init="zeros")


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(M_attention.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_bad_inputs(params):
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        rdlm.forward(params, jnp.zeros((5,), jnp.int32), CFG, num_steps=1, init_scale=0.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        rdlm.forward(params, jnp.zeros((1, CFG.max_seq_len + 1), jnp.int32), CFG, num_steps=1,
                     init_scale=0.0)
    with pytest.raises(ValueError, match="empty"):
        rdlm.forward(params, jnp.zeros((1, 0), jnp.int32), CFG, num_steps=1, init_scale=0.0)
    with pytest.raises(ValueError, match="init_state has shape"):
        rdlm.forward(params, tokens(), CFG, num_steps=1, init_state=jnp.zeros((2, 3, 4)))


def test_branches_equal_each_continuation_alone(params):
    trunk, q1, q2 = tokens(1, 6, seed=6), tokens(1, 3, seed=7), tokens(1, 2, seed=8)
    row = jnp.concatenate([trunk, q1, q2], axis=1)
    branch = jnp.array([[0] * 6 + [1] * 3 + [2] * 2])
    logits, _ = rdlm.forward(params, row, CFG, num_steps=3, init_scale=0.0, branch_ids=branch)
    for q, start in ((q1, 6), (q2, 9)):
        alone, _ = rdlm.forward(params, jnp.concatenate([trunk, q], axis=1), CFG, num_steps=3,
                                init_scale=0.0)
        np.testing.assert_allclose(logits[0, :6], alone[0, :6], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[0, start:start + q.shape[1]], alone[0, 6:], rtol=1e-5,
                                   atol=1e-5)


def test_attention_over_a_prefix_equals_full_causal_attention(params):
    """Keys/values of earlier tokens passed as a prefix (a cache, [b, h, t, e]) give the full
    pass's outputs."""
    model = rdlm.bind(params, CFG)
    x_btd = jax.random.normal(jax.random.key(3), (2, 10, CFG.d_model))
    block = model.prelude[0]
    full_ctx = rdlm.attention_context(CFG, 2, 10)
    full, (k_all, v_all) = block(x_btd, full_ctx)
    pos = jnp.broadcast_to(jnp.arange(6, 10), (2, 4))
    tail_ctx = rdlm.attention_context(CFG, 2, 4, positions=pos)
    tail, _ = block(x_btd[:, 6:], tail_ctx, (k_all[:, :, :6], v_all[:, :, :6]))
    np.testing.assert_allclose(tail, full[:, 6:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [40, 200, 256])  # 1 block; 3 uneven blocks; 4 blocks
@pytest.mark.parametrize("segmented", [False, True])
def test_blocked_causal_attention_equals_full_attention(length, segmented):
    """Values and gradients of the query-blocked causal attention equal full masked attention."""
    b, h, e = 2, 3, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, length, h, e)) for i in range(3))
    mask_b1ts = None
    if segmented:  # two packed documents per row, split at different places
        seg_bt = (jnp.arange(length)[None, :] >= jnp.array([[length // 3], [length - 7]])) + 1
        mask_b1ts = M_attention.attention_context(CFG, b, length, segment_ids=seg_bt).mask_b1ts
    probe = jax.random.normal(jax.random.key(9), (b, length, h, e))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * probe)

    ours = functools.partial(M_kernels.causal_attention, mask_b1ts=mask_b1ts)
    full = functools.partial(jax.nn.dot_product_attention, is_causal=mask_b1ts is None,
                             mask=mask_b1ts)
    np.testing.assert_allclose(ours(q, k, v), full(q, k, v), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))(q, k, v)
             for fn in (ours, full)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_blocked_causal_attention_in_bfloat16_matches_float32():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 16)) for i in range(3))
    want = M_kernels.causal_attention(q, k, v, None)
    got = M_kernels.causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05)
