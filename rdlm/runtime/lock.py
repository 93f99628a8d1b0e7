"""One training per run directory: ``<run_dir>/.lock``.

Two trainings on one run directory destroy each other's work (the second one's start-up removes
the first one's in-flight checkpoint as an interrupted save, and both append to metrics.jsonl),
so `rdlm.train.train` takes this lock before it touches the directory and releases it on the way
out. The lock is a small JSON file (pid, host, start time, the pid's start tick, the command)
created only if absent: ``O_CREAT | O_EXCL``, atomic on local and network POSIX file systems,
or on a bucket a conditional upload that the store refuses once the object exists (GCS
``ifGenerationMatch=0``, S3 ``If-None-Match: *``), so two hosts can never both create it.

A lock whose holder is provably gone — same host, and the pid no longer runs, is a zombie, or
now belongs to a later process — is stale and taken over with a note. A holder on another host
cannot be checked from here: the error says so and names the file to delete. On a bucket that
is the common case (a pod's hosts come and go), so a training killed without its ``finally``
(SIGKILL, a lost VM) leaves a lock that a person removes, as the error says.

On a multi-host run only process 0 takes the lock: the processes of one run share the directory
by design (`rdlm.train.loop` shares process 0's verdict with the others).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from rdlm.errors import RunDirLocked
from rdlm.runtime import storage
from rdlm.runtime.storage import StoragePath, as_path

LOCK_NAME = ".lock"
TAKEOVER_NAME = ".lock.takeover"
_ATTEMPTS = 5  # create / inspect rounds before giving up on a lock that keeps changing hands


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds a run directory."""

    pid: int
    host: str
    started: str  # UTC, ISO 8601
    pid_start: int | None = None  # the process's start tick (Linux): tells a reused pid apart
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.started}"


def lock_path(run_dir: str | StoragePath) -> StoragePath:
    return as_path(run_dir) / LOCK_NAME


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start tick) of a Linux process from /proc, or None when it does not exist.
    The command name may hold spaces and parentheses, so the fields are read after the last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def process_start_tick(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None elsewhere or when
    it does not exist. With the pid, it names one process even after the pid is reused."""
    stat = _proc_stat(pid) if Path("/proc/self/stat").exists() else None
    return stat[1] if stat else None


def this_process() -> LockInfo:
    """The `LockInfo` this process writes."""
    return LockInfo(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    pid_start=process_start_tick(os.getpid()), command=" ".join(sys.argv))


def is_running(pid: int, pid_start: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that wrote the lock."""
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in "ZX":  # gone, or dead and not yet reaped
            return False
        return pid_start is None or stat[1] == pid_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def is_stale(holder: LockInfo, host: str) -> bool:
    """A lock is stale only when its holder is provably gone: same host and not running."""
    return holder.host == host and not is_running(holder.pid, holder.pid_start)


def read_lock(path: StoragePath) -> LockInfo | None:
    """The holder recorded in ``path``; None when there is no lock file or it is not complete
    yet (its writer creates it, then writes it)."""
    try:
        data = json.loads(path.read_text())
        return LockInfo(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _create(path: StoragePath, me: LockInfo) -> bool:
    """Create the lock file holding ``me``; False when it exists already."""
    return storage.create_exclusive(path, json.dumps(dataclasses.asdict(me)).encode())


def _remove_stale(path: StoragePath, holder: LockInfo) -> bool:
    """Delete the lock of ``holder`` if it is still the one there. A second guard file makes the
    check-and-delete exclusive: two processes that both found the same stale lock must not let
    the slower one delete the lock the faster one has just created."""
    guard = path.with_name(TAKEOVER_NAME)
    if not storage.create_exclusive(guard, b""):
        return False  # another process is taking over right now
    try:
        if read_lock(path) != holder:
            return False
        path.unlink()
        return True
    finally:
        guard.unlink()


def held_message(run_dir: StoragePath, holder: LockInfo) -> str:
    path = run_dir / LOCK_NAME
    return (f"train.run_dir {str(run_dir)!r} is in use by another training: {holder.describe()} "
            f"(lock file {path}). Wait for it to finish or stop it, or choose another "
            f"train.run_dir; if that process is gone (e.g. its host died), delete {path}.")


def acquire(run_dir: str | StoragePath, note: Callable[[str], None] = print) -> LockInfo:
    """Take ``<run_dir>/.lock`` for this process (creating the directory), or raise
    `RunDirLocked` naming the holder and the fix. A stale lock is taken over with a ``note``."""
    run_dir = as_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, me = run_dir / LOCK_NAME, this_process()
    for _ in range(_ATTEMPTS):
        if _create(path, me):
            return me
        holder = read_lock(path)
        if holder is not None and not is_stale(holder, me.host):
            raise RunDirLocked(held_message(run_dir, holder))
        if holder is not None and _remove_stale(path, holder):
            note(f"note: took over the lock of {run_dir}: its holder ({holder.describe()}) is "
                 "no longer running.")
            continue
        time.sleep(0.2)  # being written, released or taken over just now: look again
    raise RunDirLocked(
        f"could not lock train.run_dir {str(run_dir)!r}: {path} stays unreadable or keeps "
        f"changing hands. If no training is running on it, delete {path} "
        f"(and {run_dir / TAKEOVER_NAME} if it exists).")


def release(run_dir: str | StoragePath, me: LockInfo) -> None:
    """Remove the lock if it is still ``me``'s (never another process's)."""
    path = lock_path(run_dir)
    if read_lock(path) == me:
        path.unlink(missing_ok=True)


def release_own(run_dir: str | StoragePath) -> None:
    """Remove the lock if this process holds it: for a process about to end abruptly, which no
    longer has its `LockInfo` at hand."""
    path = lock_path(run_dir)
    holder = read_lock(path)
    if holder is not None and (holder.pid, holder.host) == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)
