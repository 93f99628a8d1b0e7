"""``python -m rdlm aot CONFIG --topology v5p:4x4x4``: compile the train step for a TPU topology
on this machine and report its memory and FLOPs.

Exit status: 0 compiled and fits, 1 does not fit (XLA refused it, or its peak exceeds the
device's HBM), 2 cannot compile here (bad config, unknown topology, no libtpu)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import jax

from rdlm.config import ConfigError
from rdlm.config_files import load_config
from rdlm.runtime import sharding as shard_lib
from rdlm.runtime.hostinfo import compiling_host, toolchain
from rdlm.train.aot import (DoesNotFit, compile_train_step, over_budget_message,
                            topology_devices)


def cli(argv: list[str]) -> int:
    """``python -m rdlm aot CONFIG [key=value ...] --topology v5p:4x4x4 [--json FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m rdlm aot", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batches=32")
    parser.add_argument("--topology", help="TPU slice, e.g. v5p:4x4x4; omit to compile for the "
                                           "local devices")
    parser.add_argument("--hbm-gib", type=float, help="judge the fit against this much memory per "
                                                      "device instead of the device's own HBM")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
        devices = topology_devices(args.topology) if args.topology else jax.devices()
        _, report = compile_train_step(cfg, devices)
    except DoesNotFit as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.hbm_gib is not None:
        report.hbm_bytes = args.hbm_gib * 2**30
    print(f"config: {args.config} {' '.join(args.overrides)}".rstrip())
    print(f"topology: {args.topology or 'local devices'}")
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**dataclasses.asdict(report), "peak_bytes": report.peak_bytes,
                       "fits": report.fits, "topology": args.topology,
                       "machine": compiling_host(), "toolchain": toolchain(),
                       "command": "python -m rdlm aot " + shlex.join(argv)}, f, indent=2)
    if report.fits is False:
        mesh = shard_lib.make_mesh(cfg.mesh, devices=devices)
        print(f"error: does not fit: {over_budget_message(report, cfg, shard_lib.data_parallel_size(mesh))}",
              file=sys.stderr)
        return 1
    return 0
