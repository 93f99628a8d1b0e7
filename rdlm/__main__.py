"""Command line: ``python -m rdlm <command> …`` (also installed as ``rdlm``).

Each command lives in the module that owns the feature and exposes ``cli(argv) -> int``; this file
only dispatches, importing the module on demand so that ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rdlm.train", "train a model from a YAML config: train CONFIG [key=value ...]"),
    "eval": ("rdlm.evaluate", "accuracy/loss of a checkpoint for several numbers of steps r"),
    "sample": ("rdlm.sample", "generate text or tokens from a checkpoint"),
    "convert": ("rdlm.interop.cli", "huginn-to-rdlm / rdlm-to-huginn checkpoint conversion"),
    "prepare": ("rdlm.data.prepare", "tokenize text/JSONL into training shards"),
    "aot": ("rdlm.aot", "compile the train step ahead of time for a TPU topology"),
    "bench": ("rdlm.bench", "benchmarks: bench train CONFIG | bench sample CONFIG"),
    "demo": ("rdlm.demo", "train configs/demo.yaml, evaluate accuracy vs r, write table + plot"),
    "coconut": ("rdlm.coconut", "continuous-thought curriculum: coconut CONFIG [key=value ...]"),
}


def usage() -> str:
    lines = ["usage: python -m rdlm <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# XLA:CPU allocates an execution's temporaries afresh every call (1.6 GiB for a bench-28m train
# step), and the kernel faults each new 4 KiB page in and zeroes it: ~400k page faults and ~1 s
# of system CPU per step, ~11 % of the step's time on 2 cores. glibc's ``hugetlb`` tunable makes
# malloc ask for transparent huge pages on those mappings (512x fewer faults; a no-op where
# THP is off). Tunables are read when the process starts, hence the re-exec.
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


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # not a call from Python: safe to re-exec
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    if from_command_line:
        with_malloc_tunables()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
