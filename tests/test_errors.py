"""errors.py: one exit code per kind of error (the table README repeats), the old import paths of
the error classes, and OS errors (a full or read-only disk) reported as one line, not a traceback."""

import errno
import importlib
import inspect
import json
import pathlib
import re
import signal
import warnings

import grain
import numpy as np
import pytest

from dsmoe_jax import cli, errors
from dsmoe_jax.convert import pipeline
from helpers import TINY_HF, random_hf_checkpoint

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
KINDS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
         if issubclass(cls, errors.DsmoeError) and cls not in (errors.DsmoeError, errors.TrainingInterrupted)]
TRAIN = ["train", "--config", "tiny", "--quiet", *(a for s in (
    "model.n_layers=1", "train.steps=4", "train.batch_size=2", "train.seq_len=16", "train.eval_tokens=64",
    "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=100") for a in ("--set", s))]


def _one_line(err: str) -> str:
    """The one line of an error on stderr, besides any progress bar (lines drawn with \\r)."""
    lines = [line for line in err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("dsmoe-jax: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cls", KINDS, ids=lambda cls: cls.__name__)
def test_every_kind_of_error_exits_with_its_own_code(cls, monkeypatch, capsys):
    def fail(args):
        raise cls("the message")

    monkeypatch.setattr(cli, "_info", fail)
    assert cli.main(["info", "--config", "tiny"]) == cls.exit_code
    _one_line(capsys.readouterr().err)


def test_the_exit_codes_are_one_table_without_clashes_and_readme_lists_it():
    codes = {cls.__name__: cls.exit_code for cls in KINDS}
    usage = {"ConfigError", "InputError", "ExperimentError", "HarnessError"}
    assert {codes[name] for name in usage} == {2}, "every refusal of what the command asks is a usage error"
    assert codes["CheckpointError"] == codes["ConversionError"], "both: a checkpoint that cannot be used"
    others = [code for name, code in codes.items() if name not in usage | {"ConversionError"}]
    assert len(others) == len(set(others)) and 1 not in codes.values() and 2 not in others, codes
    assert errors.TrainingInterrupted("stopped", signal.SIGTERM).exit_code == 143

    rows = re.findall(r"^\| (\d+) \| (.*) \|$", README.read_text(), re.MULTILINE)
    listed = {name: int(code) for code, kind in rows for name in re.findall(r"`(\w+Error)`", kind)
              if hasattr(errors, name)}
    assert listed == codes, f"README's exit-code table {listed} differs from errors.py's {codes}"


@pytest.mark.parametrize("module, name", [
    ("dsmoe_jax.config", "ConfigError"), ("dsmoe_jax.config", "DsmoeError"), ("dsmoe_jax.data", "DataError"),
    ("dsmoe_jax.harness", "HarnessError"), ("dsmoe_jax.atomic", "OutputExistsError"),
    ("dsmoe_jax.convert.mapping", "ConversionError"), ("dsmoe_jax.train.loop", "TrainingError"),
    ("dsmoe_jax.train.loop", "TrainingInterrupted"), ("dsmoe_jax.train.loop", "DataError"),
])
def test_an_old_import_path_of_an_error_warns_and_gives_the_same_class(module, name):
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} moved to dsmoe_jax\.errors\.{name}; .* 0\.4"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(errors, name), f"{module}.{name} is another class than errors.{name}"


def test_the_old_import_statement_warns_where_it_is_written():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("from dsmoe_jax.config import ConfigError", "old_script.py", "exec"), {})
    assert [w.filename for w in caught if w.category is DeprecationWarning] == ["old_script.py"], \
        [(w.filename, str(w.message)) for w in caught]
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchError'"):
        importlib.import_module("dsmoe_jax.config").NoSuchError  # noqa: B018 - the lookup is the test


def test_os_errors_behind_other_errors_are_found():
    found = errors.os_error_in(ValueError("RESOURCE_EXHAUSTED: Failed writing: \"x\" [os_error_code='28']"))
    assert found.errno == errno.ENOSPC, "tensorstore (Orbax's writer) reports the OS's code in its message"
    assert errors.os_error_in(RuntimeError("I/O error: Read-only file system (os error 30)")).errno == errno.EROFS
    assert errors.os_error_in(OSError("692892 requested and 28608 written")).errno == errno.ENOSPC, "numpy's tofile"
    assert errors.os_error_in(ValueError("a value")) is None


def test_prepare_data_on_a_full_disk_is_one_line_naming_the_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "doc.txt").write_text("some text to prepare " * 20)

    def full(*args, **kwargs):  # what a write() on a full disk raises: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "data"
    assert cli.main(["prepare-data", str(tmp_path / "doc.txt"), "--out", str(out), "--quiet"]) == 8
    err = _one_line(capsys.readouterr().err)
    assert f"dsmoe-jax: prepare-data could not write: {out}: No space left on device — free space on that disk, " \
           "or point --out at another disk" in err, err


def _hf(directory: pathlib.Path) -> pathlib.Path:
    from dsmoe_jax import convert
    from dsmoe_jax.convert.hf_files import plan_shards, write_safetensors

    tensors = random_hf_checkpoint(convert.config_from_hf(TINY_HF))
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_HF))
    write_safetensors(iter(tensors.items()), plan_shards(((n, a.shape, a.dtype) for n, a in tensors.items()),
                                                         1 << 20), directory)
    return directory


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):  # as tensorstore, Orbax's writer, fails on a full disk
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "embed_VD/0" in OCDBT database: Failed to write 716800 '
                         "bytes to file 12: No space left on device [os_error_code='28']")

    monkeypatch.setattr(pipeline.ocp_v1.partial, "save", full)
    hf, out = _hf(tmp_path / "hf"), tmp_path / "out"
    assert cli.main(["convert", "hf-to-jax", str(hf), str(out)]) == 8
    err = _one_line(capsys.readouterr().err)
    assert f"convert could not write: {out}: No space left on device — free space on that disk, or point OUT at " \
           "another disk" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "no output, temporary or lock is left"


def test_convert_to_a_read_only_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    # chmod 0o555 would not stop root: the write fails as the kernel would fail it on a read-only mount
    def read_only(directory, cfg):
        raise OSError(errno.EROFS, "Read-only file system", str(directory / "config.json"))

    monkeypatch.setattr(pipeline, "write_config", read_only)
    hf, out = _hf(tmp_path / "hf"), tmp_path / "out"
    assert cli.main(["convert", "hf-to-jax", str(hf), str(out)]) == 8
    err = _one_line(capsys.readouterr().err)
    assert re.search(rf"convert could not write: {re.escape(str(tmp_path))}/\.out\.partial-[^:]+/config\.json: "
                     "Read-only file system — that disk is read-only: point OUT at a writable disk$", err.strip()), err


def test_training_on_a_full_disk_names_the_last_intact_checkpoint_and_resumes_from_it(tmp_path, monkeypatch,
                                                                                      capsys):
    save = grain.checkpoint.CheckpointHandler.save

    def full_at_step_4(self, directory, *args, **kwargs):  # the data iterator's part of checkpoint step 4
        if directory.parent.name.startswith("4."):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "process_0-of-1.json"))
        return save(self, directory, *args, **kwargs)

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full_at_step_4)
    workdir = tmp_path / "run"
    assert cli.main([*TRAIN, "--workdir", str(workdir)]) == 8
    err = _one_line(capsys.readouterr().err)
    assert f"dsmoe-jax: train (checkpoint step 4) could not write: {workdir}/checkpoints/4." in err, err
    assert "No space left on device — free space on that disk, or point --workdir at another disk; the last " \
           "intact checkpoint is step 2: rerun with --resume" in err, err

    monkeypatch.undo()  # space freed
    assert cli.main([*TRAIN, "--workdir", str(workdir), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], f"resumed after step 2, each step logged once: {steps}"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
