"""One writer per output directory: a live holder refuses a second writer, a stale lock is taken
over, a finished writer leaves no lock; training, prepare-data and convert take it."""

import json
import os
import subprocess
import sys

import pytest

from dsmoe_jax import cli, convert, load_config, prepare
from dsmoe_jax.errors import OutputLockedError
from dsmoe_jax.lock import LOCK_FILE, acquire, lock_path, output_lock
from dsmoe_jax.train.loop import train


def test_a_held_lock_refuses_a_second_writer_and_is_gone_after(tmp_path):
    with output_lock(tmp_path / "out", "the first writer"):
        holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "the first writer", holder
        with pytest.raises(OutputLockedError, match=rf"out is in use by process {os.getpid()} on .* \(the first "
                                                    r"writer, started .*\): one writer per directory"):
            acquire(tmp_path / "out", "a second writer")
    assert not (tmp_path / "out" / LOCK_FILE).exists(), "released when the block ends"


def test_a_stale_lock_is_said_and_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid,
                                                        "started": "earlier", "what": "a killed run"}))
    with output_lock(tmp_path, "the new run"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"a stale lock of process {gone.pid} (a killed run, started earlier), which is gone; taking it over" in \
        capsys.readouterr().err


def test_a_lock_of_another_host_is_refused_with_the_way_out(tmp_path):
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "today",
                                                        "what": "a training run"}))
    with pytest.raises(OutputLockedError, match=rf"process 4242 on node-17 .*if that process is gone, remove "
                                                rf".*{LOCK_FILE}"):
        acquire(tmp_path, "a training run")


def test_training_and_prepare_data_take_the_lock(tmp_path):
    cfg = load_config("tiny", ["model.n_layers=1", "train.steps=1", "train.batch_size=2", "train.seq_len=16",
                               "train.eval_tokens=64"])
    with output_lock(tmp_path / "run", "a run still going"):
        with pytest.raises(OutputLockedError, match="in use by process"):
            train(cfg, tmp_path / "run", progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE], "the second run wrote nothing"
    train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / LOCK_FILE).exists(), "a finished run leaves no lock"

    (tmp_path / "doc.txt").write_text("some text to prepare " * 20)
    with output_lock(tmp_path / "data", "prepare-data"):
        with pytest.raises(OutputLockedError, match="in use by process"):
            prepare.prepare([str(tmp_path / "doc.txt")], tmp_path / "data", workers=1, progress=False)
    prepare.prepare([str(tmp_path / "doc.txt")], tmp_path / "data", workers=1, progress=False)
    assert not (tmp_path / "data" / LOCK_FILE).exists()


def test_a_second_convert_into_a_locked_output_is_refused_with_one_line(tmp_path, capsys):
    """A convert output appears only when complete, so its lock lies beside it: ``.OUT.dsmoe-jax.lock``."""
    train(load_config("tiny", ["model.n_layers=1", "train.steps=1", "train.batch_size=2", "train.seq_len=16",
                               "train.eval_tokens=64"]), tmp_path / "run", progress=False)
    out = tmp_path / "hf"
    with output_lock(out, "convert jax-to-hf", beside=True):
        assert lock_path(out, beside=True) == tmp_path / f".hf{LOCK_FILE}" and not out.exists()
        assert cli.main(["convert", "jax-to-hf", str(tmp_path / "run"), str(out)]) == OutputLockedError.exit_code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"dsmoe-jax: {out} is in use by process {os.getpid()}" in err, err
        assert "(convert jax-to-hf, started" in err and not out.exists(), "the second conversion wrote nothing"
    convert.jax_to_hf(tmp_path / "run", out, progress=False)
    assert (out / "config.json").is_file() and not lock_path(out, beside=True).exists(), "no lock is left"
