"""Command line: ``python -m rdlm <command> …`` (also installed as ``rdlm``).

Each command is one module of this package exposing ``cli(argv) -> int``; this file only
dispatches, importing the module on demand so that ``--help`` stays fast. Process start-up tweaks
(`rdlm.cli.startup`) happen here and nowhere in the library.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from rdlm.cli.startup import with_malloc_tunables

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rdlm.cli.train", "train a model from a YAML config: train CONFIG [key=value ...]"),
    "eval": ("rdlm.cli.eval", "accuracy/loss of a checkpoint for several numbers of steps r"),
    "sample": ("rdlm.cli.sample", "generate text or tokens from a checkpoint"),
    "convert": ("rdlm.cli.convert", "huginn-to-rdlm / rdlm-to-huginn checkpoint conversion"),
    "prepare": ("rdlm.cli.prepare", "tokenize text/JSONL into training shards"),
    "aot": ("rdlm.cli.aot", "compile the train step ahead of time for a TPU topology"),
    "bench": ("rdlm.cli.bench", "benchmarks: bench train CONFIG | bench sample CONFIG"),
    "demo": ("rdlm.cli.demo", "train configs/demo.yaml, evaluate accuracy vs r, write table + plot"),
    "coconut": ("rdlm.cli.coconut", "continuous-thought curriculum: coconut CONFIG [key=value ...]"),
}


def usage() -> str:
    lines = ["usage: python -m rdlm <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # not a call from Python: safe to re-exec
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
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
