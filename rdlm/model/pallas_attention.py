"""Fused causal attention written in Pallas: splash attention on TPUs, a flash kernel on GPUs;
both take packed-segment ids, never a [b, t, s] mask. (The decode kernels, which read each
row's own cache entries, are `rdlm.model.pallas_decode`.)

`rdlm.model.kernels` decides when they run (`kernels.choose_attention`); this module adapts the
fused kernels to the model's layout
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


def shard_axes(mesh: Mesh | jax.sharding.AbstractMesh, batch: int, heads: int
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
    rows_axes, head_axis, axes = shard_axes(mesh, q_bthe.shape[0], q_bthe.shape[2])
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
