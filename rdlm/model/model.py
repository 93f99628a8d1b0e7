"""The recurrent-depth language model (Huginn-0125 architecture, SPEC §1), top to bottom.

    tokens ─ prelude ─▶ e ──┐
                            ▼
    s_0 (noise) ─▶ [ adapter(concat[s, e]) ─▶ core blocks ] × r ─▶ s_r
                                                                    │
    logits ◀─ wte^T ◀─ ln_f ◀─ coda ◀─ ln_f ◀───────────────────────┘

The layers are Flax NNX modules; everything else in the library uses the pure functions of
`rdlm.model.functional` (`init_params`, `forward`, `core_step`, `lm_loss`) on one nested-dict
params pytree. Modules are rebuilt from that dict with `nnx.merge` inside the traced function, so no
module state ever crosses a `jax.jit` boundary.

Weights are stored as ``[in, out]`` (the Huginn/PyTorch layout is ``[out, in]``; `rdlm.interop`
transposes). Fused projections keep their fused leading structure as explicit axes
(``wqkv: [d, 3, heads, head_dim]``, ``fc: [d, 2, mlp]``) so tensor parallelism can shard heads and
MLP units without cutting through the q/k/v or gate/up boundaries.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from rdlm.config import ModelConfig
from rdlm.model.attention import (KV, AttentionContext, apply_rope, apply_rope_half,
                                  previous_positions, previous_tokens)
from rdlm.model.kernels import attention, fused_projection, output_logits, project
from rdlm.model.remat import RematPlan, checkpointed_block

Params = dict[str, Any]


def _truncated_normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    """Truncated normal at ±3σ, float32 (parameters are always stored in float32)."""
    return std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)


def _param(value: jax.Array, *axes: str | None) -> nnx.Param:
    """A parameter tagged with logical axis names; `rdlm.runtime.sharding` maps them to mesh axes."""
    assert len(axes) == value.ndim, (axes, value.shape)
    return nnx.Param(value, axes=tuple(axes))


# ---------------------------------------------------------------------------------------------
# Layers.


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back, *then* scaled by the weight (Huginn's order)."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return normed * weight.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.weight = _param(jnp.ones((cfg.d_model,), jnp.float32), "norm")
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """Causal multi-head attention: fused Wqkv, q/k bias before interleaved RoPE, no other biases."""

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, h, e = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.wqkv = _param(_truncated_normal(rngs, (d, 3, h, e), cfg.init_std),
                           "embed", None, "heads", "head_dim")
        self.qk_bias = (_param(jnp.zeros((2, 1, h, e), jnp.float32), None, None, "heads", "head_dim")
                        if cfg.qk_bias else None)
        self.proj = _param(_truncated_normal(rngs, (d, d), out_std), "heads", "embed")

    def __call__(self, x_btd: jax.Array, ctx: AttentionContext,
                 kv_prefix: KV | None = None) -> tuple[jax.Array, KV]:
        """Attend over ``kv_prefix`` (e.g. a cache; ``ctx.mask`` covers prefix + new keys) and x.

        Returns the output and this call's own (post-RoPE) keys and values, for a cache to store.
        """
        dtype = x_btd.dtype
        b, t, d = x_btd.shape
        # The names are what the remat policies (`rdlm.model.remat.REMAT_SAVES`) may keep for
        # the backward pass.
        q_bthe, k_bthe, v_bthe = (checkpoint_name(x, name) for x, name in zip(
            fused_projection(x_btd, self.wqkv[...]), ("q_proj", "k_proj", "v_proj")))
        if self.qk_bias is not None:
            bias = self.qk_bias[...].astype(dtype)
            q_bthe, k_bthe = q_bthe + bias[0], k_bthe + bias[1]
        q_bthe = checkpoint_name(apply_rope(q_bthe, ctx.rope_cos_bt1f, ctx.rope_sin_bt1f), "query")
        k_bthe = checkpoint_name(apply_rope(k_bthe, ctx.rope_cos_bt1f, ctx.rope_sin_bt1f), "key")
        v_bthe = checkpoint_name(v_bthe, "value")
        out_bthe = attention(q_bthe, k_bthe, v_bthe, ctx.mask_b1ts, kv_prefix,
                             segment_ids_bt=ctx.segment_ids_bt)
        out_bthe = checkpoint_name(out_bthe, "attention_out")
        out_btd = checkpoint_name(project(out_bthe.reshape(b, t, d), self.proj[...]), "out_proj")
        return out_btd, (k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3))


class GatedMLP(nnx.Module):
    """proj(silu(gate) * up) with one fused fc whose output splits into [gate, up]."""

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, m = cfg.d_model, cfg.mlp_dim
        self.fc = _param(_truncated_normal(rngs, (d, 2, m), cfg.init_std), "embed", None, "mlp")
        self.proj = _param(_truncated_normal(rngs, (m, d), out_std), "mlp", "embed")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btm, up_btm = (checkpoint_name(x, name) for x, name in zip(
            fused_projection(x_btd, self.fc[...]), ("mlp_gate", "mlp_up")))
        return checkpoint_name(project(jax.nn.silu(gate_btm) * up_btm, self.proj[...]), "mlp_out")


class LlamaAttention(nnx.Module):
    """Grouped-query attention of the llama block: separate q and fused k/v projections with
    ``kv_heads`` key/value heads, optional q/k/v/out biases, rotate-half RoPE."""

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, h, kvh, e = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = _param(_truncated_normal(rngs, (d, h, e), cfg.init_std),
                         "embed", "heads", "head_dim")
        self.wkv = _param(_truncated_normal(rngs, (d, 2, kvh, e), cfg.init_std),
                          "embed", None, "kv_heads", "head_dim")
        self.proj = _param(_truncated_normal(rngs, (d, d), out_std), "heads", "embed")
        if cfg.attn_bias:
            self.q_bias = _param(jnp.zeros((h, e), jnp.float32), "heads", "head_dim")
            self.kv_bias = _param(jnp.zeros((2, kvh, e), jnp.float32), None, "kv_heads",
                                  "head_dim")
            self.proj_bias = _param(jnp.zeros((d,), jnp.float32), "norm")
        else:
            self.q_bias = self.kv_bias = self.proj_bias = None

    def __call__(self, x_btd: jax.Array, ctx: AttentionContext,
                 kv_prefix: KV | None = None) -> tuple[jax.Array, KV]:
        """As `Attention.__call__`; the keys and values returned have ``kv_heads`` heads."""
        dtype = x_btd.dtype
        b, t, d = x_btd.shape
        wq = self.wq[...]
        q_bthe = project(x_btd, wq.reshape(d, -1)).reshape(b, t, *wq.shape[1:])
        k_bthe, v_bthe = fused_projection(x_btd, self.wkv[...])
        if self.q_bias is not None:
            kv_bias = self.kv_bias[...].astype(dtype)
            q_bthe = q_bthe + self.q_bias[...].astype(dtype)
            k_bthe, v_bthe = k_bthe + kv_bias[0], v_bthe + kv_bias[1]
        q_bthe, k_bthe, v_bthe = (checkpoint_name(x, name) for x, name in zip(
            (q_bthe, k_bthe, v_bthe), ("q_proj", "k_proj", "v_proj")))
        q_bthe = checkpoint_name(apply_rope_half(q_bthe, ctx.rope_cos_bt1f, ctx.rope_sin_bt1f),
                                 "query")
        k_bthe = checkpoint_name(apply_rope_half(k_bthe, ctx.rope_cos_bt1f, ctx.rope_sin_bt1f),
                                 "key")
        v_bthe = checkpoint_name(v_bthe, "value")
        out_bthe = attention(q_bthe, k_bthe, v_bthe, ctx.mask_b1ts, kv_prefix,
                             segment_ids_bt=ctx.segment_ids_bt)
        out_bthe = checkpoint_name(out_bthe, "attention_out")
        out_btd = project(out_bthe.reshape(b, t, d), self.proj[...])
        if self.proj_bias is not None:
            out_btd = out_btd + self.proj_bias[...].astype(dtype)
        out_btd = checkpoint_name(out_btd, "out_proj")
        return out_btd, (k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3))


class LlamaBlock(nnx.Module):
    """x = x + attn(norm_1(x)); x = x + mlp(norm_2(x)): the pre-norm block of Llama-family
    checkpoints (`ModelConfig.block` = "llama")."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.effective_depth)
        self.norm_1, self.norm_2 = RMSNorm(cfg), RMSNorm(cfg)
        self.attn = LlamaAttention(cfg, out_std, rngs=rngs)
        self.mlp = GatedMLP(cfg, out_std, rngs=rngs)

    def __call__(self, x_btd: jax.Array, ctx: AttentionContext,
                 kv_prefix: KV | None = None) -> tuple[jax.Array, KV]:
        attn_btd, kv = self.attn(self.norm_1(x_btd), ctx, kv_prefix)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.norm_2(x_btd)), kv


class SandwichBlock(nnx.Module):
    """x = norm2(x + attn(norm1(x))); x = norm4(x + mlp(norm3(x)))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # "takase" init: out-projections shrink with the effective (unrolled) depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.effective_depth)
        self.norm_1, self.norm_2 = RMSNorm(cfg), RMSNorm(cfg)
        self.norm_3, self.norm_4 = RMSNorm(cfg), RMSNorm(cfg)
        self.attn = Attention(cfg, out_std, rngs=rngs)
        self.mlp = GatedMLP(cfg, out_std, rngs=rngs)

    def __call__(self, x_btd: jax.Array, ctx: AttentionContext,
                 kv_prefix: KV | None = None) -> tuple[jax.Array, KV]:
        attn_btd, kv = self.attn(self.norm_1(x_btd), ctx, kv_prefix)
        x_btd = self.norm_2(x_btd + attn_btd)
        x_btd = self.norm_4(x_btd + self.mlp(self.norm_3(x_btd)))
        return x_btd, kv


Block = SandwichBlock | LlamaBlock


def make_block(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Block:
    """One block of ``cfg.block``'s family."""
    return (LlamaBlock if cfg.block == "llama" else SandwichBlock)(cfg, rngs=rngs)


def run_blocks(blocks: nnx.List, x_btd: jax.Array, ctx: AttentionContext,
               kv_prefixes: list[KV] | None = None, remat: RematPlan | None = None
               ) -> tuple[jax.Array, list[KV]]:
    """A stack of blocks (a handful: unrolled); returns each block's new keys/values.

    ``remat``: rematerialise each block in the backward pass when ``remat.blocks`` (training).
    """
    kvs = []
    for i, block in enumerate(blocks):
        if remat is not None and remat.blocks and kv_prefixes is None:
            x_btd, kv = checkpointed_block(block, remat.policy)(x_btd, ctx)
        else:
            x_btd, kv = block(x_btd, ctx, None if kv_prefixes is None else kv_prefixes[i])
        kvs.append(kv)
    return x_btd, kvs


class RecurrentCore(nnx.Module):
    """One recurrence step: s ← core_blocks(adapter(concat[s, e]))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        if cfg.adapter_init == "identity":  # x = s + e at init (an rdlm extension)
            adapter = jnp.concatenate([jnp.eye(d), jnp.eye(d)], axis=0)
        elif cfg.adapter_init == "embedding":  # x = e at init, whatever the state (retrofit)
            adapter = jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)], axis=0)
        else:
            adapter = _truncated_normal(rngs, (2 * d, d), cfg.init_std)
        self.adapter = _param(adapter, "adapter_in", "embed")
        self.blocks = nnx.List([make_block(cfg, rngs=rngs) for _ in range(cfg.n_core)])

    def __call__(self, state_btd: jax.Array, embedded_btd: jax.Array, ctx: AttentionContext,
                 kv_prefixes: list[KV] | None = None) -> tuple[jax.Array, list[KV]]:
        # State first, then e: the order the published adapter weights expect.
        x_btd = jnp.concatenate([state_btd, embedded_btd.astype(state_btd.dtype)], axis=-1)
        x_btd = checkpoint_name(project(x_btd, self.adapter[...]), "adapter")
        return run_blocks(self.blocks, x_btd, ctx, kv_prefixes)


class RecurrentDepthLM(nnx.Module):
    """Prelude, recurrent core and coda; the embedding doubles as the output head unless
    ``cfg.tie_embeddings`` is false."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = _param(_truncated_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std),
                          "vocab", "embed")
        self.prelude = nnx.List([make_block(cfg, rngs=rngs) for _ in range(cfg.n_prelude)])
        self.core = RecurrentCore(cfg, rngs=rngs)
        self.coda = nnx.List([make_block(cfg, rngs=rngs) for _ in range(cfg.n_coda)])
        self.ln_f = RMSNorm(cfg)
        self.lm_head = (None if cfg.tie_embeddings else _param(
            _truncated_normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std),
            "embed", "vocab"))
        # Zero-initialised: a fresh model computes exactly what it would without the extension.
        self.token_shift = (_param(jnp.zeros((cfg.token_shift, cfg.d_model, cfg.d_model),
                                             jnp.float32), None, "embed", None)
                            if cfg.token_shift else None)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.cfg.dtype)

    def token_bases(self, tokens_bt: jax.Array) -> jax.Array:
        """``wte[tokens] * sqrt(d)`` (the llama block: unscaled): a token's own input, before
        the token shift."""
        embedded_btd = jnp.take(self.wte[...], tokens_bt, axis=0).astype(self.dtype)
        if self.cfg.block == "llama":
            return embedded_btd
        return embedded_btd * jnp.asarray(math.sqrt(self.cfg.d_model), self.dtype)

    def add_shift(self, x_btd: jax.Array, prev_kbtd: jax.Array) -> jax.Array:
        """``x + Σ_k prev_k · W_k``: the token shift of the k-th previous inputs (zero: none)."""
        return x_btd + jnp.einsum("kbtd,kde->bte", prev_kbtd.astype(self.dtype),
                                  self.token_shift[...].astype(self.dtype))

    def input_embeddings(self, tokens_bt: jax.Array, ctx: AttentionContext,
                         previous_kbt: jax.Array | None = None) -> jax.Array:
        """The prelude's input: wte[tokens] * sqrt(d)  [+ token shift].

        ``previous_kbt``: with ``cfg.token_shift``, the ids of each position's previous visible
        tokens (-1: none); derived from ``ctx`` when omitted, which is right whenever ``ctx``
        covers the whole sequence (not for a block read after a cache: pass them then).
        """
        x_btd = self.token_bases(tokens_bt)
        if self.token_shift is None:
            return x_btd
        if previous_kbt is None:
            previous_kbt = previous_tokens(tokens_bt, self.cfg.token_shift, ctx.mask_b1ts)
        prev_kbtd = jnp.where(previous_kbt[..., None] >= 0,
                              self.token_bases(jnp.maximum(previous_kbt, 0)), 0)
        return self.add_shift(x_btd, prev_kbtd)

    def shifted_inputs(self, bases_btd: jax.Array, ctx: AttentionContext) -> jax.Array:
        """The prelude's input from per-position bases (a token's ``wte · sqrt(d)``, or any
        vector standing in for it): each base plus the token shift of its predecessors' bases."""
        if self.token_shift is None:
            return bases_btd
        b, t, _ = bases_btd.shape
        where_kbt = previous_positions(b, t, self.cfg.token_shift, ctx.mask_b1ts)
        prev_kbtd = jax.vmap(lambda w: jnp.take_along_axis(
            bases_btd, jnp.maximum(w, 0)[..., None], axis=1))(where_kbt)
        return self.add_shift(bases_btd, jnp.where(where_kbt[..., None] >= 0, prev_kbtd, 0))

    def apply_prelude(self, tokens_bt: jax.Array, ctx: AttentionContext,
              kv_prefixes: list[KV] | None = None,
              previous_kbt: jax.Array | None = None,
              remat: RematPlan | None = None) -> tuple[jax.Array, list[KV]]:
        """Prelude: e = prelude_blocks(`input_embeddings`)."""
        return run_blocks(self.prelude, self.input_embeddings(tokens_bt, ctx, previous_kbt), ctx,
                          kv_prefixes, remat)

    def apply_coda(self, state_btd: jax.Array, ctx: AttentionContext,
               kv_prefixes: list[KV] | None = None,
               remat: RematPlan | None = None) -> tuple[jax.Array, list[KV]]:
        """Coda: logits = wte^T ln_f(coda_blocks(ln_f(s_r))), in float32, no logit scaling.

        The llama block has no norm before the coda (its blocks are pre-norm), and an untied
        model multiplies by ``lm_head`` instead of wte^T.
        """
        x_btd, kvs = run_blocks(self.coda, self.coda_input(state_btd), ctx, kv_prefixes, remat)
        return self.head(self.ln_f(x_btd)), kvs

    def coda_input(self, state_btd: jax.Array) -> jax.Array:
        """What the coda reads of s_r: ``ln_f(s_r)``, or s_r itself for the (pre-norm) llama
        block."""
        return state_btd if self.cfg.block == "llama" else self.ln_f(state_btd)

    def head(self, hidden_btd: jax.Array) -> jax.Array:
        """Float32 logits of the last hidden state: ``h wte^T`` (tied), or ``h lm_head``."""
        w_vd = self.wte[...] if self.lm_head is None else self.lm_head[...].T
        return output_logits(hidden_btd, w_vd)
