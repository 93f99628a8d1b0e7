"""Static-shape KV cache for generation, with recurrence-slot sharing (SPEC "Inference features").

Layout (l = layer, s = recurrence slot, k = keys/values, b = batch row, h = head, t = cache
position, e = head dim); heads before positions, so attention reads a cached layer as it is:

- ``prelude_lkbhte`` / ``coda_lkbhte``: one entry per prelude / coda layer and position.
- ``core_lskbhte``: one entry per core layer, recurrence **slot** and position. Step i of the
  recurrence writes and reads slot ``i mod num_slots``; with ``num_slots >= r`` that is the plain
  per-(layer, step) cache, with a smaller budget memory stops growing with r (KV-cache sharing).
- ``core_latest_lkbhte`` (only with adaptive exit): every position's *latest* core entry per
  layer, i.e. the keys/values of the last step that position actually ran.
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
from rdlm.model import KV


class KVCache(NamedTuple):
    prelude_lkbhte: jax.Array
    core_lskbhte: jax.Array
    coda_lkbhte: jax.Array
    core_latest_lkbhte: jax.Array | None  # None unless adaptive exit can leave tokens short
    depth_bt: jax.Array  # int32
    shift_bases_btd: jax.Array | None = None  # None unless model.token_shift


def cache_shapes(cfg: ModelConfig, batch: int, length: int, num_slots: int,
                 track_latest: bool) -> KVCache:
    """Shapes and dtypes of a cache (`jax.ShapeDtypeStruct` leaves); allocates nothing."""
    dtype = jnp.dtype(cfg.dtype)
    kv = (2, batch, cfg.n_heads, length, cfg.head_dim)

    def sds(*lead: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*lead, *kv), dtype)

    return KVCache(
        prelude_lkbhte=sds(cfg.n_prelude),
        core_lskbhte=sds(cfg.n_core, num_slots),
        coda_lkbhte=sds(cfg.n_coda),
        core_latest_lkbhte=sds(cfg.n_core) if track_latest else None,
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


def as_kv(buf_kbhte: jax.Array) -> KV:
    return buf_kbhte[0], buf_kbhte[1]


def stack_kv(kv: KV) -> jax.Array:
    return jnp.stack(kv)


def write_kv(buf_xkbhte: jax.Array, new_kbhte: jax.Array, start: jax.Array | int,
             active_b: jax.Array | None = None, lead: tuple = ()) -> jax.Array:
    """Write a block of keys/values at positions ``start …`` of ``buf[lead]``.

    ``lead`` indexes the leading (layer, slot) axes. Rows not ``active_b`` keep their old entry:
    a row that already exited has to stay readable at the steps it actually ran, not at a step
    computed from its frozen state.
    """
    new_xkbhte = new_kbhte.astype(buf_xkbhte.dtype).reshape((1,) * len(lead) + new_kbhte.shape)
    index = (*lead, 0, 0, 0, start, 0)
    if active_b is not None:
        old_xkbhte = lax.dynamic_slice(buf_xkbhte, index, new_xkbhte.shape)
        keep_b = active_b.reshape((1,) * (len(lead) + 1) + (-1, 1, 1, 1))
        new_xkbhte = jnp.where(keep_b, new_xkbhte, old_xkbhte)
    return lax.dynamic_update_slice(buf_xkbhte, new_xkbhte, index)


def read_core(cache: KVCache, layer: int, step: jax.Array, num_slots: int) -> KV:
    """Keys/values core ``layer`` attends to at recurrence ``step``, for every cached position.

    Slot ``step mod b`` for positions that ran more than ``step`` steps; a position that stopped
    earlier (adaptive exit) is read at its latest entry.
    """
    # One dynamic slice of the whole buffer: slicing the layer first would copy all its slots.
    _, _, *kbhte = cache.core_lskbhte.shape
    slot_kbhte = lax.dynamic_slice(cache.core_lskbhte,
                                   (layer, slot_of_step(step, num_slots), 0, 0, 0, 0, 0),
                                   (1, 1, *kbhte))[0, 0]
    if cache.core_latest_lkbhte is not None:
        ran_past_bt = cache.depth_bt > step
        slot_kbhte = jnp.where(ran_past_bt[None, :, None, :, None], slot_kbhte,
                               cache.core_latest_lkbhte[layer])
    return as_kv(slot_kbhte)


def write_core(cache: KVCache, layer: int, step: jax.Array, num_slots: int, kv: KV,
               start: jax.Array | int, active_b: jax.Array | None = None) -> KVCache:
    """Store core ``layer``'s keys/values of ``step`` (and, when tracked, as the latest entry)."""
    new_kbhte = stack_kv(kv)
    core = write_kv(cache.core_lskbhte, new_kbhte, start, active_b,
                    lead=(layer, slot_of_step(step, num_slots)))
    latest = cache.core_latest_lkbhte
    if latest is not None:
        latest = write_kv(latest, new_kbhte, start, active_b, lead=(layer,))
    return cache._replace(core_lskbhte=core, core_latest_lkbhte=latest)


def write_stage(buf_lkbhte: jax.Array, kvs: list[KV], start: jax.Array | int) -> jax.Array:
    """Store every prelude (or coda) layer's keys/values of one block of positions."""
    for layer, kv in enumerate(kvs):
        buf_lkbhte = write_kv(buf_lkbhte, stack_kv(kv), start, lead=(layer,))
    return buf_lkbhte


def merge_block(cache: KVCache, block: KVCache, start: jax.Array | int) -> KVCache:
    """Copy a block buffer's core entries (every slot, and the latest entries) to ``start …``."""
    core = lax.dynamic_update_slice(cache.core_lskbhte, block.core_lskbhte,
                                    (0, 0, 0, 0, 0, start, 0))
    latest = cache.core_latest_lkbhte
    if latest is not None:
        latest = lax.dynamic_update_slice(latest, block.core_latest_lkbhte,
                                          (0, 0, 0, 0, start, 0))
    return cache._replace(core_lskbhte=core, core_latest_lkbhte=latest)


def previous_bases(cache: KVCache, shift_bases_btd: jax.Array, pad_b: jax.Array,
                   start: jax.Array | int, num: int) -> jax.Array:
    """The shift bases of the ``num`` previous positions of a block at positions ``start …``
    [num, b, t, d], read from the block itself or the cache; zero before a row's first
    (left-padded) position, as the token shift treats a missing predecessor."""
    b, t, _ = shift_bases_btd.shape
    length = cache.shift_bases_btd.shape[1]
    both_bsd = jnp.concatenate([cache.shift_bases_btd,
                                shift_bases_btd.astype(cache.shift_bases_btd.dtype)], axis=1)
    position_t = start + jnp.arange(t)
    out = []
    for j in range(1, num + 1):
        where_bt = jnp.broadcast_to(position_t - j, (b, t))
        index_bt = jnp.clip(jnp.where(where_bt >= start, length + where_bt - start, where_bt),
                            0, length + t - 1)
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
