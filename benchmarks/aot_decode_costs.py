"""What each decoding pass costs on a TPU chip by XLA's cost model: lockstep against depth-continuous.

    JAX_PLATFORMS=cpu python benchmarks/aot_decode_costs.py [--topology v5p:2x2x1]
        [--preset huginn-3.5b] [--set KEY=VALUE ...] [--batch 16] [--prompt-len 1024]
        [--new-tokens 1024] [--budget 8] [--param-dtype bfloat16] [--exit kl]
        [--schedule results/bench-sample-schedule-demo-q1024-cpu.json]
        [--row-attention rows_kernel|slices] [--chips N] [--json FILE]

Needs libtpu, not a TPU (docs/training.md). Each pass of decoding is compiled on its own for
one chip of the topology, with the weights in the decoding loop's layout and a cache of
``--prompt-len`` + ``--new-tokens`` positions in the layout the programs store it in
(`row_cache.cache_layout`), and XLA's cost model for that chip says what it
reads and writes and how long it takes at the chip's peak rates (``optimal_seconds``: a
roofline, which leaves out per-op overheads):

- lockstep (`rdlm.generation.engine`; every row at the same position and step): a core step, the
  coda and the head (a token's, or a distribution criterion's check on every row's candidate
  state), a token's prelude;
- depth-continuous (`rdlm.generation.rows`; every row at its own position and step): the same
  three over every row, and the token-boundary passes over the few gathered rows
  (`continuous.few_rows`) that need them.

With ``--chips N`` the lockstep passes are also priced over N chips of the topology, the rows
split over them as ``generate(mesh=)`` splits them (``--batch`` on each, the kernels per shard):
one chip's share.

XLA cannot see inside a Pallas kernel: the row-entries decode kernel's bytes and FLOPs are
what it declares (`pallas_decode.row_entries_attention`); ``--row-attention slices`` prices
XLA's own attention instead.

The weight-read model of docs/performance.md counts a pass at its weights whatever its rows;
this prices the KV cache reads, the per-row gathers and masks too. With ``--schedule`` (a
`rdlm bench sample` JSON, whose variants report their passes) it prices each variant's passes
and prints the conversion ratio its variants at ``--batch`` rows would reach at these prices:
depth-continuous prelude passes, and coda passes beyond one check an iteration, at their
gathered price and at their whole-batch price (the two bounds). The other
bookkeeping of either loop (merging a token's entries, recording it) is not priced. The
schedule is the one that model ran; priced at another model's passes it is a what-if, truer
when the schedule waited at token boundaries as this shape would: the script prints the
``boundary_wait`` rdlm chooses here, for ``bench sample --variants exit-continuous@W``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout

from aot_decode_memory import choose_row_attention, model_from_args, model_arguments
from rdlm.config import MeshConfig
from rdlm.generation import cache as kvc
from rdlm.generation.continuous import default_boundary_wait, few_rows
from rdlm.generation.engine import block_context, run_coda, run_core_step, run_prelude, token_input
from rdlm.generation.exits import as_exit_config
from rdlm.generation.rows import coda_rows, core_step_rows, prelude_rows, row_context
from rdlm.model import abstract_params, backend, kernels, row_cache
from rdlm.runtime import sharding
from rdlm.runtime.hostinfo import compiling_host, toolchain
from rdlm.train.aot import topology_devices


def passes(cfg, batch: int, cache_len: int, num_slots: int, exit_spec: str
           ) -> dict[str, tuple[Callable, tuple]]:
    """Each pass as (function, abstract arguments): params, cache, then per-row arrays. Each
    returns what the programs keep of it (the logits of a coda pass: the token's, or a
    distribution criterion's check, whose own arithmetic is left out), so that XLA keeps it."""
    exit_cfg = as_exit_config(exit_spec)
    b, k, d = batch, few_rows(batch), cfg.d_model
    dtype = jnp.dtype(cfg.dtype)
    cache = kvc.cache_shapes(cfg, b, cache_len, num_slots, exit_cfg is not None)
    block = kvc.cache_shapes(cfg, b, 1, num_slots, exit_cfg is not None)
    rows_b1d = jax.ShapeDtypeStruct((b, 1, d), dtype)
    rows_k1d = jax.ShapeDtypeStruct((k, 1, d), dtype)
    ints = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)  # noqa: E731
    flags = jax.ShapeDtypeStruct((b,), jnp.bool_)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)

    def lock_core(params, cache, block, state, embedded, pad, pos, step, active):
        ctx = block_context(cfg, pad, pos, 1, cache_len, True)
        return run_core_step(params, cfg, num_slots, cache, block, state, embedded, ctx, step, 0,
                             active)

    def lock_coda(params, cache, state, pad, pos):
        ctx = block_context(cfg, pad, pos, 1, cache_len, True)
        return run_coda(params, cfg, cache, state, ctx, pos, True, write=False)[0]

    def lock_prelude(params, cache, tokens, pad, pos):
        ctx = block_context(cfg, pad, pos, 1, cache_len, True)
        return run_prelude(params, cfg, cache, token_input(params, cfg, tokens[:, None]), ctx,
                           pos, True, pad)

    def rows_core(params, cache, block, state, embedded, position, step, active):
        return core_step_rows(params, cfg, num_slots, cache, block, state, embedded,
                              row_context(cfg, position, cache_len), step, active)

    def rows_coda(params, cache, state, position, rows):
        return coda_rows(params, cfg, cache.coda, state, row_context(cfg, position, cache_len),
                         rows)

    def rows_prelude(params, cache, tokens, position, rows):
        return prelude_rows(params, cfg, cache.prelude, cache.shift_bases_btd, tokens, position,
                            rows)

    return {
        "lockstep core step": (lock_core, (cache, block, rows_b1d, rows_b1d, ints(b), scalar,
                                           scalar, flags)),
        "lockstep coda + head": (lock_coda, (cache, rows_b1d, ints(b), scalar)),
        "lockstep prelude": (lock_prelude, (cache, ints(b), ints(b), scalar)),
        "continuous core step": (rows_core, (cache, block, rows_b1d, rows_b1d, ints(b), ints(b),
                                             flags)),
        "continuous coda + head, every row": (lambda p, c, x, i: rows_coda(p, c, x, i, None),
                                              (cache, rows_b1d, ints(b))),
        f"continuous coda + head, {k} gathered rows": (rows_coda, (cache, rows_k1d, ints(k),
                                                                   ints(k))),
        "continuous prelude, every row": (lambda p, c, t, x: rows_prelude(p, c, t, x, None),
                                          (cache, ints(b), ints(b))),
        f"continuous prelude, {k} gathered rows": (rows_prelude, (cache, ints(k), ints(k),
                                                                  ints(k))),
    }


def price(name: str, fn: Callable, params, args: tuple, device,
          mesh: jax.sharding.Mesh | None = None) -> dict:
    """XLA's cost analysis of ``fn`` compiled for ``device``, or over ``mesh`` with the rows
    split over its "data" axis as lockstep generation splits them (the program naming the mesh,
    so that the kernels run per shard: `backend.shard_mesh`); then the price is one chip's."""
    def place_of(s) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(device)
        # The rows' axis: a cache buffer's fourth from last ([*slot, b, h, t, e]), else the first.
        axis = len(s.shape) - 4 if len(s.shape) >= 4 else 0
        spec = (None,) * axis + ("data",) if len(s.shape) else ()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    on = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place_of(s))  # noqa: E731
    # Both programs hold their cache in one layout in and out of each pass,
    # `row_cache.cache_layout` (aot_decode_memory's programs, compiled whole); compiled alone, a
    # pass would choose the layouts that suit it best, which its program does not give it, or
    # pay a copy between two. A one-position cache (the core step's block) has no layout to
    # choose; the other arrays of the cache (depths) are row-major, as a donated input's
    # layout must be where it is returned.
    def stored(s: jax.ShapeDtypeStruct) -> Format:
        if 1 in s.shape:
            return Format(None, place_of(s))
        if len(s.shape) < 4:
            return Format(Layout(tuple(range(len(s.shape)))), place_of(s))
        return Format(Layout(row_cache.cache_layout(s.shape)), place_of(s))

    def pinned(tree):  # the caches in ``tree`` in their stored layouts, the rest XLA's choice
        return jax.tree.map(lambda x: jax.tree.map(stored, x) if isinstance(x, kvc.KVCache)
                            else jax.tree.map(lambda s: Format(None, place_of(s)), x), tree,
                            is_leaf=lambda x: isinstance(x, kvc.KVCache))

    cache = jax.tree.map(lambda s, f: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=f),
                         args[0], pinned(args[0]))
    args = (cache, *jax.tree.map(on, args[1:]))
    whole = (lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=(  # noqa: E731
        jax.sharding.SingleDeviceSharding(device) if mesh is None
        else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))))
    with backend.names_mesh(mesh):
        outs = pinned(jax.eval_shape(fn, params, *args))
        # The cache is donated: a pass that writes it does so in place, as inside the programs.
        compiled = jax.jit(fn, donate_argnums=1, out_shardings=outs).lower(
            jax.tree.map(whole, params), *args).compile()
    cost = compiled.cost_analysis()
    row = {"pass": name, "optimal_us": cost["optimal_seconds"] * 1e6,
           "bytes_accessed": int(cost["bytes accessed"]), "flops": int(cost["flops"])}
    print(f"{name:<40} {row['optimal_us']:9.1f} µs  {row['bytes_accessed'] / 2**20:9.1f} MiB  "
          f"{row['flops'] / 1e9:8.2f} GFLOP")
    return row


def priced_conversions(schedule: dict, prices: dict[str, float], batch: int,
                       needs_logits: bool) -> list[dict]:
    """Each adaptive variant of a `bench sample` run at ``batch`` rows priced by ``prices`` (µs
    a pass, at that batch): its decoding time per token against the fixed-r run's, over the
    iterations it saved. ``needs_logits``: whether the run's exit criterion checks with the
    coda (then its coda passes are mostly checks)."""
    k = few_rows(batch)
    lock = {"core": prices["lockstep core step"], "coda": prices["lockstep coda + head"],
            "prelude": prices["lockstep prelude"]}
    cont = {"core": prices["continuous core step"],
            "check": prices["continuous coda + head, every row"],
            "coda_all": prices["continuous coda + head, every row"],
            "coda_few": prices[f"continuous coda + head, {k} gathered rows"],
            "prelude_all": prices["continuous prelude, every row"],
            "prelude_few": prices[f"continuous prelude, {k} gathered rows"]}
    first = [row for row in schedule["rows"] if row.get("round", 0) == 0]
    out = []
    for full in (row for row in first if row["variant"] == "full" and row["batch"] == batch):
        per_token_full = sum(full["passes"][s] * lock[s] for s in lock) / full["decoded_tokens"]
        for row in first:
            if row["batch"] != full["batch"] or row["variant"] == "full":
                continue
            p, r = row["passes"], row["num_steps"]
            saved = r / row["decode_mean_iterations"]
            if row["variant"].startswith("exit-continuous"):
                # Coda passes: the checks (at most one an iteration) at every row's price; the
                # rest (codas of rows that reached r or waited) and the preludes at the
                # gathered price (one bound) or every row's (the other).
                checks = min(p["coda"], p["core"]) if needs_logits else 0
                bounds = [p["core"] * cont["core"] + checks * cont["check"]
                          + (p["coda"] - checks) * cont[f"coda_{w}"]
                          + p["prelude"] * cont[f"prelude_{w}"] for w in ("few", "all")]
            else:
                bounds = [sum(p[s] * lock[s] for s in lock)] * 2
            conv = [per_token_full / (t / row["decoded_tokens"]) / saved for t in bounds]
            out.append({"batch": row["batch"], "variant": row["variant"],
                        "measured_decode_conversion": row.get("decode_conversion"),
                        "weight_read_schedule": row.get("schedule"),
                        "priced_conversion": conv[0] if conv[0] == conv[1] else conv})
            print(f"batch {row['batch']:>3} {row['variant']:<22} priced conversion "
                  + (f"{conv[0]:.2f}" if conv[0] == conv[1] else f"{conv[1]:.2f}–{conv[0]:.2f}")
                  + f"  (weight reads {row.get('schedule', float('nan')):.2f})")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--exit", default="kl", help="the exit criterion (the schedule's, with "
                        "--schedule): whether the cache keeps latest entries, and whether "
                        "each check runs the coda")
    parser.add_argument("--schedule", help="a `rdlm bench sample --json` file to price")
    parser.add_argument("--chips", type=int, default=1, help="also price the lockstep passes "
                        "over this many chips, --batch rows on each (one chip's price)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    backend.target_platform = lambda: "tpu"  # as a TPU host chooses (see aot_decode_memory)
    # Each pass's cache is pinned to its stored layout where it comes in and goes out (`price`);
    # the holds inside, which keep it there through the programs' loops, would only trip
    # JAX's check that a donated buffer comes back in the layout it came in.
    row_cache.hold_cache_layout = kvc.hold_cache_layout = lambda buf: buf
    # So is the row-major hold of a whole-batch pass inside the depth-continuous loop's
    # conditionals where the kernel does not run: priced alone, outside any conditional, it
    # would only convert the pinned cache.
    stage_prefix = row_cache.stage_prefix
    kvc.stage_prefix = lambda kv, in_branch=False: stage_prefix(kv)
    choose_row_attention(args)
    try:
        devices = topology_devices(args.topology)
        device = devices[0]
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = model_from_args(args)
    cfg = dataclasses.replace(cfg, max_seq_len=args.prompt_len + args.new_tokens)
    cache_len = args.prompt_len + args.new_tokens - 1
    params = jax.eval_shape(kernels.to_loop_layout, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(args.param_dtype)),
        abstract_params(cfg)))
    rows = [price(name, fn, params, inputs, device) for name, (fn, inputs) in
            passes(cfg, args.batch, cache_len, args.budget, args.exit).items()]
    if args.chips > 1:  # lockstep as `generate(mesh=)` runs it: the rows over "data"
        mesh = sharding.make_mesh(MeshConfig(data=-1), devices=devices[:args.chips])
        rows += [price(f"{name}, {args.batch} rows on each of {args.chips} chips", fn, params,
                       inputs, device, mesh)
                 for name, (fn, inputs) in passes(cfg, args.chips * args.batch, cache_len,
                                                  args.budget, args.exit).items()
                 if name.startswith("lockstep")]
    prices = {row["pass"]: row["optimal_us"] for row in rows}
    ratio = prices["continuous core step"] / prices["lockstep core step"]
    print(f"a continuous core step costs {ratio:.3f} of a lockstep one")
    # A schedule run on another model waited by that model's weights; this is the wait rdlm
    # would choose here (`bench sample --variants exit-continuous@W` runs a schedule with it).
    wait = default_boundary_wait(cfg, args.batch, as_exit_config(args.exit))
    print(f"rdlm's default boundary_wait at this shape and batch: {wait}")
    priced = None
    if args.schedule:
        with open(args.schedule) as f:
            priced = priced_conversions(json.load(f), prices, args.batch,
                                        as_exit_config(args.exit).needs_logits)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "device": device.device_kind,
                       "compiled_on": compiling_host(), "toolchain": toolchain(),
                       "command": " ".join(["python", "benchmarks/aot_decode_costs.py", *argv]),
                       "model": dataclasses.asdict(cfg), "batch": args.batch,
                       "cache_len": cache_len, "cache_budget": args.budget, "exit": args.exit,
                       "param_dtype": args.param_dtype, "chips": args.chips, "passes": rows,
                       "row_attention": row_cache.choose_row_attention("tpu", True),
                       "continuous_over_lockstep_core_step": ratio,
                       "default_boundary_wait": wait,
                       "schedule": args.schedule, "priced": priced}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
