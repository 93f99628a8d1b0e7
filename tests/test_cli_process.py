"""The command line's process setup: the glibc malloc tunable it re-executes itself with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rdlm.cli.startup import MALLOC_TUNABLE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")

# Prints "start" on every (re)execution, then what the final process saw.
PROGRAM = ("import os, sys; print('start', flush=True); "
           "from rdlm.cli.startup import with_malloc_tunables; with_malloc_tunables(); "
           "print('env', os.environ.get('GLIBC_TUNABLES')); print('argv', sys.argv[1:])")


def _run(tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-c", PROGRAM, "train", "a=1"], env=env,
                          capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def test_reexecs_once_with_the_tunable_and_the_same_arguments() -> None:
    assert _run(None) == ["start", "start", f"env {MALLOC_TUNABLE}", "argv ['train', 'a=1']"]


def test_keeps_other_tunables() -> None:
    out = _run("glibc.malloc.arena_max=4")
    assert out[:2] == ["start", "start"]
    assert out[2] == f"env glibc.malloc.arena_max=4:{MALLOC_TUNABLE}"


def test_an_explicit_hugetlb_setting_is_respected() -> None:
    assert _run("glibc.malloc.hugetlb=0") == ["start", "env glibc.malloc.hugetlb=0",
                                              "argv ['train', 'a=1']"]
