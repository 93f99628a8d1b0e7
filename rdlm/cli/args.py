"""Argument types shared by the command-line programs."""

from __future__ import annotations

import argparse

import jax

from rdlm.config import MeshConfig
from rdlm.generation import SpeculativeConfig
from rdlm.runtime import sharding
from rdlm.runtime.distributed import maybe_initialize_distributed


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def speculative_arg(text: str) -> SpeculativeConfig:
    """``K`` or ``K:DRAFT_STEPS`` (draft K tokens with DRAFT_STEPS iterations each)."""
    k, _, steps = text.partition(":")
    try:
        return SpeculativeConfig(num_draft=int(k), draft_steps=int(steps) if steps else 4)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--speculative {text!r}: {err}")


def mesh_arg(text: str) -> MeshConfig:
    """``data=D,fsdp=F,tensor=T`` (any of them; -1 takes the devices the others leave) as a
    `MeshConfig`, e.g. ``tensor=4`` or ``data=2,tensor=4``."""
    sizes = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        name, _, value = item.partition("=")
        if name not in ("data", "fsdp", "tensor") or name in sizes:
            raise argparse.ArgumentTypeError(f"{text!r}: {name!r} is not one of data, fsdp, "
                                             "tensor (each once), as in data=2,tensor=4")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {name}={value!r} is not a whole number")
    sizes.setdefault("data", -1 if -1 not in sizes.values() else 1)
    return MeshConfig(**sizes)


def cli_mesh(mesh_cfg: MeshConfig | None) -> jax.sharding.Mesh | None:
    """The mesh ``--mesh`` asks for (None without it: one device), over every process of a
    multi-host cluster that JAX detects (a TPU pod, SLURM), which this process joins first;
    each host runs the same command, as in training."""
    if mesh_cfg is None:
        return None
    maybe_initialize_distributed(mesh_cfg)
    return sharding.make_mesh(mesh_cfg)
