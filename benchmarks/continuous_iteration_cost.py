"""What one loop iteration costs in lockstep and in depth-continuous adaptive-exit decoding.

    python benchmarks/continuous_iteration_cost.py [--preset bench-28m | --checkpoint RUN]
        [--batch 16] [--exit latent-diff] [--new-tokens 16] [--waits 0,18,1000000]

The same prompts (random ids, one per row, no queue) are generated at r = 32 with adaptive
exit, lockstep and depth-continuous at several ``boundary_wait``s; each call is timed (best of
three after a compilation) minus the prefill alone. Per iteration: lockstep runs as many
iterations as its slowest row needs per token, with one boundary pass per token; the
continuous program reports its iterations and boundary passes. A very long wait makes the
continuous rows finish together, so it runs the same iterations and passes as lockstep: the
difference per iteration is the continuous program's own bookkeeping. docs/performance.md
("Queues, waiting at the token boundary, and the ceiling") has the numbers.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import rdlm
from rdlm.generation import generate
from rdlm.runtime.checkpoint import load_params


def best_time(call, repeats: int = 3):
    """(best seconds of ``repeats`` calls after a compiling one, the last output)."""
    out = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-28m", help="a model preset, random init")
    parser.add_argument("--checkpoint", help="a trained run or checkpoint instead (runs/demo)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--exit", default="latent-diff")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--waits", default="0,18,1000000")
    args = parser.parse_args()
    if args.checkpoint:
        saved, params = load_params(args.checkpoint)
        cfg, args.preset = saved.model, args.checkpoint
    else:
        cfg = rdlm.model_preset(args.preset)
        params = rdlm.init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, 32)).tolist()
    r = 32

    def run(max_new_tokens: int, **options):
        return lambda: generate(params, cfg, prompts, num_steps=r, max_new_tokens=max_new_tokens,
                                cache_budget=r, exit=args.exit, **options)

    prefill_s, _ = best_time(run(1))
    seconds, out = best_time(run(args.new_tokens))
    iterations = int(out.steps[:, 1:].max(0).sum())  # each token step lasts its slowest row
    print(f"{jax.devices()[0].device_kind}, {args.preset}, {args.batch} rows, exit {args.exit}, "
          f"prefill {prefill_s * 1e3:.0f} ms")
    print(f"lockstep: {(seconds - prefill_s) / iterations * 1e3:.2f} ms per iteration "
          f"({iterations} iterations, {args.new_tokens - 1} boundary passes)")
    for wait in (int(w) for w in args.waits.split(",")):
        seconds, out = best_time(run(args.new_tokens, continuous_batching=True,
                                     batch_size=args.batch, boundary_wait=wait))
        stats = out.stats
        print(f"continuous, boundary_wait {wait}: "
              f"{(seconds - prefill_s) / stats['iterations'] * 1e3:.2f} ms per iteration "
              f"({stats['iterations']} iterations, {stats['boundary_passes']} boundary passes, "
              f"rows busy {stats['row_utilization']:.0%})")


if __name__ == "__main__":
    main()
