"""Keeps the repository's top-level source folders from shadowing installed packages.

``kernels/``, ``train/`` and ``configs/`` are installed as ``dsmoe_jax.kernels``,
``dsmoe_jax.train`` and ``dsmoe_jax.configs``. A Python started in the repository root (``python
-m pytest``, ``python -c``, a notebook) puts the root first on ``sys.path``, where each folder also
looks like a top-level package: ``import kernels`` would then load this project's kernels instead
of Hugging Face's ``kernels`` package, which transformers imports. Each folder's ``__init__`` calls
:func:`defer_to_installed` when it is imported under its bare name, and that import gets the
installed package of the name instead (or a clear error when there is none).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, init_file: str) -> None:
    """Replace the module being imported as top-level ``name`` (from ``init_file``, a folder of this
    repository) by the package of that name installed elsewhere on ``sys.path``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {name}/ of the dsmoe-jax repository is the package "
            f"dsmoe_jax.{name}; import it under that name", name=name)
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds for the name once this __init__ ends.
    sys.modules[name] = module
    spec.loader.exec_module(module)
