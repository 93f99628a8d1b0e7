"""Ahead-of-time compilation of the train step for a TPU slice, from a CPU machine.

    pip install "jax[tpu]==0.10.2"        # optional extra: brings libtpu (not in requirements.txt)
    python -m rdlm aot configs/huginn-3.5b.yaml --topology v5p:4x4x4

XLA compiles the exact sharded program `rdlm.train` would run (same mesh rules, optimizer,
micro-batching, donation) against a *description* of the slice, so a config that does not fit in
HBM fails here in minutes instead of on the pod. Nothing is allocated: parameters, optimizer state
and the batch are `jax.ShapeDtypeStruct`s carrying their shardings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from rdlm.model import flops as flops_lib
from rdlm.model import kernels
from rdlm.runtime import sharding as shard_lib
from rdlm.config import Config, ConfigError
from rdlm.train.optim import make_optimizer
from rdlm.train.state import abstract_state, state_shardings
from rdlm.train.step import BATCH_KEYS, make_train_step

# HBM per device (one jax.Device) in bytes. v5p: 96 GiB of HBM2e, of which XLA's out-of-memory
# messages give 95.74 GiB as usable ("Used … of 95.74G hbm"); the other TPUs by their spec.
# Matched in order: "tpu v5 lite" (v5e) before "tpu v5" (v5p reports its kind as "TPU v5").
HBM_BYTES: dict[str, float] = {
    "tpu v5 lite": 16 * 2**30,
    "tpu v5e": 16 * 2**30,
    "tpu v5p": 95.74 * 2**30,
    "tpu v5": 95.74 * 2**30,
    "tpu v6 lite": 32 * 2**30,
    "tpu v6e": 32 * 2**30,
    "tpu v4": 32 * 2**30,
    "tpu v3": 16 * 2**30,
    "h100": 80 * 2**30,
    "h200": 141 * 2**30,
}


@dataclasses.dataclass
class AotReport:
    """Per-device numbers of one compiled train step."""

    devices: int
    device_kind: str
    mesh: dict[str, int]
    argument_bytes: float  # params + optimizer state + batch shards
    output_bytes: float
    alias_bytes: float  # outputs that reuse donated inputs (not counted twice)
    temp_bytes: float  # activations, gradients and scratch
    hbm_bytes: float | None
    xla_flops: float | None  # XLA's count: loop bodies counted once, so a lower bound
    model_flops: float  # rdlm.flops at the config's expected depth, per device per step
    compile_s: float
    attention: str = ""  # the kernel `rdlm.model.kernels.attention` picked for training

    @property
    def peak_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes

    def format(self) -> str:
        gib = lambda b: f"{b / 2**30:,.2f} GiB"
        lines = [f"devices: {self.devices} x {self.device_kind}, mesh {self.mesh}",
                 f"attention kernel: {self.attention}",
                 f"compile time: {self.compile_s:.1f}s",
                 "per device:",
                 f"  arguments (params, optimizer state, batch): {gib(self.argument_bytes)}",
                 f"  outputs: {gib(self.output_bytes)} ({gib(self.alias_bytes)} aliased to "
                 "donated inputs)",
                 f"  temporaries (activations, gradients): {gib(self.temp_bytes)}",
                 f"  peak estimate: {gib(self.peak_bytes)}"]
        if self.hbm_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  HBM: {gib(self.hbm_bytes)} -> {verdict} "
                         f"({self.peak_bytes / self.hbm_bytes:.0%} used)")
        lines.append(f"  model FLOPs per step (rdlm.flops, expected depth): "
                     f"{self.model_flops:.3e}")
        if self.xla_flops is not None:
            lines.append(f"  XLA cost-analysis FLOPs (each loop body once): {self.xla_flops:.3e}")
        return "\n".join(lines)


def _hbm_of(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in HBM_BYTES.items() if k in kind), None)


def batch_keys(cfg: Config) -> tuple[str, ...]:
    """The arrays a training batch of ``cfg`` carries (`rdlm.data.pipeline`): tokens, targets,
    the loss mask and segment ids always, branch ids only with ``data.branches``. The mask kind,
    and with it the attention kernel, follows from them (`rdlm.model.kernels`)."""
    keys = ("inputs", "targets", "loss_mask", "segment_ids")
    keys += ("branch_ids",) if cfg.data.branches else ()
    assert set(keys) <= set(BATCH_KEYS), keys
    return keys


def abstract_batch(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    sharding = shard_lib.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in batch_keys(cfg)}


class DoesNotFit(RuntimeError):
    """XLA refused the program: it needs more memory than a device has. The message names the
    biggest arrays and settings that use less."""


def train_attention_kernel(cfg: Config, devices: Sequence[jax.Device]) -> str:
    """The attention kernel the train step of ``cfg`` runs on ``devices`` (what
    `rdlm.model.kernels.attention` decides when it traces the step)."""
    kind = kernels.MASKED if cfg.data.branches else kernels.SEGMENTS
    return kernels.choose_attention(devices[0].platform, cfg.model.dtype, kind, cfg.train.seq_len,
                                    per_shard=True)


_OP = re.compile(r"=\s*\"?(stablehlo\.[a-z_]+|[a-z_]+\.[a-z_]+)")
_TENSOR = re.compile(r"tensor<([0-9x]+)x([a-z][a-z0-9]*)>")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "i1": 1, "i8": 1, "f64": 8,
                "i64": 8, "ui8": 1}


def largest_arrays(program_text: str, n: int = 5) -> list[tuple[str, str, int]]:
    """The ``n`` biggest results in a lowered (StableHLO) program: (op, type, bytes), largest
    first, each type once. A line's result is its last tensor type. Shapes are those of the
    traced program: global for arrays the compiler partitions, per device inside the Pallas
    kernels' shard_map."""
    seen: dict[str, tuple[str, str, int]] = {}
    for line in program_text.splitlines():
        op, tensors = _OP.search(line), _TENSOR.findall(line)
        if op is None or not tensors:
            continue
        dims, dtype = tensors[-1]
        type_ = f"{dtype}[{dims.replace('x', ',')}]"
        size = math.prod(int(d) for d in dims.split("x")) * _DTYPE_BYTES.get(dtype, 4)
        if type_ not in seen:
            seen[type_] = (op.group(1).removeprefix("stablehlo."), type_, size)
    return sorted(seen.values(), key=lambda item: -item[2])[:n]


def fit_suggestions(cfg: Config, dp: int) -> list[str]:
    """Settings that lower activation memory, the biggest lever first."""
    out = []
    rows = cfg.train.batch_size // cfg.train.micro_batches // dp  # per device per micro-batch
    if rows > 1:
        out.append(f"train.micro_batches={cfg.train.micro_batches * 2} (halves the "
                   f"{rows} rows each device holds per micro-batch)")
    if not cfg.model.remat or cfg.model.remat_policy in ("core", "none"):
        out.append("model.remat=true model.remat_policy=full (recompute prelude and coda blocks "
                   "in the backward pass too)")
    if cfg.train.seq_len > 1024:
        out.append(f"train.seq_len={cfg.train.seq_len // 2} (activations grow with the length)")
    out.append("more devices on the mesh's fsdp axis (parameters and optimizer state shrink)")
    return out


def compile_train_step(cfg: Config, devices: Sequence[jax.Device]) -> tuple[Any, AotReport]:
    """Lower and compile the train step of ``cfg`` for ``devices`` (TPU topology or real).

    Raises `DoesNotFit` when XLA refuses the program for lack of device memory."""
    mesh = shard_lib.make_mesh(cfg.mesh, devices=devices)
    micro_rows = cfg.train.batch_size // cfg.train.micro_batches
    dp = shard_lib.data_parallel_size(mesh)
    if micro_rows % dp:
        raise ConfigError(f"train.batch_size / train.micro_batches = {micro_rows} must be "
                          f"divisible by the {dp} data-parallel devices (mesh.data × mesh.fsdp).")
    tx = make_optimizer(cfg.train)
    state = abstract_state(cfg, tx, state_shardings(cfg, tx, mesh))
    batch = abstract_batch(cfg, mesh)
    step = make_train_step(cfg, mesh, batch_keys=tuple(batch))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    try:
        compiled = lowered.compile()
    except Exception as err:  # XLA's own error type; only an out-of-memory verdict is ours
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        raise DoesNotFit(does_not_fit_message(str(err), cfg, dp, lowered.as_text())) from None
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = flops_lib.expected_train_flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    report = AotReport(
        devices=len(devices), device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        argument_bytes=float(mem.argument_size_in_bytes),
        output_bytes=float(mem.output_size_in_bytes),
        alias_bytes=float(mem.alias_size_in_bytes),
        temp_bytes=float(mem.temp_size_in_bytes),
        hbm_bytes=_hbm_of(devices[0].device_kind),
        xla_flops=float(cost["flops"]) if cost and "flops" in cost else None,
        model_flops=model_flops / len(devices),
        compile_s=compile_s, attention=train_attention_kernel(cfg, devices))
    return compiled, report


def does_not_fit_message(xla_error: str, cfg: Config, dp: int, program_text: str) -> str:
    """One message for a program too big for the device: XLA's verdict, the biggest arrays, and
    settings that would use less memory."""
    verdict = next((line.strip() for line in xla_error.splitlines() if line.strip()), xla_error)
    biggest = ", ".join(f"{op} {type_} {size / 2**30:.2f} GiB"
                        for op, type_, size in largest_arrays(program_text))
    return (f"the train step does not fit in device memory: {verdict} Biggest arrays: {biggest}. "
            f"Settings that use less: {'; '.join(fit_suggestions(cfg, dp))}.")


def over_budget_message(report: AotReport, cfg: Config, dp: int) -> str:
    """For a program XLA compiled but whose peak exceeds the HBM of the table (or --hbm-gib)."""
    gib = lambda b: f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"
    return (f"peak {gib(report.peak_bytes)} > HBM {gib(report.hbm_bytes or 0)} per device "
            f"(arguments {gib(report.argument_bytes)}, temporaries {gib(report.temp_bytes)}). "
            f"Settings that use less: {'; '.join(fit_suggestions(cfg, dp))}.")


# "v5p:4x4x4", "v6e:8x8", "v5litepod-16"-style names go to libtpu, which knows which exist.
TOPOLOGY_NAME = re.compile(r"v\d+[a-z]*(:\d+(x\d+)*|-\d+|pod-\d+)")


def topology_devices(topology: str) -> list[jax.Device]:
    """Devices of a TPU slice description such as ``v5p:4x4x4`` (needs libtpu, no TPU)."""
    from jax.experimental import topologies
    if not TOPOLOGY_NAME.fullmatch(topology):
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r}: expected a TPU generation and the chips "
            "along each axis, such as v5p:2x2x2, v5p:4x4x4, v6e:4x4 or v5e:4x4.")
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            f"compiling for TPU topology {topology!r} needs libtpu, which is not installed: "
            f'pip install "jax[tpu]=={jax.__version__}" (the same version as jax), then run with '
            "JAX_PLATFORMS=cpu; without --topology, aot compiles for the local devices.")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as err:
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r}: {type(err).__name__}: {err}. Install the "
            'optional extra with pip install "jax[tpu]==0.10.2" (same version as jax) and '
            "use a name such as v5p:2x2x2, v5p:4x4x4 or v5e:4x4.") from err
    return list(topo.devices)
