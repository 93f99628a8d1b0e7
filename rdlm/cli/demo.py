"""``python -m rdlm demo``: the main job on the embedded default, end to end.

Trains ``configs/demo.yaml`` (or resumes it, or reuses the finished checkpoint), evaluates
exact-match accuracy on held-out problems for several numbers of recurrence steps r, writes a table
(`results.md`, `results.json`) and a plot (`accuracy_vs_r.png`) into the run directory, and prints a
few solved problems with the core iterations each answer token used under KL adaptive exit.
``train.run_dir`` may be a bucket (``gs://…``): the table, JSON and plot go there too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from rdlm.config import Config
from rdlm.config_files import load_config, to_dict
from rdlm.data.render import completion_text, prompt_tokens
from rdlm.data.tasks import example_at, make_task
from rdlm.data.tokenizer import load_tokenizer
from rdlm.generation import generate
from rdlm.generation.evaluate import evaluate_accuracy
from rdlm.runtime import checkpoint, storage
from rdlm.runtime.checkpoint import finished_step
from rdlm.runtime.hostinfo import machine
from rdlm.runtime.storage import StoragePath
from rdlm.train import train

DEFAULT_CONFIG = "demo"  # the shipped configs/demo.yaml (`rdlm.config_files.config_path`)
DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 64)


def accuracy_table(result: dict[str, Any]) -> str:
    """Markdown: overall accuracy per r, then accuracy per problem depth (rows) and r (columns)."""
    steps = sorted(result["accuracy"])
    lines = ["| r | " + " | ".join(str(r) for r in steps) + " |",
             "|---|" + "---|" * len(steps),
             "| accuracy | " + " | ".join(f"{result['accuracy'][r]:.3f}" for r in steps) + " |"]
    by_depth = result.get("accuracy_by_reasoning_steps") or {}
    depths = sorted({d for per_r in by_depth.values() for d in per_r})
    if depths:
        lines += ["", "Accuracy by reasoning steps of the problem (rows) and r (columns):", "",
                  "| steps | " + " | ".join(str(r) for r in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(f"{by_depth[r].get(d, float('nan')):.3f}"
                                                  for r in steps) + " |")
    if result.get("shortcuts"):
        lines += ["", "Answer heuristics that do not follow the chain (must stay far below the "
                  "model): " + ", ".join(f"{k} {v:.3f}" for k, v in result["shortcuts"].items())]
    return "\n".join(lines)


def plot_accuracy(result: dict[str, Any], path: StoragePath, title: str) -> None:
    # deferred: matplotlib takes most of a second to load and only this plot needs it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(result["accuracy"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_depth = result.get("accuracy_by_reasoning_steps") or {}
    depths = sorted({d for per_r in by_depth.values() for d in per_r})
    for d in depths:
        ax.plot(steps, [by_depth[r].get(d, np.nan) for r in steps], marker=".", alpha=0.6,
                label=f"{d} reasoning steps")
    ax.plot(steps, [result["accuracy"][r] for r in steps], marker="o", color="black", lw=2.5,
            label="all problems")
    for name, value in (result.get("shortcuts") or {}).items():
        ax.axhline(value, ls=":", color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(r) for r in steps])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recurrence steps r at test time")
    ax.set_ylabel("exact-match accuracy (held out)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with path.open("wb") as f:  # a file object: matplotlib cannot write to a bucket by name
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def show_examples(params: Any, cfg: Config, num: int, num_steps: int) -> list[dict[str, Any]]:
    """Solve a few held-out problems with KL adaptive exit; report iterations per answer token."""
    task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    tok = load_tokenizer(cfg.data.tokenizer)
    examples = [example_at(task, "test", i) for i in range(num)]
    prompts = [prompt_tokens(e, tok, fmt=cfg.data.format) for e in examples]
    max_new = max(len(tok.encode(completion_text(e, fmt=cfg.data.format))) for e in examples) + 1
    out = generate(params, cfg.model, prompts, max_new_tokens=max_new, num_steps=num_steps,
                   exit="kl", stop_tokens=(tok.eos_id,))
    shown = []
    for example, row, steps, n in zip(examples, out.tokens, out.steps, out.lengths):
        ids = row[:n].tolist()
        pieces = [(tok.decode([t]), int(s)) for t, s in zip(ids, steps[:n]) if t != tok.eos_id]
        text = "".join(p for p, _ in pieces)
        shown.append({"question": example.question, "answer": example.answer, "generated": text,
                      "steps_per_token": pieces,
                      "correct": text.split("#")[-1].strip() == example.answer})
    return shown


def train_or_reuse(cfg: Config, config_path: str | Path) -> float:
    """Train the run, resume it, or reuse its finished checkpoint; returns this call's seconds.
    A preempted run (SIGTERM) is saved and the demo stops: a partial model's numbers would mislead."""
    storage.check_access(cfg.train.run_dir, "train.run_dir")  # before the resume point is read
    run_dir = storage.as_path(cfg.train.run_dir)
    done = finished_step(run_dir)
    start = time.perf_counter()
    if done is not None and done >= cfg.train.steps:
        print(f"[demo] reusing the finished checkpoint in {run_dir} (step {done}).", flush=True)
        return 0.0
    note = f"resuming from step {done}" if done is not None else "training from scratch"
    print(f"[demo] {note}: {cfg.train.steps} steps of {config_path} into {run_dir}", flush=True)
    if train(cfg).status != "done":
        print("[demo] training was interrupted and saved; run the same command again to "
              "resume it.", flush=True)
        raise SystemExit(0)
    return time.perf_counter() - start


def write_results(run_dir: StoragePath, summary: dict[str, Any], result: dict[str, Any],
                  cfg: Config, config_path: str | Path) -> str:
    """results.json, accuracy_vs_r.png and results.md in the run directory; returns the table."""
    table = accuracy_table(result)
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_accuracy(result, run_dir / "accuracy_vs_r.png",
                  f"{cfg.data.task} (level {cfg.data.difficulty}): test-time recurrence")
    md = ["# Demo: accuracy vs test-time recurrence", "",
          f"Command: `make demo` (= `python -m rdlm demo {config_path}`)  ", f"Machine: {machine()}  ",
          f"Held-out problems: {result['num_examples']} ({cfg.data.task}, level "
          f"{cfg.data.difficulty}, {', '.join(cfg.data.task_args) or 'default knobs'})", "",
          table, "", "![accuracy vs r](accuracy_vs_r.png)"]
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
    return table


def print_examples(examples: list[dict[str, Any]]) -> None:
    for ex in examples:
        used = " ".join(f"{p!r}:{s}" for p, s in ex["steps_per_token"])
        mark = "✓" if ex["correct"] else "✗"
        print(f"{mark} {ex['question']}  →  {ex['generated']!r} (answer {ex['answer']}); "
              f"iterations per token under KL exit: {used}")
    if examples:
        print("  (each answer's first token comes from the prompt's own pass, which runs the full r:"
              " adaptive exit never fires during prefill)")


def run(config_path: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None, *,
        num_steps_list: tuple[int, ...] = DEFAULT_STEPS, num_examples: int = 512,
        show: int = 4) -> dict[str, Any]:
    """Train (or resume / reuse), evaluate, write the table and plot; returns the results."""
    cfg = load_config(config_path, overrides or [])
    run_dir = storage.as_path(cfg.train.run_dir)
    train_seconds = train_or_reuse(cfg, config_path)
    saved_cfg, params = checkpoint.load_params(run_dir)
    cfg = saved_cfg if isinstance(saved_cfg, Config) else cfg
    print(f"[demo] evaluating r = {list(num_steps_list)} on {num_examples} held-out problems…",
          flush=True)
    result = evaluate_accuracy(params, cfg, num_steps_list=num_steps_list,
                               num_examples=num_examples, split="test")
    examples = show_examples(params, cfg, show, num_steps=max(num_steps_list[-1], 32)) if show else []
    summary = {"config": str(config_path), "overrides": overrides or [], "machine": machine(),
               "train_seconds_this_run": round(train_seconds, 1),
               "eval_seconds": round(result["seconds"], 1),
               "accuracy": result["accuracy"],
               "accuracy_by_reasoning_steps": result["accuracy_by_reasoning_steps"],
               "shortcuts": result.get("shortcuts"), "num_examples": result["num_examples"],
               "examples": examples, "model_config": to_dict(cfg.model),
               "data_config": to_dict(cfg.data)}
    table = write_results(run_dir, summary, result, cfg, config_path)
    print("\n" + table + "\n")
    print_examples(examples)
    print(f"\n[demo] wrote {run_dir / 'results.md'}, {run_dir / 'accuracy_vs_r.png'} and "
          f"{run_dir / 'results.json'}")
    return summary


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdlm demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--show", type=int, default=4, help="solved problems to print")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    run(args.config, args.overrides, num_examples=args.num_examples, show=args.show)
    return 0
