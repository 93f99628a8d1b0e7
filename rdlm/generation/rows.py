"""The generation engine with every row at its own position and recurrence step, for
depth-continuous batching (`rdlm.generation.continuous`): one token per row through the prelude,
one core step or the coda, each row reading the cache below its own position and writing at it.

The arithmetic is the engine's (`rdlm.generation.engine`): the same layers, the same cache rule
(slot ``step mod num_slots``, the latest entry of a position that stopped earlier); only the
positions differ per row, so the mask, RoPE, the cache reads and the writes are per row.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.config import ModelConfig
from rdlm.generation import cache as kvc
from rdlm.generation.cache import KVCache
from rdlm.generation.engine import _after_reads, _model, choose_tokens
from rdlm.generation.plan import Plan, SamplingConfig
from rdlm.model import AttentionContext, KV, Params, initial_state, rope_angles, run_blocks


def row_context(cfg: ModelConfig, position_b: jax.Array, cache_len: int) -> AttentionContext:
    """Mask and RoPE of one query per row at ``position_b``: it sees the row's cached positions
    below it and itself. Prompts start at position 0 of their row (no padding)."""
    b = position_b.shape[0]
    cos_b11f, sin_b11f = rope_angles(position_b[:, None], cfg)
    prefix_bs = jnp.arange(cache_len)[None] < position_b[:, None]
    mask_bs = jnp.concatenate([prefix_bs, jnp.ones((b, 1), bool)], axis=-1)
    return AttentionContext(cos_b11f, sin_b11f, mask_bs[:, None, None, :])


def _prefixes(stage: kvc.Stage, rows_k: jax.Array | None) -> tuple:
    """A stage's cache as a pass over the rows ``rows_k`` reads it: those rows' entries
    (`kvc.read_stage_rows`), or for every row (None) where they lie (`kvc.read_stage`; these
    passes run inside conditionals)."""
    if rows_k is None:
        return kvc.read_stage(stage, in_branch=True)
    return kvc.read_stage_rows(stage, rows_k)


class PreludeRows(NamedTuple):
    embedded_k1d: jax.Array  # e, the core's input
    kvs: list[KV]  # the prelude's entries of each row's token, to write in the cache
    bases_k1d: jax.Array  # what the token hands to its successors' token shift


def prelude_rows(params: Params, cfg: ModelConfig, prelude: kvc.Stage,
                 shift_btd: jax.Array | None, token_k: jax.Array, position_k: jax.Array,
                 rows_k: jax.Array | None = None) -> PreludeRows:
    """The prelude of one token for each of the cache rows ``rows_k`` (None: every row, in
    order), over the cached prelude entries ``prelude`` and, with ``model.token_shift``, the
    cached shift bases ``shift_btd``; the caller writes what it returns (`write_prelude_rows`)."""
    model = _model(params, cfg)
    ctx = row_context(cfg, position_k, prelude[0][0].shape[2] if prelude else 0)
    prefixes = _prefixes(prelude, rows_k)
    bases_k1d = model.token_bases(token_k[:, None])
    inputs_k1d = bases_k1d
    if shift_btd is not None:
        # Each row's predecessors at its own positions (prompts start at position 0 of a row:
        # nothing before it, as the token shift treats a missing predecessor).
        back_kj = position_k[:, None] - jnp.arange(1, cfg.token_shift + 1)
        rows = jnp.arange(token_k.shape[0]) if rows_k is None else rows_k
        found_kjd = shift_btd[rows[:, None], jnp.maximum(back_kj, 0)]
        previous_jkd = jnp.where((back_kj >= 0)[..., None], found_kjd, 0).swapaxes(0, 1)
        inputs_k1d = model.add_shift(bases_k1d, previous_jkd[:, :, None])
    embedded_k1d, kvs = run_blocks(model.prelude, inputs_k1d, ctx, list(prefixes))
    embedded_k1d, kvs, bases_k1d = _after_reads(embedded_k1d, kvs, bases_k1d)
    return PreludeRows(embedded_k1d, list(kvs), bases_k1d)


def write_prelude_rows(cache: KVCache, out: PreludeRows, position_b: jax.Array,
                       write_b: jax.Array) -> KVCache:
    """``cache`` with the prelude entries (and shift bases) of the rows in ``write_b`` written at
    their positions; ``out`` holds every row's."""
    shift_btd = cache.shift_bases_btd
    if shift_btd is not None:
        shift_btd = kvc.write_rows(shift_btd[:, None], out.bases_k1d[:, None], position_b,
                                   write_b)[:, 0]
    return cache._replace(prelude=kvc.write_stage_rows(cache.prelude, out.kvs, position_b,
                                                       write_b),
                          shift_bases_btd=shift_btd)


def core_step_rows(params: Params, cfg: ModelConfig, num_slots: int, cache: KVCache,
                   block: KVCache, state_b1d: jax.Array, embedded_b1d: jax.Array,
                   ctx: AttentionContext, step_b: jax.Array, active_b: jax.Array
                   ) -> tuple[jax.Array, KVCache]:
    """Recurrence step ``step_b[b]`` of each row's current token. The cache is only read; the
    token's own entries go to ``block`` (merged when the token is done), for the reason
    `rdlm.generation.engine.run_core_step` gives. Inactive rows keep their state and entries."""
    prefixes = [kvc.read_core_rows(cache, layer, step_b, num_slots) for layer in range(cfg.n_core)]
    new_b1d, kvs = _model(params, cfg).core(state_b1d, embedded_b1d, ctx, prefixes)
    for layer, kv in enumerate(kvs):
        block = kvc.write_core_rows(block, layer, step_b, num_slots, kv, active_b)
    return jnp.where(active_b[:, None, None], new_b1d, state_b1d), block


class CodaRows(NamedTuple):
    logits_bv: jax.Array  # float32
    kvs: list[KV]  # the coda's entries of each row's token, to write once the token is done


def coda_rows(params: Params, cfg: ModelConfig, coda: kvc.Stage, state_k1d: jax.Array,
              ctx: AttentionContext, rows_k: jax.Array | None = None) -> CodaRows:
    """The coda of the candidate states of the cache rows ``rows_k`` (None: every row, in
    order) over the cached coda entries ``coda``: logits, and the entries it would write."""
    model = _model(params, cfg)
    prefixes = _prefixes(coda, rows_k)
    x_k1d, kvs = run_blocks(model.coda, model.coda_input(state_k1d), ctx, list(prefixes))
    hidden_k1d, kvs = _after_reads(model.ln_f(x_k1d), kvs)
    logits_k1v = model.head(hidden_k1d)
    return CodaRows(logits_k1v[:, 0], list(kvs))


def gathered_or_whole(rows_b: jax.Array, chunk: int, gathered: Callable, whole: Callable
                      ) -> Any:
    """Work on the rows in ``rows_b``: ``gathered(rows_k)`` over ``chunk`` gathered rows when
    they are no more, else ``whole()`` over the whole batch (a row outside ``rows_b`` computed
    and discarded). Both return the same structure, with a leading row axis; the result has
    the batch's rows, meaningful in ``rows_b`` (zero elsewhere after a gathered pass).

    The token-boundary work (the coda of the rows that finished a token, the prelude of their
    next one) is needed by a few rows at nearly every iteration of a large batch. A pass over a
    few gathered rows costs less than one over the whole batch, though not in proportion: on a
    CPU a few-row matmul reads all of the weights too (docs/performance.md). When many rows
    need it at once, one whole-batch pass is cheaper than several gathered ones.

    The work reads the cache and writes nothing: the caller writes its results after, once.
    Written inside the branches, the cache would be copied whole at every pass on TPU (XLA
    keeps a buffer in place through one conditional that writes it, not through two nested)."""
    b = rows_b.shape[0]
    if chunk >= b:
        return whole()
    count = jnp.sum(rows_b.astype(jnp.int32))

    def few() -> Any:
        rows_k = jnp.nonzero(rows_b, size=chunk, fill_value=0)[0]
        valid_k = jnp.arange(chunk) < count
        return jax.tree.map(lambda x_k: put_rows(jnp.zeros((b,) + x_k.shape[1:], x_k.dtype),
                                                 rows_k, valid_k, x_k), gathered(rows_k))

    return lax.cond(count <= chunk, few, whole)


def put_rows(x_b: jax.Array, rows_k: jax.Array, valid_k: jax.Array, new_k: jax.Array
             ) -> jax.Array:
    """``x_b`` with rows ``rows_k`` set to ``new_k`` where ``valid_k``."""
    target_k = jnp.where(valid_k, rows_k, x_b.shape[0])  # out of range: dropped
    return x_b.at[target_k].set(new_k.astype(x_b.dtype), mode="drop")


def coda_of_rows(params: Params, cfg: ModelConfig, coda: kvc.Stage, state_b1d: jax.Array,
                 position_b: jax.Array, rows_b: jax.Array, chunk: int) -> CodaRows:
    """The coda of the candidate states of the rows in ``rows_b`` (`gathered_or_whole`): logits
    [b, V] and the entries to write, meaningful in those rows."""
    cache_len = coda[0][0].shape[2] if coda else 0  # no coda layers: no attention

    def gathered(rows_k: jax.Array) -> CodaRows:
        position_k = position_b[rows_k]
        return coda_rows(params, cfg, coda, state_b1d[rows_k],
                         row_context(cfg, position_k, cache_len), rows_k)

    def whole() -> CodaRows:
        return coda_rows(params, cfg, coda, state_b1d, row_context(cfg, position_b, cache_len))

    return gathered_or_whole(rows_b, chunk, gathered, whole)


def row_keys(key: jax.Array, prompt_b: jax.Array, index_b: jax.Array) -> jax.Array:
    """One key per row from (prompt, index): a prompt draws the same numbers whatever row and
    iteration it runs in."""
    return jax.vmap(lambda p, i: jax.random.fold_in(jax.random.fold_in(key, p), i))(prompt_b,
                                                                                     index_b)


def choose_rows(logits_bv: jax.Array, keys_b: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """`choose_tokens` with a key per row."""
    if sampling.greedy:
        return choose_tokens(logits_bv, keys_b[0], sampling)
    return jax.vmap(lambda logits_v, k: choose_tokens(logits_v[None], k, sampling)[0])(
        logits_bv, keys_b)


def start_states(plan: Plan, keys_b: jax.Array, length: int) -> jax.Array:
    """s_0 of ``length`` positions per row [b, length, d]: zero, or drawn from each row's key."""
    b, d = keys_b.shape[0], plan.cfg.d_model
    if plan.init_scale == 0:
        return jnp.zeros((b, length, d), jnp.dtype(plan.cfg.dtype))
    return jax.vmap(lambda k: initial_state(plan.cfg, (length, d), key=k,
                                            init_scale=plan.init_scale))(keys_b)
