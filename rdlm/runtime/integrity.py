"""Checksums of checkpoint files: a manifest saved inside each checkpoint, checked on load.

Orbax knows when a save finished but not whether the bytes it wrote are still the bytes on disk:
a flipped block in a tensorstore file restores without error, as different numbers. So every
checkpoint rdlm writes carries ``integrity.json``, the size and sha256 of each file of its items
(the subdirectories ``params/``, ``config/``, …), and a reader compares before trusting them.

The files directly in a checkpoint directory are orbax's commit record (``_CHECKPOINT_METADATA``
and, on some file systems, ``commit_success.txt``); orbax rewrites them while it finalises the
save, after the manifest is written, and vouches for them itself (a missing or unreadable record
makes the checkpoint incomplete), so the manifest leaves them out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from rdlm.runtime import storage
from rdlm.runtime.storage import StoragePath

MANIFEST = "integrity.json"
ALGORITHM = "sha256"
# Saved in orbax's step metadata (``custom_metadata``) when the save starts: a checkpoint that
# says it carries a manifest but has none lost it, while one without the key predates checksums.
CUSTOM_METADATA = {"rdlm_integrity": MANIFEST}

# Digests already computed in this process, by file identity and last change: loading the
# config and then the params of one checkpoint (as `sample` does) hashes each file once. Any
# write changes a file's ctime, so a changed file is hashed again (an object's update time).
_DIGESTS: dict[tuple[Any, ...], str] = {}


def carries_checksums(custom_metadata: dict[str, Any] | None) -> bool:
    """Whether a checkpoint with this orbax custom metadata was saved with a manifest."""
    return bool(custom_metadata) and custom_metadata.get("rdlm_integrity") == MANIFEST


def file_digest(path: StoragePath) -> str:
    """The sha256 of a file, in hex."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def _identity(path: StoragePath) -> tuple[Any, ...]:
    """What changes whenever the file's bytes may have changed."""
    if isinstance(path, Path):
        st = path.stat()
        return (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    st = path.stat()  # an object is replaced whole, with a new update time
    return (str(path), st.length, st.mtime)


def _checked_digest(path: StoragePath) -> str:
    """`file_digest`, remembered for as long as the file stays unchanged (see `_DIGESTS`).
    Only reads go through here: a save hashes files no reader has seen, under a temporary name
    that is gone after the commit, so remembering them would only grow the table."""
    key = _identity(path)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


def item_files(ckpt: StoragePath) -> list[StoragePath]:
    """The files of a checkpoint's items (every file in its subdirectories), sorted."""
    return sorted(f for item in ckpt.iterdir() if item.is_dir()
                  for f in storage.files_under(item))


def build_manifest(ckpt: StoragePath) -> dict[str, Any]:
    """Size and digest of each item file, by its path relative to ``ckpt`` (POSIX form)."""
    files = {f.relative_to(ckpt).as_posix(): {"bytes": storage.size(f), ALGORITHM: file_digest(f)}
             for f in item_files(ckpt)}
    return {"algorithm": ALGORITHM, "files": files}


def write_manifest(ckpt: StoragePath) -> None:
    """Write ``ckpt/integrity.json`` whole or not at all."""
    text = json.dumps(build_manifest(ckpt), indent=1, sort_keys=True)
    storage.write_atomically(ckpt / MANIFEST, text.encode())


def read_manifest(ckpt: StoragePath) -> dict[str, Any] | None:
    """The manifest of ``ckpt``; None when it has none. Raises ValueError when it is unreadable."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("algorithm") != ALGORITHM or \
            not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} is not a {ALGORITHM} manifest")
    return manifest


def first_mismatch(ckpt: StoragePath, manifest: dict[str, Any], items: Iterable[str] | None = None
                   ) -> str | None:
    """What differs from the manifest among the files of ``items`` (all items when None): the
    first missing, resized or changed file, named by its full path; None when all match. Sizes
    are compared first, so a truncated file is found without reading it."""
    wanted = None if items is None else set(items)
    for rel, saved in sorted(manifest["files"].items()):
        if wanted is not None and rel.split("/", 1)[0] not in wanted:
            continue
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        size = storage.size(path)
        if size != saved["bytes"]:
            return f"{path} has {size} bytes where {saved['bytes']} were saved"
        if _checked_digest(path) != saved[ALGORITHM]:
            return f"{path} does not match the {ALGORITHM} checksum recorded when it was saved"
    return None
