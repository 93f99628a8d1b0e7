"""Static-shape KV cache for generation, with recurrence-slot sharing (SPEC "Inference features").

Layout (s = recurrence slot, b = batch row, h = head, t = cache position, e = head dim); heads
before positions, so attention reads a cached layer as it is. One (keys, values) pair of arrays
per layer, not one stacked array: attention then reads a layer's buffer in place, where a slice
of a stacked buffer is a copy in XLA (eight copies of the whole cache per decoded token, a quarter
of a small model's step).

- ``prelude`` / ``coda``: per prelude / coda layer, keys and values ``[b, h, t, e]``.
- ``core``: per core layer, keys and values ``[s, b, h, t, e]``, one entry per recurrence
  **slot** and position. Step i of the recurrence writes and reads slot ``i mod num_slots``; with
  ``num_slots >= r`` that is the plain per-(layer, step) cache, with a smaller budget memory stops
  growing with r (KV-cache sharing).
- ``core_latest`` (only with adaptive exit): per core layer, every position's *latest* entry
  ``[b, h, t, e]``, i.e. the keys/values of the last step that position actually ran.
- ``depth_bt``: how many core steps each cached position ran (0 = nothing written).
- ``shift_bases_btd`` (only with ``model.token_shift``): what each cached position hands to its
  successors' token shift, i.e. its base ``wte[token] · sqrt(d)`` — or, at a continuous thought
  that hands itself on (`rdlm.generation.plan.ThoughtConfig`), the thought vector. Vectors rather
  than token ids, so that a thought can be handed on as a token is.

Why a separate "latest" buffer instead of copying the last entry into the unwritten slots: a token
that exited after n < r steps must be read at its latest entry (step n-1) by every later token's
step i >= n. Copying step n-1 into the remaining slots is only exact without sharing: with a budget
b < r - n the copies would overwrite slots that steps i < n of later tokens still need. One extra
slot per core layer makes the rule exact in both cases and keeps memory independent of r:
a reader at step i takes slot ``i mod b`` where ``depth > i`` and the latest buffer elsewhere.

Everything here is a pure function on arrays; positions are shared by all rows (prompts are
left-padded by `rdlm.generation.plan.left_pad`), so a write is one ``dynamic_update_slice``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.config import ModelConfig
from rdlm.model import KV, RowEntries
from rdlm.model.row_cache import (hold_cache_layout, slot_prefix, stage_prefix,
                                  write_row_positions)

Stage = tuple[KV, ...]  # one (keys, values) pair per layer


class KVCache(NamedTuple):
    prelude: Stage  # [b, h, t, e] each
    core: Stage  # [s, b, h, t, e] each
    coda: Stage
    core_latest: Stage | None  # [b, h, t, e]; None unless adaptive exit can leave tokens short
    depth_bt: jax.Array  # int32
    shift_bases_btd: jax.Array | None = None  # None unless model.token_shift


def cache_shapes(cfg: ModelConfig, batch: int, length: int, num_slots: int,
                 track_latest: bool) -> KVCache:
    """Shapes and dtypes of a cache (`jax.ShapeDtypeStruct` leaves); allocates nothing."""
    dtype = jnp.dtype(cfg.dtype)
    bhte = (batch, cfg.kv_heads, length, cfg.head_dim)

    def stage(layers: int, *lead: int) -> Stage:
        sds = jax.ShapeDtypeStruct((*lead, *bhte), dtype)
        return tuple((sds, sds) for _ in range(layers))

    return KVCache(
        prelude=stage(cfg.n_prelude), core=stage(cfg.n_core, num_slots), coda=stage(cfg.n_coda),
        core_latest=stage(cfg.n_core) if track_latest else None,
        depth_bt=jax.ShapeDtypeStruct((batch, length), jnp.int32),
        shift_bases_btd=(jax.ShapeDtypeStruct((batch, length, cfg.d_model), dtype)
                         if cfg.token_shift else None))


def init_cache(cfg: ModelConfig, batch: int, length: int, num_slots: int,
               track_latest: bool) -> KVCache:
    """An empty cache (zeros; ``depth_bt == 0`` marks every position unwritten)."""
    shapes = cache_shapes(cfg, batch, length, num_slots, track_latest)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cache_bytes(cfg: ModelConfig, batch: int, length: int, num_slots: int,
                track_latest: bool) -> int:
    """Bytes the cache occupies: independent of r once ``num_slots`` (the budget) is fixed."""
    shapes = cache_shapes(cfg, batch, length, num_slots, track_latest)
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def slot_of_step(step: jax.Array | int, num_slots: int) -> jax.Array | int:
    """Recurrence step i (0-based) lives in slot i mod b."""
    return step % num_slots


def write_kv(buf_xbhte: jax.Array, new_bhte: jax.Array, start: jax.Array | int,
             active_b: jax.Array | None = None, lead: tuple = ()) -> jax.Array:
    """Write a block of keys (or values) at positions ``start …`` of ``buf[lead]``.

    ``lead`` indexes the leading (slot) axis. Rows not ``active_b`` keep their old entry: a row
    that already exited has to stay readable at the steps it actually ran, not at a step
    computed from its frozen state.
    """
    new_xbhte = new_bhte.astype(buf_xbhte.dtype).reshape((1,) * len(lead) + new_bhte.shape)
    index = (*lead, 0, 0, start, 0)
    if active_b is not None:
        old_xbhte = lax.dynamic_slice(buf_xbhte, index, new_xbhte.shape)
        keep_b = active_b.reshape((1,) * len(lead) + (-1, 1, 1, 1))
        new_xbhte = jnp.where(keep_b, new_xbhte, old_xbhte)
    return hold_cache_layout(lax.dynamic_update_slice(buf_xbhte, new_xbhte, index))


def read_core(cache: KVCache, layer: int, step: jax.Array, num_slots: int) -> KV | RowEntries:
    """Keys/values core ``layer`` attends to at recurrence ``step``, for every cached position,
    as the attention reads them (`row_cache.slot_prefix`).

    Slot ``step mod b`` for positions that ran more than ``step`` steps; a position that stopped
    earlier (adaptive exit) is read at its latest entry.
    """
    slot = slot_of_step(step, num_slots)
    if cache.core_latest is None:
        return slot_prefix(cache.core[layer], slot, None, None)
    ran_past_b1t1 = (cache.depth_bt > step)[:, None, :, None]
    return slot_prefix(cache.core[layer], slot, cache.core_latest[layer], ran_past_b1t1)


def _replace_layer(stage: Stage, layer: int, kv: KV) -> Stage:
    return stage[:layer] + (tuple(kv),) + stage[layer + 1:]


def write_core(cache: KVCache, layer: int, step: jax.Array, num_slots: int, kv: KV,
               start: jax.Array | int, active_b: jax.Array | None = None) -> KVCache:
    """Store core ``layer``'s keys/values of ``step`` (and, when tracked, as the latest entry)."""
    slot = slot_of_step(step, num_slots)
    core = _replace_layer(cache.core, layer, [
        write_kv(buf, new, start, active_b, lead=(slot,)) for buf, new in zip(cache.core[layer], kv)])
    latest = cache.core_latest
    if latest is not None:
        latest = _replace_layer(latest, layer, [
            write_kv(buf, new, start, active_b) for buf, new in zip(latest[layer], kv)])
    return cache._replace(core=core, core_latest=latest)


def write_stage(stage: Stage, kvs: list[KV], start: jax.Array | int) -> Stage:
    """Store every prelude (or coda) layer's keys/values of one block of positions."""
    return tuple(tuple(write_kv(buf, new, start) for buf, new in zip(layer_kv, new_kv))
                 for layer_kv, new_kv in zip(stage, kvs))


def merge_block(cache: KVCache, block: KVCache, start: jax.Array | int) -> KVCache:
    """Copy a block buffer's core entries (every slot, and the latest entries) to ``start …``."""
    def place(buf: jax.Array, new: jax.Array) -> jax.Array:
        index = (0,) * (buf.ndim - 2) + (start, 0)
        return hold_cache_layout(lax.dynamic_update_slice(buf, new, index))

    core = jax.tree.map(place, cache.core, block.core)
    latest = cache.core_latest
    if latest is not None:
        latest = jax.tree.map(place, latest, block.core_latest)
    return cache._replace(core=core, core_latest=latest)


def previous_bases(cache: KVCache, shift_bases_btd: jax.Array, pad_b: jax.Array,
                   start: jax.Array | int, num: int) -> jax.Array:
    """The shift bases of the ``num`` previous positions of a block at positions ``start …``
    [num, b, t, d], read from the block itself or the ``num`` cached positions before it; zero
    before a row's first (left-padded) position, as the token shift treats a missing
    predecessor. Only that window of the cache is read, not all of it, once per token."""
    b, t, _ = shift_bases_btd.shape
    length = cache.shift_bases_btd.shape[1]
    width = min(num, length)
    window_start = jnp.clip(start - width, 0, length - width)
    window_bwd = lax.dynamic_slice_in_dim(cache.shift_bases_btd, window_start, width, axis=1)
    both_bsd = jnp.concatenate([window_bwd, shift_bases_btd.astype(window_bwd.dtype)], axis=1)
    position_t = start + jnp.arange(t)
    out = []
    for j in range(1, num + 1):
        where_bt = jnp.broadcast_to(position_t - j, (b, t))
        index_bt = jnp.clip(jnp.where(where_bt >= start, width + where_bt - start,
                                      where_bt - window_start), 0, width + t - 1)
        found_btd = jnp.take_along_axis(both_bsd, index_bt[..., None], axis=1)
        out.append(jnp.where((where_bt >= pad_b[:, None])[..., None], found_btd, 0))
    return jnp.stack(out)


def set_shift_bases(cache: KVCache, shift_bases_btd: jax.Array, start: jax.Array | int
                    ) -> KVCache:
    """Record what the positions ``start …`` hand to the token shift (a no-op without it)."""
    if cache.shift_bases_btd is None:
        return cache
    return cache._replace(shift_bases_btd=lax.dynamic_update_slice(
        cache.shift_bases_btd, shift_bases_btd.astype(cache.shift_bases_btd.dtype),
        (0, start, 0)))


def set_depth(cache: KVCache, depth_bt: jax.Array, start: jax.Array | int) -> KVCache:
    """Record how many core steps the positions ``start …`` ran."""
    return cache._replace(depth_bt=lax.dynamic_update_slice(
        cache.depth_bt, depth_bt.astype(jnp.int32), (0, start)))


# ---------------------------------------------------------------------------------------------
# Per-row positions (depth-continuous batching, `rdlm.generation.continuous`): every row is at its
# own position and recurrence step, so reads gather and writes put one position per row
# (`rdlm.model.row_cache.write_row_positions`, whose form depends on the backend). A write aimed
# past the end of an axis is dropped: that is how a row that must not write is left out, without
# reading its old entry back.


def row_index(position_b: jax.Array, write_b: jax.Array, length: int) -> jax.Array:
    """Each row's position where it writes, else ``length`` (out of range: the write is
    dropped)."""
    return jnp.where(write_b, position_b, length)


def write_rows(buf_bhte: jax.Array, new_bh1e: jax.Array, position_b: jax.Array,
               write_b: jax.Array, rows_b: jax.Array | None = None) -> jax.Array:
    """``buf[rows_b[i], :, position_b[i]] = new[i, :, 0]`` for the ``i`` in ``write_b``
    (``rows_b`` None: every row of ``buf`` in order)."""
    rows_b = jnp.arange(new_bh1e.shape[0]) if rows_b is None else rows_b
    return write_row_positions(buf_bhte, new_bh1e, rows_b, position_b, write_b)


def write_stage_rows(stage: Stage, kvs: list[KV], position_b: jax.Array, write_b: jax.Array,
                     rows_b: jax.Array | None = None) -> Stage:
    """Every prelude (or coda) layer's keys/values of one token per row (of ``rows_b``)."""
    return tuple(tuple(write_rows(buf, new, position_b, write_b, rows_b)
                       for buf, new in zip(layer_kv, new_kv))
                 for layer_kv, new_kv in zip(stage, kvs))


def read_stage(stage: Stage, in_branch: bool = False) -> tuple[KV | RowEntries, ...]:
    """Every prelude (or coda) layer's keys/values for every row, as the attention reads them
    where they lie (`row_cache.stage_prefix`; ``in_branch``: inside a conditional)."""
    return tuple(stage_prefix(kv, in_branch) for kv in stage)


def read_stage_rows(stage: Stage, rows_k: jax.Array) -> tuple[RowEntries, ...]:
    """The cache rows ``rows_k`` of every prelude (or coda) layer, as `RowEntries` prefixes,
    which the attention reads in place."""
    return tuple(RowEntries(kv, (rows_k,)) for kv in stage)


def read_core_rows(cache: KVCache, layer: int, step_b: jax.Array, num_slots: int
                   ) -> RowEntries:
    """`read_core` with each row at its own recurrence step: row b reads slot
    ``step_b[b] mod num_slots`` where a position ran past that step, its latest entry
    elsewhere; as a `RowEntries` prefix, which the attention reads in place."""
    index = (slot_of_step(step_b, num_slots), jnp.arange(step_b.shape[0]))
    if cache.core_latest is None:
        return RowEntries(cache.core[layer], index)
    ran_past_b1t1 = (cache.depth_bt > step_b[:, None])[:, None, :, None]
    return RowEntries(cache.core[layer], index, cache.core_latest[layer], ran_past_b1t1)


def write_core_rows(block: KVCache, layer: int, step_b: jax.Array, num_slots: int, kv: KV,
                    active_b: jax.Array) -> KVCache:
    """Store core ``layer``'s keys/values of each active row's current step in a one-position
    block buffer (slot ``step_b mod num_slots``; and as the latest entry, when tracked)."""
    b = step_b.shape[0]
    slot_b = row_index(slot_of_step(step_b, num_slots), active_b, num_slots)
    core = _replace_layer(block.core, layer, [
        buf.at[slot_b, jnp.arange(b)].set(new.astype(buf.dtype), mode="drop")
        for buf, new in zip(block.core[layer], kv)])
    latest = block.core_latest
    if latest is not None:
        keep_b111 = active_b[:, None, None, None]
        latest = _replace_layer(latest, layer, [jnp.where(keep_b111, new.astype(buf.dtype), buf)
                                                for buf, new in zip(latest[layer], kv)])
    return block._replace(core=core, core_latest=latest)


def merge_rows(cache: KVCache, block: KVCache, position_b: jax.Array, write_b: jax.Array,
               depth_b: jax.Array) -> KVCache:
    """Copy each written row's one-position block buffer (every slot, and the latest entry) to
    its position, and record the steps it ran there."""
    b, t = cache.depth_bt.shape
    rows_b = jnp.arange(b)

    def place(buf_sbhte: jax.Array, new_sbh1e: jax.Array) -> jax.Array:
        return write_row_positions(buf_sbhte, new_sbh1e, rows_b, position_b, write_b)

    core = jax.tree.map(place, cache.core, block.core)
    latest = cache.core_latest
    if latest is not None:
        latest = jax.tree.map(lambda buf, new: write_rows(buf, new, position_b, write_b),
                              latest, block.core_latest)
    depth_bt = cache.depth_bt.at[rows_b, row_index(position_b, write_b, t)].set(
        depth_b.astype(jnp.int32), mode="drop")
    return cache._replace(core=core, core_latest=latest, depth_bt=depth_bt)


# The fields of a cache that hold keys and values, ``[..., t, e]``.
KV_FIELDS = ("prelude", "core", "coda", "core_latest")
# The batch axis of each field of a cache: the core's arrays lead with the slot.
_BATCH_AXIS = KVCache(prelude=0, core=1, coda=0, core_latest=0, depth_bt=0, shift_bases_btd=0)


def put_row(cache: KVCache, rows: KVCache, src: jax.Array, row: jax.Array) -> KVCache:
    """``cache`` with row ``row`` from position 0 set to row ``src`` of ``rows``, a cache of as
    many or fewer positions (a prompt's prefill); the row's later positions keep what they
    held, which no query reads before writing it (a row reads the positions below its own)."""
    def put(buf: jax.Array, new: jax.Array, axis: int, kv: bool) -> jax.Array:
        piece = lax.dynamic_slice_in_dim(new, src, 1, axis).astype(buf.dtype)
        start = [jnp.int32(0)] * buf.ndim
        start[axis] = row
        out = lax.dynamic_update_slice(buf, piece, start)
        return hold_cache_layout(out) if kv else out

    fields = [None if old is None else
              jax.tree.map(lambda buf, new, a=axis, kv=name in KV_FIELDS: put(buf, new, a, kv),
                           old, new)
              for name, axis, old, new in zip(KVCache._fields, _BATCH_AXIS, cache, rows)]
    return KVCache(*fields)
