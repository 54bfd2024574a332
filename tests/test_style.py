"""The code passes the linter configured in pyproject.toml ([tool.ruff]): pyflakes, pycodestyle
(120 columns), import order, pyupgrade and bugbear."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(REPO)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check (fix: ruff check --fix .):\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
