"""Where a run keeps its files: a local path, or an object-store URL (``gs://``, ``s3://``).

On a pod every host has its own disk, so a multi-host run can only checkpoint, resume and read
its data through shared storage. Every place that touches a run's files takes its path through
`as_path`: a local path becomes the same absolute `pathlib.Path` as before, a URL an
`etils.epath.Path` (fsspec: gcsfs, s3fs), the path type orbax uses itself. Both answer the same
pathlib calls; what differs between them (sizes, atomic writes, create-if-absent, moves,
appending) is decided here, once.

Endpoints and credentials come from each client's own settings, so one set of environment
variables points all of them at a store or an emulator:

- ``gs://``: Application Default Credentials (the VM's service account on a TPU VM;
  ``gcloud auth application-default login`` or ``GOOGLE_APPLICATION_CREDENTIALS`` elsewhere);
  ``STORAGE_EMULATOR_HOST`` for an emulator (also handed to tensorstore as
  ``TENSORSTORE_GCS_HTTP_URL`` unless that is set).
- ``s3://``: the AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
  an instance role); ``AWS_ENDPOINT_URL`` for an S3-compatible store.

`check_access` asks the store once, at the boundary, and turns an unreachable endpoint, a
missing bucket, absent credentials or a refusal into one `StorageError` naming the URL and the
setting to fix, before any step runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Iterator, Sequence, Union

import fsspec
from etils import epath

from rdlm.errors import StorageError

REMOTE_SCHEMES = ("gs://", "s3://")
StoragePath = Union[Path, epath.Path]

# Other writers (tensorstore, the other hosts of a pod) change a run's prefixes behind gcsfs's
# and s3fs's backs, so a cached listing would show a checkpoint directory as it was before a
# save. Every listing asks the store.
for _protocol in ("gcs", "gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
# gcsfs otherwise asks a separate control-plane API (and its credentials) for the bucket type
# on every call, and logs a warning whenever that API is not there (emulators, narrow roles).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://…``, ``s3://…``) rather than a file."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path: str | os.PathLike) -> StoragePath:
    """The path a run uses for ``path``: an absolute `pathlib.Path` for a local path (``~``
    expanded), an `epath.Path` for a ``gs://`` or ``s3://`` URL."""
    text = os.fspath(path)
    if is_remote(text):
        if text.startswith("gs://"):
            _share_gcs_emulator()
        return epath.Path(text)
    return Path(text).expanduser().absolute()


def as_given(path: str | os.PathLike) -> StoragePath:
    """``path`` as written: a `pathlib.Path` for a local path (a relative one stays relative, as
    in messages and meta files that name it), an `epath.Path` for a bucket URL."""
    return as_path(path) if is_remote(path) else Path(path)


def _share_gcs_emulator() -> None:
    """tensorstore (orbax's array writer) has its own setting for the GCS endpoint; give it the
    one the Google clients read, so that one variable points every client at an emulator."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", _with_scheme(emulator))


def _with_scheme(host: str) -> str:
    return host if "://" in host else f"http://{host}"


def _fs_and_key(path: StoragePath) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, key = fsspec.core.url_to_fs(os.fspath(path))
    return fs, key


# ---------------------------------------------------------------------------------------------
# What differs between a file system and an object store.


def size(path: StoragePath) -> int:
    """The size of a file in bytes."""
    if isinstance(path, Path):
        return path.stat().st_size
    return int(path.stat().length)


def modified_ns(path: StoragePath) -> int:
    """When a file or directory last changed, in nanoseconds since the epoch."""
    if isinstance(path, Path):
        return path.stat().st_mtime_ns
    return int(path.stat().mtime * 1_000_000_000)


def files_under(folder: StoragePath) -> list[StoragePath]:
    """Every file below ``folder``, at any depth. On an object store one listing of the prefix
    (a recursive glob there would be a request per level)."""
    if isinstance(folder, Path):
        return [f for f in folder.rglob("*") if f.is_file()]
    fs, key = _fs_and_key(folder)
    scheme = os.fspath(folder).split("://", 1)[0]
    return [epath.Path(f"{scheme}://{name}") for name in fs.find(key)]


def read_range(path: StoragePath, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a file: one ranged read, however large the file."""
    if isinstance(path, Path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    fs, key = _fs_and_key(path)
    return fs.cat_file(key, start=start, end=stop)


def glob(pattern: str) -> list[str]:
    """The files and folders matching a glob pattern (``*``, ``?``, ``[…]``), local or in a
    bucket, sorted."""
    if not is_remote(pattern):
        import glob as glob_lib
        return sorted(glob_lib.glob(pattern))
    fs, key = fsspec.core.url_to_fs(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{name}" for name in fs.glob(key))


def require_array_store(url: str, setting: str) -> None:
    """Raise `StorageError` when orbax cannot write checkpoint arrays at ``url``. orbax 0.12.8
    builds tensorstore specs for local paths and ``gs://`` only (its S3 support is an open pull
    request, google/orbax#2739), although tensorstore itself has an s3 driver; data, logs and
    exports work on ``s3://``."""
    if os.fspath(url).startswith("s3://"):
        raise StorageError(
            f"{setting}={os.fspath(url)!r}: checkpoints cannot be written to s3:// (orbax-checkpoint "
            "0.12.8 writes arrays to local paths and gs:// only); put checkpoints on gs:// or on "
            "a mounted file system (e.g. mountpoint-s3 or s3fs-fuse), and keep s3:// for data.")


def write_atomically(path: StoragePath, data: bytes) -> None:
    """Write ``path`` whole or not at all. A local file is written under a temporary name,
    synced and renamed into place; an object store makes an upload visible only once complete."""
    if not isinstance(path, Path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_exclusive(path: StoragePath, data: bytes) -> bool:
    """Create ``path`` holding ``data`` if no file is there; False when one is. Atomic among
    concurrent creators: ``O_CREAT | O_EXCL`` locally, a conditional upload on an object store
    (GCS ``ifGenerationMatch=0``, S3 ``If-None-Match: *``), which the store refuses once the
    object exists."""
    if isinstance(path, Path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    fs, key = _fs_and_key(path)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    except OSError as err:  # s3fs reports S3's 412 Precondition Failed as EINVAL
        if "Precondition" in str(err) or "412" in str(err):
            return False
        raise
    return True


def move_tree(source: StoragePath, target: StoragePath) -> None:
    """Move a directory (on an object store: copy every object under the prefix, then delete)."""
    if isinstance(source, Path):
        shutil.move(source, target)
        return
    fs, key = _fs_and_key(source)
    fs.mv(key, _fs_and_key(target)[1], recursive=True)


def copy_file(source: StoragePath, target: StoragePath) -> None:
    """Copy one file between any two places (local, bucket). A file goes to or from a bucket
    in chunks, never whole in memory (safetensors shards run to gigabytes)."""
    if isinstance(source, Path) and isinstance(target, Path):
        shutil.copyfile(source, target)
    elif isinstance(source, Path):
        fs, key = _fs_and_key(target)
        fs.put_file(os.fspath(source), key)
    elif isinstance(target, Path):
        fs, key = _fs_and_key(source)
        fs.get_file(key, os.fspath(target))
    else:
        target.write_bytes(source.read_bytes())


def upload_tree(local: Path, target: StoragePath, last: Sequence[str] = ()) -> None:
    """Copy every file below the folder ``local`` to the same place below ``target``; the files
    whose names match a pattern of ``last`` (``"*.meta.json"``, ``"config.json"``) after all the
    others. Each object appears whole, so a reader that waits for those files, which mark a
    folder complete, never sees part of it."""
    files = sorted(f for f in local.rglob("*") if f.is_file())
    marks = [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in last)]
    for f in [*(f for f in files if f not in marks), *marks]:
        copy_file(f, target / f.relative_to(local).as_posix())


@contextlib.contextmanager
def staged(target: StoragePath, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local folder to write the files of the folder ``target`` into, for writers that take
    only local files (numpy, pyarrow, tokenizers): ``target`` itself when it is local; for a
    bucket a temporary folder, uploaded with `upload_tree` (``last`` last) when the block ends
    without an error and removed in any case, so an interrupted write leaves nothing there."""
    if isinstance(target, Path):
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="rdlm-staged-") as folder:
        yield Path(folder)
        upload_tree(Path(folder), target, last)


class AppendedText:
    """A text file that grows by lines (metrics.jsonl). Objects cannot be appended to, so on an
    object store the lines are kept and the whole object is uploaded again when ``flush`` is
    called at least ``upload_every_s`` after the last upload, and on ``close``; a kill loses at
    most that much of the log, which a resumed run writes again from its checkpoint."""

    def __init__(self, path: StoragePath, upload_every_s: float = 30.0):
        self.path = path
        self.upload_every_s = upload_every_s
        self._local = open(path, "a") if isinstance(path, Path) else None
        self._text = "" if self._local else (path.read_text() if path.exists() else "")
        self._uploaded = time.monotonic()

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
        else:
            self._text += text

    def flush(self, force: bool = False) -> None:
        if self._local is not None:
            self._local.flush()
        elif force or time.monotonic() - self._uploaded >= self.upload_every_s:
            self.path.write_text(self._text)
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        else:
            self.flush(force=True)


# ---------------------------------------------------------------------------------------------
# One early question to the store, with the answer a person can act on.

_GCS_CREDENTIALS = ("the VM's service account (on a TPU VM), `gcloud auth application-default "
                    "login`, or GOOGLE_APPLICATION_CREDENTIALS=<key file>")
_S3_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"


def endpoint(url: str) -> str:
    """The HTTP endpoint the clients use for ``url``'s store."""
    if url.startswith("gs://"):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        return _with_scheme(emulator) if emulator else "https://storage.googleapis.com"
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return custom or "https://s3.amazonaws.com"


def _endpoint_setting(url: str) -> str:
    return ("STORAGE_EMULATOR_HOST" if url.startswith("gs://")
            else "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3)")


def _reachable(http_url: str, timeout_s: float) -> str | None:
    """None when a TCP connection to the endpoint opens, else why not. One quick try: the
    clients' own retries take half a minute to give up on a closed port."""
    parts = urllib.parse.urlsplit(http_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None


def _bucket_and_key(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def _is_credentials_error(err: BaseException) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                         "RefreshError", "NoAuthHandlerFound"})


def check_access(url: str, setting: str, *, timeout_s: float = 5.0) -> None:
    """Raise `StorageError` unless the bucket of ``url`` (the value of ``setting``, e.g.
    ``train.run_dir``) can be reached and listed with the credentials at hand. Local paths pass
    (their errors are the file system's own)."""
    if not is_remote(url):
        return
    as_path(url)  # the emulator setting reaches tensorstore before any array is written
    where = f"{setting}={url!r}"
    http = endpoint(url)
    why = _reachable(http, timeout_s)
    if why is not None:
        raise StorageError(f"{where}: cannot reach the storage endpoint {http} ({why}); check the "
                           f"network, or set {_endpoint_setting(url)} to the endpoint to use.")
    bucket, key = _bucket_and_key(url)
    credentials = _GCS_CREDENTIALS if url.startswith("gs://") else _S3_CREDENTIALS
    scheme = url.split("://", 1)[0]
    try:
        fs, _ = _fs_and_key(epath.Path(url))
        fs.ls(f"{bucket}/{key}".rstrip("/"), detail=False) if key else fs.ls(bucket)
    except FileNotFoundError:
        if not fs.exists(bucket):
            raise StorageError(f"{where}: the bucket {scheme}://{bucket} does not exist (at "
                               f"{http}); create it or fix {setting}.") from None
    except PermissionError as err:
        raise StorageError(f"{where}: the store refused access to {scheme}://{bucket} ({err}); "
                           f"grant these credentials read and write on the bucket, or use "
                           f"others: {credentials}.") from err
    except Exception as err:  # each client has its own exception types
        if _is_credentials_error(err):
            raise StorageError(f"{where}: no credentials for {scheme}://{bucket} ({err}); "
                               f"provide them with {credentials}.") from err
        raise StorageError(f"{where}: could not list {scheme}://{bucket} at {http} "
                           f"({type(err).__name__}: {str(err)[:160]}); check {setting} and "
                           f"the credentials ({credentials}).") from err
