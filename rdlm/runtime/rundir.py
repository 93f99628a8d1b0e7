"""What a training run keeps beside its checkpoints (``<run>/config.yaml``, ``tokenizer.json``,
``metrics.jsonl``), found from any path a user may pass: the run directory, its
``checkpoints/`` or one ``checkpoints/<step>``, on disk or in a bucket."""

from __future__ import annotations

import os

from rdlm.runtime.storage import StoragePath, as_path


def find_in_run(path: str | os.PathLike, name: str) -> StoragePath | None:
    """``name`` in ``path`` (a directory, or a file's directory) or in the one or two
    directories above it, whichever comes first; None if none holds it."""
    here = as_path(path)
    here = here.parent if here.is_file() else here
    for folder in (here, here.parent, here.parent.parent):
        if (folder / name).is_file():
            return folder / name
    return None
