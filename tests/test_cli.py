"""The ``dsmoe-jax`` command line."""

import pathlib
import subprocess
import sys

from dsmoe_jax import cli


def test_info_prints_architecture_and_counts(capsys):
    assert cli.main(["info", "--config", "16b"]) == 0
    out = capsys.readouterr().out
    assert "16,375,728,128 total" in out
    assert "2 shared + 64 routed experts of width 1408, top-6" in out
    assert "GFLOP forward" in out
    assert "on cpu       grouped MLP backend tiled, attention blocked (xla over a KV cache)" in out, out


def test_info_override_changes_the_count(capsys):
    cli.main(["info", "--config", "16b", "--set", "model.n_layers=2"])
    assert "16,375,728,128" not in capsys.readouterr().out


def test_config_errors_exit_2_with_the_message(capsys):
    assert cli.main(["info", "--config", "tiny", "--set", "moe.top_kk=2"]) == 2
    assert "unknown key moe.top_kk" in capsys.readouterr().err


def test_console_script_is_installed():
    script = pathlib.Path(sys.executable).parent / "dsmoe-jax"
    assert script.is_file(), f"pip install -e . should put the dsmoe-jax script beside {sys.executable}"
    out = subprocess.run([script, "info", "--config", "tiny"], capture_output=True, text=True, check=True).stdout
    assert "parameters" in out


def test_train_eval_generate_round_trip(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    sets = ["train.steps=3", "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=3",
            "train.eval_every=3", "model.n_layers=2"]
    assert cli.main(["train", "--config", "tiny", "--workdir", workdir] + [a for s in sets for a in ("--set", s)]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", workdir, "--tokens", "128"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["generate", "--checkpoint", workdir, "--prompt", "import os", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os") and len(out.rstrip("\n")) > len("import os"), out
    assert cli.main(["train", "--config", "tiny", "--workdir", workdir, "--set", "model.n_layers=2"]) == 1
    assert "pass --resume" in capsys.readouterr().err
