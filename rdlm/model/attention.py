"""What every attention layer of one forward pass shares: RoPE angles and the mask.

Positions come from segment ids (packed documents) and branch ids (several continuations of one
prefix); the kernels that compute attention itself live in `rdlm.model.kernels`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.config import ModelConfig

# (keys, values), each [batch, heads, length, head_dim]: the KV cache's layout
# (`rdlm.generation.cache`), in which the attention dots over a cache need no transposed copy of it.
KV = tuple[jax.Array, jax.Array]


class RowEntries(NamedTuple):
    """Cached keys and values that each query row reads from its own place in a larger buffer
    (depth-continuous decoding): row i's entries are ``buffers[index[0][i], index[1][i], …]``
    (its own recurrence slot of a core layer: ``(slot_b, arange(b))``; one of a few gathered
    rows of a stage: ``(rows_k,)``) where ``use_b1t1``, its ``fallback`` entries (the latest of
    each position) elsewhere. A prefix in this form lets the attention read each row's entries
    where they lie (`rdlm.model.kernels.attend_with_prefix`)."""

    buffers: KV  # [*lead, h, t, e] each, the lead axes indexed by ``index``
    index: tuple[jax.Array, ...]  # one [rows] array per lead axis
    fallback: KV | None = None  # [rows, h, t, e] each; None: the buffers everywhere
    use_b1t1: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every attention layer of one forward pass shares (a pytree of arrays)."""

    rope_cos_bt1f: jax.Array  # f = head_dim / 2 rotation frequencies
    rope_sin_bt1f: jax.Array
    # True where query t may attend to key s; None means plain causal attention (no [b, t, s]
    # mask is built at all).
    mask_b1ts: jax.Array | None
    # Set when ``mask_b1ts`` is exactly "causal within equal segment ids": the fused kernels
    # (`rdlm.model.kernels`) then take these ids instead of the [b, t, s] mask, which XLA drops
    # as dead code when nothing else reads it.
    segment_ids_bt: jax.Array | None = None


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """Position of each token inside its segment: restarts at 0 wherever the segment id changes."""
    t = segment_ids_bt.shape[1]
    index_bt = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
    is_start_bt = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]],
        axis=1)
    start_bt = lax.cummax(jnp.where(is_start_bt, index_bt, 0), axis=1)
    return index_bt - start_bt


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """The head_dim / 2 rotation frequencies, after ``cfg.rope_scaling``."""
    e = cfg.head_dim
    inv_freq_f = 1.0 / (cfg.rope_base ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if cfg.rope_scaling == "linear":
        return inv_freq_f / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        # Wavelengths longer than the pretraining context / low_freq_factor are stretched by the
        # factor, those shorter than context / high_freq_factor kept, and the band between
        # interpolated linearly in context / wavelength.
        wavelen_f = 2 * jnp.pi / inv_freq_f
        ramp_f = ((cfg.rope_original_max_len / wavelen_f - cfg.rope_low_freq_factor)
                  / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
        ramp_f = jnp.clip(ramp_f, 0.0, 1.0)
        return (1 - ramp_f) * inv_freq_f / cfg.rope_scaling_factor + ramp_f * inv_freq_f
    return inv_freq_f


def rope_angles(positions_bt: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotation angles, float32, shaped to broadcast over heads."""
    angle_btf = positions_bt.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
    return jnp.cos(angle_btf)[:, :, None, :], jnp.sin(angle_btf)[:, :, None, :]


def attention_context(cfg: ModelConfig, batch: int, length: int, *,
                      segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None,
                      branch_ids: jax.Array | None = None) -> AttentionContext:
    """Causal mask (within a segment when packed) and RoPE angles for a [batch, length] input.

    Segment ids mark packed documents (and id 0 conventionally marks padding): a token attends only
    to earlier tokens of its own segment, and positions restart with each segment, so a packed row
    computes exactly what its documents would alone.

    Branch ids share one prefix between several continuations: branch 0 is the trunk, and a token
    of branch k > 0 sees the trunk and its own branch only. A token's position is the number of
    tokens it sees before it, so every branch computes exactly what it would alone after the trunk
    (several questions about one context, each isolated from the others' answers).
    """
    causal_tt = jnp.tril(jnp.ones((length, length), bool))
    if segment_ids is None and branch_ids is None:
        mask_b1ts = None
        default_positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:
        mask_bts = jnp.broadcast_to(causal_tt, (batch, length, length))
        if segment_ids is not None:
            mask_bts = mask_bts & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if branch_ids is not None:
            visible_bts = ((branch_ids[:, None, :] == 0)
                           | (branch_ids[:, :, None] == branch_ids[:, None, :]))
            mask_bts = mask_bts & visible_bts
        mask_b1ts = mask_bts[:, None]
        default_positions = mask_bts.sum(-1) - 1
    positions = default_positions if positions is None else positions
    cos, sin = rope_angles(positions, cfg)
    kernel_segments_bt = segment_ids if branch_ids is None else None
    return AttentionContext(cos, sin, mask_b1ts, kernel_segments_bt)


def previous_positions(batch: int, length: int, num: int, mask_b1ts: jax.Array | None
                       ) -> jax.Array:
    """[num, b, t]: the 1st … ``num``-th previous *visible* position of every position, -1 where
    none.

    "Visible" follows the attention mask: within a segment, and across a branch's start into its
    trunk, so packed and branched rows see exactly the neighbours they would see alone.
    """
    index_t = jnp.arange(length)
    if mask_b1ts is None:
        prev_bt = jnp.broadcast_to(index_t - 1, (batch, length))
    else:  # the latest earlier key each query may attend to
        earlier_bts = mask_b1ts[:, 0] & (index_t[None, :] < index_t[:, None])[None]
        prev_bt = jnp.max(jnp.where(earlier_bts, index_t, -1), axis=-1)
    out, where_bt = [], prev_bt
    for _ in range(num):
        out.append(where_bt)
        where_bt = jnp.where(where_bt >= 0, jnp.take_along_axis(
            prev_bt, jnp.maximum(where_bt, 0), axis=1), -1)
    return jnp.stack(out)


def previous_tokens(tokens_bt: jax.Array, num: int, mask_b1ts: jax.Array | None) -> jax.Array:
    """Ids of the 1st … ``num``-th previous visible token of every position, -1 where none."""
    where_kbt = previous_positions(*tokens_bt.shape, num, mask_b1ts)
    ids_kbt = jax.vmap(lambda w: jnp.take_along_axis(tokens_bt, jnp.maximum(w, 0), axis=1))(
        where_kbt)
    return jnp.where(where_kbt >= 0, ids_kbt, -1)


def apply_rope_half(x_bthe: jax.Array, cos_bt1f: jax.Array, sin_bt1f: jax.Array) -> jax.Array:
    """Rotate the pairs (i, i + head_dim/2) of the head dimension ("rotate half", the Llama
    layout), in float32."""
    x1, x2 = jnp.split(x_bthe.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_bt1f - x2 * sin_bt1f, x2 * cos_bt1f + x1 * sin_bt1f], -1)
    return rotated.astype(x_bthe.dtype)


def apply_rope(x_bthe: jax.Array, cos_bt1f: jax.Array, sin_bt1f: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (0,1), (2,3), … of the head dimension, in float32."""
    x_bthf2 = x_bthe.astype(jnp.float32).reshape(*x_bthe.shape[:-1], -1, 2)
    real, imag = x_bthf2[..., 0], x_bthf2[..., 1]
    rotated = jnp.stack([real * cos_bt1f - imag * sin_bt1f, real * sin_bt1f + imag * cos_bt1f], -1)
    return rotated.reshape(x_bthe.shape).astype(x_bthe.dtype)

