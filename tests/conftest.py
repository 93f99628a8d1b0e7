"""Tests run on the CPU backend whatever the machine has, with cheap XLA compilation.

Test programs are tiny, so XLA's backend optimisation buys nothing and costs most of the
compile time; level 0 keeps `make test` fast on a 2-core CI machine.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent XLA compilation cache in the test workers: writing an entry serialises the
# compiled executable, and XLA:CPU's serialisation crashed a worker (segfault in
# `executable.serialize()` while a training test compiled its step, among the hundreds of
# programs a worker compiles); reading entries left half-written by a killed run crashed it
# too. The tests that kill and restart a training process give its processes a private cache
# of their own (`tests.multihost.subprocess_env`): a handful of programs, compiled once
# instead of at every restart.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
