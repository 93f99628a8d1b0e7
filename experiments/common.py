"""Plumbing shared by the recurrent-depth experiments (E1–E7): train or reuse a run, evaluate,
write the report.

Every experiment trains through the library (`rdlm.train.train`, the same loop, checkpoints and
resume as ``python -m rdlm train``) into ``runs/experiments/<run>/``; a finished run is reused, a
killed one resumes. Results go to ``experiments/results/<name>.{md,json,png}`` with the exact
command, the config, the wall time and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rdlm.runtime import checkpoint  # noqa: E402
from rdlm.cli.startup import with_malloc_tunables  # noqa: E402
from rdlm.config import Config  # noqa: E402
from rdlm.config_files import load_config, to_dict  # noqa: E402
from rdlm.runtime.checkpoint import finished_step  # noqa: E402
from rdlm.runtime.hostinfo import machine  # noqa: E402
from rdlm.train import read_metrics  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "experiments"
# Minuscule settings for `make test`: seconds of training, a handful of problems.
SMOKE = ["model.d_model=32", "model.mlp_dim=64", "model.n_heads=2", "train.steps=2",
         "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=0",
         "train.log_every=1", "train.progress=lines"]


def parse_args(argv: Sequence[str] | None, doc: str,
               extra: Sequence[tuple[str, str]] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, help_text in extra:
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--smoke", action="store_true", help="minuscule setting (tests)")
    parser.add_argument("--fresh", action="store_true", help="retrain instead of reusing runs")
    parser.add_argument("--out", default=str(RESULTS), help="where the report goes")
    parser.add_argument("--runs", default=str(RUNS), help="where training runs live")
    parser.add_argument("--examples", type=int, default=None, help="held-out problems per cell")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    if argv is None:  # run as a script: huge pages for XLA's temporaries, as `python -m rdlm`
        with_malloc_tunables()
    return args


def config(args: argparse.Namespace, run: str, extra: Sequence[str] = ()) -> Config:
    """The base config with the run's overrides (and the smoke setting under --smoke)."""
    overrides = [*extra, *args.overrides, f"train.run_dir={Path(args.runs) / run}"]
    if args.smoke:
        overrides = [*SMOKE, *overrides]
    return load_config(BASE_CONFIG, overrides)


def trained(cfg: Config, fresh: bool = False) -> tuple[Config, Any, float]:
    """(config, params, training seconds of this call) for ``cfg``'s run directory: trains it
    (or resumes it) unless a finished checkpoint is already there."""
    from rdlm.train import train

    run_dir = Path(cfg.train.run_dir)
    if fresh and run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    done = finished_step(run_dir) if run_dir.exists() else None
    start = time.perf_counter()
    if done is None or done < cfg.train.steps:
        print(f"[experiments] training {run_dir} ({cfg.train.steps} steps)", flush=True)
        if train(cfg).status != "done":  # SIGTERM: saved; evaluating a partial run would mislead
            raise SystemExit(f"[experiments] training of {run_dir} was interrupted; it resumes "
                             "when the script is run again.")
    seconds = time.perf_counter() - start
    saved, params = checkpoint.load_params(run_dir)
    return saved, params, seconds


def shared_run(args: argparse.Namespace) -> tuple[Config, Any]:
    """(config, params) of the recurrent run that E1 and E3–E7 share (trained on first use)."""
    cfg, params, _ = trained(config(args, "recurrent"), args.fresh)
    return cfg, params


def longer_chains(cfg: Config, extra_hops: int = 2) -> tuple[str, ...]:
    """The training level's knobs with chains up to ``extra_hops`` hops longer."""
    from rdlm.data.tasks import make_task
    params = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args).params
    return (*cfg.data.task_args, f"max_hops={params.max_hops + extra_hops}")


def held_out_examples(args: argparse.Namespace, cfg: Config, num: int, smoke_num: int = 4
                      ) -> list:
    """Test-split problems with chains up to two hops longer than trained (``--examples``
    overrides ``num``)."""
    return test_examples(cfg, args.examples or (smoke_num if args.smoke else num),
                         longer_chains(cfg))


def training_minutes(run_dir: Path) -> float | None:
    """Minutes a run spent training: the sum of the step times in its metrics.jsonl."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return sum(r.get("step_time_s", 0.0) for r in rows) / 60 if rows else None


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def write_report(args: argparse.Namespace, name: str, title: str, *, claim: str, table: str,
                 verdict: str, data: dict[str, Any], configs: dict[str, Config], wall: float,
                 plot: str | None = None) -> Path:
    """``<out>/<name>.md`` (claim, verdict, table, command, configs, wall time, machine) and
    ``<out>/<name>.json`` (the same numbers, machine-readable)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([f"experiments/{name}.py", *sys.argv[1:]]) if not args.smoke \
        else f"python experiments/{name}.py --smoke"
    lines = [f"# {title}", "", f"**Claim.** {claim}", "", f"**Result.** {verdict}", "", table, ""]
    if plot:
        lines += [f"![{name}]({plot})", ""]
    trainings = {label: training_minutes(Path(cfg.train.run_dir)) for label, cfg in configs.items()}
    lines += ["## Reproduce", "", f"    {command}", "",
              f"Wall time of this invocation {wall / 60:.1f} min on {machine()}; finished training "
              "runs are reused. Training time of each run (sum of its logged step times): "
              + ", ".join(f"`{label}` {m:.1f} min" for label, m in trainings.items()
                          if m is not None) + ".", "", "## Configs", ""]
    for label, cfg in configs.items():
        lines += [f"`{label}`: `{_relative(Path(cfg.train.run_dir))}`", "", "```json",
                  json.dumps({"model": to_dict(cfg.model), "data": to_dict(cfg.data),
                              "train": {k: v for k, v in to_dict(cfg.train).items()
                                        if k in ("steps", "batch_size", "seq_len", "lr",
                                                 "optimizer", "schedule", "warmup_steps",
                                                 "depth", "init_scale")}},
                             indent=1, default=str), "```", ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    (out / f"{name}.json").write_text(json.dumps(
        {"name": name, "claim": claim, "verdict": verdict, "command": command,
         "machine": machine(), "wall_seconds": round(wall, 1),
         "training_minutes": {k: None if m is None else round(m, 2) for k, m in trainings.items()},
         **data}, indent=1, default=str))
    print("\n".join(lines[:8]), flush=True)
    print(f"[experiments] wrote {path}, {path.with_suffix('.json').name}"
          + (f" and {plot}" if plot else ""), flush=True)
    return path


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def test_examples(cfg: Config, num: int, task_args: Sequence[str] | None = None) -> list:
    """``num`` held-out problems of the config's task (``task_args`` replace its knobs)."""
    from rdlm.data.tasks import example_at, make_task
    task = make_task(cfg.data.task, cfg.data.difficulty,
                     cfg.data.task_args if task_args is None else task_args)
    return [example_at(task, "test", i) for i in range(num)]


def generate_answers(params: Any, cfg: Config, examples: Sequence[Any], *, num_steps: int,
                     batch_size: int = 64, **options: Any) -> dict[str, Any]:
    """Greedy answers from `rdlm.generate` (the cached engine, with ``options`` such as
    ``exit=``, ``cache_budget=``, ``continuous_cot=``).

    Returns accuracy, per-example correctness, the core iterations of every *decoded* answer
    token (the first generated token comes from the prefill at the full r, where no exit
    applies, so it is left out of the iteration counts) and the cache size.
    """
    from rdlm.data.render import completion_text, parse_answer, prompt_tokens
    from rdlm.data.tokenizer import load_tokenizer
    from rdlm.generation import generate

    tok = load_tokenizer(cfg.data.tokenizer)
    max_new = max(len(tok.encode(completion_text(e))) for e in examples) + 1
    correct, steps, cache_bytes = [], [], 0
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        out = generate(params, cfg.model, [prompt_tokens(e, tok) for e in chunk],
                       max_new_tokens=max_new, num_steps=num_steps, stop_tokens=(tok.eos_id,),
                       **options)
        cache_bytes = max(cache_bytes, out.cache_bytes)
        for e, row, row_steps, n in zip(chunk, out.tokens, out.steps, out.lengths):
            ids = [int(t) for t in row[:n] if t != tok.eos_id]
            correct.append(parse_answer(tok.decode(ids)) == e.answer)
            steps.append([int(s) for s in row_steps[1:n]])
    flat = [s for row in steps for s in row]
    return {"accuracy": float(np.mean(correct)), "correct": correct, "steps": steps,
            "mean_steps": float(np.mean(flat)) if flat else float("nan"),
            "cache_bytes": cache_bytes}


def loss_vs_r_axes(ax: Any, steps: Sequence[int], title: str) -> None:
    """Labels of a held-out-loss-vs-r plot: r on a log-2 axis with a tick at each r."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(r) for r in steps])
    ax.set_xlabel("recurrence steps r at test time")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def save_figure(fig: Any, args: argparse.Namespace, name: str) -> Path:
    """``<out>/<name>.png``, and the figure closed."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    pyplot().close(fig)
    return out / f"{name}.png"
