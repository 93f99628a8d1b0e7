"""``python -m rdlm bench sample CONFIG``: decoding throughput for every variant, batch and r."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import MODEL_PRESETS, Config, ModelConfig
from rdlm.config_files import load_config
from rdlm.cli.args import int_list, speculative_arg
from rdlm.data.render import completion_text, prompt_tokens
from rdlm.data.tasks import example_at, make_task
from rdlm.data.tokenizer import load_tokenizer
from rdlm.generation import ExitConfig, GenerateOutput, SpeculativeConfig, generate
from rdlm.generation.exits import as_exit_config
from rdlm.generation.plan import pass_weights
from rdlm.model import abstract_params, backend, count_params, init_params, row_cache
from rdlm.runtime import checkpoint
from rdlm.runtime.hostinfo import results_report


def weight_bytes_per_token(cfg: ModelConfig, mean_steps: float) -> float:
    """Parameter bytes batch-1 decoding reads per token: one pass of the prelude and one of the
    coda with the head (`pass_weights`), and the core's weights once per recurrence step."""
    itemsize = jax.tree.leaves(abstract_params(cfg))[0].dtype.itemsize  # one stored dtype
    w = pass_weights(cfg)
    return itemsize * (w["prelude"] + w["coda"] + mean_steps * w["core"])


def conversion_ceiling(cfg: ModelConfig, exit_cfg: ExitConfig, r: int, mean_steps: float
                       ) -> float:
    """The conversion ratio of a schedule that wastes no row-iteration, counting weight reads
    (or FLOPs: the same ratio): a token at fixed r costs r core steps and one boundary pass
    (prelude, coda, head); under adaptive exit ``mean_steps`` core steps, each with the
    criterion's check (the coda and the head for a distribution criterion, every
    ``check_every`` steps), and the pass, whose coda is the exiting check's under a
    distribution criterion (the depth-continuous program keeps it). What adaptive exit can
    convert, whatever the scheduling or the hardware."""
    w = pass_weights(cfg)
    full = r * w["core"] + w["prelude"] + w["coda"]
    check = w["coda"] / exit_cfg.check_every if exit_cfg.needs_logits else 0.0
    adaptive = (mean_steps * (w["core"] + check) + w["prelude"]
                + (0.0 if exit_cfg.needs_logits else w["coda"]))
    return (full / adaptive) / (r / mean_steps)


def schedule_conversion(cfg: ModelConfig, passes: dict[str, int], decoded: int,
                        full_passes: dict[str, int], full_decoded: int, r: int,
                        mean_steps: float) -> float:
    """The conversion ratio the schedule as it ran would reach where decoding is bound by
    weight reads (small batches on an accelerator): the weights its passes read per decoded
    token (``stats["passes"]``, after the first tokens), against the fixed-r run's, over the
    iterations it saved (``r / mean_steps``). Between the measured conversion of a host whose
    costs are not weight reads (a CPU) and the `conversion_ceiling`: the share the schedule
    loses to idle rows (lockstep) or to extra boundary passes and waits (depth-continuous).
    KV-cache reads and per-pass overheads are left out."""
    w = pass_weights(cfg)
    cost = lambda p: sum(p[stage] * w[stage] for stage in w)
    return ((cost(full_passes) / full_decoded) / (cost(passes) / decoded)) / (r / mean_steps)


def memory_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (a jitted sum over a large float32 array), best of a few."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def _bench_config(spec: str, overrides: Sequence[str]) -> ModelConfig:
    if spec in MODEL_PRESETS and not Path(spec).is_file():
        return load_config(None, [f"model.preset={spec}", *overrides]).model
    return load_config(spec, overrides).model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rdlm bench sample")
    parser.add_argument("config", nargs="?",
                        help="YAML config or model preset name (e.g. bench-28m), random init; "
                             "not with --checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16")
    parser.add_argument("--steps", type=int_list, default=[4, 16, 32])
    parser.add_argument("--batches", type=int_list, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=4, help="slots of the shared-cache runs")
    parser.add_argument("--exit", default="kl", help="criterion of the adaptive-exit runs")
    parser.add_argument("--speculative", type=speculative_arg, default=SpeculativeConfig(),
                        help="K or K:DRAFT_STEPS of the speculative runs (default 4:4)")
    parser.add_argument("--variants", default="full,shared,exit",
                        help="comma list of: full (one slot per step), shared, exit, "
                             "exit-continuous (exit with depth-continuous batching; "
                             "exit-continuous@W with boundary_wait=W), speculative")
    parser.add_argument("--queue", type=int, default=None,
                        help="prompts per timed call, a multiple of each batch (default: one "
                             "batch): the lockstep variants run them batch after batch, "
                             "exit-continuous as one queue over that many rows, where a row "
                             "that finishes its sequence takes the next prompt")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every variant this many times, alternating (variants of one "
                             "batch and r back to back in each round), and report the median: "
                             "the conversion ratio compares runs of the same round, so that a "
                             "shared host's load moves both sides alike")
    parser.add_argument("--decode-rate", action="store_true",
                        help="also time the queue's prefills alone (as each schedule runs them: "
                             "lockstep batches, or depth-continuous refills), and report "
                             "tokens/s and the conversion ratio of the decoding after them")
    parser.add_argument("--checkpoint",
                        help="a trained checkpoint or run directory instead of a random init")
    parser.add_argument("--prompt-file",
                        help="prompts from a token file (.npy, e.g. a prepared data folder's "
                             "held-out split): consecutive windows of --prompt-len tokens, "
                             "instead of random ids")
    parser.add_argument("--task-prompts", action="store_true",
                        help="with --checkpoint of a task model (the demo's): prompts from its "
                             "task's held-out problems, rendered (question and answer) one "
                             "after another, in windows of --prompt-len tokens")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    return parser


def task_tokens(config: Config, count: int) -> np.ndarray:
    """Held-out problems of ``config``'s task, each rendered as question then answer, one after
    another, until there are ``count`` ids."""
    task = make_task(config.data.task, config.data.difficulty, config.data.task_args)
    tok = load_tokenizer(config.data.tokenizer)
    ids: list[int] = []
    index = 0
    while len(ids) < count:
        example = example_at(task, "test", index)
        ids += prompt_tokens(example, tok) + tok.encode(completion_text(example))
        index += 1
    return np.asarray(ids, np.int64)


def bench_prompts(cfg: ModelConfig, batch: int, length: int, prompt_file: str | None,
                  tokens: np.ndarray | None = None) -> list[list[int]]:
    """``batch`` prompts of ``length`` ids: random (seed 0), or consecutive windows of a token
    file (or of ``tokens``), where a trained model meets text like its training data (and its
    tokens exit at the depths that text asks for)."""
    if prompt_file is None and tokens is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, cfg.vocab_size, (batch, length)).tolist()
    if tokens is None:
        tokens = np.load(prompt_file, mmap_mode="r")
    if tokens.ndim != 1 or len(tokens) < batch * length:
        raise ValueError(f"--prompt-file {prompt_file}: need a 1-D token array of at least "
                         f"{batch * length} ids for {batch} prompts of {length}, got shape "
                         f"{tokens.shape}.")
    return np.asarray(tokens[:batch * length], np.int64).reshape(batch, length).tolist()


def variant_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """`generate` options of one variant; every one compiles once for all r. Raises KeyError
    for an unknown name."""
    max_r = max(args.steps)
    base, _, wait = name.partition("@")
    options = {
        "full": dict(cache_budget=max_r),  # one slot per step for every r
        "shared": dict(cache_budget=args.budget),
        "exit": dict(cache_budget=max_r, exit=args.exit),
        "exit-continuous": dict(cache_budget=max_r, exit=args.exit, continuous_batching=True),
        "speculative": dict(cache_budget=max_r, speculative=args.speculative),
    }[base if (base == "exit-continuous" or not wait) else name]
    if wait:
        if not wait.isdigit():
            raise KeyError(name)
        options = {**options, "boundary_wait": int(wait)}
    return options


HEADER = (f"{'variant':<20}{'batch':>6}{'r':>5}{'tokens/s':>11}{'mean it':>9}"
          f"{'cache MiB':>11}{'weight GB/s':>13}{'of bound':>10}{'compile s':>11}")


def run_queue(params: Any, cfg: ModelConfig, prompts: list[list[int]], batch: int, r: int,
              new_tokens: int, options: dict[str, Any]) -> GenerateOutput:
    """``prompts`` on ``batch`` rows: one depth-continuous call, or lockstep batch after batch
    (their outputs joined; rows busy counted over every batch). Both prefill the longest
    prompt's length (the continuous program's default rounds it up to a power of two, to share
    compilations between calls)."""
    if options.get("continuous_batching"):
        return generate(params, cfg, prompts, num_steps=r, max_new_tokens=new_tokens,
                        batch_size=batch, prompt_len=max(map(len, prompts)), **options)
    outs = [generate(params, cfg, prompts[i:i + batch], num_steps=r, max_new_tokens=new_tokens,
                     **options) for i in range(0, len(prompts), batch)]
    if len(outs) == 1:
        return outs[0]
    stats = {"core_steps": sum(o.stats["core_steps"] for o in outs)}
    if all("passes" in o.stats for o in outs):
        stats["passes"] = {stage: sum(o.stats["passes"][stage] for o in outs)
                           for stage in outs[0].stats["passes"]}
    if all("row_utilization" in o.stats for o in outs):
        # Busy row-iterations over row-iterations, each batch's token loop as long as its
        # slowest row.
        stats["row_utilization"] = (sum(float(o.steps[:, 1:].sum()) for o in outs) /
                                    max(sum(batch * o.steps[:, 1:].max(0).sum() for o in outs),
                                        1))
    for key in ("accepted_drafts", "rounds"):
        if key in outs[0].stats:
            stats[key] = sum(o.stats[key] for o in outs)
    if "rounds" in stats:
        stats["acceptance_rate"] = float(np.mean([o.stats["acceptance_rate"] for o in outs]))
    join = lambda name: np.concatenate([getattr(o, name) for o in outs])
    return GenerateOutput(tokens=join("tokens"), steps=join("steps"), lengths=join("lengths"),
                          exit_values=None if outs[0].exit_values is None else
                          join("exit_values"), logits=None, cache_bytes=outs[0].cache_bytes,
                          num_slots=outs[0].num_slots, stats=stats)


def schedule(options: dict[str, Any]) -> str:
    """How a variant runs a queue's prefills: "lockstep" (batch after batch) or "continuous"
    (``stage_rows`` prompts staged at a time, each copied into a row as one falls idle)."""
    return "continuous" if options.get("continuous_batching") else "lockstep"


def prefill_seconds(params: Any, cfg: ModelConfig, prompts: list[list[int]], batch: int,
                    r: int, options: dict[str, Any]) -> float:
    """Seconds of the variant's call on the whole queue that emits only the first token of
    each prompt (best of two after a compilation): its prefills, all at the full r, as its
    schedule runs them, which the decoding rate leaves out."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run_queue(params, cfg, prompts, batch, r, 1, options)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def timed_row(params: Any, cfg: ModelConfig, prompts: list[list[int]], batch: int, r: int,
              new_tokens: int, options: dict[str, Any], bandwidth: float,
              prefill_s: float | None = None) -> tuple[dict[str, Any], str]:
    """``prompts`` on ``batch`` rows, timed (`run_queue`): its JSON row and its printed line
    (without the compile time). With ``prefill_s`` (of every prompt), also the decoding rate:
    the tokens after the first over the time after the prefill, and their mean iterations."""
    start = time.perf_counter()
    out = run_queue(params, cfg, prompts, batch, r, new_tokens, options)
    seconds = time.perf_counter() - start
    tokens_per_s = len(prompts) * new_tokens / seconds
    row = {"batch": batch, "queue": len(prompts), "num_steps": r, "tokens_per_s": tokens_per_s,
           "seconds": seconds, "mean_iterations": out.mean_steps,
           "cache_bytes": out.cache_bytes}
    decoded = np.arange(new_tokens)[None] < out.lengths[:, None]
    decoded[:, 0] = False  # the first tokens come from the prefill
    n_decoded = int(decoded.sum())
    if n_decoded:
        row.update(decoded_tokens=n_decoded,
                   decode_mean_iterations=float(out.steps[decoded].mean()))
    if prefill_s is not None and n_decoded:
        # NaN where the call took no longer than its prefills timed alone: the host's load
        # moved between the two timings, and the difference measures nothing.
        row.update(prefill_seconds=prefill_s,
                   decode_tokens_per_s=(n_decoded / (seconds - prefill_s)
                                        if seconds > prefill_s else float("nan")))
    line = (f"{batch:>6}{r:>5}{tokens_per_s:>11.1f}{out.mean_steps:>9.2f}"
            f"{out.cache_bytes / 2**20:>11.2f}")
    if batch == 1:
        # Recurrence steps actually run per token (drafts and verification included).
        steps_run = out.stats["core_steps"]
        achieved = (weight_bytes_per_token(cfg, steps_run / (len(prompts) * new_tokens)) *
                    tokens_per_s)
        row.update(weight_bytes_per_s=achieved, bandwidth_bytes_per_s=bandwidth)
        line += f"{achieved / 1e9:>13.2f}{achieved / bandwidth:>10.0%}"
    else:
        line += f"{'':>13}{'':>10}"
    for stat in ("acceptance_rate", "row_utilization", "boundary_passes", "prefills", "passes"):
        if stat in out.stats:
            row[stat] = out.stats[stat]
    return row, line


def bench_variants(params: Any, cfg: ModelConfig, options: dict[str, dict[str, Any]],
                   args: argparse.Namespace, bandwidth: float, prompts_by_batch: dict[int, list],
                   prefill: dict[tuple[str, int, int], float]) -> list[dict[str, Any]]:
    """Every variant, batch size and r, ``args.rounds`` times, printed as they finish: each
    variant compiled first, then in each round the variants of one batch and r back to back."""
    device = jax.devices()[0]
    compile_s = {}
    for variant, opts in options.items():
        for batch in args.batches:
            start = time.perf_counter()
            run_queue(params, cfg, prompts_by_batch[batch], batch, min(args.steps),
                      args.new_tokens, opts)
            compile_s[variant, batch] = time.perf_counter() - start
    rows = []
    for round_ in range(args.rounds):
        for batch in args.batches:
            for r in args.steps:
                for variant, opts in options.items():
                    row, line = timed_row(params, cfg, prompts_by_batch[batch], batch, r,
                                          args.new_tokens, opts, bandwidth,
                                          prefill.get((schedule(opts), batch, r)))
                    row = {"variant": variant, "round": round_, **row,
                           "compile_s": compile_s[variant, batch], "device": device.device_kind}
                    line = f"{variant:<20}{line}{compile_s[variant, batch]:>11.1f}"
                    if "acceptance_rate" in row:
                        line += f"  (drafts accepted {row['acceptance_rate']:.0%})"
                    if "row_utilization" in row:
                        line += f"  (rows busy {row['row_utilization']:.0%})"
                    if "boundary_passes" in row:
                        line += (f"  (boundary passes {row['boundary_passes']}, "
                                 f"prefills {row['prefills']})")
                    print(line + (f"  [round {round_ + 1}]" if args.rounds > 1 else ""),
                          flush=True)
                    rows.append(row)
    return rows


def add_conversion(rows: list[dict[str, Any]], cfg: ModelConfig, exit_cfg: ExitConfig
                   ) -> list[str]:
    """Each adaptive-exit row's conversion ratio, (tokens/s ÷ full tokens/s at the same batch,
    r and round) ÷ (r ÷ mean iterations): the share of the iterations it saves that reaches
    throughput (1: all of it), and its `conversion_ceiling` (at the decoded tokens' mean
    iterations when timed), and the `schedule_conversion` of its passes over the weights. Sets
    ``row["conversion"]``, ``row["ceiling"]``, ``row["schedule"]`` and returns one printed line
    per row."""
    full = {(r["batch"], r["num_steps"], r.get("round", 0)): r for r in rows
            if r["variant"] == "full"}
    lines = []
    for row in rows:
        base = full.get((row["batch"], row["num_steps"], row.get("round", 0)))
        if not row["variant"].startswith("exit") or base is None:
            continue
        speedup = row["tokens_per_s"] / base["tokens_per_s"]
        saving = row["num_steps"] / row["mean_iterations"]
        row["conversion"] = speedup / saving
        line = (f"{row['variant']:<20}{row['batch']:>6}{row['num_steps']:>5}"
                f"{speedup:>10.2f}x{saving:>10.2f}x{row['conversion']:>12.2f}")
        if "decode_tokens_per_s" in row and "decode_tokens_per_s" in base:
            # The same after each variant's own prefills, which run at the full r in all.
            speedup = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            saving = row["num_steps"] / row["decode_mean_iterations"]
            row["decode_conversion"] = speedup / saving
            line += f"{speedup:>10.2f}x{saving:>10.2f}x{row['decode_conversion']:>12.2f}"
        mean_steps = row.get("decode_mean_iterations", row["mean_iterations"])
        row["ceiling"] = conversion_ceiling(cfg, exit_cfg, row["num_steps"], mean_steps)
        if all("passes" in r and "decoded_tokens" in r for r in (row, base)):
            row["schedule"] = schedule_conversion(cfg, row["passes"], row["decoded_tokens"],
                                                  base["passes"], base["decoded_tokens"],
                                                  row["num_steps"], mean_steps)
        lines.append(line + f"{row.get('schedule', float('nan')):>10.2f}{row['ceiling']:>9.2f}")
    return lines


def median_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, batch and r: the median over rounds of tokens/s and of the conversion
    ratios (each computed within its round)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["batch"], row["num_steps"]), []).append(row)
    summary = []
    for (variant, batch, r), group in groups.items():
        entry = {"variant": variant, "batch": batch, "num_steps": r, "rounds": len(group),
                 "mean_iterations": group[0]["mean_iterations"]}
        for key in ("tokens_per_s", "decode_tokens_per_s", "conversion", "decode_conversion",
                    "schedule", "ceiling", "row_utilization", "boundary_passes", "prefills"):
            values = [row[key] for row in group if key in row and not np.isnan(row[key])]
            if values:
                entry[key] = float(np.median(values))
        summary.append(entry)
    return summary


def bench_cli(argv: Sequence[str]) -> int:
    """``python -m rdlm bench sample (CONFIG [key=value …] | --checkpoint DIR) [--json PATH]``."""
    parser = _parser()
    args = parser.parse_intermixed_args(list(argv))  # flags before or after the overrides
    if (args.config is None) == (args.checkpoint is None):
        parser.error("give a config or preset (random init), or --checkpoint, not both")
    if args.checkpoint is not None:
        if args.overrides:
            parser.error("--checkpoint takes its model from the checkpoint: no overrides")
        config, params = checkpoint.load_params(args.checkpoint)
        cfg = config.model
    else:
        cfg = _bench_config(args.config, args.overrides)
        params = init_params(cfg, jax.random.key(0))
    variants = {}
    for v in (v.strip() for v in args.variants.split(",") if v.strip()):
        try:
            variants[v] = variant_options(args, v)
        except KeyError:
            parser.error(f"unknown variant {v!r}; choose from full, shared, exit, "
                         "exit-continuous[@WAIT], speculative")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    if args.task_prompts and (args.checkpoint is None or args.prompt_file):
        parser.error("--task-prompts takes the task of --checkpoint's config, without "
                     "--prompt-file")
    prompt_source = ("held-out problems of the checkpoint's task" if args.task_prompts
                     else args.prompt_file or "random ids")
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; model "
          f"{count_params(cfg):,} parameters, {cfg.dtype}; prompt "
          f"{args.prompt_len} tokens ({prompt_source}), {args.new_tokens} "
          "greedy new tokens, zero initial state")
    bandwidth = memory_bandwidth()
    print(f"measured streaming-read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(HEADER)
    for batch in args.batches:
        if args.queue is not None and (args.queue < batch or args.queue % batch):
            parser.error(f"--queue {args.queue} must be a multiple of every batch "
                         f"(batch {batch})")
    most = max(args.queue or b for b in args.batches) * args.prompt_len
    tokens = task_tokens(config, most) if args.task_prompts else None
    prompts_by_batch = {batch: bench_prompts(cfg, args.queue or batch, args.prompt_len,
                                             args.prompt_file, tokens)
                        for batch in args.batches}
    prefill = {}
    if args.decode_rate:
        # The queue's prefills, at the full r, once per schedule (lockstep batch after batch;
        # a depth-continuous call stages them, copying each into a row as one falls idle).
        for opts in variants.values():
            for batch in args.batches:
                for r in args.steps:
                    if (schedule(opts), batch, r) not in prefill:
                        prefill[schedule(opts), batch, r] = prefill_seconds(
                            params, cfg, prompts_by_batch[batch], batch, r, opts)
        print("prefill + first tokens of the queue, seconds: " + ", ".join(
            f"{kind} batch {b} r {r}: {s:.2f}" for (kind, b, r), s in prefill.items()),
            flush=True)
    results = bench_variants(params, cfg, variants, args, bandwidth, prompts_by_batch, prefill)
    conversion = add_conversion(results, cfg, as_exit_config(args.exit))
    if conversion:
        print("\nconversion of the iterations saved into throughput, (tokens/s ÷ full tokens/s) ÷ "
              "(r ÷ mean iterations); whole call" + (", then decoding only (after the prefill)"
                                                   if prefill else "") +
              "; counting weight reads, the schedule as it ran and the ceiling of one that wastes "
              "no row-iteration:")
        head = f"{'speed-up':>11}{'r/mean it':>11}{'conversion':>12}"
        print(f"{'variant':<20}{'batch':>6}{'r':>5}" + head * (2 if prefill else 1) +
              f"{'schedule':>10}{'ceiling':>9}")
        print("\n".join(conversion))
    summary = median_summary(results) if args.rounds > 1 else None
    if summary:
        print(f"\nmedian over {args.rounds} rounds:")
        print(f"{'variant':<20}{'batch':>6}{'r':>5}{'tokens/s':>11}{'decode tok/s':>14}"
              f"{'conversion':>12}{'decoding':>10}{'schedule':>10}{'ceiling':>9}")
        for e in summary:
            print(f"{e['variant']:<20}{e['batch']:>6}{e['num_steps']:>5}"
                  f"{e['tokens_per_s']:>11.1f}{e.get('decode_tokens_per_s', float('nan')):>14.1f}"
                  f"{e.get('conversion', float('nan')):>12.2f}"
                  f"{e.get('decode_conversion', float('nan')):>10.2f}"
                  f"{e.get('schedule', float('nan')):>10.2f}"
                  f"{e.get('ceiling', float('nan')):>9.2f}")
    if args.json:
        report = results_report("python -m rdlm bench sample " + " ".join(argv),
                                model=args.checkpoint or args.config,
                                parameters=count_params(cfg),
                                prompts=prompt_source,
                                # A shared host's load moves tokens/s by tens of percent.
                                load_average=os.getloadavg(),
                                bandwidth_bytes_per_s=bandwidth,
                                # How depth-continuous rows read their own cache entries here.
                                row_attention=row_cache.choose_row_attention(
                                    backend.target_platform(), backend.pallas_runs()),
                                rows=results,
                                **({"median": summary} if summary else {}))
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
