"""``python -m rdlm train CONFIG [section.key=value ...]``: the same command on every host."""

from __future__ import annotations

import argparse
import sys

from rdlm.config import Config, ConfigError, load_config
from rdlm.errors import CheckpointError, TrainingDiverged
from rdlm.train import train


def parse_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog=prog, description="Train a model from a YAML config; resumes from train.run_dir.")
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: train.steps=100 …")
    args, extra = parser.parse_known_args(argv)
    return args, load_config(args.config, [*args.overrides, *extra])


def cli(argv: list[str]) -> int:
    """``python -m rdlm train CONFIG [section.key=value ...]``."""
    try:
        _, cfg = parse_args(argv, "python -m rdlm train")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0 if result.status in ("done", "preempted") else 1
