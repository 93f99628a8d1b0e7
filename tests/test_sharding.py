"""Logical-axis sharding rules: specs, divisibility fallbacks, FSDP placement, mesh errors."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

import rdlm
from rdlm.runtime import sharding
from rdlm.config import ConfigError, MeshConfig
from tests.multihost import xla_flags


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


def test_state_constraint_is_nothing_on_one_device():
    import jax
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert sharding.state_constraint(mesh) is None
    # An activation's FSDP axis never moves onto d_model when the batch is too small to take it
    # (a weight's would, for memory).
    state_spec = lambda shape: sharding.logical_to_spec(
        sharding.STATE_AXES, shape, FakeMesh(data=2, fsdp=4), movable=())
    assert state_spec((8, 16, 32)) == P(("data", "fsdp"), None, None)
    assert state_spec((2, 16, 32)) == P("data", None, None)
    assert spec(sharding.STATE_AXES, (2, 16, 32), data=2, fsdp=4) == P("data", None, "fsdp")


# `rdlm train`'s step over a mesh (each script below starts with it): its compiled program, the
# params after one step and the loss.
_STEP = """
import jax, numpy as np
import rdlm
from rdlm.config import MeshConfig
from rdlm.runtime import sharding
from rdlm.train.optim import make_optimizer
from rdlm.train.state import init_state, state_shardings
from rdlm.train.step import global_batch, make_train_step


def run(cfg, rows, mesh_cfg, devices, loss_fn=None):
    mesh = sharding.make_mesh(mesh_cfg, devices=devices)
    tx = make_optimizer(cfg.train)
    state = init_state(cfg, tx, state_shardings(cfg, tx, mesh))
    step = make_train_step(cfg, mesh, batch_keys=tuple(rows),  # what `rdlm train` runs
                           loss_fn=loss_fn)
    batch = global_batch(rows, cfg, mesh)
    hlo = step.lower(state, batch).compile().as_text()
    state, metrics = step(state, batch)
    return hlo, jax.device_get(state.params), float(metrics["loss"])
"""

# `rdlm train`'s step on 8 devices pins the latent state to [batch, length, act_embed]: the
# compiled step's recurrence loops carry the state split by the batch only (XLA left alone splits
# it along d_model over "fsdp", as the weights are), and the numbers are the one-device step's.
_CONSTRAINED_STEP = """
import re

B, T = 8, 16
cfg = rdlm.load_config("configs/tiny.yaml", [f"train.batch_size={B}", f"train.seq_len={T}",
                                             "model.remat=true"])
rng = np.random.default_rng(0)
rows = {k: rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32)
        for k in ("inputs", "targets")}


def carried_states(hlo):
    # [rows, T, cols] float arrays carried by the compiled while loops (per-device shapes)
    carried = set()
    for m in re.finditer(r"= \\(([^)]*)\\) while\\(", hlo):
        carried |= {tuple(map(int, s)) for s in re.findall(r"f32\\[(\\d+),(\\d+),(\\d+)\\]",
                                                             m.group(1)) if int(s[1]) == T}
    return carried


_, single_params, single_loss = run(cfg, rows, MeshConfig(), jax.devices()[:1])
d = cfg.model.d_model
for shape in ((2, 4, 1), (1, 8, 1), (2, 2, 2)):
    mesh_cfg = MeshConfig(**dict(zip(("data", "fsdp", "tensor"), shape)))
    hlo, params, loss = run(cfg, rows, mesh_cfg, jax.devices())
    rows_per_device = B // (shape[0] * shape[1])
    # The state [s; e] may be carried concatenated (2d wide), as XLA's CPU pipeline does
    # without its fusion emitters: split by the batch, whole along d_model either way.
    carried = carried_states(hlo)
    assert (rows_per_device, T, d) in carried, (shape, carried)
    assert carried <= {(rows_per_device, T, d), (rows_per_device, T, 2 * d)}, (shape, carried)
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print("CONSTRAINED-OK")
"""


def _on_8_devices(script: str) -> str:
    """``script``'s stdout, run in a process of 8 CPU devices (fixed when JAX starts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return result.stdout


def test_train_step_keeps_the_state_sharded_by_batch_and_the_numbers():
    assert "CONSTRAINED-OK" in _on_8_devices(_STEP + _CONSTRAINED_STEP)


# The same step traced for a TPU on 8 devices: the step names its mesh as the program's
# context, so splash attention runs per shard of it (rows over data × fsdp, heads over tensor;
# Pallas' interpreter here), with the LM objective and with one whose forward pass has no state
# constraint (as Coconut's has none), and the loss and the updated params are the one-device
# step's, whose attention is XLA's. On a mesh of one device the kernel runs whole.
_KERNELS_PER_SHARD = """
from rdlm.model import backend, kernels, pallas_attention
from rdlm.train.step import DepthPolicy, LMObjective

B, T = 8, 128
cfg = rdlm.load_config("configs/tiny.yaml", [f"train.batch_size={B}", f"train.seq_len={T}",
                                             f"model.max_seq_len={T}"])
rng = np.random.default_rng(0)
rows = {k: rng.integers(0, cfg.model.vocab_size, (B, T), dtype=np.int32)
        for k in ("inputs", "targets")}
rows["segment_ids"] = 1 + (np.arange(T)[None] >= rng.integers(1, T, (B, 1))).astype(np.int32)
_, single_params, single_loss = run(cfg, rows, MeshConfig(), jax.devices()[:1])
chosen, shards = [], []
choose, splash_local = kernels.choose_attention, pallas_attention._splash_local
def spy(*args, **kwargs):
    chosen.append(choose(*args, **kwargs))
    return chosen[-1]
def local(q, *args, **kwargs):
    shards.append(q.shape[:3])
    return splash_local(q, *args, **{**kwargs, "interpret": True})
kernels.choose_attention, backend.target_platform = spy, lambda: "tpu"
pallas_attention._splash_local = local
unconstrained = LMObjective(cfg.model, cfg.train.init_scale, DepthPolicy.of(cfg), None)
for loss_fn in (None, unconstrained):
    chosen.clear(), shards.clear()
    _, params, loss = run(cfg, rows, MeshConfig(data=2, fsdp=2, tensor=2), jax.devices(),
                          loss_fn)
    assert set(chosen) == {kernels.SPLASH}, chosen
    heads = cfg.model.n_heads
    assert set(shards) == {(B // 4, T, heads // 2)}, shards  # a shard's rows, positions, heads
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
# A mesh of one of the 8 devices: the program runs whole on it, so the kernel does too.
chosen.clear(), shards.clear()
jax.clear_caches()  # its step was traced above, for the reference
_, params, loss = run(cfg, rows, MeshConfig(), jax.devices()[:1])
assert set(chosen) == {kernels.SPLASH} and set(shards) == {(B, T, heads)}, (chosen, shards)
np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
print("PER-SHARD-OK")
"""


def test_train_step_runs_the_tpu_kernels_per_shard_of_its_mesh():
    assert "PER-SHARD-OK" in _on_8_devices(_STEP + _KERNELS_PER_SHARD)
