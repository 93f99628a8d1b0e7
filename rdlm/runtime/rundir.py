"""What a training run keeps beside its checkpoints (``<run>/config.yaml``, ``tokenizer.json``,
``metrics.jsonl``), found from any path a user may pass: the run directory, its
``checkpoints/`` or one ``checkpoints/<step>``. Plain paths only, so that light callers (the
tokenizer) can use it."""

from __future__ import annotations

import os
from pathlib import Path


def find_in_run(path: str | os.PathLike, name: str) -> Path | None:
    """``name`` in ``path`` (a directory, or a file's directory) or in the one or two
    directories above it, whichever comes first; None if none holds it."""
    here = Path(path)
    here = here.parent if here.is_file() else here
    for folder in (here, here.parent, here.parent.parent):
        if (folder / name).is_file():
            return folder / name
    return None
