"""Which backend a program is traced for, and whether it runs whole on each device: what every
backend-specific choice of `rdlm.model.kernels` and `rdlm.model.row_cache` asks first.

Both are read through this module (``backend.target_platform``), so that a script compiling for
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
    return context.size == 1 or all(kind == jax.sharding.AxisType.Manual
                                    for kind in context.axis_types)
