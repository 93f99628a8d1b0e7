"""``python -m rdlm lm-eval …``: lm-evaluation-harness's own command line with ``--model rdlm``.

lm-eval's command line only knows the models of the modules it has imported; this command
imports `rdlm.lm_eval` (which registers ``rdlm``) and hands every argument to it unchanged, with
``--model rdlm`` added when no model is named:

    python -m rdlm lm-eval --model_args checkpoint=runs/demo,num_steps=32 --tasks arc_easy
    python -m rdlm lm-eval ls tasks
"""

from __future__ import annotations

import sys
from typing import Sequence

from rdlm.config import MeshConfig
from rdlm.errors import CheckpointError
from rdlm.runtime.distributed import maybe_initialize_distributed

SUBCOMMANDS = ("run", "ls", "validate")


def with_model(argv: Sequence[str], model: str = "rdlm") -> list[str]:
    """``argv`` with ``--model MODEL`` added to an evaluation that names no model (after
    lm-eval's ``run`` when it is given; ``ls``, ``validate`` and help are left alone)."""
    argv = list(argv)
    if not argv or argv[0] in ("ls", "validate", "-h", "--help"):
        return argv
    if any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        return argv
    head = argv[:1] if argv[0] == "run" else []
    return head + ["--model", model] + argv[len(head):]


def cli(argv: Sequence[str]) -> int:
    try:
        import rdlm.lm_eval  # noqa: F401  (registers --model rdlm)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # On a cluster JAX detects (a TPU pod, SLURM) each host runs this same command: the
    # processes join, and the model's mesh spans every host's devices.
    maybe_initialize_distributed(MeshConfig())
    previous = sys.argv
    sys.argv = ["lm-eval", *with_model(argv)]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except (ValueError, CheckpointError) as err:  # bad model_args, checkpoint or tokenizer
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = previous
    return 0
