"""``python -m rdlm train CONFIG [section.key=value ...]``: the same command on every host.

Exit status: 0 done (or stopped by SIGTERM / one Ctrl-C, with the step saved); 2 a bad config,
checkpoint or a run directory in use by another training; 3 the run diverged; 130 aborted by a
second Ctrl-C. Every failure is one ``error:`` line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import sys

from rdlm.config import Config, ConfigError, load_config
from rdlm.data.tasks import make_task
from rdlm.errors import CheckpointError, TrainingDiverged
from rdlm.train import train

ABORTED = 130  # the shell's status for a process ended by SIGINT


def parse_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, Config]:
    """The arguments and the checked config (`ConfigError` names the field and the fix)."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a model from a YAML config; resumes from train.run_dir.")
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: train.steps=100 …")
    args, extra = parser.parse_known_args(argv)
    cfg = load_config(args.config, [*args.overrides, *extra])
    if cfg.data.source == "synthetic":  # the task's knobs, before anything is compiled
        make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    return args, cfg


def cli(argv: list[str]) -> int:
    """``python -m rdlm train CONFIG [section.key=value ...]``."""
    try:
        _, cfg = parse_args(argv, "python -m rdlm train")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as err:  # a run dir in use (RunDirLocked) included
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\nerror: aborted by Ctrl-C without saving; rerun the same command to resume "
              f"from the last checkpoint in {cfg.train.run_dir}.", file=sys.stderr)
        return ABORTED
    return 0 if result.status in ("done", "preempted") else 1
