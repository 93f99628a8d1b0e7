"""Decoding with every row at its own position: attention over each row's own entries of a
larger KV-cache buffer (its recurrence slot, or a few rows of a stage), read by index where they
lie, in Pallas: on TPU with the indices prefetched to scalar memory (`row_entries_attention`),
on GPU in Triton (`gpu_row_entries_attention`), and either per shard of a mesh
(`row_entries_attention_per_shard`).

`rdlm.model.row_cache.choose_row_attention` decides when they run, and
`rdlm.model.kernels.attend_with_prefix` turns the model's layout and masks into theirs.
``interpret=True`` runs them in Pallas' interpreter on any backend, as the CPU test suite does.

Measured choices are in docs/performance.md.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from rdlm.model.pallas_attention import shard_axes


# The row-entries decode kernel's tile along the cached positions: as splash's, a multiple of the
# 128-lane width; a cache of up to this many positions is one tile, a longer one is tiled with a
# partial last tile, masked in the kernel.
ROWS_BLOCK = 512


def _rows_kernel(*refs, lead: int, with_fallback: bool, positions_minor: bool, scale: float,
                 length: int, masked_logit: float):
    """One query row's one KV head over one tile of its own cached entries (grid: rows, heads,
    tiles), with an online softmax held in VMEM; the block's own keys join at the last tile.
    ``positions_minor``: the cached tiles come as ``[e, u]``, not ``[u, e]``."""
    refs = list(refs)[lead:]  # the prefetched indices are used by the index maps only
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    if with_fallback:
        kf_ref, vf_ref, use_ref = refs[:3]
        refs = refs[3:]
    visible_ref, own_k_ref, own_v_ref, own_visible_ref, out_ref, m_ref, l_ref, acc_ref = refs
    tile = pl.program_id(2)
    block = k_ref.shape[1] if positions_minor else k_ref.shape[0]

    @pl.when(tile == 0)
    def _start():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q_re = q_ref[...]
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)

    # The block's own few keys (``cached=False``) are taken in float32: Mosaic lowers a 16-bit
    # product with so few keys or queries as a broadcast it cannot verify.
    def scores(keys: jax.Array, cached: bool = True) -> jax.Array:  # [r, u]
        if not cached:
            return dot(q_re.astype(jnp.float32), keys.astype(jnp.float32),
                       (((1,), (1,)), ((), ()))) * scale
        contract = 0 if positions_minor else 1
        return dot(q_re, keys, (((1,), (contract,)), ((), ()))) * scale

    def weighted(p_ru: jax.Array, values: jax.Array, cached: bool = True) -> jax.Array:
        if not cached:
            return dot(p_ru, values.astype(jnp.float32), (((1,), (0,)), ((), ())))
        contract = 1 if positions_minor else 0
        return dot(p_ru.astype(values.dtype), values, (((1,), (contract,)), ((), ())))

    def accumulate(logits_ru: jax.Array, values: Callable[[jax.Array], jax.Array]) -> None:
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(logits_ru, axis=1, keepdims=True))
        p_ru = jnp.exp(logits_ru - m_next[:, :1])
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_ru, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + values(p_ru)

    # A partial last tile holds whatever lies past the cache: mask it, and zero its entries
    # (a zero weight times a NaN would still be NaN).
    def in_range(axis: int) -> jax.Array:
        shape = (1, block) if axis == 1 else (block, 1)
        return jax.lax.broadcasted_iota(jnp.int32, shape, axis) < length - tile * block

    in_range_1u = in_range(1)
    entries_in_range = in_range_1u if positions_minor else in_range(0)

    def read(ref) -> jax.Array:
        return jnp.where(entries_in_range, ref[...], 0).astype(q_re.dtype)

    k, v = read(k_ref), read(v_ref)
    logits_ru = scores(k)
    if with_fallback:
        use_1u = use_ref[...] != 0
        kf, vf = read(kf_ref), read(vf_ref)
        logits_ru = jnp.where(use_1u, logits_ru, scores(kf))
    visible_ru = jnp.logical_and(visible_ref[...] != 0, in_range_1u)
    logits_ru = jnp.where(visible_ru, logits_ru, masked_logit)
    if with_fallback:
        accumulate(logits_ru, lambda p: weighted(jnp.where(use_1u, p, 0.0), v)
                   + weighted(jnp.where(use_1u, 0.0, p), vf))
    else:
        accumulate(logits_ru, lambda p: weighted(p, v))

    @pl.when(tile == pl.num_programs(2) - 1)
    def _finish():
        own_logits = jnp.where(own_visible_ref[...] != 0,
                               scores(own_k_ref[...], cached=False), masked_logit)
        accumulate(own_logits, lambda p: weighted(p, own_v_ref[...], cached=False))
        out_ref[...] = (acc_ref[...] / l_ref[...][:, :1]).astype(out_ref.dtype)


def _swap_last(index_map: Callable) -> Callable:
    """``index_map`` for the same blocks of a view with its two innermost axes swapped."""
    def swapped(*grid_and_indices):
        *outer, tile, zero = index_map(*grid_and_indices)
        return (*outer, zero, tile)
    return swapped


def row_entries_attention(q_bkre: jax.Array, buffers: tuple[jax.Array, jax.Array],
                          index: tuple[jax.Array, ...], visible_brs: jax.Array,
                          own_k_bkue: jax.Array, own_v_bkue: jax.Array,
                          own_visible_bru: jax.Array,
                          fallback: tuple[jax.Array, jax.Array] | None = None,
                          use_b1s: jax.Array | None = None, *, masked_logit: float,
                          positions_minor: bool = False, interpret: bool = False) -> jax.Array:
    """Decoding attention in which each row reads its own entries of a larger cache buffer
    where they lie (TPU): row i's keys and values are ``buffers[index[0][i], index[1][i], …]``,
    ``[kh, s, e]``, or ``fallback[i]`` at the positions where ``use_b1s`` is 0, then the block's
    own ``[kh, t, e]``. ``q_bkre``: each KV head's r = g·t query rows (the g heads of its
    group, each at t positions); ``visible_brs`` and ``own_visible_bru``: which cached and which
    own keys each query row sees (int32, nonzero: visible); every query row sees at least one of
    its own keys. Scores and softmax in float32; the same function as
    `kernels.attend_with_prefix`. ``positions_minor``: the cache buffers are stored with their
    positions innermost (`row_cache.cache_layout`), and the kernel reads their tiles so.

    The indices are prefetched to the TPU's scalar memory and pick each tile's block in its
    index map, so the kernel reads each row's entries straight from the buffer: nothing is
    gathered or stacked first, and the whole batch is one kernel per layer, at any number of
    rows (docs/performance.md weighs it against attending row by row in XLA).
    """
    import jax.experimental.pallas.tpu as pltpu
    b, kh, r, e = q_bkre.shape
    lead, length = len(index), buffers[0].shape[-2]
    block = length if length <= ROWS_BLOCK else ROWS_BLOCK
    with_fallback = fallback is not None
    squeezed = pl.squeezed

    def slot_map(i, h, j, *ix):
        return tuple(x[i] for x in ix) + (h, j, 0)

    def row_map(i, h, j, *ix):
        return (i, h, j, 0)

    def mask_map(i, h, j, *ix):
        return (i, 0, j)

    def whole_map(i, h, j, *ix):
        return (i, h, 0, 0)

    def own_mask_map(i, h, j, *ix):
        return (i, 0, 0)

    tile = (block, e)
    if positions_minor:  # [.., e, s] views: free, in the layout the buffers are stored in
        tile = (e, block)
        buffers = tuple(jnp.swapaxes(x, -1, -2) for x in buffers)
        if fallback is not None:
            fallback = tuple(jnp.swapaxes(x, -1, -2) for x in fallback)
        slot_map = _swap_last(slot_map)
        row_map = _swap_last(row_map)
    slot_spec = pl.BlockSpec((squeezed,) * (lead + 1) + tile, slot_map)
    in_specs = [pl.BlockSpec((squeezed, squeezed, r, e), whole_map), slot_spec, slot_spec]
    operands = [q_bkre, *buffers]
    if with_fallback:
        row_spec = pl.BlockSpec((squeezed, squeezed) + tile, row_map)
        in_specs += [row_spec, row_spec, pl.BlockSpec((squeezed, 1, block), mask_map)]
        operands += [*fallback, use_b1s]
    t = own_k_bkue.shape[2]
    in_specs += [pl.BlockSpec((squeezed, r, block), mask_map),
                 pl.BlockSpec((squeezed, squeezed, t, e), whole_map),
                 pl.BlockSpec((squeezed, squeezed, t, e), whole_map),
                 pl.BlockSpec((squeezed, r, t), own_mask_map)]
    operands += [visible_brs, own_k_bkue, own_v_bkue, own_visible_bru]
    kernel = functools.partial(_rows_kernel, lead=lead, with_fallback=with_fallback,
                               positions_minor=positions_minor, scale=1.0 / math.sqrt(e),
                               length=length, masked_logit=masked_logit)
    # What the kernel moves: each row's entries (twice with a fallback), its queries, masks
    # and output; the compiler cannot see inside the kernel, so XLA's cost model takes this.
    # HBM holds the entries in tiles of 128 along the innermost axis, padded: with features
    # innermost, Huginn-0125's 96 take 128.
    itemsize = buffers[0].dtype.itemsize
    per_row = (pl.cdiv(length, 128) * 128 * e if positions_minor
               else length * pl.cdiv(e, 128) * 128)
    entries = b * kh * per_row * itemsize * 2 * (2 if with_fallback else 1)
    cost = pl.CostEstimate(
        flops=4 * b * kh * r * (length + t) * e * (2 if with_fallback else 1),
        transcendentals=b * kh * r * (length + t),
        bytes_accessed=entries + 2 * q_bkre.size * q_bkre.dtype.itemsize
        + 4 * (visible_brs.size + (use_b1s.size if with_fallback else 0)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=lead, grid=(b, kh, pl.cdiv(length, block)), in_specs=in_specs,
        out_specs=pl.BlockSpec((squeezed, squeezed, r, e), whole_map),
        scratch_shapes=[pltpu.VMEM((r, 128), jnp.float32), pltpu.VMEM((r, 128), jnp.float32),
                        pltpu.VMEM((r, e), jnp.float32)])
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q_bkre.shape, q_bkre.dtype), grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="row_entries_attention",
    )(*(ix.astype(jnp.int32) for ix in index), *operands)


# The GPU kernel's tile along the cached positions, and the smallest side of a Triton dot: its
# query rows and the block's own keys are padded to it (and to powers of two, as Triton's tiles
# must be; Huginn-0125's 96 features to 128), the padding masked at every load and store.
GPU_ROWS_BLOCK = 64
TRITON_MIN_DOT = 16


def _tile(n: int) -> int:
    return max(TRITON_MIN_DOT, pl.next_power_of_2(n))


def _gpu_rows_kernel(*refs, lead: int, with_fallback: bool, scale: float, length: int,
                     rows: int, own: int, features: int, masked_logit: float):
    """One row's one KV head (grid: rows, heads): its query rows over its own cached entries,
    tile by tile with an online softmax, then over the block's own keys."""
    index_refs, (q_ref, k_ref, v_ref, *refs) = refs[:lead], refs[lead:]
    if with_fallback:
        kf_ref, vf_ref, use_ref, *refs = refs
    visible_ref, own_k_ref, own_v_ref, own_visible_ref, out_ref = refs
    from jax.experimental.pallas import triton as plgpu
    i, h = pl.program_id(0), pl.program_id(1)
    entry = tuple(ix[i] for ix in index_refs)  # where this row's entries lie
    r_pad, e_pad = q_ref.shape
    u_pad = own_k_ref.shape[0]
    block = GPU_ROWS_BLOCK
    feature_1e = (jnp.arange(e_pad) < features)[None, :]
    row_r1 = (jnp.arange(r_pad) < rows)[:, None]
    q_re = plgpu.load(q_ref, mask=row_r1 & feature_1e, other=0.0)
    # float32 products stay float32 (no TF32), as the XLA path computes them.
    dot = functools.partial(plgpu.dot, allow_tf32=False if q_re.dtype == jnp.float32 else None)

    def scores(keys_ue: jax.Array) -> jax.Array:  # [r, u]
        return dot(q_re, keys_ue, trans_b=True) * scale

    def accumulate(carry, logits_ru, values):
        m_r, l_r, acc_re = carry
        m_next = jnp.maximum(m_r, jnp.max(logits_ru, axis=1))
        p_ru = jnp.exp(logits_ru - m_next[:, None])
        alpha = jnp.exp(m_r - m_next)
        return (m_next, alpha * l_r + jnp.sum(p_ru, axis=1),
                alpha[:, None] * acc_re + values(p_ru))

    def tile(j, carry):
        at = pl.ds(j * block, block)
        in_range_u = j * block + jnp.arange(block) < length
        entries = in_range_u[:, None] & feature_1e
        k = plgpu.load(k_ref.at[entry + (h, at, pl.ds(0, e_pad))], mask=entries, other=0.0)
        v = plgpu.load(v_ref.at[entry + (h, at, pl.ds(0, e_pad))], mask=entries, other=0.0)
        visible = plgpu.load(visible_ref.at[i, pl.ds(0, r_pad), at],
                             mask=row_r1 & in_range_u[None, :], other=0) != 0
        logits_ru = scores(k)
        if with_fallback:  # the latest entries where this row's slot has none
            kf = plgpu.load(kf_ref.at[i, h, at, pl.ds(0, e_pad)], mask=entries, other=0.0)
            vf = plgpu.load(vf_ref.at[i, h, at, pl.ds(0, e_pad)], mask=entries, other=0.0)
            use_1u = plgpu.load(use_ref.at[i, pl.ds(0, 1), at], mask=in_range_u[None, :],
                                other=0) != 0
            logits_ru = jnp.where(use_1u, logits_ru, scores(kf))
        logits_ru = jnp.where(visible, logits_ru, masked_logit)  # loaded invisible past the end
        if with_fallback:
            return accumulate(carry, logits_ru, lambda p: (
                dot(jnp.where(use_1u, p, 0.0).astype(v.dtype), v)
                + dot(jnp.where(use_1u, 0.0, p).astype(vf.dtype), vf)))
        return accumulate(carry, logits_ru, lambda p: dot(p.astype(v.dtype), v))

    start = (jnp.full((r_pad,), -jnp.inf, jnp.float32), jnp.zeros((r_pad,), jnp.float32),
             jnp.zeros((r_pad, e_pad), jnp.float32))
    carry = jax.lax.fori_loop(0, pl.cdiv(length, block), tile, start)
    own_u = jnp.arange(u_pad) < own
    own_entries = own_u[:, None] & feature_1e
    own_k = plgpu.load(own_k_ref, mask=own_entries, other=0.0)
    own_v = plgpu.load(own_v_ref, mask=own_entries, other=0.0)
    own_visible = plgpu.load(own_visible_ref.at[i, pl.ds(0, r_pad), pl.ds(0, u_pad)],
                             mask=row_r1 & own_u[None, :], other=0) != 0
    own_logits = jnp.where(own_visible, scores(own_k), masked_logit)
    _, l_r, acc_re = accumulate(carry, own_logits, lambda p: dot(p.astype(own_v.dtype), own_v))
    plgpu.store(out_ref, (acc_re / l_r[:, None]).astype(out_ref.dtype), mask=row_r1 & feature_1e)


def gpu_row_entries_attention(q_bkre: jax.Array, buffers: tuple[jax.Array, jax.Array],
                              index: tuple[jax.Array, ...], visible_brs: jax.Array,
                              own_k_bkue: jax.Array, own_v_bkue: jax.Array,
                              own_visible_bru: jax.Array,
                              fallback: tuple[jax.Array, jax.Array] | None = None,
                              use_b1s: jax.Array | None = None, *, masked_logit: float,
                              positions_minor: bool = False, interpret: bool = False
                              ) -> jax.Array:
    """`row_entries_attention` on GPU (Triton): the same arguments and function. Each program
    (one row, one KV head) loads its row's indices and reads its entries from the buffers
    where they lie, with pointer offsets; the rows' entries are never gathered into one array,
    which would write and read every row's slot again at every layer. ``positions_minor`` is
    the TPU's layout and is not taken here."""
    if positions_minor:
        raise ValueError("the GPU kernel reads buffers stored with their features innermost.")
    b, kh, r, e = q_bkre.shape
    u = own_k_bkue.shape[2]
    r_pad, u_pad, e_pad = _tile(r), _tile(u), _tile(e)
    whole = pl.no_block_spec
    per_head = lambda n: pl.BlockSpec((None, None, n, e_pad), lambda i, h: (i, h, 0, 0))  # noqa: E731
    with_fallback = fallback is not None
    in_specs = [whole] * len(index) + [per_head(r_pad), whole, whole]
    operands = [*(ix.astype(jnp.int32) for ix in index), q_bkre, *buffers]
    if with_fallback:
        in_specs += [whole] * 3
        operands += [*fallback, use_b1s]
    in_specs += [whole, per_head(u_pad), per_head(u_pad), whole]
    operands += [visible_brs, own_k_bkue, own_v_bkue, own_visible_bru]
    from jax.experimental.pallas import triton as plgpu
    kernel = functools.partial(_gpu_rows_kernel, lead=len(index), with_fallback=with_fallback,
                               scale=1.0 / math.sqrt(e), length=buffers[0].shape[-2], rows=r,
                               own=u, features=e, masked_logit=masked_logit)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q_bkre.shape, q_bkre.dtype), grid=(b, kh),
        in_specs=in_specs, out_specs=per_head(r_pad),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="gpu_row_entries_attention")(*operands)


def row_entries_attention_per_shard(mesh: jax.sharding.AbstractMesh, kernel: Callable,
                                    q_bkre: jax.Array,
                                    buffers: tuple[jax.Array, jax.Array],
                                    index: tuple[jax.Array, ...], visible_brs: jax.Array,
                                    own_k_bkue: jax.Array, own_v_bkue: jax.Array,
                                    own_visible_bru: jax.Array,
                                    fallback: tuple[jax.Array, jax.Array] | None = None,
                                    use_b1s: jax.Array | None = None, **kwargs) -> jax.Array:
    """``kernel`` (`row_entries_attention` or `gpu_row_entries_attention`) on each shard of the
    automatic axes of ``mesh`` (the mesh XLA partitions the program over): the rows over the data-parallel axes that divide them, the
    KV heads over the tensor axis where it divides them, whole elsewhere.

    Where the rows are split, each reads its own row of the buffers (``index[-1]`` is every
    row's own: lockstep decoding), and on its shard that row is the local one."""
    rows_axes, head_axis, axes = shard_axes(mesh, *q_bkre.shape[:2])
    lead = len(index)
    per_head = PartitionSpec(rows_axes, head_axis)
    per_row = PartitionSpec(rows_axes)
    entries = PartitionSpec(*(None,) * (lead - 1), rows_axes, head_axis)
    with_fallback = fallback is not None

    def local(q, keys, values, ix, visible, own_k, own_v, own_visible, *rest):
        if rows_axes is not None:  # each row's own row of this shard's buffers
            ix = (*ix[:-1], jnp.arange(q.shape[0]))
        kf, vf, use = rest if with_fallback else (None, None, None)
        return kernel(q, (keys, values), ix, visible, own_k, own_v, own_visible,
                      None if kf is None else (kf, vf), use, **kwargs)

    in_specs = [per_head, entries, entries, (per_row,) * lead, per_row, per_head, per_head,
                per_row]
    operands = [q_bkre, *buffers, index, visible_brs, own_k_bkue, own_v_bkue, own_visible_bru]
    if with_fallback:
        in_specs += [per_head, per_head, per_row]
        operands += [*fallback, use_b1s]
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=per_head,
                         axis_names=axes, check_vma=False)(*operands)
