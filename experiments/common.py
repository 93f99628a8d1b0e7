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

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rdlm import checkpoint  # noqa: E402
from rdlm.config import Config, load_config, to_dict  # noqa: E402
from rdlm.demo import machine  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "experiments"
# Minuscule settings for `make test`: seconds of training, a handful of problems.
SMOKE = ["model.d_model=32", "model.mlp_dim=64", "model.n_heads=2", "train.steps=2",
         "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=0",
         "train.log_every=1", "train.progress=lines"]


def parse_args(argv: Sequence[str] | None, doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="minuscule setting (tests)")
    parser.add_argument("--fresh", action="store_true", help="retrain instead of reusing runs")
    parser.add_argument("--out", default=str(RESULTS), help="where the report goes")
    parser.add_argument("--runs", default=str(RUNS), help="where training runs live")
    parser.add_argument("--examples", type=int, default=None, help="held-out problems per cell")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    return parser.parse_args(argv)


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
    steps = list(checkpoint.list_checkpoints(run_dir)) if run_dir.exists() else []
    start = time.perf_counter()
    if not steps or steps[-1] < cfg.train.steps:
        print(f"[experiments] training {run_dir} ({cfg.train.steps} steps)", flush=True)
        train(cfg)
    seconds = time.perf_counter() - start
    saved, params = checkpoint.load_params(run_dir)
    return saved, params, seconds


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
    lines += ["## Reproduce", "", f"    {command}", "",
              f"Wall time {wall / 60:.1f} min on {machine()}.", "", "## Configs", ""]
    for label, cfg in configs.items():
        lines += [f"`{label}`: `{cfg.train.run_dir}`", "", "```json",
                  json.dumps({"model": to_dict(cfg.model), "data": to_dict(cfg.data),
                              "train": {k: v for k, v in to_dict(cfg.train).items()
                                        if k in ("steps", "batch_size", "seq_len", "lr",
                                                 "optimizer", "schedule", "warmup_steps")}},
                             indent=1, default=str), "```", ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    (out / f"{name}.json").write_text(json.dumps(
        {"name": name, "claim": claim, "verdict": verdict, "command": command,
         "machine": machine(), "wall_seconds": round(wall, 1), **data}, indent=1, default=str))
    print("\n".join(lines[:8]), flush=True)
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
