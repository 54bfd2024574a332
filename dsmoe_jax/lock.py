"""One writer per output directory: a training workdir, a ``prepare-data --out``, a ``convert`` output.

Two writers in one directory lose work silently (a requeued job resuming beside the one still
running replaces its checkpoints and cuts its metrics), so the second is refused. The lock is a
file, ``.dsmoe-jax.lock``, created exclusively (``O_EXCL``) and holding its owner's host, process
id and start time, removed when the owner finishes (whatever way it ends but ``kill -9``). A
lock whose owner is gone, on this host, is stale: it is said and taken over. One on another
host cannot be checked from here; the refusal names it, and removing the file (once that
process is known to be gone) is the fix. An output that must not exist until it is complete
(``convert``'s, written beside it and renamed into place) is locked by ``.<name>.dsmoe-jax.lock``
beside it instead (``beside=True``).

    with output_lock(workdir, "the training run"):
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time

from dsmoe_jax.errors import OutputLockedError

LOCK_FILE = ".dsmoe-jax.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _holder(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # written half-way by a process killed at that instant, or removed meanwhile
        return {}


def lock_path(directory: str | os.PathLike, beside: bool = False) -> pathlib.Path:
    """The lock file of ``directory``: inside it, or with ``beside`` next to it."""
    directory = pathlib.Path(directory)
    if beside:
        directory = directory.absolute()  # so that "out" has a parent to hold the lock
        return directory.parent / f".{directory.name}{LOCK_FILE}"
    return directory / LOCK_FILE


def acquire(directory: str | os.PathLike, what: str, beside: bool = False) -> pathlib.Path:
    """Take the lock of ``directory`` (created if needed; with ``beside`` only its parent, the lock
    being next to it) for ``what`` (for messages); returns the lock file. Raises
    ``OutputLockedError`` naming the holder when another live process has it."""
    directory = pathlib.Path(directory)
    path = lock_path(directory, beside)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "what": what}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                sys.stderr.write(f"dsmoe-jax: {path}: a stale lock of process {holder['pid']} ({holder.get('what')}, "
                                 f"started {holder.get('started')}), which is gone; taking it over\n")
                path.unlink(missing_ok=True)
                continue
            who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('what')}, started "
                   f"{holder.get('started')})" if holder else "another process")
            raise OutputLockedError(f"{directory} is in use by {who}: one writer per directory; wait for it to "
                                    f"finish, or choose another directory (if that process is gone, remove {path})"
                                    ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise OutputLockedError(f"{path} keeps reappearing: another process is taking the lock; wait for it to finish")


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, what: str, enabled: bool = True, beside: bool = False):
    """Hold the lock of ``directory`` for the block (``enabled`` False: nothing, e.g. on the
    processes of a multi-process run other than the first, which share its workdir; ``beside``:
    see ``acquire``)."""
    if not enabled:
        yield
        return
    path = acquire(directory, what, beside)
    try:
        yield
    finally:
        if _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
