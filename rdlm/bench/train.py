"""``python -m rdlm bench train CONFIG``: the real train step timed at fixed depths."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rdlm.config import Config, ConfigError
from rdlm.config_files import load_config
from rdlm.model import flops as flops_lib
from rdlm.runtime import sharding as shard_lib
from rdlm.runtime.distributed import maybe_initialize_distributed
from rdlm.runtime.hostinfo import device_peak_flops, host_info
from rdlm.train.optim import make_optimizer
from rdlm.train.state import init_state, state_shardings
from rdlm.train.step import Batch, check_layout, global_batch, make_train_step


def synthetic_batch(cfg: Config, mesh: Mesh, seed: int = 0) -> Batch:
    """Random tokens in the global batch's shape and sharding (speed does not depend on data)."""
    rng = np.random.default_rng(seed + jax.process_index())
    rows = cfg.train.batch_size // jax.process_count()
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, cfg.train.seq_len + 1), np.int32)
    return global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, cfg, mesh)


def _peak_memory_bytes(compiled: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = float(stats["peak_bytes_in_use"])
    mem = compiled.memory_analysis()
    if mem is not None:
        out["compiled_temp_bytes"] = float(mem.temp_size_in_bytes)
        out["compiled_argument_bytes"] = float(mem.argument_size_in_bytes)
    out["host_max_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def measured_matmul_flops(cfg: Config, repeats: int = 10) -> float:
    """FLOP/s of one [tokens, d] × [d, mlp] matmul in the model dtype on the first device: the
    practical peak right now (on a shared CPU, load changes it several-fold)."""
    tokens = cfg.train.batch_size * cfg.train.seq_len
    dtype = jnp.dtype(cfg.model.dtype)
    a = jnp.ones((tokens, cfg.model.d_model), dtype)
    b = jnp.ones((cfg.model.d_model, cfg.model.mlp_dim), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))
    t = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, b)
    jax.block_until_ready(out)
    return 2 * tokens * cfg.model.d_model * cfg.model.mlp_dim * repeats / (time.perf_counter() - t)


def bench_train(cfg: Config, recurrences: tuple[int, ...] = (4, 32, 64), steps: int = 5,
                warmup: int = 2) -> dict[str, Any]:
    """Time the real train step (shardings, donation, optimizer) at fixed depths.

    Depth r means max(r − k, 0) steps without and min(k, r) steps with gradient (k = backprop
    depth); the depth is an input of the compiled step, so one compilation serves every r — the
    result records the compile count to prove it. The config's own mean depth comes first.
    """
    maybe_initialize_distributed(cfg.mesh)
    mesh = shard_lib.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, tx, mesh)
    state = init_state(cfg, tx, shardings)
    batch = synthetic_batch(cfg, mesh)
    step_jit = make_train_step(cfg, mesh, fixed_depth=True, batch_keys=tuple(batch))
    rep = shard_lib.replicated(mesh)
    depth_of = lambda r: jax.device_put(
        np.array([max(r - cfg.model.backprop_depth, 0), min(cfg.model.backprop_depth, r)],
                 np.int32), rep)
    t0 = time.perf_counter()
    compiled = step_jit.lower(state, batch, depth_of(1)).compile()
    compile_s = time.perf_counter() - t0
    device = jax.devices()[0]
    peak = device_peak_flops(device, cfg.model.dtype, cfg.train.peak_flops)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    k = cfg.model.backprop_depth
    results = []
    for r in (cfg.model.mean_recurrence, *recurrences):
        depth = depth_of(r)
        for _ in range(warmup):
            state, metrics = compiled(state, batch, depth)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, depth)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        flops = flops_lib.train_flops_per_token(cfg.model, cfg.train.seq_len, max(r - k, 0),
                                                min(k, r)) * tokens
        row = {"r": r, "n_no_grad": max(r - k, 0), "n_grad": min(k, r), "step_s": step_s,
               "tokens_per_s": tokens / step_s, "tflops_per_s": flops / step_s / 1e12,
               "loss": float(metrics["loss"])}
        if peak:
            row["mfu"] = flops / step_s / (peak * jax.device_count())
        row["matmul_flops_per_s"] = measured_matmul_flops(cfg)  # measured right after this r
        row["of_matmul_peak"] = flops / step_s / (row["matmul_flops_per_s"] * jax.device_count())
        results.append(row)
    return {"device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
            **host_info(), "jax": jax.__version__,
            "dtype": cfg.model.dtype, "batch": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
            "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "peak_flops_per_device": peak, "compile_s": compile_s,
            # One `Compiled` executable ran every r: it cannot recompile, so this is exact.
            "compilations": 1, "memory": _peak_memory_bytes(compiled),
            "results": results}


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}  dtype {report['dtype']}  params {report['params']:,}  "
             f"batch {report['batch']} x {report['seq_len']}",
             f"compile: {report['compile_s']:.1f}s, {report['compilations']} compilation(s) for "
             f"all r",
             "memory: " + ", ".join(f"{k} {v / 2**20:,.0f} MiB"
                                    for k, v in report["memory"].items()),
             f"{'r':>4} {'no-grad':>7} {'grad':>4} {'step s':>9} {'tokens/s':>10} "
             f"{'TFLOP/s':>8} {'MFU':>6} {'matmul TFLOP/s':>14} {'of matmul':>9}"]
    for row in report["results"]:
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
        lines.append(f"{row['r']:>4} {row['n_no_grad']:>7} {row['n_grad']:>4} "
                     f"{row['step_s']:>9.4f} {row['tokens_per_s']:>10,.0f} "
                     f"{row['tflops_per_s']:>8.3f} {mfu:>6} "
                     f"{row['matmul_flops_per_s'] / 1e12:>14.3f} {row['of_matmul_peak']:>9.1%}")
    lines.append("MFU: model FLOPs / step time / table peak; 'of matmul': the same against one "
                 "[tokens, d] x [d, mlp] matmul measured after each r (the peak the machine "
                 "gives right now).")
    return "\n".join(lines)


def bench_cli(argv: list[str]) -> int:
    """``python -m rdlm bench train CONFIG [key=value ...] [--steps N] [--recurrence 4,32,64]
    [--out FILE.json]``."""
    parser = argparse.ArgumentParser(prog="rdlm bench train")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per r (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recurrence", default="4,32,64", help="comma-separated depths r")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = bench_train(cfg, tuple(int(r) for r in args.recurrence.split(",") if r),
                         steps=args.steps, warmup=args.warmup)
    report["config"] = args.config
    report["overrides"] = args.overrides
    print(format_bench(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
