"""Writes that never leave a half-written file or directory behind.

Everything the project writes for later use (run configs, cached token arrays, converted
checkpoints) goes through here: the content is written beside its destination under a
temporary name and renamed into place only when complete, so a crash or ``kill -9`` leaves
either the old content or the new, never a torn mix. (Training checkpoints get the same
guarantee from Orbax.)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from dsmoe_jax.config import DsmoeError


class OutputExistsError(DsmoeError, FileExistsError):
    """An output directory that already holds something: it is never overwritten."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside ``path`` that replaces ``path`` when the block succeeds
    (``mode`` "w" for text, "wb" for bytes); on any error it is removed and ``path`` untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False)
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
    exists and is not empty."""
    out = pathlib.Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists; choose a new output directory or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
