"""Process start-up tweaks for command-line programs (the library never sets process state)."""

from __future__ import annotations

import os
import sys

# XLA:CPU allocates an execution's temporaries afresh every call, and the kernel faults each new
# 4 KiB page in and zeroes it, which costs a noticeable share of a CPU train step
# (docs/performance.md). glibc's ``hugetlb`` tunable makes malloc ask for transparent huge pages
# on those mappings (512x fewer faults; a no-op where THP is off). Tunables are read when the
# process starts, hence the re-exec.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def with_malloc_tunables() -> None:
    """Re-execute this command with `MALLOC_TUNABLE` added to ``GLIBC_TUNABLES``, once, on Linux.

    A ``glibc.malloc.hugetlb`` already in ``GLIBC_TUNABLES`` is respected (``=0`` opts out).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLE}" if tunables else MALLOC_TUNABLE
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        # orig_argv keeps the interpreter's own flags and the `-m rdlm` / script form.
        os.execv(sys.executable, sys.orig_argv)
    except OSError:
        pass  # not fatal: the command runs as it is, only slower on CPU
