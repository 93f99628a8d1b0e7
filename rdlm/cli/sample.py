"""``python -m rdlm sample``: generate text or tokens from a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

from rdlm.cli.args import int_list, speculative_arg
from rdlm.generation import ExitConfig, generate
from rdlm.runtime import checkpoint


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rdlm sample",
        description="Generate from a checkpoint. Defaults come from the checkpoint's sample "
                    "section.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeat for a batch); needs a tokenizer")
    parser.add_argument("--tokens", action="append", type=int_list, default=[],
                        help="prompt as token ids, e.g. 1,2,3 (repeat for a batch)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, if any)")
    parser.add_argument("--num-steps", type=int, help="core iterations per token (the cap "
                        "under --exit)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--exit", help="adaptive exit: kl, minp-kl, entropy-diff, latent-diff, "
                        "cosine, argmax-stability, optionally :THRESHOLD")
    parser.add_argument("--min-steps", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=1)
    parser.add_argument("--cache-budget", type=int, help="recurrence slots per core layer")
    parser.add_argument("--continuous-cot", action="store_true", default=None)
    parser.add_argument("--speculative", type=speculative_arg, metavar="K[:DRAFT_STEPS]")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--stop", type=int_list, help="stop token ids (default: the "
                        "tokenizer's end-of-text/turn ids)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-scale", type=float, default=0.0,
                        help="0: zero initial state (deterministic); 1: random as in training")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    return parser


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def cli(argv: Sequence[str]) -> int:
    """``python -m rdlm sample --checkpoint DIR --prompt "…" …``; returns the exit status."""
    args = _sample_parser().parse_args(list(argv))
    if not args.prompt and not args.tokens:
        print("error: give --prompt TEXT (with a tokenizer) or --tokens 1,2,3", file=sys.stderr)
        return 2
    tokenizer = None
    tok_path = args.tokenizer
    if tok_path is None and (Path(args.checkpoint) / "tokenizer.json").is_file():
        tok_path = args.checkpoint
    if tok_path is not None:
        from rdlm.interop import load_tokenizer
        tokenizer = load_tokenizer(tok_path)
    if args.prompt and tokenizer is None:
        print("error: --prompt needs --tokenizer tokenizer.json (or a checkpoint directory that "
              "holds one); or give --tokens 1,2,3", file=sys.stderr)
        return 2
    config, params = checkpoint.load_params(args.checkpoint)
    defaults = config.sample
    rows = [tokenizer.prompt(text) for text in args.prompt] + list(args.tokens)
    exit_spec = _pick(args.exit, defaults.exit)
    exit_cfg = (None if exit_spec is None else
                ExitConfig.parse(exit_spec, min_steps=args.min_steps,
                                 check_every=args.check_every))
    stop = args.stop if args.stop is not None else (tokenizer.stop_ids if tokenizer else ())
    temperature = _pick(args.temperature, defaults.temperature)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # the config's default, shortened to what the context has room for
        room = config.model.max_seq_len - max((len(r) for r in rows), default=0)
        max_new_tokens = min(defaults.max_new_tokens, room) if room > 0 else defaults.max_new_tokens
        if max_new_tokens < defaults.max_new_tokens:
            print(f"note: generating {max_new_tokens} tokens (the context holds "
                  f"{config.model.max_seq_len}); pass --max-new-tokens to choose", file=sys.stderr)
    try:
        out = generate(
            params, config.model, rows,
            max_new_tokens=max_new_tokens,
            num_steps=_pick(args.num_steps, defaults.num_steps), exit=exit_cfg,
            cache_budget=_pick(args.cache_budget, defaults.cache_budget),
            continuous_cot=_pick(args.continuous_cot, defaults.continuous_cot),
            speculative=args.speculative, temperature=temperature,
            top_k=_pick(args.top_k, defaults.top_k), top_p=_pick(args.top_p, defaults.top_p),
            min_p=_pick(args.min_p, defaults.min_p), stop_tokens=stop,
            key=jax.random.key(args.seed), init_scale=args.init_scale)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, ids in enumerate(out.rows()):
        steps = out.steps[i, :len(ids)].tolist()
        text = tokenizer.decode(ids) if tokenizer is not None else None
        if args.json:
            record = {"row": i, "tokens": ids, "steps": steps}
            if text is not None:
                record["text"] = text
            if out.exit_values is not None:
                record["exit_values"] = [None if math.isnan(v) else float(v)
                                         for v in out.exit_values[i, :len(ids)]]
            print(json.dumps(record))
            continue
        print(f"[{i}] {text if text is not None else ' '.join(map(str, ids))}")
        mean = sum(steps) / max(len(steps), 1)
        print(f"    iterations per token: {steps} (mean {mean:.2f})")
    print(f"cache: {out.cache_bytes / 2**20:.2f} MiB in {out.num_slots} recurrence slots"
          + (f"; speculative acceptance {out.stats['acceptance_rate']:.2f}"
             if "acceptance_rate" in out.stats else ""), file=sys.stderr)
    return 0

