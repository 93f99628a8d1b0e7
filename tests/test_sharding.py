"""Logical-axis sharding rules: specs, divisibility fallbacks, FSDP placement, mesh errors."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import rdlm
from rdlm.runtime import sharding
from rdlm.config import ConfigError, MeshConfig


class FakeMesh:
    """Only `.shape` is read by the spec logic, so a mapping stands in for a pod-sized mesh."""

    def __init__(self, **shape: int):
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def spec(axes, shape, **mesh):
    return sharding.logical_to_spec(axes, shape, FakeMesh(**mesh))


def test_rules_map_logical_axes_to_mesh_axes():
    assert spec(("vocab", "embed"), (64, 32), fsdp=2, tensor=2) == P("tensor", "fsdp")
    assert spec(("embed", None, "heads", "head_dim"), (32, 3, 4, 8), fsdp=2, tensor=2) == \
        P("fsdp", None, "tensor", None)
    assert spec(("norm",), (32,), fsdp=4) == P(None)
    # A mesh axis of size 1 shards nothing and is left out.
    assert spec(("vocab", "embed"), (64, 32)) == P(None, None)


def test_indivisible_dimensions_fall_back():
    # Huginn: 55 heads cannot split over tensor=2 -> replicated on that dimension.
    assert spec(("embed", None, "heads", "head_dim"), (5280, 3, 55, 96), tensor=2) == \
        P(None, None, None, None)
    # d_model 5280 is not divisible by fsdp=64: FSDP moves to the largest dimension it divides.
    assert spec(("vocab", "embed"), (65536, 5280), fsdp=64) == P("fsdp", None)
    assert spec(("mlp", "embed"), (17920, 5280), fsdp=64) == P("fsdp", None)
    # Nothing divisible: replicated rather than wrong.
    assert spec(("embed", None, "heads", "head_dim"), (5280, 3, 55, 96), fsdp=64) == \
        P(None, None, None, None)


def test_huginn_on_32_way_fsdp_shards_every_matrix():
    cfg = rdlm.model_preset("huginn-3.5b")
    specs = sharding.param_specs(cfg, FakeMesh(data=2, fsdp=32))
    import jax
    shapes = rdlm.abstract_params(cfg)
    for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(shapes),
                               jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        if leaf.ndim >= 2 and "qk_bias" not in jax.tree_util.keystr(path):
            assert "fsdp" in tuple(s), (jax.tree_util.keystr(path), s)


def test_param_shardings_mirror_params_and_batch_sharding():
    import jax
    cfg = rdlm.model_preset("tiny")
    mesh = sharding.make_mesh(MeshConfig())
    shardings = sharding.param_shardings(cfg, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(rdlm.abstract_params(cfg))
    assert sharding.batch_sharding(mesh).spec == P(None, None)  # 1 device: nothing to split
    assert sharding.data_parallel_size(mesh) == 1


def test_mesh_shape_resolution_and_errors():
    assert sharding.resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.resolve_mesh_shape(MeshConfig(data=1, fsdp=-1), 64) == (1, 64, 1)
    with pytest.raises(ConfigError, match="needs 6 devices but 8"):
        sharding.resolve_mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="must divide the device count"):
        sharding.resolve_mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


_CPU_DEVICES = """
import jax
from rdlm.runtime import sharding
assert sharding.request_cpu_devices(2) == 2
assert jax.device_count() == 2, jax.devices()
assert sharding.request_cpu_devices(3) == 2  # JAX is running now: keeps 2 and says so
print("CPU-DEVICES-OK")
"""


def test_cpu_devices_split_the_host_before_jax_starts():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # an explicit device-count flag would take precedence
    result = subprocess.run([sys.executable, "-c", _CPU_DEVICES], env=env, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "CPU-DEVICES-OK" in result.stdout
    assert "mesh.cpu_devices=3 ignored: JAX already started with 2" in result.stdout
    with pytest.raises(ConfigError, match="mesh.cpu_devices"):
        MeshConfig(cpu_devices=-1)
