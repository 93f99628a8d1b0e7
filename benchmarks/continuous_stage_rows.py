"""Depth-continuous batching with long prompts: what the size of a staged prefill costs.

    python benchmarks/continuous_stage_rows.py [--preset bench-28m] [--batch 16] [--queue 64]
        [--prompt-len N] [--new-tokens N] [--steps 8] [--stages 16,8,2] [--rounds 2]
        [--json FILE]

A queue of random prompts (between 0.8 and 1 times ``--prompt-len`` ids; by default half the
model's context, and a quarter of it in new tokens: 128 and 64 for bench-28m) goes through
``--batch`` depth-continuous rows under KL exit, once per ``stage_rows`` in ``--stages`` and
round, the stages alternating in order between rounds (a shared host's drift moves them
alike). Each call is timed whole, prefills included; the median of the rounds is printed with
the prefills and iterations the schedule ran (the same iterations whatever the stage: staging
changes when prompts are prefilled, not what the rows do). `plan.default_stage_rows` is
marked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

import rdlm
from rdlm.generation.plan import default_stage_rows
from rdlm.runtime.hostinfo import results_report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-28m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, help="default: half the context")
    parser.add_argument("--new-tokens", type=int, help="default: a quarter of the context")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stages", default="16,8,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    cfg = rdlm.model_preset(args.preset)
    args.prompt_len = args.prompt_len or cfg.max_seq_len // 2
    args.new_tokens = args.new_tokens or cfg.max_seq_len // 4
    params = rdlm.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    lengths = rng.integers(int(0.8 * args.prompt_len), args.prompt_len + 1, size=args.queue)
    prompts = [rng.integers(1, cfg.vocab_size, size=int(n)).tolist() for n in lengths]
    options = dict(max_new_tokens=args.new_tokens, num_steps=args.steps, exit="kl",
                   cache_budget=args.steps, continuous_batching=True, batch_size=args.batch,
                   prompt_len=args.prompt_len)
    stages = [int(s) for s in args.stages.split(",")]
    default = default_stage_rows(args.batch, args.prompt_len)
    for stage in stages:  # compile each program once
        rdlm.generate(params, cfg, prompts[:args.batch], stage_rows=stage, **options)

    seconds: dict[int, list[float]] = {stage: [] for stage in stages}
    stats: dict[int, dict] = {}
    for round_ in range(args.rounds):
        for stage in stages if round_ % 2 == 0 else stages[::-1]:
            start = time.perf_counter()
            out = rdlm.generate(params, cfg, prompts, stage_rows=stage, **options)
            seconds[stage].append(time.perf_counter() - start)
            stats[stage] = out.stats

    rows = []
    print(f"{'stage_rows':>10}{'median s':>10}{'prefills':>10}{'iterations':>12}")
    for stage in stages:
        row = {"stage_rows": stage, "default": stage == default, "seconds": seconds[stage],
               "median_s": float(np.median(seconds[stage])),
               "prefills": stats[stage]["prefills"], "iterations": stats[stage]["iterations"]}
        rows.append(row)
        print(f"{stage:>10}{row['median_s']:>10.2f}{row['prefills']:>10}{row['iterations']:>12}"
              + ("  (default)" if row["default"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_report(" ".join(["python", "benchmarks/continuous_stage_rows.py",
                                               *argv]), **vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
