"""Attention kernels written in Pallas. Fused causal attention: splash attention on TPUs, a flash
kernel on GPUs; both take packed-segment ids, never a [b, t, s] mask. Decoding with every row at
its own position (TPU): attention over each row's own entries of a cache buffer, read by index
(`row_entries_attention`).

`rdlm.model.kernels` decides when they run (`kernels.choose_attention`,
`row_cache.choose_row_attention`); this module adapts the fused kernels to the model's layout
(``[batch, length, heads, head_dim]``, the softmax scale 1/sqrt(head_dim), float32 statistics)
and runs them per shard of a device mesh. ``interpret=True`` runs any of the kernels in Pallas'
interpreter on any backend: that is how the CPU test suite checks their values and gradients.

Measured choices (block sizes, compile time, memory) are in docs/performance.md.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import Mesh, PartitionSpec

# Mesh axes that split the batch, and the one that splits heads: the activation rules of
# `rdlm.runtime.sharding.DEFAULT_RULES` ("batch" → (data, fsdp), "heads" → tensor), restated
# here because the model layer imports nothing above it (tests/test_kernels.py checks they agree).
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXIS = "tensor"

# Splash attention's tile along the query and key axes. 512 divides the 4,096-token context into
# an 8 x 8 grid of tiles, of which the causal mask skips the 28 above the diagonal outright; a
# multiple of the 128-lane vreg width, and with head_dim 96 (Huginn) one bf16 tile of q, k or v
# is 96 KiB, far inside VMEM, so larger tiles only lose skipped work. Shorter sequences use the
# largest multiple of 128 that divides them (docs/performance.md).
SPLASH_BLOCK = 512
SPLASH_MIN_BLOCK = 128
# Names under which the splash kernel's residuals can be saved by a remat policy
# (`rdlm.config.ModelConfig.REMAT_POLICIES`): with the output and q/k/v saved, the backward pass needs
# the softmax statistics (logsumexp) too, or it reruns the forward kernel to get them.
SPLASH_LSE_NAME = "attention_lse"

# The GPU flash kernel's tiles: 64 query/key rows forward, 32 in the backward kernels (the
# defaults of jax.experimental.pallas.ops.gpu.attention for its backward, which keeps the
# fused dq/dk/dv kernel within shared memory at head_dim 128, the padded size of 96).
GPU_BLOCK_Q = 64
GPU_BLOCK_K = 64
GPU_BLOCK_BWD = 32


def splash_block(length: int) -> int | None:
    """The splash tile for ``length`` positions: `SPLASH_BLOCK` or the largest multiple of 128
    below it that divides the length; None when no multiple of 128 divides it (the kernel's
    tiles must cover the sequence exactly)."""
    for block in range(SPLASH_BLOCK, SPLASH_MIN_BLOCK - 1, -SPLASH_MIN_BLOCK):
        if length % block == 0:
            return block
    return None


def gpu_flash_fits(length: int) -> bool:
    """Whether the GPU flash kernel's tiles cover ``length`` exactly (forward and backward)."""
    return length % GPU_BLOCK_Q == 0 and length % GPU_BLOCK_K == 0


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """The splash kernel for causal self-attention over ``length`` positions and ``heads`` heads
    in ``block`` x ``block`` tiles.

    Its block-sparsity tables come from the static causal mask, in NumPy, and become constants
    of the traced program; the kernel object holds them as arrays of the current trace, so it is
    built afresh in every trace rather than cached.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=SPLASH_LSE_NAME, interpret=interpret)


def _splash_local(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                  segment_ids_bt: jax.Array | None, block: int, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    b, t, h, e = q_bthe.shape
    kernel = _splash_kernel(h, t, block, interpret)
    # The kernel takes unscaled logits: scale q as the blocked kernel does (in its own dtype).
    q_bhte = (q_bthe * jnp.asarray(1.0 / math.sqrt(e), q_bthe.dtype)).transpose(0, 2, 1, 3)
    k_bhte, v_bhte = k_bthe.transpose(0, 2, 1, 3), v_bthe.transpose(0, 2, 1, 3)
    if segment_ids_bt is None:
        out_bhte = jax.vmap(kernel)(q_bhte, k_bhte, v_bhte)
    else:
        out_bhte = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
            q_bhte, k_bhte, v_bhte, segment_ids_bt.astype(jnp.int32))
    return out_bhte.transpose(0, 2, 1, 3)


def _gpu_flash_local(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                     segment_ids_bt: jax.Array | None, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    sizes = gpu_attention.BlockSizes(block_q=GPU_BLOCK_Q, block_k=GPU_BLOCK_K,
                                     block_q_dkv=GPU_BLOCK_BWD, block_kv_dkv=GPU_BLOCK_BWD,
                                     block_q_dq=GPU_BLOCK_BWD, block_kv_dq=GPU_BLOCK_BWD)
    seg = None if segment_ids_bt is None else segment_ids_bt.astype(jnp.int32)
    return gpu_attention.mha(q_bthe, k_bthe, v_bthe, seg, sm_scale=1.0 / math.sqrt(q_bthe.shape[-1]),
                             causal=True, block_sizes=sizes, interpret=interpret)


def _shard_axes(mesh: Mesh | jax.sharding.AbstractMesh, batch: int, heads: int
                ) -> tuple[tuple[str, ...] | None, str | None, frozenset[str]]:
    """How the kernels' `shard_map` splits its operands over ``mesh``: (the axes of the rows,
    the axis of the heads, every axis it takes). The rows go over the data-parallel axes that
    divide them, the heads over the tensor axis where it divides them; only over the axes XLA
    partitions, since an enclosing `shard_map` (a depth-continuous group) has taken the others
    by hand."""
    auto = {axis: size for axis, size, kind in
            zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
            if kind != jax.sharding.AxisType.Manual}
    rows_axes, rows = [], batch
    for axis in BATCH_MESH_AXES:
        if auto.get(axis, 1) > 1 and rows % auto[axis] == 0:
            rows_axes.append(axis)
            rows //= auto[axis]
    head_axis = (HEAD_MESH_AXIS if auto.get(HEAD_MESH_AXIS, 1) > 1
                 and heads % auto[HEAD_MESH_AXIS] == 0 else None)
    return tuple(rows_axes) or None, head_axis, frozenset(auto)


def _per_shard(local: Callable, q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
               segment_ids_bt: jax.Array | None, mesh: Mesh | jax.sharding.AbstractMesh | None
               ) -> jax.Array:
    """``local`` on each shard of ``mesh`` (or on the whole arrays without one)."""
    if mesh is None or mesh.size == 1:
        return local(q_bthe, k_bthe, v_bthe, segment_ids_bt)
    rows_axes, head_axis, axes = _shard_axes(mesh, q_bthe.shape[0], q_bthe.shape[2])
    qkv_spec, seg_spec = PartitionSpec(rows_axes, None, head_axis), PartitionSpec(rows_axes)
    run = functools.partial(jax.shard_map, mesh=mesh, out_specs=qkv_spec, axis_names=axes,
                            check_vma=False)
    if segment_ids_bt is None:
        return run(lambda q, k, v: local(q, k, v, None), in_specs=(qkv_spec,) * 3)(
            q_bthe, k_bthe, v_bthe)
    return run(local, in_specs=(qkv_spec,) * 3 + (seg_spec,))(q_bthe, k_bthe, v_bthe,
                                                               segment_ids_bt)


def splash_attention(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                     segment_ids_bt: jax.Array | None = None, *, mesh: Mesh | None = None,
                     block: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention (within equal segment ids, if given) with TPU splash attention.

    The same function as `kernels.causal_attention` with the mask "causal and same segment";
    the length must be a multiple of 128. ``block``: the tile (default `splash_block`).
    """
    length = q_bthe.shape[1]
    block = splash_block(length) if block is None else block
    if block is None or length % block or block % SPLASH_MIN_BLOCK:
        raise ValueError(f"splash attention tiles {length} positions by a multiple of "
                         f"{SPLASH_MIN_BLOCK} that divides it; got block {block}.")
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    return _per_shard(lambda q, k, v, s: local(q, k, v, s), q_bthe, k_bthe, v_bthe,
                      segment_ids_bt, mesh)


def gpu_flash_attention(q_bthe: jax.Array, k_bthe: jax.Array, v_bthe: jax.Array,
                        segment_ids_bt: jax.Array | None = None, *, mesh: Mesh | None = None,
                        interpret: bool = False) -> jax.Array:
    """Causal attention (within equal segment ids, if given) with the Pallas GPU flash kernel
    (Triton): for packed segments, which cuDNN's fused attention in JAX does not take."""
    local = functools.partial(_gpu_flash_local, interpret=interpret)
    return _per_shard(lambda q, k, v, s: local(q, k, v, s), q_bthe, k_bthe, v_bthe,
                      segment_ids_bt, mesh)



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


def row_entries_attention_per_shard(mesh: jax.sharding.AbstractMesh, q_bkre: jax.Array,
                                    buffers: tuple[jax.Array, jax.Array],
                                    index: tuple[jax.Array, ...], visible_brs: jax.Array,
                                    own_k_bkue: jax.Array, own_v_bkue: jax.Array,
                                    own_visible_bru: jax.Array,
                                    fallback: tuple[jax.Array, jax.Array] | None = None,
                                    use_b1s: jax.Array | None = None, **kwargs) -> jax.Array:
    """`row_entries_attention` on each shard of the automatic axes of ``mesh`` (the mesh XLA
    partitions the program over): the rows over the data-parallel axes that divide them, the
    KV heads over the tensor axis where it divides them, whole elsewhere.

    Where the rows are split, each reads its own row of the buffers (``index[-1]`` is every
    row's own: lockstep decoding), and on its shard that row is the local one."""
    rows_axes, head_axis, axes = _shard_axes(mesh, *q_bkre.shape[:2])
    lead = len(index)
    per_head = PartitionSpec(rows_axes, head_axis)
    per_row = PartitionSpec(rows_axes)
    entries = PartitionSpec(*(None,) * (lead - 1), rows_axes, head_axis)
    with_fallback = fallback is not None

    def local(q, keys, values, ix, visible, own_k, own_v, own_visible, *rest):
        if rows_axes is not None:  # each row's own row of this shard's buffers
            ix = (*ix[:-1], jnp.arange(q.shape[0]))
        kf, vf, use = rest if with_fallback else (None, None, None)
        return row_entries_attention(q, (keys, values), ix, visible, own_k, own_v,
                                     own_visible, None if kf is None else (kf, vf), use,
                                     **kwargs)

    in_specs = [per_head, entries, entries, (per_row,) * lead, per_row, per_head, per_head,
                per_row]
    operands = [q_bkre, *buffers, index, visible_brs, own_k_bkue, own_v_bkue, own_visible_bru]
    if with_fallback:
        in_specs += [per_head, per_head, per_row]
        operands += [*fallback, use_b1s]
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=per_head,
                         axis_names=axes, check_vma=False)(*operands)
