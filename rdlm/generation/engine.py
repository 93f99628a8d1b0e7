"""The generation engine: one block of positions through prelude, core steps and coda, reading and
writing the KV cache, at a fixed r (`forward_block`) or with per-row adaptive exit
(`decode_adaptive`); and how a token is chosen from logits. A block enters as per-position input
bases (`BlockInput`: token embeddings, or continuous thoughts) and leaves as logits, last hidden
states and final latent states (`BlockOutput`). The programs that loop over tokens are in
`rdlm.generation.programs`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.config import ModelConfig
from rdlm.generation import cache as kvc
from rdlm.generation.cache import KVCache
from rdlm.generation.exits import evaluate, init_exit_state
from rdlm.generation.plan import Plan, SamplingConfig, ThoughtConfig
from rdlm.model import (AttentionContext, KV, Params, RowEntries, bind, initial_state, rope_angles,
                        run_blocks)
from rdlm.model.kernels import from_loop_layout


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


# The segment id that a block's real (non-padding) positions share; a padding position's id is
# its own index (>= 0), so no two padding positions share one (`block_segments`).
PROMPT_SEGMENT = -1


def block_segments(pad_b: jax.Array, index_t: jax.Array) -> jax.Array:
    """[b, t] segment ids of positions ``index_t`` of left-padded rows: the real positions share
    `PROMPT_SEGMENT`, each padding position is a segment of its own.

    "Causal within equal ids" is then exactly the engine's block mask (real positions see the
    real positions before them, a padding position sees itself only, so no softmax row is
    empty), which the fused kernels take as ids instead of a [b, t, s] mask."""
    return jnp.where(index_t[None, :] >= pad_b[:, None], PROMPT_SEGMENT, index_t[None, :])


def block_context(cfg: ModelConfig, pad_b: jax.Array, start: jax.Array | int, length: int,
                  cache_len: int, with_prefix: bool) -> AttentionContext:
    """Mask and RoPE for queries at cache positions ``start … start+length-1``.

    Keys are the cache (positions < start, not padding) followed by the block itself, causal
    within `block_segments`. Without a prefix (a prompt's prefill) the context carries the
    segment ids too, so that `rdlm.model.kernels.attention` can pick splash attention on TPU or
    the Pallas flash kernel on GPU; the blocked CPU kernel reads the same mask as before.
    Over a mesh those kernels run per shard of the mesh the program names
    (`rdlm.model.backend.shard_mesh`).
    """
    b = pad_b.shape[0]
    index_t = start + jnp.arange(length)
    positions_bt = jnp.maximum(index_t[None, :] - pad_b[:, None], 0)
    cos_bt1f, sin_bt1f = rope_angles(positions_bt, cfg)
    segment_bt = block_segments(pad_b, index_t)
    causal_tt = jnp.tril(jnp.ones((length, length), bool))
    block_btt = causal_tt[None] & (segment_bt[:, :, None] == segment_bt[:, None, :])
    if not with_prefix:
        return AttentionContext(cos_bt1f, sin_bt1f, block_btt[:, None], segment_bt)
    # Over a cache the mask covers cached keys too, which no segment ids express: no ids, so
    # attention stays on `attend_with_prefix`.
    index_s = jnp.arange(cache_len)
    prefix_bs = (index_s[None] >= pad_b[:, None]) & (index_s[None] < start)
    mask_bts = jnp.concatenate(
        [jnp.broadcast_to(prefix_bs[:, None, :], (b, length, cache_len)), block_btt], -1)
    return AttentionContext(cos_bt1f, sin_bt1f, mask_bts[:, None])


class BlockInput(NamedTuple):
    """What a block of positions feeds the prelude, before the token shift.

    ``bases_btd``: each position's own base, ``wte[token] · sqrt(d)`` or a thought's vector.
    ``shift_bases_btd``: what the position hands to its successors' token shift.
    ``shifted_bt``: where a position's own input gets its predecessors' shift (None: everywhere).
    """

    bases_btd: jax.Array
    shift_bases_btd: jax.Array
    shifted_bt: jax.Array | None = None


class BlockOutput(NamedTuple):
    logits_btv: jax.Array  # float32
    hidden_btd: jax.Array  # ln_f(coda(ln_f(s_r))): what the head multiplies (`model.head`)
    state_btd: jax.Array  # s_r


def _model(params: Params, cfg: ModelConfig) -> Any:
    """The NNX model over loop-layout params."""
    return bind(from_loop_layout(params), cfg)


def token_input(params: Params, cfg: ModelConfig, tokens_bt: jax.Array) -> BlockInput:
    """Ordinary tokens: each position's base is its token's, handed on as it is."""
    bases_btd = _model(params, cfg).token_bases(tokens_bt)
    return BlockInput(bases_btd, bases_btd)


def thought_input(params: Params, cfg: ModelConfig, thoughts: ThoughtConfig,
                  tokens_bt: jax.Array, previous_hidden_bd: jax.Array, start: jax.Array | int,
                  pad_b: jax.Array) -> BlockInput:
    """Prompt positions ``start …`` where a ``thoughts.token_id`` is a continuous thought; only the
    first position of the block may hold one (its base: the hidden state of the position before,
    zero at a row's first position, where nothing precedes it), handed on and shifted as
    `ThoughtConfig` says."""
    token = token_input(params, cfg, tokens_bt)
    position_t = start + jnp.arange(tokens_bt.shape[1])
    is_thought_bt = (tokens_bt == thoughts.token_id) & (position_t[None] >= pad_b[:, None])
    previous_b1d = jnp.where((start > pad_b)[:, None, None], previous_hidden_bd[:, None], 0)
    bases_btd = jnp.where(is_thought_bt[..., None], previous_b1d.astype(token.bases_btd.dtype),
                          token.bases_btd)
    if thoughts.shift_sees_thoughts:
        return BlockInput(bases_btd, bases_btd)
    return BlockInput(bases_btd, token.shift_bases_btd, ~is_thought_bt)


def _stage_prefixes(stage: kvc.Stage, with_prefix: bool) -> list[KV | RowEntries] | None:
    return list(kvc.read_stage(stage)) if with_prefix else None


def prelude_inputs(model: Any, cache: KVCache, block: BlockInput, start: jax.Array | int,
                   pad_b: jax.Array) -> jax.Array:
    """Each position's base plus, with ``model.token_shift``, its predecessors' shift bases
    (from the block or the cache) through the shift matrices."""
    if cache.shift_bases_btd is None:
        return block.bases_btd
    previous_kbtd = kvc.previous_bases(cache, block.shift_bases_btd, pad_b, start,
                                       model.cfg.token_shift)
    shifted_btd = model.add_shift(block.bases_btd, previous_kbtd)
    if block.shifted_bt is None:
        return shifted_btd
    return jnp.where(block.shifted_bt[..., None], shifted_btd, block.bases_btd)


def run_prelude(params: Params, cfg: ModelConfig, cache: KVCache, block: BlockInput,
                ctx: AttentionContext, start: jax.Array | int, with_prefix: bool,
                pad_b: jax.Array) -> tuple[jax.Array, KVCache]:
    """(e for the block, cache with the block's prelude entries and shift bases written)."""
    model = _model(params, cfg)
    embedded_btd, kvs = run_blocks(model.prelude, prelude_inputs(model, cache, block, start, pad_b),
                                   ctx, _stage_prefixes(cache.prelude, with_prefix))
    embedded_btd, kvs, shift_bases_btd = _after_reads(embedded_btd, kvs, block.shift_bases_btd)
    cache = kvc.set_shift_bases(cache, shift_bases_btd, start)
    return embedded_btd, cache._replace(prelude=kvc.write_stage(cache.prelude, kvs, start))


def _after_reads(output_btd: jax.Array, *writes: Any) -> tuple:
    """``writes`` made to depend on a stage's output, so that they reach the cache only after
    every read of it. Without the dependency XLA may schedule an in-place write before the
    attention that reads the same buffer, and then copies the whole buffer (twice) to keep the
    read intact, once per token: on a small model much of a decoding step's time. Adding
    ``0 · output`` is that dependency (XLA keeps a float multiply by zero, which is not exact
    for inf/NaN); an optimization barrier would not be, XLA:CPU drops barriers."""
    zero_b = 0 * output_btd[:, 0, 0]

    def tie(x: jax.Array) -> jax.Array:
        return x + zero_b.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    return (output_btd, *jax.tree.map(tie, writes))


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
             write: bool = True, logits_at_b: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, KVCache]:
    """(logits float32, last hidden state, cache): the coda of `RecurrentDepthLM.apply_coda`,
    keeping the hidden state that a continuous thought feeds back. ``logits_at_b``: the one
    block position of each row whose logits are wanted ([b, 1, V]; None: every position's)."""
    model = _model(params, cfg)
    x_btd, kvs = run_blocks(model.coda, model.coda_input(state_btd), ctx,
                            _stage_prefixes(cache.coda, with_prefix))
    hidden_btd, kvs = _after_reads(model.ln_f(x_btd), kvs)
    if logits_at_b is None:
        logits_btv = model.head(hidden_btd)
    else:  # the head over a whole prompt would be its biggest array, for one position's use
        logits_btv = model.head(jnp.take_along_axis(hidden_btd, logits_at_b[:, None, None], 1))
    if write:
        cache = cache._replace(coda=kvc.write_stage(cache.coda, kvs, start))
    return logits_btv, hidden_btd, cache


def start_state(plan: Plan, shape: tuple[int, ...], key: jax.Array,
                 start: jax.Array | int) -> jax.Array:
    if plan.init_scale == 0:
        return jnp.zeros(shape, jnp.dtype(plan.cfg.dtype))
    return initial_state(plan.cfg, shape, key=jax.random.fold_in(key, start),
                         init_scale=plan.init_scale)


def block_buffer(plan: Plan, batch: int, length: int) -> KVCache:
    """Core entries of the positions being computed, merged into the cache after their loop."""
    return kvc.init_cache(plan.cfg, batch, length, plan.num_slots, plan.track_latest)


def forward_block(params: Params, plan: Plan, cache: KVCache, block: BlockInput,
                  pad_b: jax.Array, start: jax.Array | int, num_steps: jax.Array | int,
                  state_btd: jax.Array, with_prefix: bool, logits_at_b: jax.Array | None = None
                  ) -> tuple[BlockOutput, KVCache]:
    """A block of positions at a fixed number of steps (prefill, plain decoding, draft, verify,
    thoughts); returns its outputs and the cache with the block written. ``logits_at_b``: the
    one position of each row whose logits are wanted (`run_coda`)."""
    cfg = plan.cfg
    b, length, _ = block.bases_btd.shape
    ctx = block_context(cfg, pad_b, start, length, plan.cache_len, with_prefix)
    embedded_btd, cache = run_prelude(params, cfg, cache, block, ctx, start, with_prefix, pad_b)
    # A prompt with nothing before it reads no cache, so it can write the cache directly.
    read, write, write_start = ((cache, block_buffer(plan, b, length), 0) if with_prefix
                                else (None, cache, start))

    def body(step: jax.Array, carry: tuple[jax.Array, KVCache]) -> tuple[jax.Array, KVCache]:
        state, w = carry
        return run_core_step(params, cfg, plan.num_slots, read, w, state, embedded_btd, ctx, step,
                             write_start)

    state_btd, write = lax.fori_loop(0, num_steps, body, (state_btd, write))
    cache = kvc.merge_block(cache, write, start) if with_prefix else write
    cache = kvc.set_depth(cache, jnp.full((b, length), num_steps, jnp.int32), start)
    logits_btv, hidden_btd, cache = run_coda(params, cfg, cache, state_btd, ctx, start,
                                             with_prefix, logits_at_b=logits_at_b)
    return BlockOutput(logits_btv, hidden_btd, state_btd), cache


class ExitCarry(NamedTuple):
    """The recurrence loop of one token under adaptive exit."""

    step: jax.Array
    state_b1d: jax.Array
    done_b: jax.Array  # exited (or finished generating)
    steps_b: jax.Array  # steps each row ran
    value_b: jax.Array  # the criterion's value at the last evaluation
    memory: Any  # `ExitState` of the last evaluation
    write: KVCache  # the token's own core entries


def decode_adaptive(params: Params, plan: Plan, cache: KVCache, token_b1: jax.Array,
                    pad_b: jax.Array, pos: jax.Array, num_steps: jax.Array,
                    state_b1d: jax.Array, skip_b: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, KVCache]:
    """One token per row with per-row adaptive exit (capped at ``num_steps``).

    Rows in ``skip_b`` (finished generating) start as exited. Returns (logits [b, V], final
    state [b, 1, d], steps run [b], exit value [b], cache).
    """
    cfg, exit_cfg = plan.cfg, plan.exit
    ctx = block_context(cfg, pad_b, pos, 1, plan.cache_len, True)
    embedded_b1d, cache = run_prelude(params, cfg, cache, token_input(params, cfg, token_b1), ctx,
                                      pos, True, pad_b)
    b = token_b1.shape[0]

    def not_finished(carry: ExitCarry) -> jax.Array:
        return (carry.step < num_steps) & ~jnp.all(carry.done_b)

    def body(carry: ExitCarry) -> ExitCarry:
        step, active_b = carry.step, ~carry.done_b
        state, write = run_core_step(params, cfg, plan.num_slots, cache, carry.write,
                                     carry.state_b1d, embedded_b1d, ctx, step, 0, active_b)
        check = (step + 1) % exit_cfg.check_every == 0

        def check_exit(memory: Any) -> tuple:
            logits_bv = None
            if exit_cfg.needs_logits:  # the coda on the candidate state; its entries are not kept
                logits_bv = run_coda(params, cfg, cache, state, ctx, pos, True, write=False)[0][:, 0]
            value, converged, new_memory = evaluate(exit_cfg, memory, state[:, 0], logits_bv)
            new_memory = jax.tree.map(
                lambda n, o: jnp.where(active_b.reshape((-1,) + (1,) * (n.ndim - 1)), n, o),
                new_memory, memory)
            return value, converged, new_memory

        def no_check(memory: Any) -> tuple:
            return carry.value_b, jnp.zeros((b,), bool), memory

        value, converged_b, memory = lax.cond(check, check_exit, no_check, carry.memory)
        done_b = carry.done_b | (active_b & converged_b & (step + 1 >= exit_cfg.min_steps))
        return ExitCarry(step + 1, state, done_b, carry.steps_b + active_b.astype(jnp.int32),
                         jnp.where(active_b & check, value, carry.value_b), memory, write)

    init = ExitCarry(jnp.int32(0), state_b1d, skip_b, jnp.zeros((b,), jnp.int32),
                     jnp.full((b,), jnp.inf, jnp.float32),
                     init_exit_state(state_b1d[:, 0], cfg.vocab_size), block_buffer(plan, b, 1))
    out = lax.while_loop(not_finished, body, init)
    cache = kvc.merge_block(cache, out.write, pos)
    cache = kvc.set_depth(cache, out.steps_b[:, None], pos)
    logits_b1v, _, cache = run_coda(params, cfg, cache, out.state_b1d, ctx, pos, True)
    return logits_b1v[:, 0], out.state_b1d, out.steps_b, out.value_b, cache
