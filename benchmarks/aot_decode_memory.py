"""Decoding programs compiled ahead of time for one TPU chip: memory, and copies of the cache.

    JAX_PLATFORMS=cpu python benchmarks/aot_decode_memory.py [--topology v5p:2x2x1]
        [--preset huginn-3.5b] [--set n_heads=11 ...] [--batch 16] [--prompt-len 1024]
        [--new-tokens 1024] [--budget 8] [--stage-rows N] [--param-dtype bfloat16]
        [--chips N [--tensor T]] [--row-attention rows_kernel|slices] [--json FILE]

Needs libtpu (``pip install "jax[tpu]==0.10.2"``, docs/training.md), not a TPU. Compiles the
lockstep program and the depth-continuous one (KL exit, ``--batch`` rows, a queue of four
prompts a row) of a 1,024-wide model (or a preset's) in bfloat16 for the first chip of the
topology, and reports what XLA's compile says: argument and temporary bytes, and every copy
the program makes of a cache buffer (the whole of it, or a layout change), once per call or in
the decoding loop, the Pallas kernels in it (splash for the prefill, the row-entries kernel
for decoding), and how long the trace and compile took on this host. The
model's kernels are chosen for the TPU, as on a TPU host. With ``--chips N`` it also compiles
both over the topology's first N chips in groups of ``--tensor`` chips (default 1) that split
the weights (tensor-parallel), ``--batch`` rows in each group, and reports one chip's memory:
lockstep as ``generate(mesh=)`` runs it (the rows over the groups, the weights placed by the
training rules, the kernels per shard), depth-continuous with every group its own share of
the queue.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import yaml

from rdlm.config import MeshConfig, ModelConfig, model_preset
from rdlm.config_files import from_dict, to_dict
from rdlm.generation.api import generate_jit
from rdlm.generation.continuous import Queue, continuous_jit, continuous_on_groups_jit
from rdlm.generation.plan import continuous_plan, make_plan
from rdlm.model import abstract_params, backend, row_cache
from rdlm.runtime import sharding
from rdlm.runtime.checkpoint import PARAM_DTYPES
from rdlm.runtime.hostinfo import compiling_host, toolchain
from rdlm.train.aot import topology_devices

MODEL = ModelConfig(vocab_size=32_768, d_model=1_024, n_heads=8, mlp_dim=4_096, n_prelude=1,
                    n_core=2, n_coda=1, max_seq_len=4_096, mean_recurrence=8, backprop_depth=4,
                    dtype="bfloat16")


def cache_copies(hlo: str, cache_len: int, head_dim: int) -> list[str]:
    """The copies in compiled HLO text of a cache buffer (positions, then head features),
    whole or gathered, outside fused kernels: a copy the program makes of the cache, or a
    layout change of it; each with where it is, "entry" (once per call, around the prefill)
    or "loop" (in the decoding loop or its branches). (A copy inside a fusion is the way that
    kernel reads its operand.)"""
    found, fused, entry = [], False, False
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")):  # a computation's header
            fused = line.startswith("%fused_computation")
            entry = line.startswith("ENTRY")
            continue
        copy = re.search(r"= (\w+)\[([0-9,]+)\](\{[0-9,]+)[^ ]* copy\(", line)
        if copy and not fused:
            dims = copy.group(2).split(",")
            if dims[-2:] == [str(cache_len), str(head_dim)]:
                found.append(f"{'entry' if entry else 'loop'}: "
                             f"{copy.group(1)}[{copy.group(2)}]{copy.group(3)}}}")
    return found


def report(name: str, compiled: jax.stages.Compiled, cache_len: int, head_dim: int) -> dict:
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    copies = cache_copies(hlo, cache_len, head_dim)
    in_loop = sum(c.startswith("loop") for c in copies)
    pallas = hlo.count('custom_call_target="tpu_custom_call"')  # the prefill's splash kernels
    row = {"program": name, "argument_bytes": memory.argument_size_in_bytes,
           "temp_bytes": memory.temp_size_in_bytes, "cache_copies": len(copies),
           "cache_copies_in_loop": in_loop, "copied_shapes": sorted(set(copies)),
           "pallas_kernels": pallas}
    print(f"{name:<12} arguments {memory.argument_size_in_bytes / 2**30:6.2f} GiB  temporaries "
          f"{memory.temp_size_in_bytes / 2**30:6.2f} GiB  cache copies {len(copies)} "
          f"({in_loop} in the decoding loop)  Pallas kernels {pallas}"
          + (f"  {sorted(set(copies))}" if copies else ""))
    return row


def compiled_report(name: str, lower: Callable[[], jax.stages.Lowered], cache_len: int,
                    head_dim: int) -> dict:
    """`report` of the program ``lower()`` gives, with the seconds its trace, lowering and
    compile took on this host, or XLA's refusal when it does not fit."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as err:  # RESOURCE_EXHAUSTED: more than the HBM
        message = str(err).splitlines()[0]
        print(f"{name:<12} does not compile: {message}")
        return {"program": name, "error": message}
    seconds = time.perf_counter() - start
    print(f"{name:<12} compiled in {seconds:.1f} s")
    return {**report(name, compiled, cache_len, head_dim), "compile_seconds": round(seconds, 1)}


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what is compiled, and for which chip (shared with aot_decode_costs)."""
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--preset", help="a model preset (rdlm.MODEL_PRESETS) instead of the "
                        "1,024-wide model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field of the model config, e.g. n_heads=11 or "
                        "block=llama")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=1_024)
    parser.add_argument("--new-tokens", type=int, default=1_024)
    parser.add_argument("--budget", type=int, default=8, help="recurrence slots kept per layer")
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32",
                        help="the parameters' dtype (float32: as rdlm initialises and trains "
                        "them; bfloat16: as `rdlm sample --param-dtype bfloat16` loads them)")
    parser.add_argument("--row-attention", choices=(row_cache.ROWS_KERNEL, row_cache.SLICES),
                        help="how decoding attends over each row's own entries (default: as "
                        "rdlm chooses, row_cache.choose_row_attention)")


def choose_row_attention(args: argparse.Namespace) -> None:
    """``--row-attention``, where given, in place of rdlm's choice."""
    if args.row_attention:
        row_cache.choose_row_attention = lambda platform, per_shard: args.row_attention


def model_from_args(args: argparse.Namespace) -> ModelConfig:
    """The 1,024-wide model or ``--preset``'s, in bfloat16, with the ``--set`` changes."""
    model = model_preset(args.preset, dtype="bfloat16") if args.preset else MODEL
    changes = {key: yaml.safe_load(value) for key, value in
               (item.split("=", 1) for item in args.set)}
    return from_dict(ModelConfig, {**to_dict(model), **changes}, "model")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(parser)
    parser.add_argument("--stage-rows", type=int, help="prompts the continuous program "
                        "prefills together (default: rdlm's, default_stage_rows)")
    parser.add_argument("--chips", type=int, default=1, help="also compile both programs "
                        "over this many chips, --batch rows in each group of --tensor")
    parser.add_argument("--tensor", type=int, default=1, help="with --chips: chips that split "
                        "the weights of one group of rows (tensor parallelism)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    # The kernel choices follow the platform the program is compiled for; on this CPU host
    # JAX's default backend is the CPU, so say it as a TPU host would.
    backend.target_platform = lambda: "tpu"
    choose_row_attention(args)
    try:
        devices = topology_devices(args.topology)
        device = devices[0]
    except RuntimeError as err:  # no libtpu, or a topology it cannot describe
        print(f"error: {err}", file=sys.stderr)
        return 2
    place = jax.sharding.SingleDeviceSharding(device)

    def spec(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=place)

    cfg = dataclasses.replace(model_from_args(args),
                              max_seq_len=args.prompt_len + args.new_tokens)
    params = jax.tree.map(lambda s: spec(s.shape, jnp.dtype(args.param_dtype)),
                          abstract_params(cfg))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=place)
    b, length = args.batch, args.prompt_len
    rows = [[1] * length] * (4 * b)
    plan = make_plan(cfg, rows, max_new_tokens=args.new_tokens, num_steps=32, exit="kl",
                     cache_budget=args.budget, prompt_len=length)

    results = []
    lockstep = dataclasses.replace(plan, batch=b)
    results.append(compiled_report("lockstep", lambda: generate_jit.lower(
        params, spec((b, length), jnp.int32), spec((b,), jnp.int32), spec((), jnp.int32), key,
        plan=lockstep), plan.cache_len, cfg.head_dim))
    rows_plan = continuous_plan(plan, len(rows), b, args.stage_rows)
    queue = Queue(spec((rows_plan.queue, length), jnp.int32), spec((rows_plan.queue,), jnp.int32),
                  spec((), jnp.int32))
    results.append(compiled_report("continuous", lambda: continuous_jit.lower(
        params, queue, spec((), jnp.int32), spec((), jnp.float32), spec((), jnp.int32), key,
        plan=rows_plan), plan.cache_len, cfg.head_dim))
    if args.chips > 1:
        mesh = sharding.make_mesh(MeshConfig(data=-1, tensor=args.tensor),
                                  devices=devices[:args.chips])
        over = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.data_axes()))
        everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        n = sharding.data_parallel_size(mesh)

        def on(shape: tuple[int, ...], dtype: jnp.dtype, sharding: jax.sharding.Sharding
               ) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        queues = Queue(on((n, rows_plan.queue, length), jnp.int32, over),
                       on((n, rows_plan.queue), jnp.int32, over), on((n,), jnp.int32, over),
                       on((n,), jnp.int32, over))
        split = jax.tree.map(lambda s, place: on(s.shape, s.dtype, place), params,
                             sharding.param_shardings(cfg, mesh, sharding.GROUP_RULES))
        scalar = functools.partial(on, (), sharding=everywhere)
        where = f" on {args.chips} chips" + (f", groups of {args.tensor}"
                                             if args.tensor > 1 else "")
        rows_over = on((n * b, length), jnp.int32, jax.sharding.NamedSharding(
            mesh, sharding.batch_spec(mesh)))
        pad_over = on((n * b,), jnp.int32, over)
        placed = jax.tree.map(lambda s, place: on(s.shape, s.dtype, place), params,
                              sharding.param_shardings(cfg, mesh))
        results.append(compiled_report("lockstep" + where, lambda: generate_jit.lower(
            placed, rows_over, pad_over, scalar(jnp.int32), on((), key.dtype, everywhere),
            plan=dataclasses.replace(plan, batch=n * b, mesh=mesh)),
            plan.cache_len, cfg.head_dim))
        results.append(compiled_report("continuous" + where, lambda: (
            continuous_on_groups_jit.lower(
                split, queues, scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32),
                on((), key.dtype, everywhere), plan=rows_plan, mesh=mesh)),
            plan.cache_len, cfg.head_dim))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "device": device.device_kind,
                       "compiled_on": compiling_host(), "toolchain": toolchain(),
                       "command": " ".join(["python", "benchmarks/aot_decode_memory.py", *argv]),
                       "model": dataclasses.asdict(cfg), "batch": b, "prompt_len": length,
                       "new_tokens": args.new_tokens, "cache_budget": args.budget,
                       "cache_len": plan.cache_len, "stage_rows": rows_plan.stage_rows,
                       "param_dtype": args.param_dtype, "chips": args.chips,
                       "row_attention": args.row_attention or "as rdlm chooses",
                       "tensor": args.tensor,
                       "programs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
