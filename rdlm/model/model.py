"""The recurrent-depth language model (Huginn-0125 architecture, SPEC §1), top to bottom.

    tokens ─ prelude ─▶ e ──┐
                            ▼
    s_0 (noise) ─▶ [ adapter(concat[s, e]) ─▶ core blocks ] × r ─▶ s_r
                                                                    │
    logits ◀─ wte^T ◀─ ln_f ◀─ coda ◀─ ln_f ◀───────────────────────┘

The layers are Flax NNX modules; everything else in the library uses the pure functions at the
bottom of this file (`init_params`, `forward`, `core_step`, `lm_loss`) on one nested-dict params
pytree. Modules are rebuilt from that dict with `nnx.merge` inside the traced function, so no
module state ever crosses a `jax.jit` boundary.

Weights are stored as ``[in, out]`` (the Huginn/PyTorch layout is ``[out, in]``; `rdlm.interop`
transposes). Fused projections keep their fused leading structure as explicit axes
(``wqkv: [d, 3, heads, head_dim]``, ``fc: [d, 2, mlp]``) so tensor parallelism can shard heads and
MLP units without cutting through the q/k/v or gate/up boundaries.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from rdlm.config import ModelConfig
from rdlm.model import recurrence
from rdlm.model.attention import (KV, AttentionContext, apply_rope, apply_rope_half,
                                  attention_context, previous_positions, previous_tokens)
from rdlm.model.kernels import attention, fused_projection, output_logits, project
from rdlm.model.remat import RematPlan, checkpointed_block, remat_plan

Params = dict[str, Any]


def _truncated_normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    """Truncated normal at ±3σ, float32 (parameters are always stored in float32)."""
    return std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)


def _param(value: jax.Array, *axes: str | None) -> nnx.Param:
    """A parameter tagged with logical axis names; `rdlm.sharding` maps them to mesh axes."""
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
                             segment_ids_bt=ctx.segment_ids_bt, mesh=ctx.mesh)
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
                             segment_ids_bt=ctx.segment_ids_bt, mesh=ctx.mesh)
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


# ---------------------------------------------------------------------------------------------
# The pure-functional API: one params pytree in, arrays out.


@functools.lru_cache(maxsize=64)
def _abstract_model(cfg: ModelConfig) -> RecurrentDepthLM:
    return nnx.eval_shape(lambda: RecurrentDepthLM(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=64)
def _graphdefs(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    model = _abstract_model(cfg)
    return nnx.graphdef(model), nnx.graphdef(model.core)


def bind(params: Params, cfg: ModelConfig) -> RecurrentDepthLM:
    """The NNX model over ``params`` (cheap; call it inside the traced function)."""
    return nnx.merge(_graphdefs(cfg)[0], params)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh parameters with the "takase" init, as a nested dict of float32 arrays.

    Jitted: wrap it in ``jax.jit(..., out_shardings=...)`` to create parameters already sharded.
    """
    model = RecurrentDepthLM(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the params pytree (`jax.ShapeDtypeStruct` leaves); allocates nothing."""
    return nnx.to_pure_dict(nnx.state(_abstract_model(cfg), nnx.Param))


def param_axes(cfg: ModelConfig) -> Params:
    """The params pytree's logical axis names: a tuple per leaf, e.g. ``("vocab", "embed")``."""
    state = nnx.state(_abstract_model(cfg), nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters (tied embedding counted once), without allocating any."""
    return sum(group_sizes(cfg).values())


def group_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per top-level group ("wte", "prelude", "core", "coda", "ln_f", …), without
    allocating any."""
    return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
            for name, tree in abstract_params(cfg).items()}


def initial_state(cfg: ModelConfig, shape: tuple[int, ...], *, key: jax.Array | None,
                  init_scale: float | jax.Array = 1.0) -> jax.Array:
    """s_0 ~ TruncNormal(±3σ) · σ · sqrt(d) · init_scale, σ = sqrt(2/(5d)); zeros without a key.

    ``init_scale=0`` (or no key) is the deterministic zero state; a concrete non-zero
    ``init_scale`` without a key is an error rather than a silent zero state.
    """
    dtype = jnp.dtype(cfg.dtype)
    if key is None:
        # A traced init_scale cannot be checked here; without a key the state is zero regardless.
        if isinstance(init_scale, (int, float)) and init_scale != 0:
            raise ValueError("a random initial state needs key=...; pass init_scale=0.0 for the "
                             "deterministic zero state.")
        return jnp.zeros(shape, dtype)
    noise = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    return (noise * (cfg.init_std * math.sqrt(cfg.d_model) * init_scale)).astype(dtype)


def core_step(params: Params, state_btd: jax.Array, embedded_btd: jax.Array, cfg: ModelConfig,
              ctx: AttentionContext) -> jax.Array:
    """One recurrence step s_i = core(adapter(concat[s_{i-1}, e])), as a pure function.

    ``params`` is the full params pytree or just ``{"core": params["core"]}``.
    """
    core = nnx.merge(_graphdefs(cfg)[1], params["core"])
    state_btd, _ = core(state_btd, embedded_btd, ctx)
    return state_btd


Constrain = Callable[[jax.Array], jax.Array]


def _step_fn(cfg: ModelConfig, constrain: Constrain | None = None) -> recurrence.StepFn:
    """`core_step` in the (consts, state) form the loops in `rdlm.recurrence` take; each new
    state goes through ``constrain`` (see `forward`)."""
    def step(consts: tuple[Params, jax.Array, AttentionContext], state_btd: jax.Array) -> jax.Array:
        core_params, embedded_btd, ctx = consts
        state_btd = core_step({"core": core_params}, state_btd, embedded_btd, cfg, ctx)
        return state_btd if constrain is None else constrain(state_btd)
    return step


def _check_key(key: jax.Array | None, init_scale: Any, init_state: jax.Array | None) -> None:
    """Checked before tracing, while ``init_scale`` is still a concrete number."""
    if key is None and init_state is None and isinstance(init_scale, (int, float)) and init_scale:
        raise ValueError("a random initial state needs key=...; pass init_scale=0.0 for the "
                         "deterministic zero state.")


def _check_tokens(tokens_bt: jax.Array, cfg: ModelConfig) -> None:
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens_bt.shape)}.")
    if not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens_bt.dtype}.")
    if tokens_bt.shape[1] == 0:
        raise ValueError("tokens are empty: give at least one token per row.")
    if tokens_bt.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens_bt.shape[1]} exceeds model.max_seq_len="
                         f"{cfg.max_seq_len}; shorten the input or raise max_seq_len.")


def _run(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, recur: Any, *,
         key: jax.Array | None, init_scale: float | jax.Array, init_state: jax.Array | None,
         segment_ids: jax.Array | None, positions: jax.Array | None,
         branch_ids: jax.Array | None = None, constrain: Constrain | None = None,
         remat: RematPlan | None = None) -> tuple[jax.Array, dict]:
    """prelude → ``recur(step, consts, s_0)`` → coda; shared by `forward` and `forward_train`.

    ``remat``: the prelude's and coda's share of the training's `RematPlan`.
    """
    _check_tokens(tokens_bt, cfg)
    model = bind(params, cfg)
    b, t = tokens_bt.shape
    # The state constraint knows the mesh the batch is sharded over: the attention kernels
    # that XLA cannot partition run per shard of it.
    ctx = attention_context(cfg, b, t, segment_ids=segment_ids, positions=positions,
                            branch_ids=branch_ids, mesh=getattr(constrain, "mesh", None))
    embedded_btd, _ = model.apply_prelude(tokens_bt, ctx, remat=remat)
    if init_state is None:
        state_btd = initial_state(cfg, embedded_btd.shape, key=key, init_scale=init_scale)
    else:
        if init_state.shape != embedded_btd.shape:
            raise ValueError(f"init_state has shape {tuple(init_state.shape)}, expected "
                             f"{tuple(embedded_btd.shape)} ([batch, length, d_model]).")
        state_btd = init_state.astype(embedded_btd.dtype)
    if constrain is not None:
        embedded_btd, state_btd = constrain(embedded_btd), constrain(state_btd)
    state_btd, aux = recur(_step_fn(cfg, constrain), (params["core"], embedded_btd, ctx), state_btd)
    logits_btv, _ = model.apply_coda(state_btd, ctx, remat=remat)
    aux["state"] = state_btd
    return logits_btv, aux


def forward(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *,
            num_steps: int | jax.Array, key: jax.Array | None = None,
            init_scale: float | jax.Array = 1.0, init_state: jax.Array | None = None,
            segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
            branch_ids: jax.Array | None = None, return_trajectory: bool = False,
            constrain: Constrain | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [batch, length, vocab] (float32) after ``num_steps`` recurrence steps.

    - ``num_steps`` may be traced: ``jax.jit(forward, static_argnames=("cfg",))`` compiles once for
      every r.
    - ``init_scale=0.0`` (or ``key=None``) starts from the zero state: fully deterministic.
    - ``init_state`` [batch, length, d] replaces s_0 (continuous chain of thought, analysis).
    - ``segment_ids`` [batch, length] for packed/padded rows; ``branch_ids`` for several isolated
      continuations of one shared prefix (see `attention_context`); ``positions`` overrides the
      RoPE positions derived from them.
    - ``aux["state"]`` is the final latent s_r (before the final norm); with
      ``return_trajectory=True`` (``num_steps`` a Python int) ``aux["trajectory"]`` is
      ``ln_f(s_i)`` for i = 1..r, shaped [r, batch, length, d].
    - ``constrain``: a hashable function applied to e, s_0 and every step's state
      ([batch, length, d]), e.g. `rdlm.runtime.sharding.state_constraint(mesh)` to keep the latent
      sharded by the batch on a device mesh; None (the default) applies nothing.
    """
    _check_key(key, init_scale, init_state)
    if return_trajectory:
        if not isinstance(num_steps, (int, np.integer)):
            raise TypeError("return_trajectory=True needs num_steps as a Python int (the "
                            f"trajectory's length is a shape); got {type(num_steps).__name__}.")
        return _forward_trajectory(params, tokens_bt, cfg, int(num_steps), key, init_scale,
                                   init_state, segment_ids, positions, branch_ids, constrain)
    return _forward(params, tokens_bt, cfg, num_steps, key, init_scale, init_state, segment_ids,
                    positions, branch_ids, constrain)


@functools.partial(jax.jit, static_argnums=(2, 10))
def _forward(params, tokens_bt, cfg, num_steps, key, init_scale, init_state, segment_ids, positions,
             branch_ids, constrain):
    def recur(step, consts, state):
        return recurrence.iterate(step, consts, state, num_steps), {}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=positions,
                branch_ids=branch_ids, constrain=constrain)


@functools.partial(jax.jit, static_argnums=(2, 3, 10))
def _forward_trajectory(params, tokens_bt, cfg, num_steps, key, init_scale, init_state,
                        segment_ids, positions, branch_ids, constrain):
    def recur(step, consts, state):
        state, states_rbtd = recurrence.iterate_collect(step, consts, state, num_steps)
        return state, {"trajectory": bind(params, cfg).ln_f(states_rbtd)}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=positions,
                branch_ids=branch_ids, constrain=constrain)


def forward_train(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *,
                  n_no_grad: int | jax.Array, n_grad: int | jax.Array,
                  key: jax.Array | None = None, init_scale: float | jax.Array = 1.0,
                  init_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  branch_ids: jax.Array | None = None, constrain: Constrain | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`forward` with truncated backprop: ``n_no_grad`` steps without gradient, then
    ``n_grad <= cfg.backprop_depth`` steps with gradient, rematerialised as ``cfg.remat`` and
    ``cfg.remat_policy`` say (`remat_plan`).

    Both counts may be traced: one compilation serves every sampled depth.
    """
    _check_key(key, init_scale, init_state)
    return _forward_train(params, tokens_bt, cfg, n_no_grad, n_grad, key, init_scale, init_state,
                          segment_ids, branch_ids, constrain)


@functools.partial(jax.jit, static_argnums=(2, 10))
def _forward_train(params, tokens_bt, cfg, n_no_grad, n_grad, key, init_scale, init_state,
                   segment_ids, branch_ids, constrain):
    plan = remat_plan(cfg)

    def recur(step, consts, state):
        state = recurrence.iterate_no_grad(step, consts, state, n_no_grad)
        state = recurrence.iterate_with_grad(
            step, consts, state, n_grad, cfg.backprop_depth, remat=plan.core,
            mask_skipped=recurrence.mostly_full_backprop(cfg.mean_recurrence, cfg.backprop_depth),
            policy=plan.policy)
        return state, {}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=None,
                branch_ids=branch_ids, constrain=constrain, remat=plan)


def lm_loss(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, *,
            n_no_grad: int | jax.Array, n_grad: int | jax.Array, key: jax.Array | None = None,
            init_scale: float | jax.Array = 1.0, constrain: Constrain | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy under truncated backprop.

    ``batch``: ``inputs`` and ``targets`` [batch, length] int; optional ``loss_mask`` (1 where a
    target counts), ``segment_ids`` (packed documents) and ``branch_ids`` (isolated continuations
    of a shared prefix). ``constrain``: see `forward`. Returns (loss, metrics).
    """
    logits_btv, _ = forward_train(params, batch["inputs"], cfg, n_no_grad=n_no_grad,
                                    n_grad=n_grad, key=key, init_scale=init_scale,
                                    segment_ids=batch.get("segment_ids"),
                                    branch_ids=batch.get("branch_ids"), constrain=constrain)
    return masked_token_loss(logits_btv, batch["targets"], batch.get("loss_mask"))


def token_loss_sums(logits_btv: jax.Array, targets_bt: jax.Array,
                    loss_mask_bt: jax.Array | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy, summed correct argmax predictions and the token count,
    over the positions where ``loss_mask_bt`` is 1 (all positions without a mask).

    Sums, not means, so that batches and micro-batches combine exactly.
    """
    mask_bt = (jnp.ones(targets_bt.shape, jnp.float32) if loss_mask_bt is None
               else loss_mask_bt.astype(jnp.float32))
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    correct_bt = (jnp.argmax(logits_btv, -1) == targets_bt).astype(jnp.float32)
    return {"nll": (nll_bt * mask_bt).sum(), "correct": (correct_bt * mask_bt).sum(),
            "num_tokens": mask_bt.sum()}


def masked_token_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                      loss_mask_bt: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean token loss, {loss, accuracy, num_tokens}) over the masked positions: the objective
    of every trainer (plain LM, continuous thought)."""
    sums = token_loss_sums(logits_btv, targets_bt, loss_mask_bt)
    num_tokens = jnp.maximum(sums["num_tokens"], 1.0)
    loss = sums["nll"] / num_tokens
    return loss, {"loss": loss, "accuracy": sums["correct"] / num_tokens,
                  "num_tokens": sums["num_tokens"]}
