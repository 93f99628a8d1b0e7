"""Generation: one jitted program per configuration, with every inference feature of SPEC §1.

    prompts ─▶ left-pad ─▶ prefill (parallel, fixed r, never exits) ─▶ lax.while_loop over tokens:
                              one token ─▶ prelude ─▶ core × r (or until its row exits) ─▶ coda ─▶ sample

- The whole generation (prefill and every decoded token) is one ``jax.jit`` program: the token
  loop and the recurrence loop are ``lax`` loops, so there is no per-token Python dispatch.
- ``num_steps`` is data: with a fixed number of cache slots (``cache_budget``) one compilation
  serves every r. Without a budget the cache has one slot per step, so the slot count (a shape)
  follows r.
- Prompts are left-padded to a common length so every row writes the same cache position at each
  step; padding is masked out and RoPE positions count from each row's first real token, so a row
  computes what it would alone.
- Adaptive exit is per token and per row: a row whose token converged keeps its state (and its
  cache entries) frozen while the other rows continue; the loop stops when all rows are done or at
  ``num_steps``.
- Self-speculative decoding drafts ``num_draft`` tokens with ``draft_steps`` iterations, verifies
  them in one parallel pass at the full r and keeps the longest agreeing prefix (shared by the
  batch, so all rows stay at the same position); rejected positions are simply overwritten later,
  which is the cache roll-back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rdlm import cache as kvc
from rdlm.cache import KVCache
from rdlm.config import ModelConfig
from rdlm.exits import ExitConfig, as_exit_config, evaluate, init_exit_state
from rdlm.model import AttentionContext, KV, Params, bind, initial_state, rope_angles

PAD_ID = 0  # fills padding in the prompt buffer and the tokens after a row's stop token


# ---------------------------------------------------------------------------------------------
# Static configuration of one compiled generation program.


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Self-speculative decoding: draft with few iterations, verify at the full r.

    ``accept_prob=None`` accepts a draft token when it equals the verifier's choice (the argmax
    under greedy decoding: output identical to plain decoding); a number accepts it when the
    verifier gives it at least that probability (faster, approximate). A draft runs
    ``min(draft_steps, r)`` iterations.
    """

    num_draft: int = 4
    draft_steps: int = 4
    accept_prob: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_draft", "draft_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative {name}={v!r} must be a positive integer.")
        if self.accept_prob is not None and not 0.0 < self.accept_prob <= 1.0:
            raise ValueError(f"speculative accept_prob={self.accept_prob!r} must be in (0, 1].")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from logits; temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1].")
        if self.min_p is not None and not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Every static choice of one compiled program (shapes, features); hashable."""

    cfg: ModelConfig
    batch: int
    prompt_len: int
    cache_len: int
    max_new_tokens: int
    num_slots: int
    exit: ExitConfig | None
    continuous_cot: bool
    speculative: SpeculativeConfig | None
    sampling: SamplingConfig
    stop_tokens: tuple[int, ...]
    init_scale: float
    return_logits: bool

    @property
    def track_latest(self) -> bool:
        return self.exit is not None

    @property
    def out_len(self) -> int:
        extra = 0 if self.speculative is None else self.speculative.num_draft
        return self.max_new_tokens + extra


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns (NumPy arrays, one row per prompt).

    ``tokens`` [batch, max_new_tokens]: generated ids; after a row's stop token (kept) the rest is
    ``PAD_ID``. ``steps`` [batch, max_new_tokens]: core iterations that produced each token's
    distribution (the first token comes from the prefill at the full r; 0 after the stop).
    ``exit_values``: the exit criterion's value at the step each token stopped (adaptive exit
    only). ``logits`` [batch, max_new_tokens, vocab] with ``return_logits=True``.
    """

    tokens: np.ndarray
    steps: np.ndarray
    lengths: np.ndarray
    exit_values: np.ndarray | None
    logits: np.ndarray | None
    cache_bytes: int
    num_slots: int
    stats: dict[str, float]

    def rows(self) -> list[list[int]]:
        """Each row's generated tokens up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @property
    def mean_steps(self) -> float:
        """Mean core iterations per generated token (over real tokens of all rows)."""
        mask = np.arange(self.steps.shape[1])[None] < self.lengths[:, None]
        return float(self.steps[mask].mean()) if mask.any() else 0.0


# ---------------------------------------------------------------------------------------------
# Token choice.


def filter_logits(logits_bv: jax.Array, *, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) / min-p sets to -inf."""
    neg_inf = jnp.asarray(-jnp.inf, logits_bv.dtype)
    if top_k is not None and top_k < logits_bv.shape[-1]:
        kth_b1 = lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, neg_inf, logits_bv)
    if min_p is not None and min_p > 0:
        probs_bv = jax.nn.softmax(logits_bv, -1)
        logits_bv = jnp.where(probs_bv < min_p * probs_bv.max(-1, keepdims=True), neg_inf, logits_bv)
    if top_p is not None and top_p < 1:
        sorted_bv = jnp.sort(logits_bv, -1)[:, ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, -1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it
        # already does.
        drop_bv = (jnp.cumsum(probs_bv, -1) - probs_bv) >= top_p
        cutoff_b1 = jnp.min(jnp.where(drop_bv, jnp.inf, sorted_bv), -1, keepdims=True)
        logits_bv = jnp.where(logits_bv < cutoff_b1, neg_inf, logits_bv)
    return logits_bv


def choose_tokens(logits_bv: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Argmax when greedy, else a draw from the tempered, filtered distribution."""
    if sampling.greedy:
        return jnp.argmax(logits_bv, -1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv.astype(jnp.float32) / sampling.temperature,
                              top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p)
    return jax.random.categorical(key, logits_bv, -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# One block of positions through prelude / core step / coda, reading and writing the cache.


def block_context(cfg: ModelConfig, pad_b: jax.Array, start: jax.Array | int, length: int,
                  cache_len: int, with_prefix: bool) -> AttentionContext:
    """Mask and RoPE for queries at cache positions ``start … start+length-1``.

    Keys are the cache (positions < start, not padding) followed by the block itself (causal).
    A padding query attends to itself only, so no softmax row is empty.
    """
    b = pad_b.shape[0]
    index_t = start + jnp.arange(length)
    positions_bt = jnp.maximum(index_t[None, :] - pad_b[:, None], 0)
    cos_bt1f, sin_bt1f = rope_angles(positions_bt, cfg.head_dim, cfg.rope_base)
    real_key_bt = index_t[None, :] >= pad_b[:, None]
    causal_tt = jnp.tril(jnp.ones((length, length), bool))
    block_btt = causal_tt[None] & (real_key_bt[:, None, :] | jnp.eye(length, dtype=bool)[None])
    mask_bts = block_btt
    if with_prefix:
        index_s = jnp.arange(cache_len)
        prefix_bs = (index_s[None] >= pad_b[:, None]) & (index_s[None] < start)
        mask_bts = jnp.concatenate(
            [jnp.broadcast_to(prefix_bs[:, None, :], (b, length, cache_len)), block_btt], -1)
    return AttentionContext(cos_bt1f, sin_bt1f, mask_bts[:, None])


# XLA's CPU dot computes the fused q/k/v and gate/up projections (their decoding layout, see
# `model.fused_projection`) as W^T·x^T and, inside a loop, would transpose those weights again at
# every recurrence step (more memory traffic than the matmul itself at batch 1). Laying them out
# once before the loops, behind an optimization barrier so the two transposes cannot cancel, turns
# the per-step transpose into a free re-interpretation.
# [d,3,h,e] → [3,h,e,d]; [d,2,m] → [2,m,d]; the unfused projections [in, out] → [out, in]
# (`rdlm.model.project` multiplies weights-first while decoding).
_DECODE_ORDER = {"wqkv": (1, 2, 3, 0), "fc": (1, 2, 0), "proj": (1, 0), "adapter": (1, 0)}


def _map_named(params: Params, fn: Any) -> Params:
    def visit(name: str, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: visit(k, v) for k, v in node.items()}
        return fn(name, node)
    return visit("", params)


def to_loop_layout(params: Params) -> Params:
    """Params with the decoding-time projections stored transposed (call once, outside loops)."""
    return _map_named(params, lambda name, x: lax.optimization_barrier(
        jnp.transpose(x, _DECODE_ORDER[name])) if name in _DECODE_ORDER else x)


def _model(params: Params, cfg: ModelConfig) -> Any:
    """The NNX model over loop-layout params (the inverse transposes happen at each use)."""
    return bind(_map_named(params, lambda name, x: jnp.transpose(
        x, np.argsort(_DECODE_ORDER[name])) if name in _DECODE_ORDER else x), cfg)


def _stage_prefixes(buf_lkbhte: jax.Array, with_prefix: bool) -> list[KV] | None:
    if not with_prefix:
        return None
    return [kvc.as_kv(buf_lkbhte[layer]) for layer in range(buf_lkbhte.shape[0])]


def run_prelude(params: Params, cfg: ModelConfig, cache: KVCache, tokens_bt: jax.Array,
                ctx: AttentionContext, start: jax.Array | int, with_prefix: bool,
                pad_b: jax.Array) -> tuple[jax.Array, KVCache]:
    previous_kbt = (kvc.previous_tokens(cache, tokens_bt, pad_b, start, cfg.token_shift)
                    if cfg.token_shift else None)
    embedded_btd, kvs = _model(params, cfg).embed(
        tokens_bt, ctx, _stage_prefixes(cache.prelude_lkbhte, with_prefix), previous_kbt)
    cache = kvc.set_tokens(cache, tokens_bt, start)
    return embedded_btd, cache._replace(
        prelude_lkbhte=kvc.write_stage(cache.prelude_lkbhte, kvs, start))


def run_core_step(params: Params, cfg: ModelConfig, num_slots: int, read: KVCache | None,
                  write: KVCache, state_btd: jax.Array, embedded_btd: jax.Array,
                  ctx: AttentionContext, step: jax.Array, write_start: jax.Array | int,
                  active_b: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Recurrence step ``step`` (0-based) of a block of positions.

    Attends to ``read`` (the cache before this block; None for a prompt with nothing before it)
    and stores the block's keys/values in ``write`` at ``write_start``. Keeping the two apart
    matters: if one buffer were read and written inside the step loop, XLA could not prove that
    every layer's read precedes the in-place writes and would copy the whole cache each step.
    Inactive rows keep their state and their entries.
    """
    prefixes = (None if read is None else
                [kvc.read_core(read, layer, step, num_slots) for layer in range(cfg.n_core)])
    new_btd, kvs = _model(params, cfg).core(state_btd, embedded_btd, ctx, prefixes)
    for layer, kv in enumerate(kvs):
        write = kvc.write_core(write, layer, step, num_slots, kv, write_start, active_b)
    if active_b is not None:
        new_btd = jnp.where(active_b[:, None, None], new_btd, state_btd)
    return new_btd, write


def run_coda(params: Params, cfg: ModelConfig, cache: KVCache, state_btd: jax.Array,
             ctx: AttentionContext, start: jax.Array | int, with_prefix: bool,
             write: bool = True) -> tuple[jax.Array, KVCache]:
    logits_btv, kvs = _model(params, cfg).decode(
        state_btd, ctx, _stage_prefixes(cache.coda_lkbhte, with_prefix))
    if write:
        cache = cache._replace(coda_lkbhte=kvc.write_stage(cache.coda_lkbhte, kvs, start))
    return logits_btv, cache


def _start_state(plan: _Plan, shape: tuple[int, ...], key: jax.Array,
                 start: jax.Array | int) -> jax.Array:
    if plan.init_scale == 0:
        return jnp.zeros(shape, jnp.dtype(plan.cfg.dtype))
    return initial_state(plan.cfg, shape, key=jax.random.fold_in(key, start),
                         init_scale=plan.init_scale)


def _block_buffer(plan: _Plan, batch: int, length: int) -> KVCache:
    """Core entries of the positions being computed, merged into the cache after their loop."""
    return kvc.init_cache(plan.cfg, batch, length, plan.num_slots, plan.track_latest)


def forward_block(params: Params, plan: _Plan, cache: KVCache, tokens_bt: jax.Array,
                  pad_b: jax.Array, start: jax.Array | int, num_steps: jax.Array | int,
                  state_btd: jax.Array, with_prefix: bool
                  ) -> tuple[jax.Array, jax.Array, KVCache]:
    """A block of tokens at a fixed number of steps (prefill, plain decoding, draft, verify).

    Returns (logits [b, t, V], final states [b, t, d], cache with the block written).
    """
    cfg = plan.cfg
    b, length = tokens_bt.shape
    ctx = block_context(cfg, pad_b, start, length, plan.cache_len, with_prefix)
    embedded_btd, cache = run_prelude(params, cfg, cache, tokens_bt, ctx, start, with_prefix,
                                      pad_b)
    # A prompt with nothing before it reads no cache, so it can write the cache directly.
    read, write, write_start = ((cache, _block_buffer(plan, b, length), 0) if with_prefix
                                else (None, cache, start))

    def body(step: jax.Array, carry: tuple[jax.Array, KVCache]) -> tuple[jax.Array, KVCache]:
        state, w = carry
        return run_core_step(params, cfg, plan.num_slots, read, w, state, embedded_btd, ctx, step,
                             write_start)

    state_btd, write = lax.fori_loop(0, num_steps, body, (state_btd, write))
    cache = kvc.merge_block(cache, write, start) if with_prefix else write
    cache = kvc.set_depth(cache, jnp.full(tokens_bt.shape, num_steps, jnp.int32), start)
    logits_btv, cache = run_coda(params, cfg, cache, state_btd, ctx, start, with_prefix)
    return logits_btv, state_btd, cache


def decode_adaptive(params: Params, plan: _Plan, cache: KVCache, token_b1: jax.Array,
                    pad_b: jax.Array, pos: jax.Array, num_steps: jax.Array,
                    state_b1d: jax.Array, skip_b: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, KVCache]:
    """One token per row with per-row adaptive exit (capped at ``num_steps``).

    Rows in ``skip_b`` (finished generating) start as exited. Returns (logits [b, V], final
    state [b, 1, d], steps run [b], exit value [b], cache).
    """
    cfg, exit_cfg = plan.cfg, plan.exit
    ctx = block_context(cfg, pad_b, pos, 1, plan.cache_len, True)
    embedded_b1d, cache = run_prelude(params, cfg, cache, token_b1, ctx, pos, True, pad_b)
    b = token_b1.shape[0]

    def not_finished(carry: tuple) -> jax.Array:
        step, done_b = carry[0], carry[2]
        return (step < num_steps) & ~jnp.all(done_b)

    def body(carry: tuple) -> tuple:
        step, state, done_b, steps_b, value_b, memory, w = carry
        active_b = ~done_b
        state, w = run_core_step(params, cfg, plan.num_slots, cache, w, state, embedded_b1d, ctx,
                                 step, 0, active_b)
        steps_b = steps_b + active_b.astype(jnp.int32)
        check = (step + 1) % exit_cfg.check_every == 0

        def check_exit(memory_: Any) -> tuple:
            logits_bv = None
            if exit_cfg.needs_logits:  # the coda on the candidate state; its entries are not kept
                logits_bv = run_coda(params, cfg, cache, state, ctx, pos, True, write=False)[0][:, 0]
            value, converged, new_memory = evaluate(exit_cfg, memory_, state[:, 0], logits_bv)
            new_memory = jax.tree.map(
                lambda n, o: jnp.where(active_b.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                new_memory, memory_)
            return value, converged, new_memory

        def no_check(memory_: Any) -> tuple:
            return value_b, jnp.zeros((b,), bool), memory_

        value, converged_b, memory = lax.cond(check, check_exit, no_check, memory)
        value_b = jnp.where(active_b & check, value, value_b)
        done_b = done_b | (active_b & converged_b & (step + 1 >= exit_cfg.min_steps))
        return step + 1, state, done_b, steps_b, value_b, memory, w

    init = (jnp.int32(0), state_b1d, skip_b, jnp.zeros((b,), jnp.int32),
            jnp.full((b,), jnp.inf, jnp.float32), init_exit_state(state_b1d[:, 0], cfg.vocab_size),
            _block_buffer(plan, b, 1))
    _, state_b1d, _, steps_b, value_b, _, write = lax.while_loop(not_finished, body, init)
    cache = kvc.merge_block(cache, write, pos)
    cache = kvc.set_depth(cache, steps_b[:, None], pos)
    logits_b1v, cache = run_coda(params, cfg, cache, state_b1d, ctx, pos, True)
    return logits_b1v[:, 0], state_b1d, steps_b, value_b, cache


# ---------------------------------------------------------------------------------------------
# The generation programs.


def _is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    if not stop_tokens:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def _put_column(buf: jax.Array, column: jax.Array, n: jax.Array) -> jax.Array:
    """buf[:, n] = column (any trailing dims)."""
    return lax.dynamic_update_index_in_dim(buf, column.astype(buf.dtype), n, axis=1)


def _prefill(params: Params, plan: _Plan, prompt_bt: jax.Array, pad_b: jax.Array,
             num_steps: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
    """The prompt in one parallel pass at the full r (no exit); logits and state of its last slot."""
    cfg = plan.cfg
    cache = kvc.init_cache(cfg, plan.batch, plan.cache_len, plan.num_slots, plan.track_latest)
    state_btd = _start_state(plan, (*prompt_bt.shape, cfg.d_model), key, 0)
    logits_btv, state_btd, cache = forward_block(params, plan, cache, prompt_bt, pad_b, 0,
                                                 num_steps, state_btd, with_prefix=False)
    return logits_btv[:, -1], state_btd[:, -1:], cache


def _buffers(plan: _Plan) -> dict[str, jax.Array]:
    b, n = plan.batch, plan.out_len
    bufs = {"tokens": jnp.full((b, n), PAD_ID, jnp.int32), "steps": jnp.zeros((b, n), jnp.int32),
            "exit_values": jnp.full((b, n), jnp.nan, jnp.float32)}
    if plan.return_logits:
        bufs["logits"] = jnp.zeros((b, n, plan.cfg.vocab_size), jnp.float32)
    return bufs


def _first_token(params: Params, plan: _Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                 num_steps: jax.Array, sample_key: jax.Array, state_key: jax.Array
                 ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, KVCache]:
    """Prefill at the full r and write the first generated token (both decoding modes start so).

    Returns (buffers, finished_b, last prompt state, cache)."""
    logits_bv, state_b1d, cache = _prefill(params, plan, prompt_bt, pad_b, num_steps, state_key)
    first_b = choose_tokens(logits_bv, jax.random.fold_in(sample_key, 0), plan.sampling)
    bufs = _buffers(plan)
    bufs["tokens"] = _put_column(bufs["tokens"], first_b, 0)
    bufs["steps"] = _put_column(bufs["steps"], jnp.full_like(first_b, num_steps), 0)
    if plan.return_logits:
        bufs["logits"] = _put_column(bufs["logits"], logits_bv, 0)
    return bufs, _is_stop(first_b, plan.stop_tokens), state_b1d, cache


def _generate_plain(params: Params, plan: _Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                    num_steps: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Prefill, then one token per row per iteration of a ``while_loop``."""
    sample_key, state_key = jax.random.split(key)
    bufs, finished_b, state_b1d, cache = _first_token(params, plan, prompt_bt, pad_b, num_steps,
                                                      sample_key, state_key)

    def not_finished(carry: tuple) -> jax.Array:
        n, finished = carry[0], carry[2]
        return (n < plan.max_new_tokens) & ~jnp.all(finished)

    def body(carry: tuple) -> tuple:
        n, bufs, finished, state_prev, c = carry
        token_b1 = lax.dynamic_index_in_dim(bufs["tokens"], n - 1, axis=1)
        pos = plan.prompt_len + n - 1
        state_b1d = (state_prev if plan.continuous_cot
                     else _start_state(plan, state_prev.shape, state_key, pos))
        if plan.exit is None:
            logits_b1v, state_b1d, c = forward_block(params, plan, c, token_b1, pad_b, pos,
                                                     num_steps, state_b1d, with_prefix=True)
            logits_bv = logits_b1v[:, 0]
            steps_b = jnp.full((plan.batch,), num_steps, jnp.int32)
            value_b = jnp.full((plan.batch,), jnp.nan, jnp.float32)
        else:
            logits_bv, state_b1d, steps_b, value_b, c = decode_adaptive(
                params, plan, c, token_b1, pad_b, pos, num_steps, state_b1d, finished)
        token_b = choose_tokens(logits_bv, jax.random.fold_in(sample_key, n), plan.sampling)
        bufs = dict(bufs)
        bufs["tokens"] = _put_column(bufs["tokens"], token_b, n)
        bufs["steps"] = _put_column(bufs["steps"], steps_b, n)
        bufs["exit_values"] = _put_column(bufs["exit_values"], value_b, n)
        if plan.return_logits:
            bufs["logits"] = _put_column(bufs["logits"], logits_bv, n)
        finished = finished | _is_stop(token_b, plan.stop_tokens)
        return n + 1, bufs, finished, state_b1d, c

    init = (jnp.int32(1), bufs, finished_b, state_b1d, cache)
    n, bufs, _, _, _ = lax.while_loop(not_finished, body, init)
    bufs["num_generated"] = n
    bufs["core_steps"] = jnp.sum(bufs["steps"])
    return bufs


def _generate_speculative(params: Params, plan: _Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                          num_steps: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Prefill, then rounds of: draft k tokens cheaply, verify them at the full r in one pass."""
    spec = plan.speculative
    k = spec.num_draft
    b = plan.batch
    # A draft never runs more iterations than the verifier: that would cost more than verifying.
    draft_steps = jnp.minimum(spec.draft_steps, num_steps)
    sample_key, state_key = jax.random.split(key)
    bufs, finished_b, _, cache = _first_token(params, plan, prompt_bt, pad_b, num_steps,
                                              sample_key, state_key)
    first_b = bufs["tokens"][:, 0]

    def not_finished(carry: tuple) -> jax.Array:
        n, finished = carry[0], carry[3]
        return (n < plan.max_new_tokens) & ~jnp.all(finished)

    def draft(c: KVCache, next_b: jax.Array, pos: jax.Array, round_key: jax.Array
              ) -> tuple[jax.Array, KVCache]:
        """k cheap tokens after ``next_b`` (at ``pos``); their cache entries are scratch."""
        def one(j: jax.Array, carry: tuple) -> tuple:
            token_b, drafts_bk, c_ = carry
            p = pos + j
            state = _start_state(plan, (b, 1, plan.cfg.d_model), state_key, p)
            logits_b1v, _, c_ = forward_block(params, plan, c_, token_b[:, None], pad_b, p,
                                              draft_steps, state, with_prefix=True)
            token_b = choose_tokens(logits_b1v[:, 0], jax.random.fold_in(round_key, j),
                                    plan.sampling)
            return token_b, drafts_bk.at[:, j].set(token_b), c_

        _, drafts_bk, c = lax.fori_loop(0, k, one, (next_b, jnp.zeros((b, k), jnp.int32), c))
        return drafts_bk, c

    def body(carry: tuple) -> tuple:
        n, bufs, next_b, finished, c, accepted = carry
        pos = plan.prompt_len + n - 1  # where next_b (already emitted) goes
        round_key = jax.random.fold_in(sample_key, n)
        drafts_bk, c = draft(c, next_b, pos, jax.random.fold_in(round_key, 0))
        block_bt = jnp.concatenate([next_b[:, None], drafts_bk], 1)  # positions pos … pos+k
        state = _start_state(plan, (b, k + 1, plan.cfg.d_model), state_key, pos)
        logits_btv, _, c = forward_block(params, plan, c, block_bt, pad_b, pos, num_steps, state,
                                         with_prefix=True)
        verify_keys = jax.random.split(jax.random.fold_in(round_key, 1), k + 1)
        target_bt = jax.vmap(lambda lg, kk: choose_tokens(lg, kk, plan.sampling),
                             in_axes=(1, 0), out_axes=1)(logits_btv, verify_keys)
        if spec.accept_prob is None:
            agree_bk = drafts_bk == target_bt[:, :k]
        else:
            probs_btv = jax.nn.softmax(logits_btv[:, :k], -1)
            agree_bk = jnp.take_along_axis(probs_btv, drafts_bk[..., None], -1)[..., 0] \
                >= spec.accept_prob
        run_b = jnp.sum(jnp.cumprod(agree_bk.astype(jnp.int32), 1), 1)
        # One accepted length for the whole batch keeps every row at the same cache position.
        n_accept = jnp.min(jnp.where(finished, k, run_b))
        index_t = jnp.arange(k + 1)
        drafts_bt = jnp.concatenate([drafts_bk, drafts_bk[:, -1:]], 1)
        chunk_bt = jnp.where(index_t[None] < n_accept, drafts_bt, target_bt)
        bufs = dict(bufs)
        bufs["tokens"] = lax.dynamic_update_slice(bufs["tokens"], chunk_bt, (0, n))
        bufs["steps"] = lax.dynamic_update_slice(
            bufs["steps"], jnp.full((b, k + 1), num_steps, jnp.int32), (0, n))
        if plan.return_logits:
            bufs["logits"] = lax.dynamic_update_slice(bufs["logits"], logits_btv, (0, n, 0))
        emitted_bt = index_t[None] <= n_accept
        finished = finished | jnp.any(emitted_bt & _is_stop(chunk_bt, plan.stop_tokens), 1)
        next_b = jnp.take_along_axis(chunk_bt, jnp.full((b, 1), n_accept), 1)[:, 0]
        return n + n_accept + 1, bufs, next_b, finished, c, accepted + n_accept

    init = (jnp.int32(1), bufs, first_b, finished_b, cache, jnp.int32(0))
    n, bufs, _, _, _, accepted = lax.while_loop(not_finished, body, init)
    rounds = jnp.maximum(n - 1 - accepted, 1)  # each round emits accepted + 1 tokens
    bufs["num_generated"] = jnp.minimum(n, plan.max_new_tokens)
    bufs["accepted_drafts"] = accepted
    bufs["rounds"] = n - 1 - accepted
    bufs["core_steps"] = num_steps + rounds * (num_steps + k * draft_steps)
    return bufs


def _generate_program(params: Params, prompt_bt: jax.Array, pad_b: jax.Array,
                      num_steps: jax.Array, key: jax.Array, plan: _Plan) -> dict[str, jax.Array]:
    params = to_loop_layout(params)
    if plan.speculative is not None:
        return _generate_speculative(params, plan, prompt_bt, pad_b, num_steps, key)
    return _generate_plain(params, plan, prompt_bt, pad_b, num_steps, key)


_generate_jit = jax.jit(_generate_program, static_argnames=("plan",))


# ---------------------------------------------------------------------------------------------
# Input checks (before anything is traced) and the public entry point.


def prompt_rows(prompt_tokens: Any, prompt_lengths: Any, cfg: ModelConfig) -> list[list[int]]:
    """Validated prompts as lists of ids: a list of id lists, one id list, or a padded array
    [batch, length] (prompts left-aligned) with ``prompt_lengths``."""
    if prompt_lengths is not None:
        array = np.asarray(prompt_tokens)
        lengths = np.asarray(prompt_lengths).reshape(-1)
        if array.ndim != 2 or lengths.shape[0] != array.shape[0]:
            raise ValueError(f"a padded prompt array must be [batch, length] with one length per "
                             f"row; got shape {array.shape} and {lengths.shape[0]} lengths.")
        if np.any(lengths > array.shape[1]):
            raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the array length "
                             f"{array.shape[1]}.")
        rows = [array[i, :int(n)].tolist() for i, n in enumerate(lengths)]
    else:
        if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
            prompt_tokens = np.asarray(prompt_tokens).tolist()
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty: give a list of token-id lists (one per row).")
        if all(isinstance(t, (int, np.integer)) for t in prompt_tokens):
            prompt_tokens = [prompt_tokens]
        rows = [list(r) if isinstance(r, (list, tuple, np.ndarray)) else r for r in prompt_tokens]
    if not rows:
        raise ValueError("prompt_tokens is empty: give at least one prompt.")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(row).__name__}.")
        if len(row) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token.")
        for t in row:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"prompt {i} holds {t!r}: token ids must be integers.")
        bad = [int(t) for t in row if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside the vocabulary "
                             f"[0, {cfg.vocab_size}).")
    return [[int(t) for t in row] for row in rows]


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """[batch, longest] int32 with each prompt right-aligned, and the padding per row."""
    longest = max(len(r) for r in rows)
    prompt_bt = np.full((len(rows), longest), PAD_ID, np.int32)
    pad_b = np.array([longest - len(r) for r in rows], np.int32)
    for i, row in enumerate(rows):
        prompt_bt[i, pad_b[i]:] = row
    return prompt_bt, pad_b


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


def make_plan(cfg: ModelConfig, rows: list[list[int]], *, max_new_tokens: int, num_steps: int,
              exit: ExitConfig | str | None = None, cache_budget: int | None = None,
              continuous_cot: bool = False, speculative: SpeculativeConfig | None = None,
              sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
              init_scale: float = 0.0, return_logits: bool = False) -> _Plan:
    """Check every option and fix the static shape of the program; raises ValueError."""
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    num_steps = _positive_int("num_steps", num_steps)
    if cache_budget is not None:
        if isinstance(cache_budget, bool) or not isinstance(cache_budget, (int, np.integer)) \
                or cache_budget < 1:
            raise ValueError(f"cache_budget={cache_budget!r} must be an integer >= 1 (recurrence "
                             "slots kept per core layer), or None for one slot per step.")
    exit_cfg = as_exit_config(exit)
    if speculative is True:
        speculative = SpeculativeConfig()
    if speculative is not None and not isinstance(speculative, SpeculativeConfig):
        raise TypeError("speculative must be a SpeculativeConfig, True or None.")
    if speculative is not None and (exit_cfg is not None or continuous_cot):
        raise ValueError("speculative decoding verifies a block of tokens in one parallel pass, "
                         "so it cannot be combined with adaptive exit or continuous_cot.")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens="
                         f"{max_new_tokens} is {longest + max_new_tokens}, beyond "
                         f"model.max_seq_len={cfg.max_seq_len}.")
    stop = tuple(int(t) for t in stop_tokens)
    bad = [t for t in stop if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens {bad} are outside the vocabulary [0, {cfg.vocab_size}).")
    extra = 0 if speculative is None else speculative.num_draft
    return _Plan(cfg=cfg, batch=len(rows), prompt_len=longest,
                 cache_len=longest + max_new_tokens - 1 + extra, max_new_tokens=max_new_tokens,
                 num_slots=int(cache_budget) if cache_budget is not None else num_steps,
                 exit=exit_cfg, continuous_cot=bool(continuous_cot), speculative=speculative,
                 sampling=sampling, stop_tokens=stop, init_scale=float(init_scale),
                 return_logits=bool(return_logits))


def _finish(raw: dict[str, jax.Array], plan: _Plan) -> GenerateOutput:
    """Trim to max_new_tokens, cut each row after its stop token, move to NumPy."""
    n_new = plan.max_new_tokens
    num_generated = int(raw["num_generated"])
    tokens = np.asarray(raw["tokens"])[:, :n_new].copy()
    steps = np.asarray(raw["steps"])[:, :n_new].copy()
    lengths = np.full((plan.batch,), min(num_generated, n_new), np.int64)
    if plan.stop_tokens:
        is_stop = np.isin(tokens, plan.stop_tokens) & (np.arange(n_new)[None] < lengths[:, None])
        first = np.where(is_stop.any(1), is_stop.argmax(1) + 1, lengths)
        lengths = np.minimum(lengths, first)
    after = np.arange(n_new)[None] >= lengths[:, None]
    tokens[after] = PAD_ID
    steps[after] = 0
    exit_values = None
    if plan.exit is not None:
        exit_values = np.asarray(raw["exit_values"])[:, :n_new].copy()
        exit_values[after] = np.nan
    stats = {"core_steps": float(raw["core_steps"]) if plan.speculative else float(steps.sum())}
    if plan.speculative is not None:
        rounds = max(int(raw["rounds"]), 1)
        stats.update(accepted_drafts=int(raw["accepted_drafts"]), rounds=int(raw["rounds"]),
                     acceptance_rate=int(raw["accepted_drafts"]) /
                     (rounds * plan.speculative.num_draft))
    logits = None
    if plan.return_logits:
        logits = np.asarray(raw["logits"])[:, :n_new]
    return GenerateOutput(tokens=tokens, steps=steps, lengths=lengths, exit_values=exit_values,
                          logits=logits, cache_bytes=plan_cache_bytes(plan),
                          num_slots=plan.num_slots, stats=stats)


def plan_cache_bytes(plan: _Plan) -> int:
    return kvc.cache_bytes(plan.cfg, plan.batch, plan.cache_len, plan.num_slots, plan.track_latest)


def _place(params: Params, cfg: ModelConfig, prompt_bt: np.ndarray, pad_b: np.ndarray,
           mesh: jax.sharding.Mesh | None) -> tuple[Params, jax.Array, jax.Array]:
    """Params by the training rules, the batch over "data" (replicated if it does not divide)."""
    if mesh is None:
        return params, jnp.asarray(prompt_bt), jnp.asarray(pad_b)
    from jax.sharding import NamedSharding, PartitionSpec

    from rdlm import sharding

    params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    spec = sharding.batch_spec(mesh)
    if prompt_bt.shape[0] % sharding.data_parallel_size(mesh):
        spec = PartitionSpec()  # a batch that does not divide stays replicated
    return (params, jax.device_put(prompt_bt, NamedSharding(mesh, spec)),
            jax.device_put(pad_b, NamedSharding(mesh, PartitionSpec(*spec[:1]))))


def generate(params: Params, cfg: ModelConfig, prompt_tokens: Any, *, max_new_tokens: int,
             num_steps: int, exit: ExitConfig | str | None = None,
             cache_budget: int | None = None, continuous_cot: bool = False,
             speculative: SpeculativeConfig | bool | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             stop_tokens: Sequence[int] = (), key: jax.Array | None = None,
             prompt_lengths: Any = None, init_scale: float = 0.0, return_logits: bool = False,
             mesh: jax.sharding.Mesh | None = None) -> GenerateOutput:
    """Generate ``max_new_tokens`` tokens after each prompt with ``num_steps`` core iterations.

    - ``prompt_tokens``: a list of token-id lists (lengths may differ), or a padded array with
      ``prompt_lengths``.
    - ``exit``: adaptive exit per token and row, an `ExitConfig` or ``"kl"``, ``"kl:5e-4"``,
      ``"argmax-stability:3"`` …; the cap is ``num_steps``. The prompt never exits early.
    - ``cache_budget``: recurrence slots per core layer (step i uses slot i mod budget); None keeps
      one slot per step. Fix it to compile once for every ``num_steps``.
    - ``continuous_cot``: each generated token starts from the previous token's final state.
    - ``speculative``: a `SpeculativeConfig` (or True for the defaults).
    - ``temperature`` 0 is greedy; otherwise ``key`` is required; ``top_k``/``top_p``/``min_p``
      filter the distribution. ``stop_tokens`` end a row (the stop token is kept).
    - ``init_scale``: 0 (default) starts every token from the zero state (deterministic); a
      positive value draws s_0 from ``key`` as in training.
    - ``mesh``: shard params with `rdlm.sharding.param_shardings` and the batch over "data".
    """
    rows = prompt_rows(prompt_tokens, prompt_lengths, cfg)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p,
                              min_p=min_p)
    if key is None and (not sampling.greedy or init_scale != 0):
        raise ValueError("sampling with temperature > 0 or a random initial state "
                         "(init_scale > 0) needs key=jax.random.key(...).")
    plan = make_plan(cfg, rows, max_new_tokens=max_new_tokens, num_steps=num_steps, exit=exit,
                     cache_budget=cache_budget, continuous_cot=continuous_cot,
                     speculative=speculative, sampling=sampling, stop_tokens=stop_tokens,
                     init_scale=init_scale, return_logits=return_logits)
    prompt_bt, pad_b = left_pad(rows)
    params, prompt_bt, pad_b = _place(params, cfg, prompt_bt, pad_b, mesh)
    key = jax.random.key(0) if key is None else key
    raw = _generate_jit(params, prompt_bt, pad_b, jnp.int32(num_steps), key, plan=plan)
    return _finish(raw, plan)


# ---------------------------------------------------------------------------------------------
# Command line: python -m rdlm sample …


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def _speculative_arg(text: str) -> SpeculativeConfig:
    """``K`` or ``K:DRAFT_STEPS`` (draft K tokens with DRAFT_STEPS iterations each)."""
    k, _, steps = text.partition(":")
    try:
        return SpeculativeConfig(num_draft=int(k), draft_steps=int(steps) if steps else 4)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--speculative {text!r}: {err}")


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rdlm sample",
        description="Generate from a checkpoint. Defaults come from the checkpoint's sample "
                    "section.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeat for a batch); needs a tokenizer")
    parser.add_argument("--tokens", action="append", type=_int_list, default=[],
                        help="prompt as token ids, e.g. 1,2,3 (repeat for a batch)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, if any)")
    parser.add_argument("--num-steps", type=int, help="core iterations per token (the cap "
                        "under --exit)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--exit", help="adaptive exit: kl, minp-kl, entropy-diff, latent-diff, "
                        "cosine, argmax-stability, optionally :THRESHOLD")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=1)
    parser.add_argument("--cache-budget", type=int, help="recurrence slots per core layer")
    parser.add_argument("--continuous-cot", action="store_true", default=None)
    parser.add_argument("--speculative", type=_speculative_arg, metavar="K[:DRAFT_STEPS]")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--stop", type=_int_list, help="stop token ids (default: the "
                        "tokenizer's end-of-text/turn ids)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-scale", type=float, default=0.0,
                        help="0: zero initial state (deterministic); 1: random as in training")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    return parser


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def cli(argv: Sequence[str]) -> int:
    """``python -m rdlm sample --checkpoint DIR --prompt "…" …``; returns the exit status."""
    args = _sample_parser().parse_args(list(argv))
    from pathlib import Path

    from rdlm import checkpoint

    if not args.prompt and not args.tokens:
        print("error: give --prompt TEXT (with a tokenizer) or --tokens 1,2,3", file=sys.stderr)
        return 2
    tokenizer = None
    tok_path = args.tokenizer
    if tok_path is None and (Path(args.checkpoint) / "tokenizer.json").is_file():
        tok_path = args.checkpoint
    if tok_path is not None:
        from rdlm.interop import load_tokenizer
        tokenizer = load_tokenizer(tok_path)
    if args.prompt and tokenizer is None:
        print("error: --prompt needs --tokenizer tokenizer.json (or a checkpoint directory that "
              "holds one); or give --tokens 1,2,3", file=sys.stderr)
        return 2
    config, params = checkpoint.load_params(args.checkpoint)
    defaults = config.sample
    rows = [tokenizer.prompt(text) for text in args.prompt] + list(args.tokens)
    exit_spec = _pick(args.exit, defaults.exit)
    exit_cfg = (None if exit_spec is None else
                ExitConfig.parse(exit_spec, min_steps=args.min_steps,
                                 check_every=args.check_every))
    stop = args.stop if args.stop is not None else (tokenizer.stop_ids if tokenizer else ())
    temperature = _pick(args.temperature, defaults.temperature)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the config's default, shortened to what the context has room for
        room = config.model.max_seq_len - max((len(r) for r in rows), default=0)
        max_new_tokens = min(defaults.max_new_tokens, room) if room > 0 else defaults.max_new_tokens
        if max_new_tokens < defaults.max_new_tokens:
            print(f"note: generating {max_new_tokens} tokens (the context holds "
                  f"{config.model.max_seq_len}); pass --max-new-tokens to choose", file=sys.stderr)
    try:
        out = generate(
            params, config.model, rows,
            max_new_tokens=max_new_tokens,
            num_steps=_pick(args.num_steps, defaults.num_steps), exit=exit_cfg,
            cache_budget=_pick(args.cache_budget, defaults.cache_budget),
            continuous_cot=_pick(args.continuous_cot, defaults.continuous_cot),
            speculative=args.speculative, temperature=temperature,
            top_k=_pick(args.top_k, defaults.top_k), top_p=_pick(args.top_p, defaults.top_p),
            min_p=_pick(args.min_p, defaults.min_p), stop_tokens=stop,
            key=jax.random.key(args.seed), init_scale=args.init_scale)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, ids in enumerate(out.rows()):
        steps = out.steps[i, :len(ids)].tolist()
        text = tokenizer.decode(ids) if tokenizer is not None else None
        if args.json:
            record = {"row": i, "tokens": ids, "steps": steps}
            if text is not None:
                record["text"] = text
            if out.exit_values is not None:
                record["exit_values"] = [None if math.isnan(v) else float(v)
                                         for v in out.exit_values[i, :len(ids)]]
            print(json.dumps(record))
            continue
        print(f"[{i}] {text if text is not None else ' '.join(map(str, ids))}")
        mean = sum(steps) / max(len(steps), 1)
        print(f"    iterations per token: {steps} (mean {mean:.2f})")
    print(f"cache: {out.cache_bytes / 2**20:.2f} MiB in {out.num_slots} recurrence slots"
          + (f"; speculative acceptance {out.stats['acceptance_rate']:.2f}"
             if "acceptance_rate" in out.stats else ""), file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m rdlm bench sample CONFIG


def weight_bytes_per_token(cfg: ModelConfig, mean_steps: float) -> float:
    """Parameter bytes batch-1 decoding reads per token: every non-core weight once (the tied
    embedding as the output head) and the core's weights once per recurrence step."""
    from rdlm.model import abstract_params

    shapes = abstract_params(cfg)
    size = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    core = size(shapes["core"])
    return size(shapes) - core + mean_steps * core


def memory_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a jitted sum over a large float32 array), best of a few."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def _bench_config(spec: str, overrides: Sequence[str]) -> ModelConfig:
    from pathlib import Path

    from rdlm.config import MODEL_PRESETS, load_config

    if spec in MODEL_PRESETS and not Path(spec).is_file():
        return load_config(None, [f"model.preset={spec}", *overrides]).model
    return load_config(spec, overrides).model


def bench_cli(argv: Sequence[str]) -> int:
    """``python -m rdlm bench sample CONFIG [key=value …] [--quick] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m rdlm bench sample")
    parser.add_argument("config", help="YAML config or model preset name (e.g. bench-28m)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--steps", type=_int_list, default=[4, 16, 32])
    parser.add_argument("--batches", type=_int_list, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=4, help="slots of the shared-cache runs")
    parser.add_argument("--exit", default="kl", help="criterion of the adaptive-exit runs")
    parser.add_argument("--speculative", type=_speculative_arg, default=SpeculativeConfig(),
                        help="K or K:DRAFT_STEPS of the speculative runs (default 4:4)")
    parser.add_argument("--variants", default="full,shared,exit",
                        help="comma list of: full (one slot per step), shared, exit, speculative")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_intermixed_args(list(argv))  # flags before or after the overrides
    cfg = _bench_config(args.config, args.overrides)
    params = jax.jit(lambda k: __import__("rdlm").init_params(cfg, k))(jax.random.key(0))
    max_r = max(args.steps)
    variants = {
        "full": dict(cache_budget=max_r),  # one slot per step for every r: one compile
        "shared": dict(cache_budget=args.budget),
        "exit": dict(cache_budget=max_r, exit=args.exit),
        "speculative": dict(cache_budget=max_r, speculative=args.speculative),
    }
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in chosen:
        if v not in variants:
            parser.error(f"unknown variant {v!r}; choose from {sorted(variants)}")
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; model "
          f"{__import__('rdlm').count_params(cfg):,} parameters, {cfg.dtype}; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} greedy new tokens, zero initial state")
    bandwidth = memory_bandwidth()
    print(f"measured streaming-read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    results = []
    header = (f"{'variant':<12}{'batch':>6}{'r':>5}{'tokens/s':>11}{'mean it':>9}"
              f"{'cache MiB':>11}{'weight GB/s':>13}{'of bound':>10}{'compile s':>11}")
    print(header)
    for variant in chosen:
        for batch in args.batches:
            prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
            common = dict(max_new_tokens=args.new_tokens, **variants[variant])
            start = time.perf_counter()
            generate(params, cfg, prompts, num_steps=min(args.steps), **common)
            compile_s = time.perf_counter() - start
            for r in args.steps:
                start = time.perf_counter()
                out = generate(params, cfg, prompts, num_steps=r, **common)
                seconds = time.perf_counter() - start
                tokens_per_s = batch * args.new_tokens / seconds
                mean_steps = out.mean_steps
                row = {"variant": variant, "batch": batch, "num_steps": r,
                       "tokens_per_s": tokens_per_s, "seconds": seconds,
                       "mean_iterations": mean_steps, "cache_bytes": out.cache_bytes,
                       "compile_s": compile_s, "device": device.device_kind}
                line = (f"{variant:<12}{batch:>6}{r:>5}{tokens_per_s:>11.1f}{mean_steps:>9.2f}"
                        f"{out.cache_bytes / 2**20:>11.2f}")
                if batch == 1:
                    # Recurrence steps actually run per token (drafts and verification included).
                    steps_run = out.stats["core_steps"]
                    achieved = weight_bytes_per_token(cfg, steps_run / args.new_tokens) \
                        * tokens_per_s
                    row.update(weight_bytes_per_s=achieved, bandwidth_bytes_per_s=bandwidth)
                    line += f"{achieved / 1e9:>13.2f}{achieved / bandwidth:>10.0%}"
                else:
                    line += f"{'':>13}{'':>10}"
                line += f"{compile_s:>11.1f}"
                if "acceptance_rate" in out.stats:
                    row["acceptance_rate"] = out.stats["acceptance_rate"]
                    line += f"  (drafts accepted {row['acceptance_rate']:.0%})"
                print(line, flush=True)
                results.append(row)
    if args.json:
        report = {"device": f"{device.platform} {device.device_kind} x{jax.device_count()}",
                  **host_info(), "jax": jax.__version__, "bandwidth_bytes_per_s": bandwidth,
                  "command": "python -m rdlm bench sample " + " ".join(argv), "rows": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def host_info() -> dict[str, Any]:
    """What a results file records of the machine: CPU model, cores, the malloc tunables."""
    return {"host_cpu": cpu_model(), "host_cores": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def cpu_model() -> str:
    """The host CPU's model name (Linux), so a results file says which machine made it."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else "unknown"
    except OSError:
        return "unknown"
