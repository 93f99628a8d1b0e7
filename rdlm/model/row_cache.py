"""Decoding with every row at its own position: how the KV cache is laid out on each backend, and
how each row's entries are written and read.

- Writing one cache position per row, and reading each row's own recurrence slot (or a few rows
  of a stage): a slice per row on TPU, one scatter or gather elsewhere (`write_row_positions`,
  `read_row_entries`).
- Attending over each row's own entries (a `RowEntries` prefix): on TPU and GPU a Pallas kernel
  reads them by index where they lie (`choose_row_attention`; the attention itself is
  `rdlm.model.kernels.attend_with_prefix`); on TPU lockstep decoding hands its core slot and
  its stages to the same kernel (`slot_prefix`, `stage_prefix`).
- On TPU the cache is stored with whichever of positions and features pads less innermost
  (`cache_layout`), held so at every write (`hold_cache_layout`).

Measured effects of each choice are in docs/performance.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from rdlm.model import backend
from rdlm.model.attention import KV, RowEntries


# Writing one cache position per row, each row at its own position, and reading each row's own
# entries (depth-continuous decoding): one scatter or gather, or a slice per row.
INDEXED, SLICES = "indexed", "slices"


def choose_row_access(platform: str) -> str:
    """How `write_row_positions` and `read_row_entries` go on ``platform``: `SLICES` on TPU,
    `INDEXED` (one scatter or gather) elsewhere.

    XLA:TPU tiles an array's last two axes, a cache's positions × features. For a scatter of
    single positions it lays the whole buffer out again with heads innermost, and back for the
    attention that reads it: two copies of the cache per write, where the write itself is a few
    entries per row. A gather of whole rows (each row's recurrence slot, a few rows of a stage)
    it lowers as slices over every axis it does not index, so it reads the whole buffer: every
    slot of a core layer to take one a row. A `dynamic_slice` or `dynamic_update_slice` per row
    touches the rows' entries only (docs/performance.md). On GPU and CPU the scatter and the
    gather are one kernel each, where a loop over the rows would be one launch (or more) per
    row."""
    return SLICES if platform == "tpu" else INDEXED


# How attention over each row's own entries (a `RowEntries` prefix) goes: besides `INDEXED`
# (gathered into one array first) and `SLICES` (row by row), a Pallas kernel that reads them
# where they lie (`rdlm.model.pallas_decode`: Mosaic on TPU, Triton on GPU).
ROWS_KERNEL = "rows_kernel"


def choose_row_attention(platform: str, per_shard: bool) -> str:
    """How `kernels.attend_with_prefix` attends over a `RowEntries` prefix on ``platform``: on
    TPU and GPU the platform's row-entries kernel where a Pallas kernel can run (``per_shard``,
    `backend.pallas_runs`: whole on each device, or per shard of the mesh the program names);
    else row by row over slices on TPU, the rows' entries gathered once elsewhere
    (`choose_row_access`).

    On TPU XLA can only read each row's entries where they lie one row at a time: a
    `dynamic_slice` and an attention per row, unrolled, whose count of small ops and compile
    time grow with the rows. On GPU it gathers them: each row's slot of every core layer
    written to a new array and read again, at every step. The kernels read them by index in
    one launch per layer."""
    if platform in ("tpu", "gpu") and per_shard:
        return ROWS_KERNEL
    return choose_row_access(platform)


def _tpu_kernel_reads(platform: str | None = None) -> bool:
    """Whether the TPU's row-entries kernel reads the cache in the program being traced (on
    ``platform``; None: the one JAX compiles for): there the cache is held to its stored layout,
    and lockstep reads its slot and stages through the kernel too."""
    platform = platform or backend.target_platform()
    return (platform == "tpu"
            and choose_row_attention(platform, backend.pallas_runs()) == ROWS_KERNEL)


def read_row_entries(buf: jax.Array, index_k: tuple[jax.Array, ...], how: str | None = None
                     ) -> jax.Array:
    """``buf[index_k]``: for each ``i``, the sub-array of ``buf`` at ``(index_k[0][i],
    index_k[1][i], …)`` of its leading axes, stacked ``[k, *rest]``: a row's own recurrence
    slot of a core layer, or a few rows of a stage's cache. ``how``: `INDEXED` or `SLICES`
    (None: `choose_row_access` for the platform JAX compiles for)."""
    if (how or choose_row_access(backend.target_platform())) == INDEXED:
        return buf[index_k]
    lead, rest = len(index_k), buf.shape[len(index_k):]
    return jnp.concatenate([
        lax.dynamic_slice(buf, tuple(ix[i] for ix in index_k) + (0,) * len(rest),
                          (1,) * lead + rest).reshape((1, *rest))
        for i in range(index_k[0].shape[0])])


def write_row_positions(buf_xbhte: jax.Array, new_xkh1e: jax.Array, rows_k: jax.Array,
                        position_k: jax.Array, write_k: jax.Array, how: str | None = None
                        ) -> jax.Array:
    """``buf[..., rows_k[i], :, position_k[i], :] = new[..., i, :, 0, :]`` for each ``i`` in
    ``write_k``: a buffer ``[*lead, b, h, t, e]`` (the lead axes, such as the recurrence slot,
    written whole) and one position of ``k`` rows in the same layout, ``[*lead, k, h, 1, e]``.
    Rows outside ``write_k`` keep their entry; ``rows_k`` are distinct. ``how``: `INDEXED` or
    `SLICES` (None: `choose_row_access` for the platform JAX compiles for).

    The entries keep the buffer's axis order, position axis included: XLA:TPU lays an array out
    to make a reshape or transpose next to it free, so an entry squeezed or transposed on its
    way in would make it lay out the whole buffer to match."""
    lead = buf_xbhte.ndim - 4
    length = buf_xbhte.shape[-2]
    new_xkh1e = new_xkh1e.astype(buf_xbhte.dtype)
    if (how or choose_row_access(backend.target_platform())) == INDEXED:
        where_k = jnp.where(write_k, position_k, length)  # out of range: the write is dropped
        index = (slice(None),) * lead + (rows_k, slice(None), where_k)
        # Advanced indices on two axes apart put the indexed axis first: [k, *lead, h, e].
        return buf_xbhte.at[index].set(jnp.moveaxis(new_xkh1e[..., 0, :], lead, 0), mode="drop")

    # Only the rows that write, in a loop as long as they are many: nothing to read back.
    k = rows_k.shape[0]
    writing_k = jnp.nonzero(write_k, size=k, fill_value=0)[0]

    def one(j: jax.Array, buf_xbhte: jax.Array) -> jax.Array:
        i = writing_k[j]
        piece = lax.dynamic_slice_in_dim(new_xkh1e, i, 1, axis=lead)  # [*lead, 1, h, 1, e]
        start = (0,) * lead + (rows_k[i], 0, position_k[i], 0)
        return hold_cache_layout(lax.dynamic_update_slice(buf_xbhte, piece, start))

    return lax.fori_loop(0, jnp.sum(write_k.astype(jnp.int32)), one, buf_xbhte)


def positions_innermost(shape: tuple[int, ...]) -> bool:
    """Whether a KV-cache buffer ``[..., t, e]`` is stored on TPU with its positions innermost:
    when that pads it less than its features innermost.

    XLA:TPU tiles the two innermost axes by 8 × 128, padding the innermost to a multiple of
    128. With the features innermost, each of Huginn-0125's 96 takes 128, a third more cache
    to hold and to read at every step; with the positions innermost, only the last partial
    tile of positions is padded (docs/performance.md). A buffer of one or a few positions
    keeps its features innermost."""
    t, e = shape[-2:]
    lanes = lambda x: -(-x // 128) * 128  # noqa: E731
    return lanes(t) * e < lanes(e) * t


def cache_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axis order, major to minor, in which a KV-cache buffer ``[..., t, e]`` is stored on
    TPU (`positions_innermost`)."""
    n = len(shape)
    if positions_innermost(shape):
        return tuple(range(n - 2)) + (n - 1, n - 2)
    return tuple(range(n))


def hold_cache_layout(buf: jax.Array, platform: str | None = None) -> jax.Array:
    """``buf``, a KV-cache buffer just written, held to the layout it is stored in
    (`cache_layout`) where the row-entries kernel reads it: on TPU, in a program that runs whole
    on each device or names the mesh it is partitioned over (`choose_row_attention`). Elsewhere
    unchanged: where XLA partitions a program without the kernel it reads the cache with its
    own attention, and chooses the layout that suits it.

    XLA:TPU chooses the layout of a loop's carried cache from the operations inside it; where
    two choices differ it copies the whole buffer between them, in every iteration
    (docs/performance.md). Held at each write, the cache stays in one layout through every
    loop, the one the kernel reads."""
    if not _tpu_kernel_reads(platform):
        return buf
    return with_layout_constraint(buf, Layout(major_to_minor=cache_layout(buf.shape)))


def row_entries(prefix: RowEntries, how: str | None = None, row: int | None = None) -> KV:
    """Each row's own entries of a `RowEntries` prefix, ``[rows, h, s, e]`` each; ``row``: that
    row's alone, ``[1, h, s, e]``. ``how``: as `read_row_entries`."""
    pick = slice(None) if row is None else slice(row, row + 1)
    index = tuple(ix[pick] for ix in prefix.index)
    kv = tuple(read_row_entries(buf, index, how) for buf in prefix.buffers)
    if prefix.fallback is None:
        return kv
    return tuple(jnp.where(prefix.use_b1t1[pick], x, fallback[pick])
                 for x, fallback in zip(kv, prefix.fallback))


def stage_prefix(kv: KV, in_branch: bool = False) -> KV | RowEntries:
    """What every row attends to of a prelude or coda layer's cache, ``[b, h, t, e]`` each:
    where the TPU's row-entries kernel reads the cache (`_tpu_kernel_reads`), a `RowEntries`
    prefix that it reads where it lies; elsewhere the buffers.

    ``in_branch``: read inside a conditional (the depth-continuous whole-batch passes). There
    XLA:TPU lays an attention's operands out as the attention prefers, whatever the layout of
    the buffer passed in, and copies the whole buffer to match; so where the kernel does not
    run, the buffers are held row-major, as XLA stores them in a program it partitions
    (docs/performance.md). Outside conditionals (lockstep) a hold would only add copies."""
    if _tpu_kernel_reads():
        return RowEntries(kv, (jnp.arange(kv[0].shape[0]),))
    if in_branch and choose_row_attention(backend.target_platform(),
                                          backend.pallas_runs()) == SLICES:
        return tuple(with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))
                     for x in kv)
    return kv


def slot_prefix(slots: KV, slot: jax.Array, latest: KV | None, use_b1t1: jax.Array | None
                ) -> KV | RowEntries:
    """What every row of a lockstep core step attends to: recurrence slot ``slot`` of
    ``slots`` (``[s, b, h, t, e]`` each) where ``use_b1t1``, the ``latest`` entries elsewhere
    (None: the slot everywhere). Where the TPU's row-entries kernel reads the cache
    (`_tpu_kernel_reads`), a `RowEntries` prefix that it reads where it lies, in the layout
    the cache is stored in (`cache_layout`); elsewhere the slot itself, merged."""
    if _tpu_kernel_reads():
        b = slots[0].shape[1]
        return RowEntries(slots, (jnp.full((b,), slot), jnp.arange(b)), latest, use_b1t1)
    kv = tuple(lax.dynamic_index_in_dim(buf_sbhte, slot, keepdims=False) for buf_sbhte in slots)
    if latest is None:
        return kv
    return tuple(jnp.where(use_b1t1, x, fallback) for x, fallback in zip(kv, latest))
