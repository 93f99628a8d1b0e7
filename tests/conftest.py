"""Tests run on the CPU backend whatever the machine has, with cheap XLA compilation.

Test programs are tiny, so XLA's backend optimisation buys nothing and costs most of the
compile time; level 0 keeps `make test` fast on a 2-core CI machine.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the run, shared by both xdist workers and by the
# processes the tests start: many tests compile the same small programs (the tiny model's train
# step, its generation programs), and a cache hit skips XLA. Entries are keyed by the program,
# the flags and the devices, so a changed program compiles afresh.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"rdlm-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
