"""Tests run on the CPU backend whatever the machine has, with cheap XLA compilation.

Test programs are tiny, so XLA's backend optimisation and its CPU fusion emitters buy nothing
and cost most of the compile time (`tests.multihost.CHEAP_COMPILE`); without them `make test`
stays fast on a 2-core CI machine.
"""

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the run, shared by both xdist workers and by the
# processes the tests start: many tests compile the same small programs (the tiny model's train
# step, its generation programs), and a cache hit skips XLA. Entries are keyed by the program,
# the flags and the devices, so a changed program compiles afresh. The cache belongs to this run
# only (xdist gives every worker the run's id; the processes inherit the variable): an entry
# half-written by a run that was killed, or by another run at the same time, crashed XLA when a
# later run read it.
_CACHES = Path(tempfile.gettempdir()) / f"rdlm-tests-xla-cache-{os.getuid()}"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    for _old in _CACHES.glob("*") if _CACHES.is_dir() else ():
        if time.time() - _old.stat().st_mtime > 6 * 3600:  # runs long finished
            shutil.rmtree(_old, ignore_errors=True)
    _run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHES / _run)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
from tests.multihost import CHEAP_COMPILE  # noqa: E402  (numpy only: JAX is not started)

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_COMPILE}".strip()


import jax  # noqa: E402  (after the environment above, which JAX reads at import)
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent compilation cache for one module's subprocesses
    (`tests.multihost.subprocess_env`): the processes a kill-and-restart test starts compile
    once."""
    return tmp_path_factory.mktemp("jax-cache")


def _memory_mappings() -> tuple[int, int]:
    """(this process's memory mappings, the kernel's limit); (0, 1) where Linux's /proc is not."""
    try:
        with open("/proc/self/maps") as f:
            count = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return count, int(f.read())
    except OSError:
        return 0, 1


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the compiled programs when a module ends with the worker past a third of the
    kernel's limit on memory mappings. Every XLA:CPU executable keeps a few mappings of its code
    until it is freed, and the jit caches keep every one: a worker that had run ~470 tests held
    Linux's default limit of 65,530 (vm.max_map_count), and XLA crashed (segfault) compiling
    or serialising the next program. Clearing only past a third keeps the reuse of programs
    across modules (each module's peak stays under 17,000)."""
    yield
    count, limit = _memory_mappings()
    if count > limit // 3:
        jax.clear_caches()
        gc.collect()
