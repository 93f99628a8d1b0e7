"""Command line: ``python -m rdlm <command> …`` (also installed as ``rdlm``).

Each command is one module of this package exposing ``cli(argv) -> int``; this file only
dispatches, importing the module on demand so that ``--help`` stays fast. Process start-up tweaks
(`rdlm.cli.startup`) happen here and nowhere in the library.

Expected failures (a bad config key or value, a missing or damaged file, a checkpoint that does
not fit) end as one ``error:`` line naming the problem and the fix, with exit status 2 (3 for a
diverged training); ``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable

from rdlm.cli.startup import with_malloc_tunables
from rdlm.errors import CheckpointError, ConfigError, TrainingDiverged

DEBUG_FLAG = "--debug"
# What a user's input can cause: reported in one line. Anything else is a bug and keeps its
# traceback. ValueError covers bad JSON and undecodable text; OSError missing or unreadable files.
EXPECTED_ERRORS = (ConfigError, CheckpointError, ValueError, OSError, KeyError)

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rdlm.cli.train", "train a model from a YAML config: train CONFIG [key=value ...]"),
    "eval": ("rdlm.cli.eval", "accuracy/loss of a checkpoint for several numbers of steps r"),
    "sample": ("rdlm.cli.sample", "generate text or tokens from a checkpoint"),
    "convert": ("rdlm.cli.convert", "Huginn-0125 / Llama-family <-> rdlm checkpoint conversion"),
    "analyze-layers": ("rdlm.cli.analyze_layers",
                       "per-layer influence of a Llama-family model; suggests the retrofit split"),
    "prepare": ("rdlm.cli.prepare", "tokenize text/JSONL into training shards"),
    "aot": ("rdlm.cli.aot", "compile the train step ahead of time for a TPU topology"),
    "bench": ("rdlm.cli.bench", "benchmarks: bench train CONFIG | bench sample CONFIG"),
    "demo": ("rdlm.cli.demo", "train configs/demo.yaml, evaluate accuracy vs r, write table + plot"),
    "coconut": ("rdlm.cli.coconut", "continuous-thought curriculum: coconut CONFIG [key=value ...]"),
    "lm-eval": ("rdlm.cli.lm_eval", "lm-evaluation-harness with --model rdlm (needs rdlm[eval])"),
}


def usage() -> str:
    lines = ["usage: rdlm <command> [args] [--debug]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--debug: show the traceback of an error instead of its one-line summary"]
    return "\n".join(lines)


def error_line(err: BaseException) -> str:
    """``error: …``: the exception's own message (a KeyError's key without its repr quotes), and
    for errors that are not rdlm's own, the hint to rerun with ``--debug``."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    if not isinstance(err, (ConfigError, CheckpointError, TrainingDiverged)):
        text = f"{text} ({type(err).__name__}; rerun with {DEBUG_FLAG} for the traceback)"
    return f"error: {text}"


def run_reporting_errors(command: Callable[[list[str]], int | None], argv: list[str],
                         debug: bool) -> int:
    """``command(argv)``'s exit status, or 2 (3 for a diverged run) after one ``error:`` line."""
    if debug:
        return int(command(argv) or 0)
    try:
        return int(command(argv) or 0)
    except TrainingDiverged as err:
        print(error_line(err), file=sys.stderr)
        return 3
    except EXPECTED_ERRORS as err:
        print(error_line(err), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None  # not a call from Python: safe to re-exec
    argv = sys.argv[1:] if argv is None else argv
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
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
    return run_reporting_errors(module.cli, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
