"""Log-likelihood of continuations: the scoring behind `rdlm.lm_eval`'s ``loglikelihood``
requests, without lm-eval.

Each (context, continuation) becomes a right-padded row whose last tokens are scored; rows are
batched by length into a few padded lengths (`bucket_length`), and `score_batch` is one jitted
program per (batch, length) bucket with r traced, so a sweep over r compiles nothing new.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import ModelConfig
from rdlm.model import Params, forward

SHORTEST_BUCKET = 16  # the shortest padded length (see `bucket_length`)


@functools.partial(jax.jit, static_argnames=("cfg", "constrain"))
def score_batch(params: Params, tokens_bt: jax.Array, targets_bt: jax.Array,
                score_mask_bt: jax.Array, num_steps: jax.Array, *, cfg: ModelConfig,
                constrain: Callable | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed log-probability of the scored targets [batch], whether each is the argmax
    [batch]) after ``num_steps`` core iterations from the zero state.

    Rows are right-padded, so the plain causal mask is enough: a real token never sees the
    padding after it (no segment ids, whose [batch, length, length] mask costs time)."""
    logits_btv, _ = forward(params, tokens_bt, cfg, num_steps=num_steps, init_scale=0.0,
                            constrain=constrain)
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    target_logp_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
    scored_bt = score_mask_bt.astype(bool)
    greedy_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
    return (jnp.where(scored_bt, target_logp_bt, 0.0).sum(-1),
            jnp.all(greedy_bt | ~scored_bt, axis=-1))


def bucket_length(n: int, cap: int) -> int:
    """The padded length of an n-token row: the next of 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, …
    (four steps per doubling), at most ``cap``. Few distinct lengths mean few compilations (four
    per doubling of the longest row), and a row is padded by less than a quarter of its length
    (two steps per doubling padded 27% more tokens than exact lengths on varied requests)."""
    length = SHORTEST_BUCKET
    while length < n:
        length += (1 << (length.bit_length() - 1)) // 4
    return max(min(length, cap), n)


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """One scored sequence: the model reads ``inputs`` and the last ``num_scored`` of the next
    tokens ``targets`` count."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]
    num_scored: int


def score_row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> ScoreRow:
    """Context + continuation as a row of at most ``max_length`` inputs, cut on the left (as
    lm-eval's own models do: the continuation is kept whole when it fits)."""
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    return ScoreRow(tuple(whole[:-1]), tuple(whole[1:]), min(len(continuation), len(whole) - 1))


def pack_rows(rows: Sequence[ScoreRow], batch: int, length: int) -> dict[str, np.ndarray]:
    """Right-padded [batch, length] arrays; padding (and filler rows past ``len(rows)``)
    scores nothing."""
    arrays = {name: np.zeros((batch, length), np.int32)
              for name in ("tokens", "targets", "score_mask")}
    for i, row in enumerate(rows):
        n = len(row.inputs)
        arrays["tokens"][i, :n] = row.inputs
        arrays["targets"][i, :n] = row.targets
        arrays["score_mask"][i, n - row.num_scored:n] = 1
    return arrays


def batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices of rows in batches of similar length, longest first (a memory problem shows at
    once, and each batch pads little)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]
