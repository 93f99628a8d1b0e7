"""Attention over each row's own recurrence slot of a core layer, one decoding step of one
layer, timed on this machine in every way rdlm can compute it here.

    python benchmarks/row_attention.py [--rows 16] [--positions 2048] [--heads 55]
        [--head-dim 96] [--slots 8] [--dtype bfloat16] [--repeats 50] [--json FILE]

Depth-continuous decoding reads, at every core step, each row's own recurrence slot of a
layer's cache (`RowEntries`, with the latest entries where a position stopped earlier). The
ways (`rdlm.model.row_cache`): the platform's Pallas kernel, which reads them where they lie
(TPU, GPU); the entries gathered into one array first (GPU, CPU); row by row over slices
(TPU); and, for reference, lockstep's read of one slot for every row as rdlm computes it here.
Each is compiled alone and timed over ``--repeats`` calls; the report gives microseconds per
call, the entries read per second, and how far each per-row way's output is from the first's.
Defaults: Huginn-0125's heads at 16 rows of 2,048 positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.model import backend, kernels, row_cache
from rdlm.model.attention import RowEntries
from rdlm.runtime.hostinfo import results_report

WAYS = {"tpu": (row_cache.ROWS_KERNEL, row_cache.SLICES),
        "gpu": (row_cache.ROWS_KERNEL, row_cache.INDEXED),
        "cpu": (row_cache.INDEXED,)}


def inputs(args: argparse.Namespace) -> tuple:
    """Random queries, a layer's slots, latest entries and the block's own keys, as a core step
    of ``--rows`` rows, each at its own slot, sees them."""
    s, b, h, t, e = args.slots, args.rows, args.heads, args.positions, args.head_dim
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 8)
    normal = lambda key, shape: jax.random.normal(key, shape, dtype)  # noqa: E731
    # Each slot a different multiple of one draw: random numbers for every slot at once would
    # take several times the slots' memory on the way.
    scale_s = (1.0 + jnp.arange(s, dtype=dtype) / s).reshape(s, 1, 1, 1, 1)
    slots = tuple(normal(key, (b, h, t, e))[None] * scale_s for key in keys[:2])
    latest = (normal(keys[2], (b, h, t, e)), normal(keys[3], (b, h, t, e)))
    use_b1t1 = jax.random.bernoulli(keys[4], 0.8, (b, 1, t, 1))
    slot_b = jax.random.randint(keys[5], (b,), 0, s)
    q_b1he = normal(keys[6], (b, 1, h, e))
    own = (normal(keys[7], (b, 1, h, e)),) * 2
    seen_b = t - jnp.arange(b) % 7  # rows see slightly different lengths of their cache
    mask_b1ts = (jnp.arange(t + 1)[None, None, None] < seen_b[:, None, None, None]) \
        | (jnp.arange(t + 1) == t)[None, None, None]
    return q_b1he, own, slots, (slot_b, jnp.arange(b)), latest, use_b1t1, mask_b1ts


CHOOSE = row_cache.choose_row_attention
# Lockstep's read, for reference: every row at one slot, as rdlm reads it on this platform
# (`row_cache.slot_prefix`: the slot merged with the latest entries and XLA's attention, or on
# TPU the kernel).
LOCKSTEP = "lockstep"


def time_way(how: str, args: argparse.Namespace, arrays: tuple) -> tuple[float, np.ndarray]:
    """Seconds per call of the attention computed ``how``, and its output."""
    q_b1he, (k, v), slots, index, latest, use_b1t1, mask_b1ts = arrays
    row_cache.choose_row_attention = (CHOOSE if how == LOCKSTEP else
                                      lambda platform, per_shard: how)

    @jax.jit
    def step(q_b1he, k, v, slots, index, latest, use_b1t1, mask_b1ts):
        prefix = (row_cache.slot_prefix(slots, index[0][0], latest, use_b1t1) if how == LOCKSTEP
                  else RowEntries(slots, index, latest, use_b1t1))
        return kernels.attend_with_prefix(q_b1he, k, v, prefix, mask_b1ts)

    call = lambda: step(q_b1he, k, v, slots, index, latest, use_b1t1, mask_b1ts)  # noqa: E731
    out = jax.block_until_ready(call())  # compile
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / args.repeats, np.asarray(out, np.float32)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--positions", type=int, default=2_048)
    parser.add_argument("--heads", type=int, default=55)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument("--slots", type=int, default=8, help="recurrence slots a layer keeps")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    platform = backend.target_platform()
    arrays = inputs(args)
    # What the attention reads of the cache: each row's slot, and its latest entries.
    entries = 2 * 2 * args.rows * args.heads * args.positions * args.head_dim \
        * jnp.dtype(args.dtype).itemsize
    results, first = [], None
    for how in (*WAYS.get(platform, (row_cache.INDEXED,)), LOCKSTEP):
        seconds, out = time_way(how, args, arrays)
        first = out if first is None else first
        # Lockstep reads other entries (one slot for every row): its output is not comparable.
        difference = None if how == LOCKSTEP else float(np.abs(out - first).max())
        row = {"way": how, "microseconds": round(seconds * 1e6, 1),
               "entries_gb_per_s": round(entries / seconds / 1e9, 1),
               "max_abs_difference": difference}
        results.append(row)
        print(f"{how:<12} {row['microseconds']:>10.1f} µs  {row['entries_gb_per_s']:>8.1f} GB/s of "
              f"entries" + ("" if difference is None else f"  |Δ| {difference:.2e}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_report(
                " ".join(["python", "benchmarks/row_attention.py", *argv]),
                **{k: v for k, v in vars(args).items() if k != "json"},
                entries_bytes=int(entries), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
