"""Any lm-eval task at several r: its metric vs r, fixed depth and under an adaptive exit, and the
mean core iterations per generated token under the exit.

    python experiments/lm_eval_r_sweep.py --checkpoint RUN --tasks arc_easy gsm8k_cot \\
        [--num-steps 1 2 4 8 16 32] [--exit kl:1e-3] [--include-path DIR] [--limit N] \\
        [--num-fewshot K] [--batch-size 16] [--name sweep] [--out experiments/results]
    python experiments/lm_eval_r_sweep.py --local-tasks [--checkpoint RUN]

The checkpoint is loaded once (`rdlm.lm_eval.RDLM.at` changes r and the exit); log-likelihood
tasks compile once per length bucket for every r, and generation once (its cache holds one slot
per step of the largest r, unless ``--cache-budget`` says otherwise). ``--exit`` adds a second
run per r with the exit (it changes only generation tasks: a log-likelihood is one parallel
pass at fixed r).
``--local-tasks`` writes three small offline tasks (multiple choice, generation, rolling
log-likelihood; the same kind `tests/test_lm_eval.py` uses) and, without ``--checkpoint``, a
random-init tiny model: a run of the plumbing, whose numbers carry no meaning.

Writes ``<out>/<name>.{json,md,png}``: per task and r, the task's first metric (fixed r and
with the exit) and the mean iterations per generated token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import rdlm  # noqa: E402
from rdlm.runtime.hostinfo import machine  # noqa: E402

RESULTS = ROOT / "experiments" / "results"

LOCAL_DOCS = {
    "local_mc": ("multiple_choice",
                 [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a - b)],
                   "answer": 0} for a, b in [(2, 3), (4, 1), (7, 2), (5, 5), (9, 3), (6, 4)]],
                 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                 'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
    "local_gen": ("generate_until",
                  [{"question": f"count: {n} {n + 1} {n + 2}", "answer": f" {n + 3}"}
                   for n in range(1, 7)],
                  'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                  'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
                  "metric_list:\n  - metric: exact_match\n"),
    "local_roll": ("loglikelihood_rolling",
                   [{"text": t} for t in ["think deeper, not wider.", "one two three four five"]],
                   'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                   "metric_list:\n  - metric: word_perplexity\n"),
}


def write_local_tasks(folder: Path) -> list[str]:
    """The local tasks' YAML files and JSON-lines data in ``folder``; returns their names."""
    _write_tasks(folder, LOCAL_DOCS)
    return list(LOCAL_DOCS)


def write_text_tasks(folder: Path, data: Path, count: int = 200) -> list[str]:
    """Three offline tasks on the held-out documents of a prepared data folder (what
    `rdlm prepare --test-fraction` wrote: ``test-*.npy`` and ``tokenizer.json``), text the model
    never trained on:

    - ``text_cloze`` (multiple choice): the first words of a held-out line, and its next two
      words among three distractors, each the two words after another line's context;
    - ``text_next_words`` (generation, exact match): the same contexts, the next two words
      generated greedily up to the end of the line;
    - ``text_rolling``: word perplexity of held-out paragraphs.
    """
    import random

    import numpy as np

    from rdlm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(data / "tokenizer.json")
    stream = np.concatenate([np.load(p) for p in sorted(data.glob("test-*.npy"))])
    text = tok.decode(stream.tolist(), skip_special_tokens=True)
    items = []
    for line in text.splitlines():
        words = line.split()
        # Lines long enough for a context and two words after it, without pydoc's boilerplate.
        if len(words) >= 8 and "automatically" not in line and "|" not in line:
            cut = len(words) - 2 if len(words) < 12 else 6
            items.append((" ".join(words[:cut]), " " + " ".join(words[cut:cut + 2])))
    rng = random.Random(0)
    rng.shuffle(items)
    items = list(dict(items).items())[:count]  # one item per distinct context
    docs_mc = []
    for i, (context, answer) in enumerate(items):
        distractors = [items[(i + k * 37) % len(items)][1] for k in (1, 2, 3)]
        choices = [answer] + [d for d in distractors if d != answer]
        docs_mc.append({"question": context, "choices": choices, "answer": 0})
    paragraphs = [p.strip() for p in text.split("\n\n") if 200 <= len(p.strip()) <= 1200]
    tasks = {
        "text_cloze": ("multiple_choice", docs_mc,
                       'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                       'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
        "text_next_words": ("generate_until",
                            [{"question": c, "answer": a} for c, a in items[:count // 2]],
                            'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
                            '  do_sample: false\nfilter_list:\n  - name: two_words\n'
                            '    filter:\n      - function: regex\n'
                            '        regex_pattern: "^(\\\\s*\\\\S+\\\\s+\\\\S+)"\n'
                            '      - function: take_first\n'
                            'metric_list:\n  - metric: exact_match\n'),
        "text_rolling": ("loglikelihood_rolling",
                         [{"text": p} for p in paragraphs[:40]],
                         'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                         "metric_list:\n  - metric: word_perplexity\n"),
    }
    _write_tasks(folder, tasks)
    return list(tasks)


def _write_tasks(folder: Path, tasks: dict[str, tuple[str, list, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (output_type, docs, body) in tasks.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path}\ntest_split: test\noutput_type: {output_type}\n{body}")


def tiny_checkpoint(folder: Path) -> Path:
    """A random-init tiny model with the character tokenizer (the local tasks' alphabet)."""
    from rdlm.config import Config
    from rdlm.runtime.checkpoint import save_params
    cfg = Config(model=rdlm.model_preset("tiny"))
    path = folder / "tiny-random"
    save_params(path, cfg, rdlm.init_params(cfg.model, jax.random.key(0)))
    return path


def first_metric(task_results: dict[str, Any]) -> tuple[str, float]:
    """The task's first reported metric (``acc,none``, ``exact_match,strict-match``, …)."""
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    raise ValueError(f"no metric in {sorted(task_results)}")


def sweep(model: Any, tasks: list[str], num_steps: list[int], exit: str | None,
          evaluate_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (r, exit or not): each task's first metric and the mean iterations."""
    import lm_eval
    rows = []
    for r in num_steps:
        for spec in [None] + ([exit] if exit else []):
            at_r = model.at(r, spec)
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(model=at_r, tasks=tasks, **evaluate_kwargs)
            metrics = {task: first_metric(values) for task, values in out["results"].items()}
            rows.append({"num_steps": r, "exit": spec, "seconds": time.perf_counter() - start,
                         "mean_steps": None if math.isnan(at_r.mean_steps) else at_r.mean_steps,
                         "metrics": {t: {"metric": m, "value": v}
                                     for t, (m, v) in metrics.items()}})
            print(f"r={r} exit={spec}: " + ", ".join(f"{t} {m}={v:.4g}" for t, (m, v)
                                                     in metrics.items())
                  + (f"; mean iterations/token {at_r.mean_steps:.2f}"
                     if not math.isnan(at_r.mean_steps) else ""), flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({t for row in rows for t in row["metrics"]})
    exits = sorted({row["exit"] for row in rows}, key=lambda e: (e is not None, e or ""))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.4))
    for ax, task in zip(axes, tasks):
        for spec in exits:
            sel = [row for row in rows if row["exit"] == spec and task in row["metrics"]]
            ax.plot([row["num_steps"] for row in sel],
                    [row["metrics"][task]["value"] for row in sel], "o-",
                    label="fixed r" if spec is None else f"exit {spec}")
        metric = next(row["metrics"][task]["metric"] for row in rows if task in row["metrics"])
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("r (cap under the exit)")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for spec in exits:
        sel = [row for row in rows if row["exit"] == spec and row["mean_steps"] is not None]
        if sel:
            ax.plot([row["num_steps"] for row in sel], [row["mean_steps"] for row in sel], "o-",
                    label="fixed r" if spec is None else f"exit {spec}")
    ax.set_xscale("log", base=2)
    ax.set_title("mean iterations per generated token", fontsize=9)
    ax.set_xlabel("r (cap under the exit)")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    tasks = sorted({t for row in rows for t in row["metrics"]})
    lines = [f"# lm-eval r sweep: {meta['checkpoint']}", "", f"`{meta['command']}`", "",
             f"{meta['machine']}; {meta['seconds']:.0f} s.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    head = ["r", "exit"] + [f"{t} ({next(r['metrics'][t]['metric'] for r in rows if t in r['metrics'])})"
                            for t in tasks] + ["mean iterations / generated token"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["num_steps"]), row["exit"] or "fixed"]
        cells += [f"{row['metrics'][t]['value']:.4g}" if t in row["metrics"] else "" for t in tasks]
        cells.append("" if row["mean_steps"] is None else f"{row['mean_steps']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="rdlm run/step or Huginn-layout directory")
    parser.add_argument("--tasks", nargs="+", default=[])
    parser.add_argument("--local-tasks", action="store_true",
                        help="write and run three small offline tasks")
    parser.add_argument("--text-tasks", metavar="DATA_DIR",
                        help="write and run three offline tasks on the held-out documents of "
                             "a prepared data folder (test-*.npy, tokenizer.json)")
    parser.add_argument("--include-path", help="folder of extra task YAMLs")
    parser.add_argument("--num-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--exit", help="adaptive exit for a second run per r, e.g. kl:1e-3")
    parser.add_argument("--cache-budget", type=int,
                        help="KV-cache slots per core layer (default: the largest r, exact)")
    parser.add_argument("--limit", type=float)
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--system-instruction")
    parser.add_argument("--name", default="lm_eval_r_sweep")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not args.tasks and not args.local_tasks and not args.text_tasks:
        parser.error("give --tasks NAME ..., --local-tasks or --text-tasks DATA_DIR")

    import rdlm.lm_eval  # noqa: F401  (registers the model; needs the eval extra)
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tasks, include, note = list(args.tasks), args.include_path, None
        if args.local_tasks:
            tasks += write_local_tasks(Path(tmp) / "tasks")
        if args.text_tasks:
            tasks += write_text_tasks(Path(tmp) / "tasks", Path(args.text_tasks))
            note = (f"Tasks written from the held-out documents of `{args.text_tasks}` (text the "
                    "model never trained on; `write_text_tasks`): text_cloze picks a line's next "
                    "two words among four (chance 0.25), text_next_words generates them "
                    "greedily (exact match), text_rolling is the word perplexity of held-out "
                    "paragraphs. The exit changes only generation.")
        if args.local_tasks or args.text_tasks:
            include = [p for p in (include, str(Path(tmp) / "tasks")) if p]
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(tiny_checkpoint(Path(tmp)))
            note = ("The model is a random-init `tiny` preset (no training): this run shows the "
                    "sweep's plumbing, its numbers mean nothing.")
        only_local = not args.tasks and not args.include_path
        manager = TaskManager(include_path=include, include_defaults=not only_local)
        # One cache slot per step of the largest r is exactly the uncompressed cache at every r,
        # and one generation program then serves them all.
        model = rdlm.lm_eval.RDLM(checkpoint=checkpoint, num_steps=args.num_steps[0],
                                  batch_size=args.batch_size,
                                  cache_budget=args.cache_budget or max(args.num_steps))
        kwargs = {"task_manager": manager, "limit": args.limit, "num_fewshot": args.num_fewshot,
                  "apply_chat_template": args.apply_chat_template,
                  "system_instruction": args.system_instruction, "log_samples": False}
        rows = sweep(model, tasks, args.num_steps, args.exit, kwargs)
    meta = {"command": "python experiments/lm_eval_r_sweep.py " + " ".join(argv or sys.argv[1:]),
            "checkpoint": args.checkpoint or "random-init tiny", "machine": machine(),
            "seconds": time.perf_counter() - start, "note": note}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(report(rows, meta))
    plot(rows, out / f"{args.name}.png", f"{meta['checkpoint']}: metric vs r")
    print(f"wrote {out / args.name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
