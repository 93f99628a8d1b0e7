"""KV cache: slot mapping, the latest-entry rule, masked writes and sizes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import rdlm
from rdlm.generation import cache as kvc

CFG = rdlm.model_preset("tiny")


def _kv(value, t=1):
    shape = (1, CFG.n_heads, t, CFG.head_dim)  # [b, h, t, e], the cache layout
    return jnp.full(shape, value, jnp.float32), jnp.full(shape, -value, jnp.float32)


def test_size_depends_on_the_budget_not_on_r():
    one_slot = kvc.cache_bytes(CFG, 2, 16, 1, False)
    four = kvc.cache_bytes(CFG, 2, 16, 4, False)
    per_slot = CFG.n_core * 2 * 2 * 16 * CFG.d_model * 4
    assert four - one_slot == 3 * per_slot
    # The latest-entry buffer costs exactly one more slot.
    assert kvc.cache_bytes(CFG, 2, 16, 4, True) - four == per_slot
    assert kvc.slot_of_step(9, 4) == 1


def test_step_i_uses_slot_i_mod_budget_and_exited_positions_their_latest_entry():
    budget, layer = 3, 1
    cache = kvc.init_cache(CFG, 1, 4, budget, track_latest=True)
    # Position 0 ran 7 steps, position 1 ran 2 steps (exited early); value = 10 * pos + step.
    for pos, depth in ((0, 7), (1, 2)):
        for step in range(depth):
            cache = kvc.write_core(cache, layer, jnp.int32(step), budget,
                                   _kv(10.0 * pos + step), pos)
        cache = kvc.set_depth(cache, jnp.asarray([[depth]]), pos)
    for step in range(8):
        keys, values = kvc.read_core(cache, layer, jnp.int32(step), budget)
        # Position 0: the latest step j < 7 with j = step (mod 3), or 6 once step >= 7.
        expected0 = max(j for j in range(7) if j % budget == step % budget) if step < 7 else 6
        expected1 = step if step < 2 else 1  # exited after 2 steps: its step-1 entry
        assert float(keys[0, 0, 0, 0]) == expected0
        assert float(keys[0, 0, 1, 0]) == 10 + expected1
        assert float(values[0, 0, 1, 0]) == -(10 + expected1)


def test_inactive_rows_keep_their_entries():
    cache = kvc.init_cache(CFG, 2, 3, 2, track_latest=True)
    shape = (2, CFG.n_heads, 1, CFG.head_dim)
    kv = (jnp.ones(shape), jnp.ones(shape))
    cache = kvc.write_core(cache, 0, jnp.int32(1), 2, kv, 2, active_b=jnp.asarray([True, False]))
    written = np.asarray(cache.core[0][0][1, :, 0, 2, 0])  # layer 0, keys, slot 1
    latest = np.asarray(cache.core_latest[0][0][:, 0, 2, 0])
    assert written.tolist() == [1.0, 0.0] and latest.tolist() == [1.0, 0.0]


def test_merge_block_places_every_slot():
    cache = kvc.init_cache(CFG, 1, 5, 2, track_latest=False)
    block = kvc.init_cache(CFG, 1, 2, 2, track_latest=False)
    block = kvc.write_core(block, 0, jnp.int32(0), 2, _kv(3.0, 2), 0)
    block = kvc.write_core(block, 0, jnp.int32(1), 2, _kv(4.0, 2), 0)
    merged = kvc.merge_block(cache, block, 2)
    got = np.asarray(merged.core[0][0][:, 0, 0, :, 0])
    assert got.tolist() == [[0, 0, 3, 3, 0], [0, 0, 4, 4, 0]]


def test_previous_bases_read_the_block_and_the_cached_positions_before_it():
    cfg = rdlm.model_preset("tiny", token_shift=2)
    cache = kvc.init_cache(cfg, 2, 6, 1, track_latest=False)
    value = lambda pos: jnp.full((2, 1, cfg.d_model), float(pos))  # position p holds p + 1
    for pos in range(3):
        cache = kvc.set_shift_bases(cache, value(pos + 1), pos)
    block_btd = jnp.concatenate([value(4), value(5)], axis=1)  # positions 3 and 4
    pad_b = jnp.asarray([0, 2])  # row 1 starts at position 2
    prev_kbtd = np.asarray(kvc.previous_bases(cache, block_btd, pad_b, 3, 2)[..., 0])
    assert prev_kbtd[:, 0].tolist() == [[3, 4], [2, 3]]  # 1st and 2nd predecessors, row 0
    assert prev_kbtd[:, 1].tolist() == [[3, 4], [0, 3]]  # row 1: nothing before position 2
    at_start = np.asarray(kvc.previous_bases(cache, value(1), pad_b, 0, 2)[..., 0])
    assert at_start.tolist() == [[[0], [0]], [[0], [0]]]
