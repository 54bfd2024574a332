"""Keeps the repository's top-level source folders from shadowing installed packages.

``kernels/``, ``train/`` and ``configs/`` are installed as ``dsmoe_jax.kernels``,
``dsmoe_jax.train`` and ``dsmoe_jax.configs``. A Python started in the repository root (``python
-m pytest``, ``python -c``, a notebook) puts the root first on ``sys.path``, where each folder also
looks like a top-level package: ``import kernels`` would then load this project's kernels instead
of Hugging Face's ``kernels`` package, which transformers imports. Each folder's ``__init__`` calls
:func:`defer_to_installed` when it is imported under its bare name, and that import gets the
installed package of the name instead (or a clear error when there is none).

The same Python also finds ``dsmoe_jax`` itself in the root, ahead of any installed copy, and that
folder lacks the three subpackages an install puts inside it. An editable install's finder maps
them back; a non-editable one has none, so :data:`FINDER` does (``dsmoe_jax/__init__`` imports this
module first), and ``from dsmoe_jax import kernels`` loads ``kernels/`` as in an editable install.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

FOLDERS = ("kernels", "train", "configs")  # pyproject's package-dir: installed as dsmoe_jax.<folder>


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


class SourceFolders(importlib.abc.MetaPathFinder):
    """Finds ``dsmoe_jax.kernels``, ``.train`` and ``.configs`` in the top-level folders of the
    checkout ``root``, as pyproject's package-dir installs them."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.partition(".")
        if parent != "dsmoe_jax" or name not in FOLDERS:
            return None
        folder = os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def _source_folders() -> SourceFolders | None:
    """The finder for the checkout this package was imported from; None for an installed package,
    which holds the subpackages itself."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    if os.path.isdir(os.path.join(package, "kernels")):
        return None
    if not all(os.path.isfile(os.path.join(root, name, "__init__.py")) for name in FOLDERS):
        return None
    for finder in sys.meta_path:  # this module imported again (importlib.reload)
        if isinstance(finder, SourceFolders) and finder.root == root:
            return finder
    finder = SourceFolders(root)
    # Last: an editable install's finder, ahead of it, maps the same names to the same folders.
    sys.meta_path.append(finder)
    return finder


FINDER = _source_folders()
