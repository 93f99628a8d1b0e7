"""``python -m rdlm coconut CONFIG``: the continuous-thought curriculum, then its evaluation."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from rdlm.coconut import evaluate_method, load_coconut_config, train_coconut
from rdlm.cli.train import abort_now
from rdlm.errors import CheckpointError, ConfigError, TrainingDiverged
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import storage


def cli(argv: list[str]) -> int:
    """``python -m rdlm coconut CONFIG [section.key=value ...] [--eval-only]``."""
    parser = argparse.ArgumentParser(prog="rdlm coconut",
                                     description="continuous-thought curriculum: train + evaluate")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--json", help="write the evaluation here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg, cc = load_coconut_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        storage.check_access(args.json, "--json")  # before training: one clear error
    # One Ctrl-C saves the step (inside train); a second one ends the process as `rdlm train`'s.
    previous = signal.signal(signal.SIGINT, abort_now(cfg.train.run_dir))
    try:
        if args.eval_only:
            _, params = ckpt_lib.load_params(cfg.train.run_dir, report=ckpt_lib.say_on_stderr)
        else:
            params = train_coconut(cfg, cc).params
    except (ConfigError, CheckpointError) as err:  # as `rdlm train` reports them
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, previous)
    result = evaluate_method(params, cfg, cc)
    print(f"{cc.method}: accuracy {result['accuracy']:.3f}, generated tokens "
          f"{result['generated_tokens']:.1f} on {result['num_examples']} {cc.eval_split} problems")
    if args.json:
        storage.as_path(args.json).write_text(json.dumps({k: v for k, v in result.items()},
                                                         indent=1))
    return 0
