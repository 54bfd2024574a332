""".ci/latest's choices, through its --dry-run: which Python makes the venv, and whether a passing
run may rewrite constraints.txt (only a full run on Python 3.11). Stand-in interpreters print a
version, so nothing is installed."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None or os.name != "posix", reason="needs bash")


def _python(bin_dir: pathlib.Path, name: str, version: str) -> pathlib.Path:
    """A stand-in interpreter that prints ``version`` whatever it is asked."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def _latest(tmp_path: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``.ci/latest args`` with PATH holding only tmp_path/bin and the tools it needs (no pip, no python3)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "sed"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), **env}
    return subprocess.run([BASH, ".ci/latest", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)


def test_a_full_run_on_python_311_may_rewrite_the_constraints(tmp_path):
    _python(tmp_path / "bin", "python3.11", "3.11")
    before = (REPO / "constraints.txt").read_bytes()
    proc = _latest(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["python: python3.11 (Python 3.11)",
                                        "constraints.txt: rewritten if the tests pass"], proc.stdout
    assert (REPO / "constraints.txt").read_bytes() == before, "a dry run must leave constraints.txt alone"


@pytest.mark.parametrize("args", [("-k", "moe"), ("--co",), ("tests/test_moe.py",), ("-x",)])
def test_pytest_arguments_never_rewrite_the_constraints(tmp_path, args):
    _python(tmp_path / "bin", "python3.11", "3.11")
    proc = _latest(tmp_path, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"not rewritten: pytest arguments ({' '.join(args)}) make a partial run" in proc.stdout, proc.stdout


def test_pytest_addopts_never_rewrite_the_constraints(tmp_path):
    _python(tmp_path / "bin", "python3.11", "3.11")
    proc = _latest(tmp_path, "--dry-run", PYTEST_ADDOPTS="-k moe")
    assert "not rewritten: PYTEST_ADDOPTS (-k moe)" in proc.stdout, proc.stdout


def test_python3_on_the_path_is_never_taken(tmp_path):
    _python(tmp_path / "bin", "python3", "3.12")
    proc = _latest(tmp_path, "--dry-run")
    assert proc.returncode == 2, f"ran without python3.11 or PYTHON: {proc.stdout}"
    assert "python3.11 not found: install Python 3.11 or set PYTHON" in proc.stderr, proc.stderr


def test_python_names_the_interpreter_and_another_version_keeps_the_constraints(tmp_path):
    _python(tmp_path / "bin", "python3.11", "3.11")
    other = _python(tmp_path / "elsewhere", "python", "3.12")
    proc = _latest(tmp_path, "--dry-run", PYTHON=str(other))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"python: {other} (Python 3.12)",
        f"constraints.txt: not rewritten: {other} is Python 3.12, and constraints.txt is for 3.11"], proc.stdout


def test_an_interpreter_that_does_not_run_is_refused(tmp_path):
    broken = tmp_path / "python3.11"
    broken.write_text("#!/bin/sh\nexit 127\n")
    broken.chmod(0o755)
    proc = _latest(tmp_path, "--dry-run", PYTHON=str(broken))
    assert proc.returncode == 2 and "does not run" in proc.stderr, (proc.returncode, proc.stderr)


def test_help_shows_the_usage(tmp_path):
    proc = _latest(tmp_path, "--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "PYTHON" in proc.stdout, proc.stdout
