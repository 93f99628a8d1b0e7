"""``python -m rdlm sample``: generate text or tokens from a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

from rdlm.cli.args import cli_mesh, int_list, mesh_arg, speculative_arg
from rdlm.config import Config, check_num_steps
from rdlm.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer
from rdlm.errors import ConfigError
from rdlm.generation import ExitConfig, GenerateOutput, generate
from rdlm.runtime import checkpoint
from rdlm.runtime.checkpoint import PARAM_DTYPES


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdlm sample",
        description="Generate from a checkpoint. Defaults come from the checkpoint's sample "
                    "section.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeat for a batch; '-' reads stdin, one prompt per "
                        "line); encoded with the run's tokenizer")
    parser.add_argument("--prompt-file", help="a file with one prompt per line ('-': stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user turn of the tokenizer's chat format")
    parser.add_argument("--system", help="system prompt for --chat")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not put the beginning-of-text token in front of prompt text "
                        "(by default it is there when the tokenizer has one, as in `prepare`)")
    parser.add_argument("--no-echo", action="store_true",
                        help="print the completion only, not prompt + completion")
    parser.add_argument("--tokens", action="append", type=int_list, default=[],
                        help="prompt as token ids, e.g. 1,2,3 (repeat for a batch)")
    parser.add_argument("--tokenizer", help="'chars', 'ascii' or a tokenizer.json (default: the "
                        "tokenizer.json kept in the run, else the run's data.tokenizer)")
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
    parser.add_argument("--continuous-batching", action="store_true",
                        help="each row at its own (token, iteration); a row that finishes takes "
                        "the next prompt (docs/sampling.md)")
    parser.add_argument("--batch-size", type=int,
                        help="rows decoded at once under --continuous-batching (default: all)")
    parser.add_argument("--boundary-wait", type=int, metavar="ROW_ITERATIONS",
                        help="under --continuous-batching, how long rows at a token boundary "
                        "wait to share one pass (default: about that pass's cost; 0: none)")
    parser.add_argument("--stage-rows", type=int, metavar="ROWS",
                        help="under --continuous-batching, prompts prefilled together ahead of "
                        "the rows that take them (default: a batch of short prompts, fewer "
                        "long ones); fewer make a smaller staging cache")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--stop", type=int_list, help="stop token ids (default: the "
                        "tokenizer's end-of-text/turn ids)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-scale", type=float, default=0.0,
                        help="0: zero initial state (deterministic); 1: random as in training")
    parser.add_argument("--mesh", type=mesh_arg, metavar="data=D,tensor=T",
                        help="decode over every device: the batch split over data (and fsdp), "
                        "the weights over tensor; -1 takes the devices the others leave, e.g. "
                        "tensor=4 or data=2,tensor=4 (default: one device)")
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32",
                        help="load the parameters as this dtype (bfloat16: half the memory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    return parser


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def load_sample_tokenizer(args: argparse.Namespace, config: Config) -> Tokenizer | None:
    """``--tokenizer``, else the run's own (`run_tokenizer`); None when only ``--tokens`` are
    given and the run's tokenizer is not on this machine (ids are printed then)."""
    try:
        tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer is not None
                     else run_tokenizer(args.checkpoint, config.data.tokenizer))
    except (FileNotFoundError, ConfigError) as err:
        if args.tokenizer is not None or args.prompt or args.prompt_file:
            raise ConfigError(f"{err} Pass --tokenizer PATH (the tokenizer.json the model was "
                              "trained with), or give --tokens 1,2,3.") from None
        print(f"note: {err} Printing token ids; pass --tokenizer PATH for text.", file=sys.stderr)
        return None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens "
                          f"but the model's vocabulary holds {config.model.vocab_size}: pass the "
                          "tokenizer the model was trained with (--tokenizer PATH).")
    return tokenizer


def prompt_texts(args: argparse.Namespace) -> list[str]:
    """The text prompts: each ``--prompt`` ('-' = the lines of stdin), then the lines of
    ``--prompt-file``. An empty prompt is refused: it would sample from nothing."""
    texts: list[str] = []
    for text in args.prompt:
        texts += sys.stdin.read().splitlines() if text == "-" else [text]
    if args.prompt_file:
        source = (sys.stdin.read() if args.prompt_file == "-"
                  else Path(args.prompt_file).read_text(encoding="utf-8"))
        lines = [line for line in source.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--prompt-file {args.prompt_file!r} holds no prompts (one per "
                              "line).")
        texts += lines
    for i, text in enumerate(texts):
        if not text.strip():
            raise ConfigError(f"prompt {i} is empty: give it some text, or --tokens ID for a "
                              "sample that starts from a single token.")
    return texts


def prompt_rows(args: argparse.Namespace, tokenizer: Tokenizer | None,
                texts: Sequence[str]) -> list[list[int]]:
    """Text prompts as ids (after the beginning-of-text token when the tokenizer has one, unless
    ``--no-bos``; as a user turn under ``--chat``), then the ``--tokens`` rows as given."""
    if texts and tokenizer is None:
        raise ConfigError("text prompts need a tokenizer: pass --tokenizer PATH.")
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        rows = [tokenizer.chat_prompt([*system, {"role": "user", "content": t}]) for t in texts]
    else:
        rows = [tokenizer.prompt(t, bos=False if args.no_bos else None) for t in texts]
    return rows + list(args.tokens)


def _max_new_tokens(args: argparse.Namespace, config: Config, rows: list[list[int]]) -> int:
    """``--max-new-tokens``, else the config's default shortened to what the context has room for."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    default = config.sample.max_new_tokens
    room = config.model.max_seq_len - max((len(r) for r in rows), default=0)
    chosen = min(default, room) if room > 0 else default
    if chosen < default:
        print(f"note: generating {chosen} tokens (the context holds {config.model.max_seq_len}); "
              "pass --max-new-tokens to choose", file=sys.stderr)
    return chosen


def _generate(args: argparse.Namespace, config: Config, params: Any, rows: list[list[int]],
              stop: Sequence[int], mesh: jax.sharding.Mesh | None = None) -> GenerateOutput:
    defaults = config.sample
    exit_spec = _pick(args.exit, defaults.exit)
    exit_cfg = (None if exit_spec is None else
                ExitConfig.parse(exit_spec, min_steps=args.min_steps,
                                 check_every=args.check_every))
    return generate(
        params, config.model, rows,
        max_new_tokens=_max_new_tokens(args, config, rows),
        num_steps=_pick(args.num_steps, defaults.num_steps), exit=exit_cfg,
        cache_budget=_pick(args.cache_budget, defaults.cache_budget),
        continuous_cot=_pick(args.continuous_cot, defaults.continuous_cot),
        speculative=args.speculative, temperature=_pick(args.temperature, defaults.temperature),
        top_k=_pick(args.top_k, defaults.top_k), top_p=_pick(args.top_p, defaults.top_p),
        min_p=_pick(args.min_p, defaults.min_p), stop_tokens=stop,
        key=jax.random.key(args.seed), init_scale=args.init_scale,
        continuous_batching=args.continuous_batching, batch_size=args.batch_size,
        boundary_wait=args.boundary_wait, stage_rows=args.stage_rows,
        mesh=mesh)


def print_rows(out: GenerateOutput, tokenizer: Tokenizer | None, prompts: Sequence[str],
               as_json: bool) -> None:
    """One block (or JSON object) per row: prompt + completion as text (or the ids when there is
    no tokenizer), then the iterations each token took. ``prompts``: what to echo before each
    completion ('' for none)."""
    for i, ids in enumerate(out.rows()):
        steps = out.steps[i, :len(ids)].tolist()
        text = (tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None
                else None)
        if as_json:
            record = {"row": i, "prompt": prompts[i], "tokens": ids, "steps": steps}
            if text is not None:
                record["text"] = text
            if out.exit_values is not None:
                record["exit_values"] = [None if math.isnan(v) else float(v)
                                         for v in out.exit_values[i, :len(ids)]]
            print(json.dumps(record))
            continue
        print(f"[{i}] {prompts[i]}{text if text is not None else ' '.join(map(str, ids))}")
        mean = sum(steps) / max(len(steps), 1)
        print(f"    iterations per token: {steps} (mean {mean:.2f})")
    stats = out.stats
    print(f"cache: {out.cache_bytes / 2**20:.2f} MiB in {out.num_slots} recurrence slots"
          + (f"; speculative acceptance {stats['acceptance_rate']:.2f}"
             if "acceptance_rate" in stats else "")
          + (f"; rows busy {stats['row_utilization']:.0%} over {stats['iterations']} "
             f"iterations (boundary passes {stats['boundary_passes']}, prefills "
             f"{stats['prefills']})" if "prefills" in stats else ""), file=sys.stderr)


def echoed_prompts(args: argparse.Namespace, tokenizer: Tokenizer | None, texts: Sequence[str]
                   ) -> list[str]:
    """What `print_rows` puts before each completion: the prompt text (the ``--tokens`` rows
    decoded), or nothing under ``--no-echo`` or without a tokenizer."""
    if args.no_echo or tokenizer is None:
        return [""] * (len(texts) + len(args.tokens))
    return list(texts) + [tokenizer.decode(ids, skip_special_tokens=True) for ids in args.tokens]


def cli(argv: Sequence[str]) -> int:
    """``rdlm sample --checkpoint DIR --prompt "…" …``; returns the exit status. Errors are
    raised as `ConfigError`/`CheckpointError` and reported as one line by `rdlm.cli.main`."""
    args = _sample_parser().parse_args(list(argv))
    if not (args.prompt or args.prompt_file or args.tokens):
        raise ConfigError("give --prompt TEXT, --prompt-file FILE (or -) or --tokens 1,2,3.")
    if args.num_steps is not None:
        check_num_steps(args.num_steps, "--num-steps")
    mesh = cli_mesh(args.mesh)  # before the loading
    config = checkpoint.load_config(args.checkpoint)
    tokenizer = load_sample_tokenizer(args, config)
    texts = prompt_texts(args)
    rows = prompt_rows(args, tokenizer, texts)
    stop = args.stop if args.stop is not None else (tokenizer.stop_ids if tokenizer else ())
    config, params = checkpoint.load_params(args.checkpoint, report=checkpoint.say_on_stderr,
                                            dtype=args.param_dtype)
    out = _generate(args, config, params, rows, stop, mesh)
    if jax.process_index() == 0:  # every host of a multi-host mesh has every row
        print_rows(out, tokenizer, echoed_prompts(args, tokenizer, texts), args.json)
    return 0
