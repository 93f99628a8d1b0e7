"""The generation programs: each one whole ``jax.jit`` program, prefill and every token.

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
- Continuous thoughts in the prompt (`ThoughtConfig`) are fed once, into the cache: the prefill
  runs the positions before the earliest thought in parallel, then one position at a time up to
  the latest thought, then the rest of the prompt as one block (`_prefill_thoughts`).
- Adaptive exit is per token and per row: a row whose token converged keeps its state (and its
  cache entries) frozen while the other rows continue; the loop stops when all rows are done or at
  ``num_steps``.
- Self-speculative decoding drafts ``num_draft`` tokens with ``draft_steps`` iterations, verifies
  them in one parallel pass at the full r and keeps the longest agreeing prefix (shared by the
  batch, so all rows stay at the same position); rejected positions are simply overwritten later,
  which is the cache roll-back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.generation import cache as kvc
from rdlm.generation.cache import KVCache
from rdlm.generation.engine import (choose_tokens, decode_adaptive, forward_block, start_state,
                                     thought_input, token_input)
from rdlm.generation.plan import PAD_ID, Plan
from rdlm.model import Params, backend
from rdlm.model.kernels import to_loop_layout


def _is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    if not stop_tokens:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32))


def _put_column(buf: jax.Array, column: jax.Array, n: jax.Array) -> jax.Array:
    """buf[:, n] = column (any trailing dims)."""
    return lax.dynamic_update_index_in_dim(buf, column.astype(buf.dtype), n, axis=1)


class PromptCarry(NamedTuple):
    """The last prompt position computed so far: what the next one (a thought, maybe) and the
    first generated token need."""

    logits_bv: jax.Array
    hidden_bd: jax.Array
    state_b1d: jax.Array
    cache: KVCache


def _prefill(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
             num_steps: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
    """The prompt at the full r (no exit); logits and state of its last slot.

    One parallel pass over the positions before the thoughts (the whole prompt without them),
    then the thoughts (`_prefill_thoughts`)."""
    cfg, b = plan.cfg, plan.batch
    dtype = jnp.dtype(cfg.dtype)
    carry = PromptCarry(jnp.zeros((b, cfg.vocab_size), jnp.float32),
                        jnp.zeros((b, cfg.d_model), dtype), jnp.zeros((b, 1, cfg.d_model), dtype),
                        kvc.init_cache(cfg, b, plan.cache_len, plan.num_slots, plan.track_latest))
    if plan.prefill_len:
        block = token_input(params, cfg, prompt_bt[:, :plan.prefill_len])
        state_btd = start_state(plan, (b, plan.prefill_len, cfg.d_model), key, 0)
        out, cache = forward_block(params, plan, carry.cache, block, pad_b, 0, num_steps,
                                   state_btd, with_prefix=False)
        carry = PromptCarry(out.logits_btv[:, -1], out.hidden_btd[:, -1], out.state_btd[:, -1:],
                            cache)
    if plan.thought_block:
        carry = _prefill_thoughts(params, plan, prompt_bt, pad_b, num_steps, key, carry)
    return carry.logits_bv, carry.state_b1d, carry.cache


def _prompt_block(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                  num_steps: jax.Array, key: jax.Array, carry: PromptCarry,
                  start: jax.Array | int, length: int) -> PromptCarry:
    """Prompt positions ``start … start+length-1`` after the cache, a thought allowed at the
    first of them only (it takes the hidden state of the position before)."""
    cfg = plan.cfg
    tokens_bt = lax.dynamic_slice_in_dim(prompt_bt, start, length, axis=1)
    block = thought_input(params, cfg, plan.thoughts, tokens_bt, carry.hidden_bd, start, pad_b)
    state_btd = start_state(plan, (plan.batch, length, cfg.d_model), key, start)
    out, cache = forward_block(params, plan, carry.cache, block, pad_b, start, num_steps,
                               state_btd, with_prefix=True)
    return PromptCarry(out.logits_btv[:, -1], out.hidden_btd[:, -1], out.state_btd[:, -1:],
                       cache)


def _prefill_thoughts(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                      num_steps: jax.Array, key: jax.Array, carry: PromptCarry) -> PromptCarry:
    """The positions from the earliest thought on: one per iteration up to the latest thought
    (rows whose thoughts sit at different positions share every iteration), then the latest
    thought and the rest of the prompt as one block."""
    def one(j: jax.Array, carry: PromptCarry) -> PromptCarry:
        return _prompt_block(params, plan, prompt_bt, pad_b, num_steps, key, carry,
                             plan.prefill_len + j, 1)

    carry = lax.fori_loop(0, plan.thought_steps, one, carry)
    return _prompt_block(params, plan, prompt_bt, pad_b, num_steps, key, carry,
                         plan.prefill_len + plan.thought_steps, plan.thought_block)


def _buffers(plan: Plan) -> dict[str, jax.Array]:
    b, n = plan.batch, plan.out_len
    bufs = {"tokens": jnp.full((b, n), PAD_ID, jnp.int32), "steps": jnp.zeros((b, n), jnp.int32),
            "exit_values": jnp.full((b, n), jnp.nan, jnp.float32)}
    if plan.return_logits:
        bufs["logits"] = jnp.zeros((b, n, plan.cfg.vocab_size), jnp.float32)
    return bufs


def _first_token(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
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


class DecodeCarry(NamedTuple):
    """The token loop's state: ``n`` tokens emitted so far per row."""

    n: jax.Array
    bufs: dict[str, jax.Array]
    finished_b: jax.Array
    state_b1d: jax.Array  # the last token's final state (continuous CoT starts from it)
    cache: KVCache


def _next_token(params: Params, plan: Plan, pad_b: jax.Array, num_steps: jax.Array,
                sample_key: jax.Array, state_key: jax.Array, carry: DecodeCarry) -> DecodeCarry:
    """Run the last emitted token through the model and emit the next one, per row."""
    n = carry.n
    token_b1 = lax.dynamic_index_in_dim(carry.bufs["tokens"], n - 1, axis=1)
    pos = plan.prompt_len + n - 1
    state_b1d = (carry.state_b1d if plan.continuous_cot
                 else start_state(plan, carry.state_b1d.shape, state_key, pos))
    if plan.exit is None:
        out, cache = forward_block(params, plan, carry.cache,
                                   token_input(params, plan.cfg, token_b1), pad_b, pos, num_steps,
                                   state_b1d, with_prefix=True)
        logits_bv, state_b1d = out.logits_btv[:, 0], out.state_btd
        steps_b = jnp.full((plan.batch,), num_steps, jnp.int32)
        value_b = jnp.full((plan.batch,), jnp.nan, jnp.float32)
    else:
        logits_bv, state_b1d, steps_b, value_b, cache = decode_adaptive(
            params, plan, carry.cache, token_b1, pad_b, pos, num_steps, state_b1d,
            carry.finished_b)
    token_b = choose_tokens(logits_bv, jax.random.fold_in(sample_key, n), plan.sampling)
    bufs = dict(carry.bufs)
    bufs["tokens"] = _put_column(bufs["tokens"], token_b, n)
    bufs["steps"] = _put_column(bufs["steps"], steps_b, n)
    bufs["exit_values"] = _put_column(bufs["exit_values"], value_b, n)
    if plan.return_logits:
        bufs["logits"] = _put_column(bufs["logits"], logits_bv, n)
    finished_b = carry.finished_b | _is_stop(token_b, plan.stop_tokens)
    return DecodeCarry(n + 1, bufs, finished_b, state_b1d, cache)


def _generate_plain(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
                    num_steps: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
    """Prefill, then one token per row per iteration of a ``while_loop``."""
    sample_key, state_key = jax.random.split(key)
    bufs, finished_b, state_b1d, cache = _first_token(params, plan, prompt_bt, pad_b, num_steps,
                                                      sample_key, state_key)

    def not_finished(carry: DecodeCarry) -> jax.Array:
        return (carry.n < plan.max_new_tokens) & ~jnp.all(carry.finished_b)

    def body(carry: DecodeCarry) -> DecodeCarry:
        return _next_token(params, plan, pad_b, num_steps, sample_key, state_key, carry)

    init = DecodeCarry(jnp.int32(1), bufs, finished_b, state_b1d, cache)
    out = lax.while_loop(not_finished, body, init)
    bufs = dict(out.bufs)
    bufs["num_generated"] = out.n
    bufs["core_steps"] = jnp.sum(bufs["steps"])
    return bufs


class SpeculativeCarry(NamedTuple):
    """The rounds loop's state: ``n`` tokens emitted so far (the same for every row)."""

    n: jax.Array
    bufs: dict[str, jax.Array]
    next_b: jax.Array  # emitted, not yet run through the model
    finished_b: jax.Array
    cache: KVCache
    accepted: jax.Array  # drafts accepted so far


def _generate_speculative(params: Params, plan: Plan, prompt_bt: jax.Array, pad_b: jax.Array,
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

    def not_finished(carry: SpeculativeCarry) -> jax.Array:
        return (carry.n < plan.max_new_tokens) & ~jnp.all(carry.finished_b)

    def draft(c: KVCache, next_b: jax.Array, pos: jax.Array, round_key: jax.Array
              ) -> tuple[jax.Array, KVCache]:
        """k cheap tokens after ``next_b`` (at ``pos``); their cache entries are scratch."""
        def one(j: jax.Array, carry: tuple) -> tuple:
            token_b, drafts_bk, c_ = carry
            p = pos + j
            state = start_state(plan, (b, 1, plan.cfg.d_model), state_key, p)
            block = token_input(params, plan.cfg, token_b[:, None])
            out, c_ = forward_block(params, plan, c_, block, pad_b, p, draft_steps, state,
                                    with_prefix=True)
            token_b = choose_tokens(out.logits_btv[:, 0], jax.random.fold_in(round_key, j),
                                    plan.sampling)
            return token_b, drafts_bk.at[:, j].set(token_b), c_

        _, drafts_bk, c = lax.fori_loop(0, k, one, (next_b, jnp.zeros((b, k), jnp.int32), c))
        return drafts_bk, c

    def body(carry: SpeculativeCarry) -> SpeculativeCarry:
        n, bufs, next_b, finished, c, accepted = carry
        pos = plan.prompt_len + n - 1  # where next_b (already emitted) goes
        round_key = jax.random.fold_in(sample_key, n)
        drafts_bk, c = draft(c, next_b, pos, jax.random.fold_in(round_key, 0))
        block_bt = jnp.concatenate([next_b[:, None], drafts_bk], 1)  # positions pos … pos+k
        state = start_state(plan, (b, k + 1, plan.cfg.d_model), state_key, pos)
        out, c = forward_block(params, plan, c, token_input(params, plan.cfg, block_bt), pad_b,
                               pos, num_steps, state, with_prefix=True)
        logits_btv = out.logits_btv
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
        return SpeculativeCarry(n + n_accept + 1, bufs, next_b, finished, c, accepted + n_accept)

    init = SpeculativeCarry(jnp.int32(1), bufs, first_b, finished_b, cache, jnp.int32(0))
    n, bufs, _, _, _, accepted = lax.while_loop(not_finished, body, init)
    rounds = jnp.maximum(n - 1 - accepted, 1)  # each round emits accepted + 1 tokens
    bufs["num_generated"] = jnp.minimum(n, plan.max_new_tokens)
    bufs["accepted_drafts"] = accepted
    bufs["rounds"] = n - 1 - accepted
    bufs["core_steps"] = num_steps + rounds * (num_steps + k * draft_steps)
    return bufs


def _generate_program(params: Params, prompt_bt: jax.Array, pad_b: jax.Array,
                      num_steps: jax.Array, key: jax.Array, plan: Plan) -> dict[str, jax.Array]:
    # Over a mesh the program names it, so that the decode kernels run per shard of it
    # (`backend.shard_mesh`).
    with backend.names_mesh(plan.mesh):
        params = to_loop_layout(params)
        if plan.speculative is not None:
            return _generate_speculative(params, plan, prompt_bt, pad_b, num_steps, key)
        return _generate_plain(params, plan, prompt_bt, pad_b, num_steps, key)


generate_jit = jax.jit(_generate_program, static_argnames=("plan",))
