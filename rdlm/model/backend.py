"""Which backend a program is traced for, and whether it runs whole on each device or is
partitioned over a mesh it names: what every backend-specific choice of `rdlm.model.kernels`
and `rdlm.model.row_cache` asks first.

Each is read through this module (``backend.target_platform``), so that a script compiling for
a TPU from a CPU host can answer them as that host would.
"""

from __future__ import annotations

import jax


def target_platform(mesh: jax.sharding.Mesh | None) -> str:
    """The platform the program is compiled for: the mesh's devices when there is a mesh (a TPU
    topology compiled ahead of time from a CPU host), else JAX's default backend."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def runs_per_device() -> bool:
    """Whether the program being traced runs whole on each device it runs on: on a single
    device, or inside a `shard_map` manual over every axis of its mesh (the depth-continuous
    groups of one device each). A Pallas kernel can run there as it is; where XLA partitions
    the program, it cannot, and XLA:TPU refuses one under any automatic axis of a multi-device
    mesh, even an axis of one device."""
    context = jax.sharding.get_abstract_mesh()
    if context.empty:
        return jax.device_count() == 1
    return not _partitioned(context)


def shard_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh XLA partitions the program being traced over, where the program names it as
    its context (`jax.sharding.use_abstract_mesh`; lockstep generation over a mesh does, and
    so does a depth-continuous group split over "tensor"): a Pallas kernel runs per shard of
    its automatic axes, inside `shard_map`. None where the program runs whole on each device,
    or names no mesh."""
    context = jax.sharding.get_abstract_mesh()
    return None if context.empty or not _partitioned(context) else context


def pallas_runs() -> bool:
    """Whether a Pallas kernel can run in the program being traced: whole on each device
    (`runs_per_device`), or per shard of the mesh it names (`shard_mesh`)."""
    return runs_per_device() or shard_mesh() is not None


def _partitioned(context: jax.sharding.AbstractMesh) -> bool:
    """Whether XLA partitions a program over ``context``: some axis of it is left automatic,
    and it has several devices."""
    return context.size > 1 and not all(kind == jax.sharding.AxisType.Manual
                                        for kind in context.axis_types)
