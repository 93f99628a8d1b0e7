"""``python -m rdlm eval``: exact-match accuracy of a checkpoint for several numbers of steps r."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Sequence

import jax

from rdlm.cli.args import cli_mesh, mesh_arg
from rdlm.config import Config, check_num_steps
from rdlm.errors import ConfigError
from rdlm.generation.evaluate import evaluate_accuracy, format_table, read_problems
from rdlm.runtime import storage
from rdlm.runtime.checkpoint import PARAM_DTYPES, load_params, say_on_stderr
from rdlm.train.eval import TOKEN_SOURCES, held_out_loss, loss_table, plot_loss_vs_r

DESCRIPTION = """A checkpoint at several numbers of steps r: held-out loss and perplexity for a
model trained on text, exact-match accuracy for one trained on a reasoning task.

    rdlm eval --checkpoint runs/text                       # loss vs r on the test split
    rdlm eval --checkpoint runs/demo --task chains --num-steps 1,2,4,8,16,32,64

Answers are decoded greedily by the generation engine (`rdlm.generate`, with its KV cache), in
batches of --batch-size prompts, or with --continuous-batching as one queue on that many rows;
``num_steps`` is data and the cache has a slot per step of the largest r, so one compilation
serves every r. The initial state is zero by default (``init_scale=0``), which makes the
numbers deterministic.
"""


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--num-steps {text!r} must be comma-separated integers, "
                          "e.g. 1,2,4,8") from None
    if not steps:
        raise ConfigError(f"--num-steps {text!r} must list integers >= 1.")
    for r in steps:
        check_num_steps(r, "--num-steps")
    return steps


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdlm eval", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--task", help="chains | addition | prosqa | prontoqa "
                                       "(default: the checkpoint's data.task)")
    parser.add_argument("--difficulty", type=int, help="task level 1-5 (default: the config's)")
    parser.add_argument("--task-args", nargs="*", default=None, help="knob=value overrides")
    parser.add_argument("--num-steps", default="1,2,4,8,16,32,64", help="comma-separated r")
    parser.add_argument("--num-batches", type=int, default=8,
                        help="text models: batches of train.batch_size x train.seq_len tokens")
    parser.add_argument("--allow-train-data", action="store_true",
                        help="text models: measure the loss even when the split's files are the "
                        "training files (data.paths without {split})")
    parser.add_argument("--plot", help="text models: write the loss-vs-r plot (PNG) here")
    parser.add_argument("--problems", help="JSONL file of your own problems, one "
                        '{"question": ..., "answer": ...} per line (optional "steps": [...]), '
                        "instead of generated ones")
    parser.add_argument("--num-examples", type=int, default=256)
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--format", choices=("nocot", "cot"), help="default: the config's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--continuous-batching", action="store_true",
                        help="task models: rows work through the problems at their own pace")
    parser.add_argument("--init-scale", type=float, default=0.0,
                        help="0 = zero initial state (deterministic); 1 = Huginn's random state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32",
                        help="load the parameters as this dtype (bfloat16: half the memory)")
    parser.add_argument("--mesh", type=mesh_arg, metavar="data=D,tensor=T",
                        help="over every device, as `rdlm sample --mesh` (default: one device "
                        "for task accuracy, the run's training mesh for the loss)")
    parser.add_argument("--json", help="write the full result (with predictions) here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(list(argv))
    steps = _parse_steps(args.num_steps)
    for setting, output in (("--json", args.json), ("--markdown", args.markdown),
                            ("--plot", args.plot)):  # files or bucket URLs
        if output:
            storage.check_access(output, setting)  # before the evaluation: one clear error
    mesh = cli_mesh(args.mesh)
    cfg, params = load_params(args.checkpoint, report=say_on_stderr, dtype=args.param_dtype)
    if cfg.data.source in TOKEN_SOURCES:
        return _text_eval(args, cfg, params, steps, mesh)
    changes = {k: v for k, v in (("task", args.task), ("difficulty", args.difficulty),
                                 ("format", args.format)) if v is not None}
    if args.task_args is not None:
        changes["task_args"] = tuple(args.task_args)
    elif args.task and args.task != cfg.data.task:
        changes["task_args"] = ()  # knobs of another task would not apply
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
    examples = read_problems(args.problems) if args.problems else None
    result = evaluate_accuracy(params, cfg, num_steps_list=steps,
                               examples=examples,
                               num_examples=args.num_examples, split=args.split,
                               batch_size=args.batch_size, init_scale=args.init_scale,
                               seed=args.seed, continuous_batching=args.continuous_batching,
                               mesh=mesh)
    if jax.process_index() != 0:  # every host of a multi-host mesh has the result: one reports
        return 0
    table = format_table(result)
    print(table)
    print(f"({result['seconds']:.1f} s)")
    if args.markdown:
        storage.as_path(args.markdown).write_text(f"checkpoint `{args.checkpoint}`\n\n{table}\n")
    if args.json:
        storage.as_path(args.json).write_text(json.dumps(
            {**result, "checkpoint": str(args.checkpoint),
             "accuracy": {str(k): v for k, v in result["accuracy"].items()},
             "predictions": {str(k): v for k, v in result["predictions"].items()},
             "accuracy_by_reasoning_steps": {
                 str(k): {str(d): a for d, a in v.items()}
                 for k, v in result["accuracy_by_reasoning_steps"].items()}}, indent=2))
    return 0


def _text_eval(args: argparse.Namespace, cfg: Config, params: object, steps: list[int],
               mesh: jax.sharding.Mesh | None) -> int:
    """Held-out loss and perplexity vs r of a model trained on token data."""
    if args.task or args.problems:
        raise ConfigError(f"{args.checkpoint!r} is a text model (data.source="
                          f"{cfg.data.source!r}); a reasoning task needs a model trained on one. "
                          "Drop --task/--problems to get its held-out loss vs r.")
    if args.num_batches < 1:
        raise ConfigError(f"--num-batches={args.num_batches} must be >= 1.")
    result = held_out_loss(params, cfg, num_steps_list=steps, split=args.split,
                           num_batches=args.num_batches, allow_train_data=args.allow_train_data,
                           mesh=mesh)
    if jax.process_index() != 0:
        return 0
    table = loss_table(result)
    print(f"{result['split']} split, {result['tokens']:,} tokens\n{table}")
    if args.markdown:
        storage.as_path(args.markdown).write_text(
            f"checkpoint `{args.checkpoint}`, {result['split']} split, {result['tokens']:,} "
            f"tokens\n\n{table}\n")
    if args.json:
        storage.as_path(args.json).write_text(json.dumps(
            {**result, "checkpoint": str(args.checkpoint),
             "loss": {str(r): v for r, v in result["loss"].items()},
             "perplexity": {str(r): v for r, v in result["perplexity"].items()}}, indent=2))
    if args.plot:
        plot_loss_vs_r(result, args.plot)
    return 0
