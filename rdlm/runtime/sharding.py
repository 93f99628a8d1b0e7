"""Device mesh, logical-axis rules and the shardings of params, batches and activations.

Parameters carry logical axis names (`rdlm.param_axes`: "vocab", "embed", "heads", "head_dim",
"mlp", "norm", "adapter_in", None), and so does the latent state between recurrence steps
([batch, length, act_embed]). A rule table maps each logical name to a mesh axis:

    batch → (data, fsdp)    embed → fsdp    heads, mlp, vocab → tensor    act_embed → (none)

so FSDP shards every weight matrix along d_model, tensor parallelism splits heads and MLP units,
and the batch is split over every data-parallel device. A mesh axis is used at most once per array.
When a dimension is not divisible by its mesh axis (Huginn's 55 heads over tensor=2, say) that
dimension is replicated instead; an FSDP axis that found no home on its preferred dimension moves
to the largest other dimension it divides, so no weight silently stays replicated across the whole
FSDP group when another dimension could carry it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rdlm.config import ConfigError, MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axis (or tuple of mesh axes, or None = replicated).
LogicalRules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations: the batch over every data-parallel device; the model dimension whole on each
    # device (tensor parallelism splits heads and MLP units inside a block, not the state between)
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",  # grouped-query attention's key/value heads (the llama block)
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # The adapter's input (2d) axis sits beside an "embed" axis that already takes fsdp.
    "adapter_in": None,
}

# Mesh axes that hold parameter shards for memory (not compute) and may move to another dimension.
_MOVABLE_AXES = ("fsdp",)

# The weights of a decoding loop that every data-parallel group runs on its own (depth-continuous
# batching): split over "tensor" only. Gathering FSDP shards would read every weight across the
# group at every iteration, so within a group the weights are whole except for tensor parallelism.
GROUP_RULES: dict[str, str | tuple[str, ...] | None] = {**DEFAULT_RULES, "embed": None}


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor) for ``num_devices``; -1 takes what the other axes leave."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh={dict(zip(MESH_AXES, sizes))} is invalid for {num_devices} devices: the "
                f"fixed axes ({fixed} devices) must divide the device count.")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; make the product equal the device count or set one "
            "axis to -1.")
    return tuple(sizes)  # type: ignore[return-value]


def request_cpu_devices(num: int) -> int:
    """Ask JAX for ``num`` host CPU devices (``mesh.cpu_devices``); returns the count in effect
    (0 when nothing was asked: ``num`` is 0 or XLA_FLAGS fixes the count).

    Only possible before JAX starts its backends: afterwards (a notebook that already ran JAX, a
    test session) the run goes on with the devices there are and says so. An explicit
    ``--xla_force_host_platform_device_count`` in XLA_FLAGS wins. Accelerators are unaffected.
    """
    if num <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", num)
    except RuntimeError:  # backends already initialised
        have = len(jax.devices("cpu"))
        if have != num:
            print(f"note: mesh.cpu_devices={num} ignored: JAX already started with {have} CPU "
                  "device(s) in this process (set it before the first JAX operation).", flush=True)
        return have
    return len(jax.devices("cpu"))


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: every device of every process).

    With the default devices `jax.make_mesh` orders them for the physical topology (ICI rings on
    TPU); an explicit list (an AOT topology, a test subset) is used in its given order.
    """
    if devices is None:
        shape = resolve_mesh_shape(mesh_cfg, jax.device_count())
        return jax.make_mesh(shape, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(shape, devices=list(devices))
    except Exception:  # non-TPU or irregular device sets: plain row-major order
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _mesh_axes_of(rule: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: LogicalRules | None = None, *,
                    movable: Sequence[str] = _MOVABLE_AXES) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names, divisibility-checked.

    A mesh axis of size 1 is dropped (it shards nothing), a mesh axis already used by an earlier
    dimension is skipped, and a dimension that its mesh axes do not divide is replicated.
    ``movable`` (FSDP) axes left unplaced go to the largest free dimension they divide: right for
    a weight's memory, wrong for an activation, which passes ``movable=()``.
    """
    rules = DEFAULT_RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}.")
    used: set[str] = set()
    spec: list[tuple[str, ...]] = []
    for name, dim in zip(axes, shape):
        chosen: list[str] = []
        for mesh_axis in _mesh_axes_of(rules.get(name) if name is not None else None):
            size = mesh.shape[mesh_axis]
            if size == 1 or mesh_axis in used:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen))
    for mesh_axis in movable:
        size = mesh.shape.get(mesh_axis, 1)
        wanted = any(mesh_axis in _mesh_axes_of(rules.get(n)) for n in axes if n is not None)
        if size == 1 or mesh_axis in used or not wanted:
            continue
        free = [i for i, (d, s) in enumerate(zip(shape, spec)) if not s and d % size == 0]
        if free:
            best = max(free, key=lambda i: shape[i])
            spec[best] = (mesh_axis,)
            used.add(mesh_axis)
    return PartitionSpec(*[s[0] if len(s) == 1 else (s or None) for s in spec])


def param_specs(cfg: ModelConfig, mesh: Mesh, rules: LogicalRules | None = None) -> Any:
    """PartitionSpec pytree mirroring the params of ``cfg``."""
    from rdlm.model import abstract_params, param_axes
    shapes = abstract_params(cfg)
    axes = param_axes(cfg)
    return jax.tree.map(lambda ax, leaf: logical_to_spec(ax, leaf.shape, mesh, rules),
                        axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: LogicalRules | None = None) -> Any:
    """NamedSharding pytree mirroring the params of ``cfg`` (for `jax.jit` / checkpoint restore)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(mesh: Mesh, rules: LogicalRules | None = None) -> PartitionSpec:
    """[batch, length] arrays: batch over every data-parallel mesh axis, length replicated."""
    rules = DEFAULT_RULES if rules is None else rules
    axes = tuple(a for a in _mesh_axes_of(rules["batch"]) if mesh.shape[a] > 1)
    return PartitionSpec(axes or None, None)


def batch_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> NamedSharding:
    """Sharding of a global [batch, length] input array."""
    return NamedSharding(mesh, batch_spec(mesh, rules))


def data_axes(rules: LogicalRules | None = None) -> tuple[str, ...]:
    """The mesh axes the batch is split over (each of their coordinates is one data-parallel
    group of devices)."""
    return _mesh_axes_of((DEFAULT_RULES if rules is None else rules)["batch"])


def group_axes(mesh: Mesh, rules: LogicalRules | None = None) -> frozenset[str]:
    """The axes a program run by each data-parallel group on its own (`jax.shard_map`'s
    ``axis_names``) takes by hand: the data axes, and every axis of one device. XLA then
    partitions a group's program only over the axes that split its weights ("tensor", when it
    has several devices), and a group of one device runs it as one device would."""
    return frozenset(data_axes(rules)) | {a for a, size in mesh.shape.items() if size == 1}


def data_parallel_size(mesh: Mesh, rules: LogicalRules | None = None) -> int:
    """How many ways the batch is split; the global batch must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in data_axes(rules))


def to_host(tree: Any) -> Any:
    """A program's outputs as NumPy, in one transfer. An output that spans devices of other
    processes (a mesh over several hosts, each process running the same program on the same
    inputs) is gathered first, so that every process gets all of it."""
    def whole(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(x, tiled=True)
        return x
    return jax.device_get(jax.tree.map(whole, tree))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


STATE_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class StateConstraint:
    """Pins a [batch, length, d_model] activation to its logical sharding (`STATE_AXES`) with
    `jax.lax.with_sharding_constraint`: the hook that `rdlm.model.forward_train` / `lm_loss` /
    `forward` take as ``constrain`` and apply to the prelude's output, s_0 and every recurrence
    step's state.

    Without it XLA infers the loop-carried state's sharding from the weights around it: with FSDP
    it splits the state along d_model over "fsdp" (as the weights are) instead of along the batch,
    so every matmul of every recurrence step moves activations instead of gathering weights.
    Frozen (hashable), so jitted functions take it as a static argument.
    """

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        spec = logical_to_spec(STATE_AXES, x_btd.shape, self.mesh, dict(self.rules), movable=())
        return jax.lax.with_sharding_constraint(x_btd, NamedSharding(self.mesh, spec))


def state_constraint(mesh: Mesh, rules: LogicalRules | None = None
                     ) -> Callable[[jax.Array], jax.Array] | None:
    """The `StateConstraint` of ``mesh``, or None on one device (nothing to pin: the compiled
    program stays exactly the unsharded one)."""
    if mesh.size == 1:
        return None
    rules = DEFAULT_RULES if rules is None else rules
    return StateConstraint(mesh, tuple(sorted(rules.items())))


def describe(cfg: ModelConfig, mesh: Mesh, rules: LogicalRules | None = None) -> list[str]:
    """One line per parameter: path, shape, spec and bytes per device; for logs and `aot`."""
    from rdlm.model import abstract_params
    shapes = abstract_params(cfg)
    specs = param_specs(cfg, mesh, rules)
    lines = []
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                  jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        shards = math.prod(mesh.shape[a] for part in spec if part is not None
                           for a in ((part,) if isinstance(part, str) else part))
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize // shards
        lines.append(f"{jax.tree_util.keystr(path):<40} {str(leaf.shape):<24} {str(spec):<36} "
                     f"{nbytes / 2**20:9.2f} MiB/device")
    return lines
