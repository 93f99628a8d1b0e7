"""Backend-specific kernels behind the model's matmuls and attention, chosen here and only here.

The model (`rdlm.model.model`) calls `dense`, `fused_projection`, `project` and `attention`; what
runs underneath depends on the backend and the shape:

- CPU: weight matmuls with a hand-written backward (`dense`), blocked causal attention that skips
  the key blocks above the diagonal (`causal_attention`), and, while decoding (few rows), the
  weights-first orientation that XLA:CPU's small-row matmuls prefer, with the weights stored once
  in the loop layout (`to_loop_layout`).
- GPU: plain causal attention in 16-bit floats goes to cuDNN's fused kernel; causal attention
  within packed segments to a Pallas flash kernel (`rdlm.model.pallas_attention`), since JAX's
  cuDNN attention takes padding lengths but not segment ids.
- TPU: causal attention, plain or within packed segments, goes to the Pallas splash kernel,
  where the program runs whole on each device or is split by a mesh passed in or named as its
  context (`backend.runs_per_device`, `backend.shard_mesh`); XLA cannot partition a kernel
  inside a program it partitions itself.
- Everywhere: other masks (branches) and attention over a KV cache use the XLA paths here.
- Decoding with every row at its own position: attention over each row's own cache entries
  (`attend_with_prefix` of a `RowEntries` prefix) is, on TPU, a Pallas kernel that reads them
  by index where they lie (`pallas_decode.row_entries_attention`, per shard of the mesh a
  partitioned program names: `backend.shard_mesh`), or row by row where XLA partitions a
  program that names none; how those entries are laid out, written and read is
  `rdlm.model.row_cache`.

`choose_attention` is the whole decision, a pure function of the target platform, dtype, mask
kind and shape.

Measured effects of each choice are in docs/performance.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rdlm.model import backend, pallas_attention, pallas_decode, row_cache
from rdlm.model.attention import KV, RowEntries

@jax.custom_vjp
def dense(x: jax.Array, w_dk: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of x, with a hand-written backward: the product's input is
    the residual, the input gradient is ``dy @ wᵀ`` and the weight gradient one contraction over
    every leading axis.

    The same math as autodiff, but XLA:CPU compiles autodiff of the plain product into a slower
    backward (docs/performance.md). Ordering the two gradients with an optimisation barrier
    changes nothing: the CPU pipeline drops barriers before scheduling.
    """
    return x @ w_dk


def _dense_fwd(x: jax.Array, w_dk: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w_dk, (x, w_dk)


def _dense_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w_dk = res
    return dy @ w_dk.T, jnp.einsum("...d,...k->dk", x, dy)


dense.defvjp(_dense_fwd, _dense_bwd)


# Up to this many query rows (batch x new positions) a matmul counts as decoding: `fused_projection`
# and `project` then multiply weights-first, which reads the weights contiguously when the
# generation engine has stored them once in the loop layout (`to_loop_layout`). Both sides of that
# contract live in this file.
DECODE_ROWS = 64


def fused_projection(x_btd: jax.Array, w_dk: jax.Array) -> list[jax.Array]:
    """``x @ w`` for a fused weight ``[d, k, ...]`` (q/k/v, gate/up): the k outputs ``[b, t, ...]``.

    Both branches compute the same contraction; only the layout differs. Decoding (few rows): the
    weights are the traffic, and the fused axis outermost lets XLA read the loop-layout weights
    (`to_loop_layout`) contiguously. Training and prefill: the activations are the
    traffic, and each part gets its own matmul with a contiguous output. One matmul over the
    whole fused weight leaves the parts as strided slices of its output, which XLA:CPU's backward
    transposes with the consuming elementwise ops fused in, far slower than a plain transpose; an
    outermost fused axis makes it transpose the activations in both passes (docs/performance.md).
    """
    b, t, _ = x_btd.shape
    w_dk = w_dk.astype(x_btd.dtype)
    if b * t <= DECODE_ROWS:
        out_kbt = jnp.einsum("btd,dk...->kbt...", x_btd, w_dk)
        return [out_kbt[i] for i in range(w_dk.shape[1])]
    return [dense(x_btd, w_dk[:, i].reshape(w_dk.shape[0], -1)).reshape(b, t, *w_dk.shape[2:])
            for i in range(w_dk.shape[1])]


def project(x_btd: jax.Array, w_dk: jax.Array) -> jax.Array:
    """``x @ w`` for an unfused weight ``[d, k]`` (output projections, the core's adapter).

    Decoding (few rows) computes it weights-first, ``wᵀ xᵀ``: XLA:CPU's small-row matmuls run
    faster with the weight as the left operand, provided the weight is stored ``[k, d]``
    (`to_loop_layout`). Training and prefill: `dense`.
    """
    b, t, _ = x_btd.shape
    w_dk = w_dk.astype(x_btd.dtype)
    if b * t <= DECODE_ROWS:
        return jnp.einsum("btd,dk->kbt", x_btd, w_dk).transpose(1, 2, 0)
    return dense(x_btd, w_dk)


def output_logits(hidden_btd: jax.Array, w_vd: jax.Array) -> jax.Array:
    """Float32 logits ``h wᵀ`` for an output weight stored ``[vocab, d]`` (the tied embedding,
    or ``lm_head`` in the loop layout).

    Decoding (few rows) computes them weights-first, ``w hᵀ``: at 16 rows XLA:CPU's
    ``[16, 512] × [512, 4,096]`` takes ~3.3 ms with the hidden states as the left operand and
    ~0.85 ms with the weight (docs/performance.md). Adaptive exit by the distribution criteria
    runs the head at every recurrence step, so this is most of what a step's check costs beyond
    the coda. Training and prefill: the plain contraction.
    """
    b, t, _ = hidden_btd.shape
    w_vd = w_vd.astype(hidden_btd.dtype)
    if b * t <= DECODE_ROWS:
        return jnp.einsum("btd,vd->vbt", hidden_btd, w_vd,
                          preferred_element_type=jnp.float32).transpose(1, 2, 0)
    return jnp.einsum("btd,vd->btv", hidden_btd, w_vd, preferred_element_type=jnp.float32)


# The float32 score of a hidden key: finite, so a row with no visible key stays finite (uniform).
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)

# Causal attention splits its queries into this many row blocks (each at least
# `CAUSAL_BLOCK_MIN_ROWS` long), so the key blocks above the diagonal are never computed.
CAUSAL_BLOCKS = 4
CAUSAL_BLOCK_MIN_ROWS = 64


def causal_attention(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                     mask_b1ts: jax.Array | None) -> jax.Array:
    """Causal attention of t queries over their own t keys; ``mask_b1ts`` (None: plain causal)
    may only remove keys from the causal set (segments, branches, padding), never add later ones.

    Query block i attends to keys ``[0, end_i)`` only, which skips 3/8 of the score and value
    matmuls at 4 blocks; the softmax normaliser is applied to the [t, e] output instead of the
    [t, s] probabilities. Scores and softmax in float32. On CPU this beats
    `jax.nn.dot_product_attention`, which always takes XLA's dense path (docs/performance.md).
    """
    dtype = q_bthe.dtype
    t = q_bthe.shape[1]
    n = max(1, min(CAUSAL_BLOCKS, t // CAUSAL_BLOCK_MIN_ROWS))
    bounds = [round(i * t / n) for i in range(n + 1)]
    q_bkgte = grouped_queries(q_bthe * jnp.asarray(1.0 / math.sqrt(q_bthe.shape[-1]), dtype),
                              k_bthe.shape[2])
    k_bkse, v_bkse = k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3)
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits_bkgts = jnp.einsum("bkgte,bkse->bkgts", q_bkgte[..., lo:hi, :],
                                  k_bkse[:, :, :hi], preferred_element_type=jnp.float32)
        visible_ts = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
        if mask_b1ts is not None:
            visible_ts = visible_ts & mask_b1ts[:, :, None, lo:hi, :hi]
        logits_bkgts = jnp.where(visible_ts, logits_bkgts, MASKED_LOGIT)
        weights_bkgts = jnp.exp(logits_bkgts - logits_bkgts.max(-1, keepdims=True))
        out_bkgte = jnp.einsum("bkgts,bkse->bkgte", weights_bkgts.astype(dtype),
                               v_bkse[:, :, :hi], preferred_element_type=jnp.float32)
        outs.append((out_bkgte / weights_bkgts.sum(-1, keepdims=True)).astype(dtype))
    return ungrouped(jnp.concatenate(outs, axis=3))


def grouped_queries(q_bthe: jax.Array, kv_heads: int) -> jax.Array:
    """[b, t, h, e] queries as [b, kv_heads, h / kv_heads, t, e]: grouped-query attention, in
    which each key/value head serves a group of consecutive query heads, without copying keys
    or values per query head (one group per head when kv_heads = h)."""
    b, t, h, e = q_bthe.shape
    return q_bthe.transpose(0, 2, 1, 3).reshape(b, kv_heads, h // kv_heads, t, e)


def ungrouped(out_bkgte: jax.Array) -> jax.Array:
    """The inverse of `grouped_queries`, for the attention output: [b, t, h, e]."""
    b, k, g, t, e = out_bkgte.shape
    return out_bkgte.reshape(b, k * g, t, e).transpose(0, 2, 1, 3)


def repeat_kv(x_bthe: jax.Array, heads: int) -> jax.Array:
    """Keys or values with each of their heads repeated for its group of query heads, for the
    fused kernels that take equal head counts."""
    return jnp.repeat(x_bthe, heads // x_bthe.shape[2], axis=2)


def attend_with_prefix(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                       prefix: KV | RowEntries, mask_b1ts: jax.Array | None) -> jax.Array:
    """Attention of a block of queries over cached keys/values and the block's own (decoding).

    ``prefix`` is ``[b, h, s, e]`` (the cache layout), or each row's own entries of a larger
    buffer (`RowEntries`); ``mask_b1ts`` covers the s cached and the t new keys (None: every
    cached key visible, causal within the block). The same computation as `jax.nn.dot_product_attention`
    over the concatenated keys (float32 scores and softmax), but the cache is never
    concatenated or transposed: both copied the whole cache in every layer and step, which was
    half of batch-16 decoding time on CPU.
    """
    if isinstance(prefix, RowEntries):
        how = row_cache.choose_row_attention(backend.target_platform(),
                                             backend.pallas_runs())
        if how == row_cache.ROWS_KERNEL:
            return _attend_rows_kernel(q_bthe, k_bthe, v_bthe, prefix, mask_b1ts)
        if how == row_cache.SLICES:
            return _attend_row_by_row(q_bthe, k_bthe, v_bthe, prefix, mask_b1ts)
        prefix = row_cache.row_entries(prefix)
    dtype = q_bthe.dtype
    keys_bkse, values_bkse = (x.astype(dtype) for x in prefix)
    s, t = keys_bkse.shape[2], q_bthe.shape[1]
    q_bkgte = grouped_queries(q_bthe, k_bthe.shape[2])
    k_bkue, v_bkue = k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3)
    scores = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    logits_bkgts = jnp.concatenate([scores("bkgte,bkse->bkgts", q_bkgte, keys_bkse),
                                    scores("bkgte,bkue->bkgtu", q_bkgte, k_bkue)], axis=-1)
    logits_bkgts = logits_bkgts * (1.0 / math.sqrt(q_bthe.shape[-1]))
    if mask_b1ts is None:
        mask_b1ts = (jnp.arange(s + t)[None, :] <= jnp.arange(t)[:, None] + s)[None, None]
    logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, MASKED_LOGIT)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dtype)
    out_bkgte = (jnp.einsum("bkgts,bkse->bkgte", probs_bkgts[..., :s], values_bkse)
                 + jnp.einsum("bkgtu,bkue->bkgte", probs_bkgts[..., s:], v_bkue))
    return ungrouped(out_bkgte)



def _attend_rows_kernel(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                        prefix: RowEntries, mask_b1ts: jax.Array | None) -> jax.Array:
    """`attend_with_prefix` of a `RowEntries` prefix in the Pallas kernel that reads each row's
    entries where they lie (`pallas_decode.row_entries_attention` on TPU,
    `pallas_decode.gpu_row_entries_attention` on GPU), per shard of the mesh the program names
    (`backend.shard_mesh`): the model's layout and masks turned into the kernel's, each KV head
    with its group's query rows."""
    b, t, h, e = q_bthe.shape
    kh, s = k_bthe.shape[2], prefix.buffers[0].shape[-2]
    g = h // kh
    if mask_b1ts is None:
        mask_b1ts = (jnp.arange(s + t)[None, :] <= jnp.arange(t)[:, None] + s)[None, None]
    visible_bgts = jnp.broadcast_to(mask_b1ts, (b, g, t, s + t)).astype(jnp.int32)
    visible_brs = visible_bgts.reshape(b, g * t, s + t)
    use_b1s = None if prefix.fallback is None else prefix.use_b1t1[..., 0].astype(jnp.int32)
    on_tpu = backend.target_platform() == "tpu"
    attend = (pallas_decode.row_entries_attention if on_tpu else
              pallas_decode.gpu_row_entries_attention)
    mesh = backend.shard_mesh()
    if mesh is not None:
        attend = functools.partial(pallas_decode.row_entries_attention_per_shard, mesh, attend)
    out_bkre = attend(
        grouped_queries(q_bthe, kh).reshape(b, kh, g * t, e), prefix.buffers, prefix.index,
        visible_brs[..., :s], k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3),
        visible_brs[..., s:], prefix.fallback, use_b1s, masked_logit=MASKED_LOGIT,
        positions_minor=on_tpu and row_cache.positions_innermost(prefix.buffers[0].shape))
    return ungrouped(out_bkre.reshape(b, kh, g, t, e))


def _attend_row_by_row(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                       prefix: RowEntries, mask_b1ts: jax.Array | None) -> jax.Array:
    """`attend_with_prefix` one row at a time, each over its own entries sliced where they lie
    (on TPU where the row-entries kernel cannot run: `choose_row_attention`). Stacking every
    row's entries into one array first writes and reads them again at
    every layer: for each row's own recurrence slot, 1.6 times a lockstep core step's traffic
    at Huginn-0125's shape, against about one row by row (XLA's cost model,
    docs/performance.md)."""
    return jnp.concatenate([
        attend_with_prefix(q_bthe[row:row + 1], k_bthe[row:row + 1], v_bthe[row:row + 1],
                           row_cache.row_entries(prefix, row_cache.SLICES, row),
                           None if mask_b1ts is None else mask_b1ts[row:row + 1])
        for row in range(q_bthe.shape[0])])


# What `attention` runs: XLA's blocked causal attention, attention over a KV cache, cuDNN's
# fused kernel, TPU splash attention or the Pallas GPU flash kernel.
BLOCKED, CACHE, CUDNN, SPLASH, GPU_FLASH = "blocked", "cache", "cudnn", "splash", "gpu_flash"
# The mask kinds: none beyond causality; causal within packed segments (ids, no [b, t, s] mask
# needed); any other mask that only removes keys (branches).
CAUSAL, SEGMENTS, MASKED = "causal", "segments", "masked"


def choose_attention(platform: str, dtype: Any, mask_kind: str, length: int,
                     with_cache: bool = False, per_shard: bool = True) -> str:
    """Which kernel computes attention of ``length`` queries on ``platform`` ("cpu", "gpu",
    "tpu"), in ``dtype``, under a ``mask_kind`` mask; ``with_cache``: over a KV cache too.
    ``per_shard``: whether a Pallas kernel can be run per shard (there is a mesh, or a single
    device): XLA cannot partition a Pallas kernel itself and refuses to compile one in a
    program sharded over several devices.

    - A cache (decoding, verification): `attend_with_prefix` everywhere. Its masks are arbitrary
      (exited tokens read older slots, cache sharing), which no fused kernel takes, and its two
      dots read the cache once (docs/performance.md weighs a ragged TPU kernel).
    - TPU: splash attention for causal and segment masks whenever 128 divides the length.
    - GPU, 16-bit: cuDNN for plain causal attention, the Pallas flash kernel for segments.
      Float32 stays on XLA (both fused kernels would compute the dots at lower precision).
    - Otherwise (CPU, branch masks, odd lengths): the blocked XLA attention.
    """
    if with_cache:
        return CACHE
    if mask_kind not in (CAUSAL, SEGMENTS):
        return BLOCKED
    if platform == "tpu" and per_shard and pallas_attention.splash_block(length) is not None:
        return SPLASH
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        if mask_kind == CAUSAL:  # XLA partitions cuDNN's kernel itself
            return CUDNN
        if per_shard and pallas_attention.gpu_flash_fits(length):
            return GPU_FLASH
    return BLOCKED


def mask_kind(mask_b1ts: jax.Array | None, segment_ids_bt: jax.Array | None) -> str:
    """`CAUSAL` without a mask, `SEGMENTS` when the mask is exactly "same segment" (the ids are
    given), `MASKED` for any other mask."""
    if mask_b1ts is None and segment_ids_bt is None:
        return CAUSAL
    return SEGMENTS if segment_ids_bt is not None else MASKED


def attention(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
              mask_b1ts: jax.Array | None, kv_prefix: KV | None = None, *,
              segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """Attention of a block of queries over its own keys, after ``kv_prefix`` (a cache) if given.

    Without a prefix the attention is causal and ``mask_b1ts`` (None: plain causal) may only
    remove keys; ``segment_ids_bt`` says that the mask is exactly causal within equal ids (the
    fused kernels take the ids instead of the mask). With a prefix, ``mask_b1ts`` covers the
    cached and the new keys. Over a mesh the fused kernels run per shard of the mesh the
    program names (`backend.shard_mesh`).
    """
    mesh = backend.shard_mesh()
    kind = choose_attention(backend.target_platform(), q_bthe.dtype,
                            mask_kind(mask_b1ts, segment_ids_bt), q_bthe.shape[1],
                            with_cache=kv_prefix is not None, per_shard=backend.pallas_runs())
    if kind == CACHE:
        return attend_with_prefix(q_bthe, k_bthe, v_bthe, kv_prefix, mask_b1ts)
    if kind == CUDNN:
        return jax.nn.dot_product_attention(q_bthe, k_bthe, v_bthe, is_causal=True,
                                            implementation="cudnn")
    heads = q_bthe.shape[2]
    if kind == SPLASH:
        return pallas_attention.splash_attention(q_bthe, repeat_kv(k_bthe, heads),
                                                 repeat_kv(v_bthe, heads), segment_ids_bt,
                                                 mesh=mesh)
    if kind == GPU_FLASH:
        return pallas_attention.gpu_flash_attention(q_bthe, repeat_kv(k_bthe, heads),
                                                    repeat_kv(v_bthe, heads), segment_ids_bt,
                                                    mesh=mesh)
    return causal_attention(q_bthe, k_bthe, v_bthe, mask_b1ts)


# Decoding-time weight layout. XLA's CPU dot computes the weights-first projections above as
# W^T·x^T and, inside a loop, would transpose those weights again at every recurrence step (more
# memory traffic than the matmul itself at batch 1). Laying them out once before the loops, behind
# an optimization barrier so that the two transposes cannot cancel, turns the per-step transpose
# into a free re-interpretation. [d,3,h,e] → [3,h,e,d]; [d,2,m] → [2,m,d]; the unfused projections
# [in, out] → [out, in] ([d,h,e] → [h,e,d]); an untied output head [d, vocab] → [vocab, d], the
# tied embedding's layout (`output_logits`).
_LOOP_ORDER = {"wqkv": (1, 2, 3, 0), "wkv": (1, 2, 3, 0), "wq": (1, 2, 0), "fc": (1, 2, 0),
               "proj": (1, 0), "adapter": (1, 0), "lm_head": (1, 0)}


def _map_named(params: Any, fn: Any) -> Any:
    def visit(name: str, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: visit(k, v) for k, v in node.items()}
        return fn(name, node)
    return visit("", params)


def to_loop_layout(params: Any) -> Any:
    """Params with the decoding-time projections stored transposed (call once, outside loops)."""
    return _map_named(params, lambda name, x: lax.optimization_barrier(
        jnp.transpose(x, _LOOP_ORDER[name])) if name in _LOOP_ORDER else x)


def from_loop_layout(params: Any) -> Any:
    """The inverse of `to_loop_layout`, for binding the model inside a loop: the transposes
    happen at each use, where XLA folds them into the weights-first matmuls."""
    return _map_named(params, lambda name, x: jnp.transpose(
        x, np.argsort(_LOOP_ORDER[name])) if name in _LOOP_ORDER else x)
