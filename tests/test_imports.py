"""The package's imports, read with ast: they run one way (no cycles), and the library never
reaches into the training package."""

import ast
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Source directory -> the package it installs as (pyproject's package-dir).
PACKAGES = {"dsmoe_jax": "dsmoe_jax", "kernels": "dsmoe_jax.kernels", "train": "dsmoe_jax.train"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for directory, package in PACKAGES.items():
        for path in sorted((REPO / directory).rglob("*.py")):
            parts = list(path.relative_to(REPO / directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports, at any depth of its code (a function-level import
    is an import too); ``from pkg import x`` counts as importing ``pkg.x`` when that is a module."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found[found.index(found[-1]):]
    return None


def test_the_graph_sees_the_packages_modules():
    for name in ("dsmoe_jax.config", "dsmoe_jax.moe", "dsmoe_jax.kernels.backend", "dsmoe_jax.train.loop",
                 "dsmoe_jax.convert.pipeline"):
        assert name in MODULES, f"{name} missing from {sorted(MODULES)}"
    assert "dsmoe_jax.grouped" in GRAPH["dsmoe_jax.kernels.backend"], "relative and absolute imports both count"
    assert "dsmoe_jax.expert_parallel" in GRAPH["dsmoe_jax.moe"]


def test_the_triton_backend_is_registered_by_a_visible_import():
    """kernels/ builds on grouped.py and registers itself; grouped.py never loads it by name."""
    assert "dsmoe_jax.grouped" in GRAPH["dsmoe_jax.kernels"] and "dsmoe_jax.kernels" in GRAPH["dsmoe_jax"]
    assert "dsmoe_jax.kernels" not in MODULES["dsmoe_jax.grouped"].read_text(), "a by-name import hides an edge"
    from dsmoe_jax import grouped

    assert "triton" in grouped.available_backends()


def test_imports_have_no_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_would_be_found():
    knotted = {**GRAPH, "dsmoe_jax.mesh": GRAPH["dsmoe_jax.mesh"] | {"dsmoe_jax.moe"}}
    cycle = _cycle(knotted)
    assert cycle and cycle[0] == cycle[-1] and {"dsmoe_jax.mesh", "dsmoe_jax.moe"} <= set(cycle), cycle


APPLICATIONS = ("dsmoe_jax.train", "dsmoe_jax.experiments", "dsmoe_jax.cli")  # may use the training loop


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith(APPLICATIONS)))
def test_library_code_never_imports_the_training_package(name):
    training = sorted(m for m in GRAPH[name] if m.startswith("dsmoe_jax.train"))
    assert not training, f"{name} imports {training}: library code must not depend on dsmoe_jax.train"


def _readme_rows() -> list[set[str]]:
    """The modules of each row of README's "Where things are" table, top to bottom."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Where things are"):].split("\n## ")[0]
    rows = []
    for line in table.splitlines():
        cells = line.strip("|").split("|")
        if len(cells) != 2 or "`" not in cells[1]:
            continue
        names = set()
        for path in cells[1].replace("`", "").replace(",", " ").split():
            directory, _, rest = path.partition("/")
            if directory not in PACKAGES:
                continue
            prefix = ".".join([PACKAGES[directory], *rest.removesuffix(".py").strip("/").split("/")]).rstrip(".")
            if rest.endswith("/") or not rest:  # a folder: every module in it
                names |= {m for m in MODULES if m == prefix or m.startswith(prefix + ".")}
            else:
                names |= {prefix}
        if names:
            rows.append(names)
    return rows


def test_readme_map_covers_the_tree_and_its_order_is_the_import_order():
    rows = _readme_rows()
    row_of = {m: i for i, names in enumerate(rows) for m in names}
    assert set(MODULES) - {"dsmoe_jax"} <= set(row_of), f"not in README's map: {set(MODULES) - set(row_of)}"
    for name, imported in GRAPH.items():
        if name == "dsmoe_jax":  # the public API imports from everywhere
            continue
        later = sorted(m for m in imported if row_of[m] > row_of[name])
        assert not later, f"{name} imports {later}, listed below it in README's map"


def test_the_lower_layers_stay_low():
    assert GRAPH["dsmoe_jax.errors"] == set(), "errors is the root: it imports nothing of the project"
    assert GRAPH["dsmoe_jax.config"] == {"dsmoe_jax.errors"}, "config imports only the errors"
    assert GRAPH["dsmoe_jax.mesh"] == {"dsmoe_jax.config", "dsmoe_jax.errors"}, "mesh imports only config and errors"
    model_and_above = {"dsmoe_jax.model", "dsmoe_jax.sharding", "dsmoe_jax.checkpoint", "dsmoe_jax.inference"}
    for low in ("dsmoe_jax.layers", "dsmoe_jax.grouped", "dsmoe_jax.dispatch", "dsmoe_jax.expert_parallel",
                "dsmoe_jax.moe"):
        assert not GRAPH[low] & model_and_above, f"{low} imports {GRAPH[low] & model_and_above}"


def test_python_started_in_the_repository_root_imports_installed_packages_not_its_folders():
    """The root first on sys.path makes kernels/ look like Hugging Face's ``kernels``, which
    transformers' hub-kernels integration imports; the folder must hand the name over."""
    script = (
        "import kernels, transformers.integrations.hub_kernels, dsmoe_jax.kernels\n"
        "from kernels import CUDAProperties\n"
        "print(kernels.__file__)\n"
        "print(dsmoe_jax.kernels.triton_grouped_mlp.__module__)\n"
        "try:\n    import train\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_kernels, ours, train_error = proc.stdout.splitlines()
    assert not pathlib.Path(hf_kernels).is_relative_to(REPO / "kernels"), f"kernels came from kernels/: {hf_kernels}"
    assert ours == "dsmoe_jax.kernels.backend", ours
    assert "is the package dsmoe_jax.train" in train_error, train_error


def _install_without_editable_finder(env: pathlib.Path) -> pathlib.Path:
    """A virtual environment with the package copied in as ``pip install .`` lays it out (pyproject's
    package-dir) and this environment's packages reachable through a .pth line, which adds their
    folder but runs none of its .pth files: no editable install's finder. Returns its python."""
    venv.EnvBuilder(symlinks=True).create(env)
    site_dir = pathlib.Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    shutil.copytree(REPO / "dsmoe_jax", site_dir / "dsmoe_jax", ignore=shutil.ignore_patterns("__pycache__"))
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = site_dir.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    (site_dir / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env / "bin" / "python"


def test_a_non_editable_install_imports_in_the_repository_root(tmp_path):
    """Python started in the root finds the root's dsmoe_jax/ ahead of the installed copy, and that
    folder lacks kernels/, train/ and configs/; without an editable finder they must still load."""
    python = _install_without_editable_finder(tmp_path / "env")
    script = (
        "import importlib.util, kernels, transformers.integrations.hub_kernels, dsmoe_jax\n"
        "from kernels import CUDAProperties\n"
        "print(kernels.__file__)\n"
        "print(dsmoe_jax.kernels.__file__)\n"
        "print(importlib.util.find_spec('dsmoe_jax.train.loop').origin)\n"
        "print(dsmoe_jax.load_config('tiny').model.d_model)\n")
    proc = subprocess.run([python, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"importing in the root with a non-editable install:\n{proc.stderr[-3000:]}"
    hf_kernels, ours, loop, d_model = proc.stdout.splitlines()
    assert not pathlib.Path(hf_kernels).is_relative_to(REPO / "kernels"), f"kernels came from kernels/: {hf_kernels}"
    assert pathlib.Path(ours) == REPO / "kernels" / "__init__.py", f"dsmoe_jax.kernels from {ours}, not kernels/"
    assert pathlib.Path(loop) == REPO / "train" / "loop.py", f"dsmoe_jax.train.loop from {loop}, not train/"
    assert int(d_model) > 0, "the shipped configs load"
