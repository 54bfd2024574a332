"""Atomic writes: the destination holds the old content or the new, never a torn mix."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from dsmoe_jax.atomic import atomic_directory, atomic_file
from dsmoe_jax.errors import OutputExistsError


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_file_replaces_only_when_the_write_succeeds(tmp_path):
    target = tmp_path / "sub" / "config.json"
    with atomic_file(target) as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_file(target) as f:
            f.write("half of the sec")
            raise RuntimeError("crash")
    assert target.read_text() == "first", "a failed write must leave the old content"
    assert _leftovers(target.parent) == [], "no temporary file may stay behind"
    with atomic_file(target, "wb") as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a").write_text("a")
            raise RuntimeError("crash")
    assert not out.exists() and _leftovers(tmp_path) == []
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a" and _leftovers(tmp_path) == []
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_directory(out):
            pass
    assert (out / "a").read_text() == "a", "an existing output is never touched"


KILLED_MIDWAY = """
import os, signal, sys
from dsmoe_jax.atomic import atomic_directory, atomic_file
with atomic_directory(sys.argv[1] + "/out") as tmp, atomic_file(sys.argv[1] + "/config.json") as f:
    (tmp / "params").write_text("half")
    f.write("half")
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finally block runs: the temporaries stay
"""


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write_to_that_output(tmp_path, capsys):
    killed = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    pid = int(killed.stdout)
    stale = _leftovers(tmp_path)
    assert len(stale) == 2 and all(str(pid) in name for name in stale), stale
    # a leftover of another output, even a stale one, is not this write's to remove
    other = tmp_path / f".other.partial-{socket.gethostname()}-{pid}-abcdefgh"
    other.mkdir()

    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "params").write_text("whole")
    assert (tmp_path / "out" / "params").read_text() == "whole"
    with atomic_file(tmp_path / "config.json") as f:
        f.write("whole")
    assert _leftovers(tmp_path) == [other.name]
    err = capsys.readouterr().err
    assert err.count(f"(process {pid} is gone)") == 2 and f"removed {tmp_path}/.out.partial-" in err, err


def test_leftovers_that_may_still_be_in_use_are_kept_and_named(tmp_path, capsys):
    host = socket.gethostname()
    maybe_live = [f".out.partial-{host}-{os.getpid()}-abcdefgh",  # a running process
                  ".out.partial-otherhost-1234-abcdefgh",  # its processes cannot be checked from here
                  ".out.partial-abcdefgh"]  # no pid recorded
    for name in maybe_live:
        (tmp_path / name).mkdir()
    with atomic_directory(tmp_path / "out"):
        pass
    assert _leftovers(tmp_path) == sorted(maybe_live)
    err = capsys.readouterr().err
    for name in maybe_live:
        assert f"{tmp_path / name} is the unfinished output of another write" in err, err
    assert "process 1234 on otherhost" in err and "delete it once no write to the same output is running" in err
