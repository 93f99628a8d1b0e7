"""``python -m rdlm train CONFIG [section.key=value ...]``: the same command on every host.

Exit status: 0 done (or stopped by SIGTERM / one Ctrl-C, with the step saved); 2 a bad config,
checkpoint or a run directory in use by another training; 3 the run diverged; 130 aborted by a
second Ctrl-C. Every failure is one ``error:`` line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from typing import Any, Callable

import yaml

from rdlm.config import Config, ConfigError
from rdlm.config_files import load_config, to_dict
from rdlm.data.tasks import make_task
from rdlm.errors import CheckpointError, TrainingDiverged
from rdlm.runtime import lock as lock_lib
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


def abort_now(run_dir: str) -> Callable[[int, Any], None]:
    """The SIGINT handler for a Ctrl-C that `train` does not turn into a save (the second one,
    or one during start-up): end the process at once, as a kill would — the run resumes from its
    last checkpoint, and an unfinished save is discarded on the next start — but with one error
    line and the run directory unlocked. Exiting from here, rather than raising
    KeyboardInterrupt, keeps the exception out of the checkpoint writer's threads, which would
    each log a traceback."""
    def handler(signum: int, frame: Any) -> None:
        os.write(2, (f"\nerror: aborted by Ctrl-C without saving; rerun the same command to "
                     f"resume from the last checkpoint in {run_dir}.\n").encode())
        lock_lib.release_own(run_dir)
        os._exit(ABORTED)
    return handler


def cli(argv: list[str]) -> int:
    """``python -m rdlm train CONFIG [section.key=value ...]``."""
    try:
        _, cfg = parse_args(argv, "rdlm train")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"config (kept as {cfg.train.run_dir}/config.yaml):\n"
          + textwrap.indent(yaml.safe_dump(to_dict(cfg), sort_keys=False), "  "), flush=True)
    previous = signal.signal(signal.SIGINT, abort_now(cfg.train.run_dir))
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as err:  # a run dir in use (RunDirLocked) included
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0 if result.status in ("done", "preempted") else 1
