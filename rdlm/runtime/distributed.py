"""Multi-host start-up: `jax.distributed.initialize` where a cluster is configured or detected."""

from __future__ import annotations

import os

import jax

from rdlm.config import MeshConfig
from rdlm.runtime import sharding as shard_lib


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env


def maybe_initialize_distributed(mesh_cfg: MeshConfig) -> None:
    """`jax.distributed.initialize` for multi-host runs and ``mesh.cpu_devices`` (call before
    anything touches devices).

    Explicit coordinator in the config → use it; a TPU pod or SLURM job → JAX detects everything;
    otherwise this is a single-process run and only the CPU device count may change.
    """
    _initialize_distributed(mesh_cfg)
    shard_lib.request_cpu_devices(mesh_cfg.cpu_devices)


def _initialize_distributed(mesh_cfg: MeshConfig) -> None:
    if mesh_cfg.distributed == "off" or jax.distributed.is_initialized():
        return
    # CPU processes need a collectives backend to talk to each other; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mesh_cfg.coordinator_address:
        jax.distributed.initialize(coordinator_address=mesh_cfg.coordinator_address,
                                   num_processes=mesh_cfg.num_processes,
                                   process_id=mesh_cfg.process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
