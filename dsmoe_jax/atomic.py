"""Writes that never leave a half-written file or directory behind.

Everything the project writes for later use (run configs, cached token arrays, converted
checkpoints) goes through here: the content is written beside its destination under a
temporary name and renamed into place only when complete, so a crash or ``kill -9`` leaves
either the old content or the new, never a torn mix. (Training checkpoints get the same
guarantee from Orbax.)

A killed process cannot remove its temporary: the name carries the host and pid that wrote it
(``.<name>.partial-<host>-<pid>-<random>`` for directories, ``.<name>.<host>-<pid>-<random>.partial``
for files), so the next write to the same destination removes the ones whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

from dsmoe_jax import errors

# OutputExistsError was importable from here; errors.py holds it (until 0.4 it resolves here too)
__getattr__ = errors.moved_errors(__name__, "OutputExistsError")


def _owner() -> str:
    """``<host>-<pid>-``: who writes a temporary, so a later run can tell whether it is stale."""
    return f"{socket.gethostname()}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(parent: pathlib.Path, pattern: str, report_others: bool) -> None:
    """Remove the temporaries in ``parent`` whose name matches ``pattern`` (groups ``host`` and
    ``pid``) that a process of this host wrote and that is no longer running; say what was removed.
    With ``report_others``, name the ones that cannot be proven stale (written on another host,
    by a running process, or by a version that did not record its pid)."""
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for path in sorted(parent.iterdir()):
        match = re.fullmatch(pattern, path.name)
        if match is None:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if match["host"] == host and pid is not None and pid != os.getpid() and not _running(pid):
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:  # another process removed it first
                continue
            except OSError as e:
                print(f"dsmoe-jax: cannot remove {path}, left by an interrupted write ({e.strerror}); "
                      "delete it by hand", file=sys.stderr)
                continue
            print(f"dsmoe-jax: removed {path}, left by an interrupted write (process {pid} is gone)",
                  file=sys.stderr)
        elif report_others:
            who = f"process {pid} on {match['host']}" if pid is not None else "an earlier version of dsmoe-jax"
            print(f"dsmoe-jax: {path} is the unfinished output of another write ({who}), still running or "
                  "interrupted; delete it once no write to the same output is running", file=sys.stderr)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside ``path`` that replaces ``path`` when the block succeeds
    (``mode`` "w" for text, "wb" for bytes); on any error it is removed and ``path`` untouched."""
    path = pathlib.Path(path)
    # Files of other hosts or running processes go unmentioned: in multi-process runs they are
    # the concurrent writes of the other processes.
    _remove_stale(path.parent, rf"\.{re.escape(path.name)}\.(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+\.partial",
                  report_others=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.{_owner()}", suffix=".partial",
                                    delete=False)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, path)
    finally:
        if os.path.exists(f.name):
            os.unlink(f.name)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only if the block succeeds; on
    any error it is removed, so ``out`` never exists half-written. Refuses an ``out`` that
    exists and is not empty. First removes what a write to ``out`` killed midway left behind (see
    the module docstring) and names the leftovers it cannot prove stale."""
    out = pathlib.Path(out).absolute()
    _remove_stale(out.parent, rf"\.{re.escape(out.name)}\.partial-(?:(?P<host>.+)-(?P<pid>\d+)-)?[a-z0-9_]+",
                  report_others=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise errors.OutputExistsError(f"{out} already exists; choose a new output directory or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_owner()}", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
