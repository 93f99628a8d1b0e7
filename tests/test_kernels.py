"""The attention kernels against reference attention, the backend dispatch, and the remat menu.

The Pallas kernels (TPU splash attention, the GPU flash kernel) run in Pallas' interpreter on
the CPU: the same kernel bodies, values and gradients, with packed segments, in float32 and
bfloat16. Shapes are small but span several tiles, so block skipping and the segment masks
inside tiles are exercised.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.config import ModelConfig
from rdlm.model import kernels as K
from rdlm.model import functional as F, model as M
from rdlm.model import remat as R
from rdlm.model import pallas_attention as P
from rdlm.model import pallas_decode as PD
from rdlm.model import backend, row_cache as RC
from rdlm.runtime import sharding

# The residuals a backward pass keeps (JAX's own tool behind print_saved_residuals).
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

B, T, H, E = 2, 256, 2, 24  # head_dim 24: not a power of two, as Huginn's 96 is not


def _qkv_probe_segments() -> tuple[list[jax.Array], jax.Array, jax.Array]:
    q, k, v, probe = (jax.random.normal(jax.random.key(i), (B, T, H, E)) for i in range(4))
    # Row 0: two documents split inside the second tile; row 1: three, the last one short.
    starts = jnp.array([[0, 90, T], [0, 130, 250]])
    seg_bt = (jnp.arange(T)[None, None, :] >= starts[:, :, None]).sum(1).astype(jnp.int32)
    return [q, k, v], probe, seg_bt


def _reference(q, k, v, seg_bt):
    """Dense float32 attention, causal within segments (XLA's path of jax.nn)."""
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & (seg_bt[:, :, None] == seg_bt[:, None, :])
    return jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                                        mask=mask[:, None], implementation="xla")


def _value_and_grads(fn, qkv, probe):
    @jax.jit
    def run(q, k, v, probe):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(probe.astype(out.dtype))
    return run(*qkv, probe)


@pytest.mark.parametrize("kernel", ["splash", "gpu_flash"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernel_matches_reference_values_and_gradients(kernel, dtype):
    qkv, probe, seg_bt = _qkv_probe_segments()
    fn = {"splash": functools.partial(P.splash_attention, block=128, interpret=True),
          "gpu_flash": functools.partial(P.gpu_flash_attention, interpret=True)}[kernel]
    got, got_grads = _value_and_grads(lambda q, k, v: fn(q, k, v, seg_bt),
                                      [x.astype(dtype) for x in qkv], probe)
    want, want_grads = _value_and_grads(lambda q, k, v: _reference(q, k, v, seg_bt),
                                        [x.astype(dtype) for x in qkv], probe)
    assert got.dtype == jnp.dtype(dtype) and got.shape == (B, T, H, E)
    # float32: the same math in another order; bfloat16: 8-bit mantissas of the inputs to the
    # second dot (probabilities, values) against the float32 reference.
    tol = dict(float32=dict(rtol=2e-5, atol=2e-5), bfloat16=dict(rtol=0, atol=3e-2))[dtype]
    np.testing.assert_allclose(got.astype(jnp.float32), want, **tol)
    for g, w in zip(got_grads, want_grads):
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, w.astype(jnp.float32) / scale,
                                   **(dict(rtol=0, atol=1e-5) if dtype == "float32"
                                      else dict(rtol=0, atol=4e-2)))


def test_splash_without_segments_is_plain_causal_attention():
    qkv, _, _ = _qkv_probe_segments()
    got = jax.jit(lambda q, k, v: P.splash_attention(q, k, v, None, block=128, interpret=True))(
        *qkv)
    np.testing.assert_allclose(got, K.causal_attention(*qkv, None), rtol=2e-5, atol=2e-5)


def test_splash_refuses_a_tile_that_does_not_cover_the_sequence():
    qkv, _, _ = _qkv_probe_segments()
    with pytest.raises(ValueError, match="multiple of 128"):
        P.splash_attention(*(x[:, :200] for x in qkv), None, interpret=True)


def test_splash_tiles_for_huginn_context():
    assert P.splash_block(4096) == 512 and P.splash_block(384) == 384
    assert P.splash_block(640) == 128 and P.splash_block(200) is None


@pytest.mark.parametrize("platform, dtype, mask, length, cache, per_shard, want", [
    # CPU: the blocked XLA attention, whatever the mask; a cache: attention over the prefix.
    ("cpu", "bfloat16", K.CAUSAL, 4096, False, True, K.BLOCKED),
    ("cpu", "float32", K.SEGMENTS, 4096, False, True, K.BLOCKED),
    ("cpu", "float32", K.MASKED, 1, True, True, K.CACHE),
    # TPU: splash for causal and segments when 128 divides the length, in either dtype.
    ("tpu", "bfloat16", K.CAUSAL, 4096, False, True, K.SPLASH),
    ("tpu", "float32", K.SEGMENTS, 4096, False, True, K.SPLASH),
    ("tpu", "bfloat16", K.SEGMENTS, 4000, False, True, K.BLOCKED),
    ("tpu", "bfloat16", K.MASKED, 4096, False, True, K.BLOCKED),  # branches
    ("tpu", "bfloat16", K.SEGMENTS, 4096, False, False, K.BLOCKED),  # sharded, no mesh
    ("tpu", "bfloat16", K.CAUSAL, 1, True, True, K.CACHE),  # decoding
    # GPU: cuDNN for plain causal 16-bit, the Pallas flash kernel for packed segments.
    ("gpu", "bfloat16", K.CAUSAL, 4096, False, True, K.CUDNN),
    ("gpu", "float16", K.CAUSAL, 4096, False, False, K.CUDNN),  # XLA partitions cuDNN itself
    ("gpu", "bfloat16", K.SEGMENTS, 4096, False, True, K.GPU_FLASH),
    ("gpu", "bfloat16", K.SEGMENTS, 4096, False, False, K.BLOCKED),
    ("gpu", "bfloat16", K.SEGMENTS, 100, False, True, K.BLOCKED),
    ("gpu", "float32", K.SEGMENTS, 4096, False, True, K.BLOCKED),
    ("gpu", "float32", K.CAUSAL, 4096, False, True, K.BLOCKED),
    ("gpu", "bfloat16", K.MASKED, 4096, False, True, K.BLOCKED),
])
def test_dispatch_picks_the_kernel_for_backend_and_mask(platform, dtype, mask, length, cache,
                                                        per_shard, want):
    assert K.choose_attention(platform, dtype, mask, length, with_cache=cache,
                              per_shard=per_shard) == want


def test_the_cache_is_stored_with_the_axis_that_pads_less_innermost():
    assert RC.cache_layout((8, 16, 55, 2047, 96)) == (0, 1, 2, 4, 3)  # 96 features pad to 128
    assert RC.cache_layout((16, 55, 2047, 96)) == (0, 1, 3, 2)
    assert RC.cache_layout((16, 55, 1, 96)) == (0, 1, 2, 3)  # one position
    assert RC.cache_layout((4, 2, 56, 64)) == (0, 1, 2, 3)  # fewer positions than a tile
    assert RC.cache_layout((16, 8, 4096, 128)) == (0, 1, 2, 3)  # nothing to pad


def test_a_kernel_runs_per_shard_of_the_mesh_a_program_names():
    """`backend.shard_mesh`: the mesh a traced program names, where XLA partitions it (some
    axis automatic); none where every axis is taken by hand (a group of one device) or no mesh
    is named. A Pallas kernel can run in all three (`backend.pallas_runs`)."""
    from jax.sharding import AbstractMesh, AxisType
    auto = AbstractMesh((2, 2), ("data", "tensor"))
    group = AbstractMesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Manual, AxisType.Auto))
    manual = AbstractMesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Manual,) * 2)
    for mesh, named in ((auto, True), (group, True), (manual, False)):
        with jax.sharding.use_abstract_mesh(mesh):
            assert (backend.shard_mesh() is mesh) == named
            assert backend.runs_per_device() != named and backend.pallas_runs()
    # Of a group's mesh the kernels take only the axis XLA partitions.
    assert P.shard_axes(group, batch=4, heads=6) == (None, "tensor", frozenset({"tensor"}))
    assert P.shard_axes(auto, batch=4, heads=5) == (("data",), None,
                                                   frozenset({"data", "tensor"}))
    assert backend.shard_mesh() is None  # one CPU device, no mesh named


def test_row_writes_and_reads_are_slices_on_tpu_only():
    assert RC.choose_row_access("tpu") == RC.SLICES
    assert RC.choose_row_access("gpu") == RC.INDEXED
    assert RC.choose_row_access("cpu") == RC.INDEXED
    # Attention over each row's own entries: the platform's Pallas kernel where one can run
    # (whole on each device, or per shard of a mesh the program names); where XLA partitions a
    # program that names none, row by row on TPU and one gather on GPU; one gather on CPU.
    assert RC.choose_row_attention("tpu", per_shard=True) == RC.ROWS_KERNEL
    assert RC.choose_row_attention("tpu", per_shard=False) == RC.SLICES
    assert RC.choose_row_attention("gpu", per_shard=True) == RC.ROWS_KERNEL
    assert RC.choose_row_attention("gpu", per_shard=False) == RC.INDEXED
    assert RC.choose_row_attention("cpu", per_shard=True) == RC.INDEXED


@pytest.mark.parametrize("lead", [(), (3,)])
def test_both_row_writes_put_each_rows_entry_at_its_own_position(lead):
    """Rows 0, 2 and 3 of five write at positions 6, 0 and 2; row 1 is left out (its position,
    past the end, must not be clamped onto the last one)."""
    b, h, t, e = 5, 2, 7, 4
    buf = jax.random.normal(jax.random.key(0), (*lead, b, h, t, e))
    new_xkh1e = jax.random.normal(jax.random.key(1), (*lead, 4, h, 1, e))
    rows_k, position_k = jnp.array([3, 0, 1, 2]), jnp.array([2, 6, 7, 0])
    write_k = jnp.array([True, True, False, True])
    want = np.array(buf)
    for i in (0, 1, 3):
        want[(slice(None),) * len(lead) + (int(rows_k[i]), slice(None), int(position_k[i]))] = \
            new_xkh1e[..., i, :, 0, :]
    for how in (RC.INDEXED, RC.SLICES):
        got = jax.jit(functools.partial(RC.write_row_positions, how=how))(
            buf, new_xkh1e, rows_k, position_k, write_k)
        np.testing.assert_array_equal(got, want)


def test_both_row_reads_take_each_rows_own_entries():
    """Each of four rows reads its own recurrence slot of a core layer [s, b, h, t, e]; three
    rows (one twice) of a stage [b, h, t, e]: both ways give NumPy's indexing."""
    core = jax.random.normal(jax.random.key(0), (3, 4, 2, 5, 8))
    stage = core[0]
    slot_b, rows_k = jnp.array([2, 0, 1, 2]), jnp.array([3, 1, 3])
    for how in (RC.INDEXED, RC.SLICES):
        read = jax.jit(functools.partial(RC.read_row_entries, how=how))
        got = read(core, (slot_b, jnp.arange(4)))
        np.testing.assert_array_equal(got, np.stack([core[s, b] for b, s in enumerate([2, 0, 1, 2])]))
        np.testing.assert_array_equal(read(stage, (rows_k,)), np.asarray(stage)[[3, 1, 3]])


@pytest.mark.parametrize("latest,kv_heads,t", [(False, 2, 6), (True, 2, 6), (True, 1, 300)])
def test_attention_over_each_rows_own_entries_reads_what_the_rows_hold(monkeypatch, latest,
                                                                       kv_heads, t):
    """`RowEntries` prefixes (each row at its own recurrence slot of a core layer, its latest
    entries where a position stopped earlier; a few rows of a stage, one twice) attend as the
    prefix built by NumPy indexing does: gathered (CPU), on TPU (forced here) row by row over
    slices and in the row-entries Pallas kernel, and on GPU (forced) in the Triton one (both
    in Pallas' interpreter), with grouped query heads and, at 300 positions in tiles of 128
    (TPU) or 64 (GPU), a partial last tile."""
    s, b, h, e = 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 8)
    slots = tuple(jax.random.normal(k, (s, b, kv_heads, t, e)) for k in keys[:2])
    fallback = tuple(jax.random.normal(k, (b, kv_heads, t, e)) for k in keys[2:4])
    q = jax.random.normal(keys[4], (b, 1, h, e))
    k, v = (jax.random.normal(key, (b, 1, kv_heads, e)) for key in keys[5:7])
    use_b1t1 = jax.random.bernoulli(keys[7], 0.5, (b, 1, t, 1))
    seen_b = jnp.array([5, 2, 6, 3]) * (t // 6)  # the last cached key each row sees
    mask_b1ts = jnp.arange(t + 1)[None, None, None] <= seen_b[:, None, None, None]
    mask_b1ts = mask_b1ts.at[..., t].set(True)  # and its own
    core = K.RowEntries(slots, (jnp.array([2, 0, 1, 2]), jnp.arange(b)),
                        fallback if latest else None, use_b1t1 if latest else None)
    held = tuple(np.stack([np.asarray(x)[slot, row] for row, slot in enumerate([2, 0, 1, 2])])
                 for x in slots)
    if latest:
        held = tuple(np.where(use_b1t1, x, f) for x, f in zip(held, fallback))
    stage = K.RowEntries(fallback, (jnp.array([3, 1, 3, 0]),))
    stage_held = tuple(np.asarray(x)[[3, 1, 3, 0]] for x in fallback)
    for prefix, want_prefix in ((core, held), (stage, stage_held)):
        want = K.attend_with_prefix(q, k, v, want_prefix, mask_b1ts)
        gathered = jax.jit(K.attend_with_prefix)(q, k, v, prefix, mask_b1ts)
        got = {}
        for how, platform in ((RC.SLICES, "tpu"), (RC.ROWS_KERNEL, "tpu"),
                              (RC.ROWS_KERNEL, "gpu")):
            with monkeypatch.context() as patch:
                patch.setattr(backend, "target_platform", lambda: platform)
                patch.setattr(RC, "choose_row_attention", lambda platform, per_shard: how)
                patch.setattr(RC, "choose_row_access", lambda platform: RC.SLICES)
                patch.setattr(PD, "ROWS_BLOCK", 128)
                for name in ("row_entries_attention", "gpu_row_entries_attention"):
                    patch.setattr(PD, name, functools.partial(getattr(PD, name), interpret=True))
                for mask in (mask_b1ts, None):
                    # A new function each time: jit would reuse its trace of another choice.
                    attend = jax.jit(lambda *args: K.attend_with_prefix(*args))
                    got[how, platform, mask is None] = attend(q, k, v, prefix, mask)
        np.testing.assert_allclose(gathered, want, rtol=0, atol=1e-6)
        for (how, platform, unmasked), out in got.items():
            expected = K.attend_with_prefix(q, k, v, want_prefix, None) if unmasked else want
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6,
                                       err_msg=f"{how} on {platform}")


def test_mask_kind_follows_the_attention_context():
    seg_bt = jnp.array([[1, 1, 2, 2]])
    plain = rdlm.attention_context(rdlm.ModelConfig(), 1, 4)
    packed = rdlm.attention_context(rdlm.ModelConfig(), 1, 4, segment_ids=seg_bt)
    branched = rdlm.attention_context(rdlm.ModelConfig(), 1, 4, segment_ids=seg_bt,
                                      branch_ids=jnp.array([[0, 0, 1, 2]]))
    assert K.mask_kind(plain.mask_b1ts, plain.segment_ids_bt) == K.CAUSAL
    assert K.mask_kind(packed.mask_b1ts, packed.segment_ids_bt) == K.SEGMENTS
    assert K.mask_kind(branched.mask_b1ts, branched.segment_ids_bt) == K.MASKED
    assert backend.target_platform() == jax.default_backend()


def test_kernel_mesh_axes_follow_the_sharding_rules():
    assert sharding.DEFAULT_RULES["batch"] == P.BATCH_MESH_AXES
    assert sharding.DEFAULT_RULES["heads"] == P.HEAD_MESH_AXIS


# ---------------------------------------------------------------------------------------------
# The remat menu.

CFG = ModelConfig(vocab_size=32, d_model=16, n_heads=2, mlp_dim=24, n_prelude=1, n_core=1,
                  n_coda=1, max_seq_len=16, mean_recurrence=3, backprop_depth=2)


def _batch() -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    seg = (jnp.arange(16)[None] >= jnp.array([[5], [11]])).astype(jnp.int32) + 1
    return {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg}


def _loss_fn(cfg: ModelConfig, n_no_grad: int = 1):
    return lambda p, batch: rdlm.lm_loss(p, batch, cfg, n_no_grad=n_no_grad, n_grad=2,
                                         key=jax.random.key(2))[0]


def _with(**changes) -> ModelConfig:
    return ModelConfig(**{**CFG.__dict__, **changes})


@pytest.mark.parametrize("name", [n for n in ModelConfig.REMAT_POLICIES if n != "none"])
def test_every_remat_policy_gives_a_block_stack_the_gradients_of_none(name):
    """Prelude/coda blocks under each policy: the same values and gradients as storing all."""
    params = rdlm.init_params(CFG, jax.random.key(0))
    x_btd = jax.random.normal(jax.random.key(3), (2, 16, CFG.d_model))
    ctx = rdlm.attention_context(CFG, 2, 16, segment_ids=_batch()["segment_ids"])

    def loss(p, x, plan):
        blocks = F.bind(p, CFG).prelude
        y_btd, _ = M.run_blocks(blocks, M.run_blocks(blocks, x, ctx, remat=plan)[0], ctx,
                                remat=plan)
        return jnp.sum(jnp.sin(y_btd))

    plan = R.remat_plan(_with(remat_policy=name))
    plan = plan._replace(blocks=True)  # "core" leaves blocks alone: check its policy on them too
    want = jax.value_and_grad(loss, argnums=(0, 1))(params, x_btd, None)
    got = jax.value_and_grad(loss, argnums=(0, 1))(params, x_btd, plan)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_full_remat_of_the_whole_model_gives_the_loss_and_gradients_of_none():
    """Core steps, prelude and coda all rematerialised: the training loss and every gradient."""
    params = rdlm.init_params(CFG, jax.random.key(0))
    batch = _batch()
    (loss, grads), (want_loss, want_grads) = (
        jax.jit(jax.value_and_grad(_loss_fn(_with(remat_policy=name), n_no_grad=0)))(
            params, batch) for name in ("full", "none"))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_remat_policies_store_what_they_say():
    """Bytes the backward pass keeps: none > core (prelude and coda stored) > full; saving the
    matmuls or the attention output keeps more than full; remat=false is none."""
    params = rdlm.init_params(CFG, jax.random.key(0))
    batch = _batch()

    def saved_bytes(**changes):
        cfg = ModelConfig(**{**CFG.__dict__, **changes})
        residuals = saved_residuals(_loss_fn(cfg), params, batch)
        return sum(a.size * a.dtype.itemsize for a, _ in residuals)

    sizes = {name: saved_bytes(remat_policy=name) for name in ModelConfig.REMAT_POLICIES}
    assert sizes["none"] > sizes["core"] > sizes["full"]
    assert sizes["save_dots"] > sizes["save_qkv_attention_out"] > sizes["save_attention_out"] \
        > sizes["full"]
    assert saved_bytes(remat=False, remat_policy="full") == sizes["none"]
    assert R.remat_plan(CFG) == R.RematPlan(core=True, blocks=False, policy=None)  # the default


def test_unknown_remat_policy_is_refused_with_the_menu():
    with pytest.raises(rdlm.ConfigError, match="model.remat_policy='minimal'.*save_dots"):
        ModelConfig(remat_policy="minimal")


# ---------------------------------------------------------------------------------------------
# The generation engine's prefill: left-padded prompts as segments, on the fused kernels.

from rdlm.generation import cache as kvc  # noqa: E402
from rdlm.generation import engine as G  # noqa: E402
from rdlm.generation import programs  # noqa: E402
from rdlm.generation.plan import left_pad, make_plan  # noqa: E402

# head_dim 24 (not a power of two, as Huginn's 96 is not); 128 prompt positions: one splash tile,
# two GPU flash tiles.
GEN_CFG = rdlm.model_preset("tiny", d_model=48, n_heads=2, mlp_dim=64, max_seq_len=160)
GEN_ROWS = [[(7 * i) % 60 + 1 for i in range(128)], [5, 9, 13] * 30, [33]]  # pads 0, 38, 127
GEN_LEN, GEN_STEPS = 128, 3


def _dense_block_mask(pad_b, start, length):
    """The engine's block mask as it was built before segment ids: causal over real keys, and
    each padding query sees itself."""
    index_t = start + jnp.arange(length)
    real_key_bt = index_t[None, :] >= pad_b[:, None]
    causal_tt = jnp.tril(jnp.ones((length, length), bool))
    return causal_tt[None] & (real_key_bt[:, None, :] | jnp.eye(length, dtype=bool)[None])


@pytest.mark.parametrize("start, with_prefix", [(0, False), (0, True), (5, True)])
def test_block_mask_is_causal_within_the_block_segments(start, with_prefix):
    pad_b = jnp.array([0, 3, 9, 12])
    ctx = G.block_context(CFG, pad_b, start, 12, 20, with_prefix)
    block_b1tt = ctx.mask_b1ts[..., -12:]
    np.testing.assert_array_equal(block_b1tt[:, 0], _dense_block_mask(pad_b, start, 12))
    if with_prefix:  # over a cache: the mask covers cached keys too, so no ids
        assert ctx.segment_ids_bt is None
        assert K.mask_kind(ctx.mask_b1ts, ctx.segment_ids_bt) == K.MASKED
        return
    seg_bt = ctx.segment_ids_bt
    same_bt1t = seg_bt[:, :, None] == seg_bt[:, None, :]
    np.testing.assert_array_equal(block_b1tt[:, 0], jnp.tril(jnp.ones((12, 12), bool)) & same_bt1t)
    assert K.mask_kind(ctx.mask_b1ts, seg_bt) == K.SEGMENTS


def _prefill(params, cfg, num_steps=GEN_STEPS):
    """The engine's prefill of `GEN_ROWS` (left-padded to `GEN_LEN`): last logits [b, t, V] and
    the cache, as `rdlm.generation.programs` runs it."""
    plan = make_plan(cfg, GEN_ROWS, max_new_tokens=2, num_steps=num_steps, prompt_len=GEN_LEN)
    prompt_bt, pad_b = left_pad(GEN_ROWS, GEN_LEN)

    def run(params, prompt_bt, pad_b):
        params = K.to_loop_layout(params)
        cache = kvc.init_cache(cfg, plan.batch, plan.cache_len, plan.num_slots, plan.track_latest)
        state_btd = jnp.zeros((plan.batch, GEN_LEN, cfg.d_model), jnp.dtype(cfg.dtype))
        out, cache = G.forward_block(params, plan, cache, G.token_input(params, cfg, prompt_bt),
                                     pad_b, 0, num_steps, state_btd, with_prefix=False)
        return out.logits_btv, cache

    return run, (params, jnp.asarray(prompt_bt), jnp.asarray(pad_b))


def _spy_attention(monkeypatch):
    """Record what `kernels.attention` asks `choose_attention` while a program is traced."""
    calls, choose = [], K.choose_attention

    def spy(platform, dtype, kind, length, with_cache=False, per_shard=True):
        chosen = choose(platform, dtype, kind, length, with_cache=with_cache, per_shard=per_shard)
        calls.append((kind, length, with_cache, chosen))
        return chosen

    monkeypatch.setattr(K, "choose_attention", spy)
    return calls


def test_padded_prefill_asks_for_segment_attention_and_keeps_its_numbers(monkeypatch):
    """On the CPU the prefill still runs the blocked kernel over the same mask: logits and
    cache bitwise as with the dense mask alone; the kernels are asked for SEGMENTS."""
    params = rdlm.init_params(GEN_CFG, jax.random.key(0))
    run, args = _prefill(params, GEN_CFG)
    calls = _spy_attention(monkeypatch)
    logits, cache = jax.jit(run)(*args)
    layers = GEN_CFG.n_prelude + GEN_CFG.n_core + GEN_CFG.n_coda
    assert calls == [(K.SEGMENTS, GEN_LEN, False, K.BLOCKED)] * layers

    engine_context = G.block_context

    def dense_context(cfg, pad_b, start, length, cache_len, with_prefix):
        ctx = engine_context(cfg, pad_b, start, length, cache_len, with_prefix)
        return dataclasses.replace(ctx, segment_ids_bt=None,
                                   mask_b1ts=_dense_block_mask(pad_b, start, length)[:, None])

    monkeypatch.setattr(G, "block_context", dense_context)
    run, args = _prefill(params, GEN_CFG)  # a new function: traced afresh
    want_logits, want_cache = jax.jit(run)(*args)
    assert calls[-1][0] == K.MASKED
    np.testing.assert_array_equal(logits, want_logits)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(jax.device_count() != 1, reason="the Pallas kernels run unsharded on one "
                    "device only")
@pytest.mark.parametrize("platform, dtype, kernel", [("tpu", "float32", K.SPLASH),
                                                     ("gpu", "bfloat16", K.GPU_FLASH)])
def test_padded_prefill_on_the_fused_kernels_matches_the_blocked_kernel(monkeypatch, platform,
                                                                        dtype, kernel):
    """The prefill traced for a TPU (splash) or a GPU (Pallas flash), both kernels in Pallas'
    interpreter: the logits and the cache's keys/values of the CPU's blocked kernel, the
    padding rows (one prompt is all padding but its last token) included."""
    cfg = dataclasses.replace(GEN_CFG, dtype=dtype)
    params = rdlm.init_params(cfg, jax.random.key(0))
    run, args = _prefill(params, cfg)
    want_logits, want_cache = jax.jit(run)(*args)

    monkeypatch.setattr(backend, "target_platform", lambda: platform)
    monkeypatch.setattr(P, "splash_attention",
                        functools.partial(P.splash_attention, interpret=True))
    monkeypatch.setattr(P, "gpu_flash_attention",
                        functools.partial(P.gpu_flash_attention, interpret=True))
    calls = _spy_attention(monkeypatch)
    run, args = _prefill(params, cfg)
    logits, cache = jax.jit(run)(*args)
    assert {c[3] for c in calls} == {kernel}
    # float32: the same math in another order, through 3 recurrence steps of 4 layers (measured
    # within 3e-7 of the largest entry); bfloat16: one rounding step of an 8-bit mantissa apart.
    tol = dict(float32=dict(rtol=0, atol=1e-5), bfloat16=dict(rtol=0, atol=1e-2))[dtype]
    for got, want in zip(jax.tree.leaves((logits, cache)), jax.tree.leaves((want_logits,
                                                                             want_cache))):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        scale = max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(got / scale, want / scale, **tol)


def test_padded_prefill_lowers_to_splash_for_a_tpu():
    """The whole generation program exported for TPU from the CPU (`jax.export`, no libtpu):
    the prompt's attention is the segmented splash kernel (a Mosaic custom call); decoding
    attends over the cache in the row-entries kernel, the cache held to its stored layout
    (layout constraints, which `jax.export` does not promise to keep: allowed here)."""
    params = rdlm.init_params(GEN_CFG, jax.random.key(0))
    plan = make_plan(GEN_CFG, GEN_ROWS, max_new_tokens=2, num_steps=GEN_STEPS,
                     prompt_len=GEN_LEN)
    prompt_bt, pad_b = left_pad(GEN_ROWS, GEN_LEN)
    program = jax.jit(functools.partial(programs._generate_program, plan=plan))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "target_platform", lambda: "tpu")
        calls = _spy_attention(patch)
        layouts = jax.export.DisabledSafetyCheck.custom_call("LayoutConstraint")
        exported = jax.export.export(program, platforms=["tpu"], disabled_checks=[layouts])(
            params, prompt_bt, pad_b, np.int32(GEN_STEPS), jax.random.key(0))
    module = exported.mlir_module()
    kernels = set(re.findall(r'kernel_name = "([^"]+)"', module))
    assert kernels == {"splash_mha_fwd_segmented_no_residuals", "row_entries_attention"}
    # Each cache write held to the stored layout: with heads of 24 features, the positions
    # innermost, except in one-position buffers (XLA lists the axes minor to major).
    constraint = (r'@LayoutConstraint.*?result_layouts = \[dense<\[([0-9, ]+)\]>'
                  r'.*?: \(tensor<([0-9x]+)x')
    held = [(tuple(int(n) for n in shape.split("x")), tuple(int(a) for a in axes.split(", ")))
            for axes, shape in re.findall(constraint, module)]
    assert {shape[-2] for shape, _ in held} == {1, GEN_LEN + 1}
    assert all(axes == RC.cache_layout(shape)[::-1] for shape, axes in held)
    assert RC.positions_innermost((GEN_LEN + 1, GEN_CFG.head_dim))
    assert {(kind, chosen) for kind, _, cache, chosen in calls if not cache} == {
        (K.SEGMENTS, K.SPLASH)}
    assert {(kind, chosen) for kind, _, cache, chosen in calls if cache} == {(K.MASKED, K.CACHE)}


def test_depth_continuous_decoding_lowers_to_the_triton_rows_kernel_for_a_gpu():
    """The depth-continuous program exported for GPU from the CPU (`jax.export`, no CUDA):
    attention over each row's own cache entries is the Triton row-entries kernel, and the
    cache is held to no TPU layout."""
    from rdlm.generation import api
    from rdlm.generation.continuous import _generate_rows
    from rdlm.generation.plan import continuous_plan
    params = rdlm.init_params(GEN_CFG, jax.random.key(0))
    rows = [row[:40] for row in GEN_ROWS]
    plan = continuous_plan(make_plan(GEN_CFG, rows, max_new_tokens=4, num_steps=GEN_STEPS,
                                     exit="kl", cache_budget=2), len(rows), 2)
    queue = api._queue(plan, rows, range(len(rows)))
    program = jax.jit(functools.partial(_generate_rows, plan=plan))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "target_platform", lambda: "gpu")
        triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        exported = jax.export.export(program, platforms=["cuda"], disabled_checks=[triton])(
            params, queue, np.int32(GEN_STEPS), np.float32(1e-3), np.int32(0),
            jax.random.key(0))
    module = exported.mlir_module()
    assert set(re.findall(r'name = "(gpu_row_entries_attention)"', module)) == {
        "gpu_row_entries_attention"}
    assert "LayoutConstraint" not in module
