"""Which backend a program is traced for, and whether it runs whole on each device or is
partitioned over a mesh it names: what every backend-specific choice of `rdlm.model.kernels`
and `rdlm.model.row_cache` asks first.

Each is read through this module (``backend.target_platform``), so that a script compiling for
a TPU from a CPU host can answer them as that host would.

A program over several devices names its mesh as its context while it is traced
(`names_mesh`): the training step its mesh, generation its plan's, the model's forward pass
the mesh its state constraint shards the batch over. That one name says where the kernels run
and for which platform.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax


def target_platform() -> str:
    """The platform the program being traced is compiled for: the devices of the mesh it names
    (a TPU topology compiled ahead of time from a CPU host names TPU devices), else JAX's
    default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


@contextlib.contextmanager
def names_mesh(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """Name ``mesh`` as the context of the program traced inside, unless there is no mesh or
    the program names one already (a forward pass inside a training step or a generation
    program). A mesh of one device says the program runs whole on it (`runs_per_device`), on
    a host of several devices too."""
    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


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
