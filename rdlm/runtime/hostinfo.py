"""What a results file records of the machine that made it."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import jax


def host_info() -> dict[str, Any]:
    """What a results file records of the machine: CPU model, cores, the malloc tunables."""
    return {"host_cpu": cpu_model(), "host_cores": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def results_report(command: str, **fields: Any) -> dict[str, Any]:
    """The head of a benchmark's JSON results file: the device, the host, the jax version and
    the command that made it, followed by ``fields``."""
    device = jax.devices()[0]
    return {"device": f"{device.platform} {device.device_kind} x{jax.device_count()}",
            **host_info(), "jax": jax.__version__, "command": command, **fields}


def cpu_model() -> str:
    """The host CPU's model name (Linux), so a results file says which machine made it."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else "unknown"
    except OSError:
        return "unknown"


def compiling_host() -> str:
    """The host that compiled a program ahead of time, for the record: CPU model and cores."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def toolchain() -> dict[str, str]:
    """Python, jax and the installed jaxlib and libtpu versions: what a compile depends on."""
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for dist in ("jaxlib", "libtpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


# Device peak FLOP/s for MFU.
# Dense peak per device (one jax.Device), (bfloat16, float32). GPU float32 is the TF32 tensor-core
# rate, what XLA uses for float32 matmuls by default. CPU: the measured float32 matmul peak of a
# 2-core CI-class machine (DESIGN.md); pass train.peak_flops for another CPU.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 495e12),
    "h100": (989e12, 495e12),
    "a100": (312e12, 156e12),
    "l4": (121e12, 60e12),
    "tpu v6": (918e12, 918e12),
    "tpu v5 lite": (197e12, 197e12),  # v5e; checked before "tpu v5", which it contains
    "tpu v5e": (197e12, 197e12),
    "tpu v5p": (459e12, 459e12),
    "tpu v5": (459e12, 459e12),  # v5p reports its device_kind as "TPU v5"
    "tpu v4": (275e12, 275e12),
    "tpu v3": (123e12, 123e12),
    "cpu": (170e9, 170e9),
}


def device_peak_flops(device: jax.Device, dtype: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` from `PEAK_FLOPS` (``override`` wins)."""
    if override > 0:
        return override
    kind = f"{device.platform} {device.device_kind}".lower()
    for name, (bf16, f32) in PEAK_FLOPS.items():
        if name in kind:
            return bf16 if dtype == "bfloat16" else f32
    return None


def machine() -> str:
    """One line naming the host, its cores and the devices, for a results file."""
    device = jax.devices()[0]
    return (f"{platform.node()} · {platform.machine()} · {os.cpu_count()} CPU cores · "
            f"{jax.device_count()}× {device.device_kind}")
