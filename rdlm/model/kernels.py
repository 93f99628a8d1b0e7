"""Backend-specific kernels behind the model's matmuls and attention, chosen here and only here.

The model (`rdlm.model.model`) calls `dense`, `fused_projection`, `project` and `attention`; what
runs underneath depends on the backend and the shape:

- CPU: weight matmuls with a hand-written backward (`dense`), blocked causal attention that skips
  the key blocks above the diagonal (`causal_attention`), and, while decoding (few rows), the
  weights-first orientation that XLA:CPU's small-row matmuls prefer, with the weights stored once
  in the loop layout (`to_loop_layout`).
- GPU: plain causal attention in 16-bit floats goes to cuDNN's fused kernel.
- TPU: the same XLA paths; a Pallas kernel plugs in at `attention`.

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

from rdlm.model.attention import KV

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
    q_bhte = q_bthe.transpose(0, 2, 1, 3) * jnp.asarray(1.0 / math.sqrt(q_bthe.shape[-1]), dtype)
    k_bhse, v_bhse = k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3)
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits_bhts = jnp.einsum("bhte,bhse->bhts", q_bhte[:, :, lo:hi], k_bhse[:, :, :hi],
                                 preferred_element_type=jnp.float32)
        visible_ts = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
        if mask_b1ts is not None:
            visible_ts = visible_ts & mask_b1ts[:, :, lo:hi, :hi]
        logits_bhts = jnp.where(visible_ts, logits_bhts, MASKED_LOGIT)
        weights_bhts = jnp.exp(logits_bhts - logits_bhts.max(-1, keepdims=True))
        out_bhte = jnp.einsum("bhts,bhse->bhte", weights_bhts.astype(dtype), v_bhse[:, :, :hi],
                              preferred_element_type=jnp.float32)
        outs.append((out_bhte / weights_bhts.sum(-1, keepdims=True)).astype(dtype))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def attend_with_prefix(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array, prefix: KV,
                       mask_b1ts: jax.Array | None) -> jax.Array:
    """Attention of a block of queries over cached keys/values and the block's own (decoding).

    ``prefix`` is ``[b, h, s, e]`` (the cache layout); ``mask_b1ts`` covers the s cached and the t
    new keys (None: every cached key visible, causal within the block). The same computation as
    `jax.nn.dot_product_attention` over the concatenated keys (float32 scores and softmax), but
    the cache is never concatenated or transposed: both copied the whole cache in every layer and
    step, which was half of batch-16 decoding time on CPU.
    """
    dtype = q_bthe.dtype
    keys_bhse, values_bhse = (x.astype(dtype) for x in prefix)
    s, t = keys_bhse.shape[2], q_bthe.shape[1]
    q_bhte = q_bthe.transpose(0, 2, 1, 3)
    k_bhue, v_bhue = k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3)
    scores = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    logits_bhts = jnp.concatenate([scores("bhte,bhse->bhts", q_bhte, keys_bhse),
                                   scores("bhte,bhue->bhtu", q_bhte, k_bhue)], axis=-1)
    logits_bhts = logits_bhts * (1.0 / math.sqrt(q_bthe.shape[-1]))
    if mask_b1ts is None:
        mask_b1ts = (jnp.arange(s + t)[None, :] <= jnp.arange(t)[:, None] + s)[None, None]
    logits_bhts = jnp.where(mask_b1ts, logits_bhts, MASKED_LOGIT)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(dtype)
    out_bhte = (jnp.einsum("bhts,bhse->bhte", probs_bhts[..., :s], values_bhse)
                + jnp.einsum("bhtu,bhue->bhte", probs_bhts[..., s:], v_bhue))
    return out_bhte.transpose(0, 2, 1, 3)



def _cudnn_attention(q_bthe: jax.Array, mask_b1ts: jax.Array | None) -> bool:
    """Whether plain causal attention goes to cuDNN's fused kernel: on a GPU, in 16-bit floats,
    with no mask beyond causality (packed segments and branches take `causal_attention`)."""
    return (mask_b1ts is None and q_bthe.dtype in (jnp.bfloat16, jnp.float16)
            and jax.default_backend() == "gpu")


def attention(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
              mask_b1ts: jax.Array | None, kv_prefix: KV | None = None) -> jax.Array:
    """Attention of a block of queries over its own keys, after ``kv_prefix`` (a cache) if given.

    Without a prefix the attention is causal and ``mask_b1ts`` (None: plain causal) may only
    remove keys; with one, ``mask_b1ts`` covers the cached and the new keys.
    """
    if kv_prefix is not None:
        return attend_with_prefix(q_bthe, k_bthe, v_bthe, kv_prefix, mask_b1ts)
    if _cudnn_attention(q_bthe, mask_b1ts):
        return jax.nn.dot_product_attention(q_bthe, k_bthe, v_bthe, is_causal=True,
                                            implementation="cudnn")
    return causal_attention(q_bthe, k_bthe, v_bthe, mask_b1ts)


# Decoding-time weight layout. XLA's CPU dot computes the weights-first projections above as
# W^T·x^T and, inside a loop, would transpose those weights again at every recurrence step (more
# memory traffic than the matmul itself at batch 1). Laying them out once before the loops, behind
# an optimization barrier so that the two transposes cannot cancel, turns the per-step transpose
# into a free re-interpretation. [d,3,h,e] → [3,h,e,d]; [d,2,m] → [2,m,d]; the unfused projections
# [in, out] → [out, in].
_LOOP_ORDER = {"wqkv": (1, 2, 3, 0), "fc": (1, 2, 0), "proj": (1, 0), "adapter": (1, 0)}


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
