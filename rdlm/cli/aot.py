"""``python -m rdlm aot CONFIG --topology v5p:4x4x4``: compile the train step for a TPU topology
on this machine and report its memory and FLOPs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

from rdlm.config import ConfigError, load_config
from rdlm.train.aot import compile_train_step, topology_devices


def cli(argv: list[str]) -> int:
    """``python -m rdlm aot CONFIG [key=value ...] --topology v5p:4x4x4 [--json FILE]``."""
    parser = argparse.ArgumentParser(prog="rdlm aot", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batches=32")
    parser.add_argument("--topology", help="TPU slice, e.g. v5p:4x4x4; omit to compile for the "
                                           "local devices")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
        devices = topology_devices(args.topology) if args.topology else jax.devices()
        _, report = compile_train_step(cfg, devices)
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"config: {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"topology: {args.topology or 'local devices'}")
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**dataclasses.asdict(report), "peak_bytes": report.peak_bytes,
                       "fits": report.fits, "topology": args.topology}, f, indent=2)
    return 0 if report.fits is not False else 1
