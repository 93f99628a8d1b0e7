"""Log-likelihood throughput of ``--model rdlm`` against a direct batched forward.

    python benchmarks/lm_eval_loglikelihood.py [--preset bench-28m] [--num-steps 8]
        [--requests 48] [--batch-size 8] [--out results/bench-lm-eval-28m-cpu.json]

Both sides score the same requests (random printable-ASCII contexts of 8–200 characters, each
with a 1–12 character continuation) with a random-init model of the preset, at ``num_steps``:

- ``rdlm``: `rdlm.lm_eval.RDLM.loglikelihood` on lm-eval `Instance` objects, end to end
  (tokenizing, sorting, length buckets, packing, the jitted scoring program);
- ``direct``: the same token rows, sorted by length in batches of the same size, each batch
  right-padded to exactly its longest row, through a jitted `rdlm.forward` + log-softmax gather;
  tokens already encoded, nothing else timed.

Each is warmed up (compiled) once, then both are timed in ``--repeats`` alternating rounds; the
best time of each counts.
Throughput is scored-sequence tokens (context + continuation, no padding) per second. The
issue's target: rdlm at least 0.8 times the direct forward.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rdlm  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from rdlm.config import Config, DataConfig, model_preset  # noqa: E402
from rdlm.lm_eval import RDLM  # noqa: E402
from rdlm.runtime.checkpoint import load_params, save_params  # noqa: E402
from rdlm.runtime.hostinfo import results_report  # noqa: E402

ALPHABET = "".join(chr(c) for c in range(32, 127))


def make_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs of printable ASCII, lengths spread over 8–200 characters."""
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(ALPHABET) for _ in range(k))
    # A context ends in a non-space: lm-eval moves a context's trailing spaces into the
    # continuation, which the direct side would have to mimic.
    return [(text(rng.randint(7, 199)) + "x", " " + text(rng.randint(0, 11))) for _ in range(n)]


@functools.partial(jax.jit, static_argnames="cfg")
def direct_scores(params, tokens_bt, targets_bt, mask_bt, num_steps, *, cfg):
    """What a user would write by hand: forward, log-softmax, the targets' sum per row."""
    logits, _ = rdlm.forward(params, tokens_bt, cfg, num_steps=num_steps, init_scale=0.0)
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, targets_bt[..., None], -1)[..., 0]
    return (picked * mask_bt).sum(-1)


def direct_batches(model: RDLM, pairs: list[tuple[str, str]], batch_size: int
                   ) -> tuple[list[tuple[np.ndarray, ...]], list[int], int]:
    """(batches, request index of each row in batch order, scored tokens): the rows RDLM scores
    (same tokens), sorted by length, each batch padded to exactly its longest row."""
    rows = []
    for context, continuation in pairs:
        whole = model.tok_encode(context + continuation)
        ctx = model.tok_encode(context)
        rows.append((whole[:-1], whole[1:], len(whole) - len(ctx)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        length = len(chunk[0][0])
        tokens = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for i, (inp, tgt, n) in enumerate(chunk):
            tokens[i, :len(inp)], targets[i, :len(tgt)] = inp, tgt
            mask[i, len(inp) - n:len(inp)] = 1
        batches.append((tokens, targets, mask))
    return batches, order, sum(len(r[0]) for r in rows)


def best_times(fns: list, repeats: int) -> list[float]:
    """Each function's best wall time over ``repeats`` alternating rounds (after one untimed
    call that compiles), so that a change in the machine's load hits both sides alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-28m")
    parser.add_argument("--num-steps", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cfg = Config(model=model_preset(args.preset), data=DataConfig(tokenizer="ascii"))
    with tempfile.TemporaryDirectory() as tmp:
        save_params(Path(tmp) / "ckpt", cfg, rdlm.init_params(cfg.model, jax.random.key(0)))
        params = load_params(Path(tmp) / "ckpt")[1]
        model = RDLM(checkpoint=str(Path(tmp) / "ckpt"), num_steps=args.num_steps,
                     batch_size=args.batch_size)
    pairs = make_requests(args.requests)
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    batches, order, tokens = direct_batches(model, pairs, model.batch_size)
    direct = lambda: [direct_scores(params, t, g, m, np.int32(args.num_steps), cfg=cfg.model)
                      for t, g, m in batches]

    ours = [s for s, _ in model.loglikelihood(instances)]
    theirs = np.concatenate(jax.device_get(direct()))
    max_diff = max(abs(ours[i] - float(theirs[pos])) for pos, i in enumerate(order))

    t_rdlm, t_direct = best_times([lambda: model.loglikelihood(instances),
                                   lambda: jax.block_until_ready(direct())], args.repeats)
    result = results_report(
        " ".join(["python", *sys.argv]), preset=args.preset, num_steps=args.num_steps,
        requests=args.requests, batch_size=model.batch_size, scored_tokens=tokens,
        rdlm_seconds=round(t_rdlm, 4), direct_seconds=round(t_direct, 4),
        rdlm_tokens_per_s=round(tokens / t_rdlm, 1), direct_tokens_per_s=round(tokens / t_direct, 1),
        ratio=round(t_direct / t_rdlm, 3), max_abs_logprob_diff=max_diff)
    print(json.dumps(result, indent=2))
    print(f"rdlm {tokens / t_rdlm:,.0f} tokens/s, direct forward {tokens / t_direct:,.0f} "
          f"tokens/s: {t_direct / t_rdlm:.2f}x (target >= 0.8x); results agree to {max_diff:.2e}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
