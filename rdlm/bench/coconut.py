"""``python -m rdlm bench coconut CONFIG``: continuous-thought answers per second.

An answer is what `rdlm.coconut.generation.evaluate_method` decodes for one held-out problem of
the config's task: the prompt's K·c thoughts, then the answer tokens. Params are a fresh random
init (the speed does not depend on them) and every row generates the same number of answer tokens
(no stop token), the length of the longest reference answer with its ``<eos>`` unless
``--new-tokens`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Sequence

import jax

from rdlm.cli.args import int_list
from rdlm.coconut.curriculum import CoconutConfig, eval_depth, eval_prompt, load_coconut_config
from rdlm.coconut.generation import generate_after_thoughts
from rdlm.config import Config
from rdlm.data.render import completion_text
from rdlm.data.tasks import example_at, make_task
from rdlm.data.tokenizer import load_tokenizer
from rdlm.model import count_params, init_params
from rdlm.runtime.hostinfo import results_report


def answer_tokens(cfg: Config, cc: CoconutConfig, prompts_from: int = 64) -> int:
    """Tokens of the longest reference answer after the thoughts, ``<eos>`` included."""
    tok = load_tokenizer(cfg.data.tokenizer)
    task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    fmt = "coconut" if cc.uses_latents else cc.method
    stage = cc.max_latent_stage if cc.uses_latents else 0
    return 1 + max(len(tok.encode(completion_text(example_at(task, cc.eval_split, i, cfg.seed),
                                                  fmt=fmt, num_latent_steps=stage)))
                   for i in range(prompts_from))


def eval_prompts(cfg: Config, cc: CoconutConfig, count: int) -> list[list[int]]:
    """The first ``count`` held-out prompts, as `evaluate_method` renders them."""
    tok = load_tokenizer(cfg.data.tokenizer)
    task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    return [eval_prompt(example_at(task, cc.eval_split, i, cfg.seed), tok, cc)
            for i in range(count)]


def time_calls(call: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first call, which compiles; seconds of each of ``repeats`` more)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return first, seconds


def bench_batch(params: Any, cfg: Config, cc: CoconutConfig, batch: int, new_tokens: int,
                repeats: int) -> dict[str, Any]:
    """One batch size: compile time, then the median and best of ``repeats`` timed calls."""
    tok = load_tokenizer(cfg.data.tokenizer)
    prompts = eval_prompts(cfg, cc, batch)
    r = int(eval_depth(cfg, cc).n_no_grad)

    def call() -> Any:
        return generate_after_thoughts(
            params, cfg.model, prompts, num_steps=r, latent_id=tok.latent_id,
            max_new_tokens=new_tokens, eos_id=None, substitute=cc.method == "coconut",
            shift_sees_thoughts=cc.shift_sees_thoughts)

    compile_s, seconds = time_calls(call, repeats)
    median = statistics.median(seconds)
    # The paper's count of generated tokens: the thoughts plus the language tokens.
    tokens = batch * (cc.max_latents + new_tokens)
    return {"batch": batch, "num_steps": r, "thoughts": cc.max_latents,
            "answer_tokens": new_tokens, "median_s": median, "best_s": min(seconds),
            "tokens_per_s": tokens / median, "ms_per_answer": 1e3 * median / batch,
            "compile_s": compile_s}


def bench_cli(argv: Sequence[str]) -> int:
    """``python -m rdlm bench coconut CONFIG [key=value …] [--batches 1,32] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="rdlm bench coconut")
    parser.add_argument("config", help="a coconut YAML config (with a coconut: section)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. coconut.method=pause")
    parser.add_argument("--batches", type=int_list, default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="answer tokens per row (default: the longest reference answer)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per batch size")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_intermixed_args(list(argv))  # flags before or after the overrides
    cfg, cc = load_coconut_config(args.config, args.overrides)
    params = init_params(cfg.model, jax.random.key(0))
    new_tokens = args.new_tokens or answer_tokens(cfg, cc)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; model {count_params(cfg.model):,} "
          f"parameters, {cfg.model.dtype}; method {cc.method}, {cc.max_latents} thoughts + "
          f"{new_tokens} answer tokens per row, median of {args.repeats} calls")
    print(f"{'batch':>6}{'r':>4}{'ms/batch':>10}{'best ms':>9}{'ms/answer':>11}{'tokens/s':>10}"
          f"{'compile s':>11}")
    rows = []
    for batch in args.batches:
        row = bench_batch(params, cfg, cc, batch, new_tokens, args.repeats)
        print(f"{batch:>6}{row['num_steps']:>4}{1e3 * row['median_s']:>10.2f}"
              f"{1e3 * row['best_s']:>9.2f}{row['ms_per_answer']:>11.3f}"
              f"{row['tokens_per_s']:>10.0f}{row['compile_s']:>11.1f}", flush=True)
        rows.append(row)
    if args.json:
        report = results_report("python -m rdlm bench coconut " + " ".join(argv), rows=rows)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
