"""Atomic writes: the destination holds the old content or the new, never a torn mix."""

import pytest

from dsmoe_jax.atomic import OutputExistsError, atomic_directory, atomic_file


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
