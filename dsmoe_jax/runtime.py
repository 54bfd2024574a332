"""Process-wide settings: the project's cache folder and JAX's persistent compilation cache.

XLA compiles every jitted function once per process; for the small models of a CPU run that
takes longer than training (a toy arm of the experiments: 18 s cold, 7 s with the cache warm).
With the persistent cache a second process, or a second run of the same config with another
seed, loads the compiled programs from disk instead. ``dsmoe-jax`` turns it on unless given
``--no-compile-cache``; library users call ``enable_compilation_cache()`` themselves.
"""

from __future__ import annotations

import os
import pathlib

import jax


def cache_dir() -> pathlib.Path:
    """The project's cache folder: ``$DSMOE_JAX_CACHE``, else ``$XDG_CACHE_HOME/dsmoe-jax``
    (``~/.cache/dsmoe-jax``)."""
    root = os.environ.get("DSMOE_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsmoe-jax")
    return pathlib.Path(root)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Keep every compiled XLA program in ``directory`` (default ``cache_dir() / "xla"``) and
    reuse it in later processes; returns the directory."""
    path = pathlib.Path(directory) if directory is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Small CPU programs compile in well under JAX's default threshold of one second: keep all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
