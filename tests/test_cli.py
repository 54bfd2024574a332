"""The ``dsmoe-jax`` command line."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import Config, cli, errors, load_config, loading
from helpers import TINY_HF


def test_info_prints_architecture_and_counts(capsys):
    assert cli.main(["info", "--config", "16b"]) == 0
    out = capsys.readouterr().out
    assert "16,375,728,128 total" in out
    assert "2 shared + 64 routed experts of width 1408, top-6" in out
    assert "GFLOP forward" in out
    assert "on cpu       grouped MLP backend tiled, attention blocked (xla over a KV cache)" in out, out


def test_info_says_when_weights_or_gemms_are_fp8(capsys):
    assert cli.main(["info", "--config", "tiny", "--set", "model.fp8=true"]) == 0
    out = capsys.readouterr().out
    assert "FP8 GEMMs (e4m3, 1x128 and 128x128 scales)" in out and "grouped MLP backend tiled_fp8" in out, out
    assert cli.main(["info", "--config", "deepseek-v3", "--set", "model.fp8_weights=true"]) == 0
    assert "projections and experts held in FP8 (e4m3, 128x128 block scales)" in capsys.readouterr().out


def test_info_override_changes_the_count(capsys):
    assert cli.main(["info", "--config", "16b", "--set", "model.n_layers=2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("16b", ["model.n_layers=2"])
    assert (info["params_total"], info["params_activated"]) == dsmoe_jax.count_params(cfg.model), info
    assert info["flops_per_token_forward"] == dsmoe_jax.flops_per_token(cfg.model, cfg.train.seq_len), info
    assert (info["n_layers"], info["n_moe_layers"]) == (2, 1), info


def test_info_and_plan_give_top_p_routing_at_its_cap_and_at_a_measured_mean(capsys):
    """At most max_experts routed experts, the expected counts at --experts-per-token beside them
    (the 15 x 3 x 128 x 128 expert weights of each MoE layer, 1.5 fewer experts than the cap of 4)."""
    top_p = ["--config", "tiny", "--set", "moe.routing=top_p", "--set", "moe.max_experts=4"]
    assert cli.main(["info", *top_p, "--experts-per-token", "2.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("tiny", ["moe.routing=top_p", "moe.max_experts=4"])
    per_expert = cfg.model.n_moe_layers * 3 * cfg.model.d_model * cfg.model.moe.expert_d_ff
    assert info["params_activated"] - info["params_activated_expected"] == int(1.5 * per_expert), info
    assert info["flops_per_token_forward_expected"] < info["flops_per_token_forward"], info
    assert cli.main(["plan", *top_p, "--mesh", "data=8", "--experts-per-token", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "at most" in out and "at 2.5 routed experts per token" in out, out
    assert cli.main(["info", "--config", "tiny", "--experts-per-token", "2"]) == 2
    assert "other routings take a fixed number" in capsys.readouterr().err


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
    assert cli.main(["eval", "--checkpoint", workdir, "--tokens", "128", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model = loading.load_model(workdir)
    expected = dsmoe_jax.evaluate(model.params, model.cfg, loading.validation_tokens(model.cfg), max_tokens=128)
    assert printed == {"loss": expected.loss, "stderr": expected.stderr, "perplexity": expected.perplexity,
                       "tokens": expected.tokens, "windows": expected.windows, "seq_len": 32}, printed
    assert cli.main(["generate", "--checkpoint", workdir, "--prompt", "import os", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os") and len(out.rstrip("\n")) > len("import os"), out
    assert cli.main(["train", "--config", "tiny", "--workdir", workdir, "--set", "model.n_layers=2"]) == \
        errors.CheckpointError.exit_code
    assert "pass --resume" in capsys.readouterr().err


def test_eval_and_generate_on_a_hugging_face_folder_name_the_convert_command(tmp_path, capsys):
    hf = tmp_path / "deepseek-moe-16b-base"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(TINY_HF))
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    for command in (["generate", "--checkpoint", str(hf), "--prompt", "hi"], ["eval", "--checkpoint", str(hf)]):
        assert cli.main(command) == errors.CheckpointError.exit_code
        err = capsys.readouterr().err
        assert "is a Hugging Face checkpoint (model_type 'deepseek')" in err, err
        assert f"`dsmoe-jax convert hf-to-jax {hf} OUT`, then use OUT" in err and "Traceback" not in err, err


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """``make(cfg)``: a checkpoint directory whose loading returns ``cfg`` and its fresh params
    (``load_checkpoint`` stubbed: these tests are about the checks before anything runs)."""

    def make(cfg):
        params = dsmoe_jax.init_params(cfg, jax.random.key(0))
        monkeypatch.setattr(loading, "load_checkpoint", lambda directory, step=None: (params, cfg))
        return str(tmp_path)

    return make


def test_generate_refuses_the_byte_tokenizer_for_a_smaller_vocabulary(checkpoint, small_cfg, capsys):
    ckpt = checkpoint(Config(model=small_cfg))  # vocab 97, no tokenizer.json: bytes would be out of range
    assert cli.main(["generate", "--checkpoint", ckpt, "--prompt", "hi"]) == errors.DataError.exit_code
    out, err = capsys.readouterr()
    assert not out
    assert err.startswith(f"dsmoe-jax: {ckpt} has no tokenizer.json and its config names the byte tokenizer"), err
    assert f"copy the tokenizer.json the model was trained with into {ckpt}" in err and err.count("\n") == 1, err


def test_generate_speculative_prints_the_text_and_the_drafts_acceptance(checkpoint, capsys):
    ckpt = checkpoint(load_config("tiny", ["model.n_layers=1", "model.mtp_depth=1"]))
    command = ["generate", "--checkpoint", ckpt, "--prompt", "def ", "--max-new-tokens", "6", "--speculative", "mtp"]
    assert cli.main(command + ["--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def "), out
    assert re.fullmatch(r"speculative \(mtp\): \d+ tokens in \d+ passes of the model, \d+ of \d+ drafts accepted "
                        r"\(\d+%\), [\d.]+ tokens per pass\n", err), err
    assert cli.main(command) == 2, "the default temperature samples"
    assert "--speculative mtp decodes greedily; add --temperature 0" in capsys.readouterr().err
    for option, said in ((["--top-k", "-3"], "--top-k -3"), (["--top-p", "7"], "--top-p 7.0")):  # greedy ignores them
        assert cli.main(command + ["--temperature", "0", *option]) == 2
        assert f"so {said} would be ignored; leave them out" in capsys.readouterr().err
    ckpt = checkpoint(load_config("tiny", ["model.n_layers=1"]))
    assert cli.main(command + ["--temperature", "0"]) == 2
    assert "needs model.mtp_depth >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--top-k", "-2"], "top_k must be an integer from 0 to the vocabulary size 512"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--max-new-tokens", "600"], "more than model.max_seq_len 512; lower max_new_tokens to at most"),
])
def test_generate_refuses_bad_options_in_one_line(checkpoint, capsys, option, message):
    ckpt = checkpoint(load_config("tiny", ["model.n_layers=1"]))
    assert cli.main(["generate", "--checkpoint", ckpt, "--prompt", "hi", *option]) == 2
    out, err = capsys.readouterr()
    assert not out, "nothing is printed before the options are checked"
    assert err.startswith("dsmoe-jax: stream: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("array, message", [
    (np.array([1.0, 2.0]), "holds float64 values, but token ids are integers; save them with an integer dtype"),
    (np.array([1, -3, 2]), "holds token id -3 < 0, but ids lie in [0, 512); tokenize the data with the tokenizer "
                           "the model in"),
])
def test_eval_refuses_bad_token_files(checkpoint, tmp_path, capsys, array, message):
    ckpt = checkpoint(load_config("tiny", ["model.n_layers=1"]))
    np.save(tmp_path / "tokens.npy", array)
    code = cli.main(["eval", "--checkpoint", ckpt, "--data", str(tmp_path / "tokens.npy")])
    assert code == errors.DataError.exit_code, code
    err = capsys.readouterr().err
    assert f"tokens.npy {message}" in err and err.count("\n") == 1, err


def test_eval_asks_for_the_checkpoint_tokenizer_not_a_larger_vocabulary(checkpoint, small_cfg, capsys):
    ckpt = checkpoint(Config(model=small_cfg))
    assert cli.main(["eval", "--checkpoint", ckpt]) == errors.DataError.exit_code
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "copy the tokenizer.json the model was trained with" in err, err
    assert "raise model.vocab_size" not in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "CKPT", "--tasks", ""], "--tasks '' names no task: e.g. --tasks hellaswag,piqa"),
    (["eval", "--checkpoint", "CKPT", "--tasks", " , "], "--tasks ' , ' names no task"),
    (["eval", "--checkpoint", "CKPT", "--tokens", "-5"], "--tokens -5: must be >= 1"),
    (["experiment", "architectures", "--scale", "toy", "--seeds", "0,1,0"], "--seeds '0,1,0' repeats seed 0"),
    (["experiment", "architectures", "--scale", "toy", "--dry-run", "--mesh", "data=3,expert=x"],
     "--mesh 'data=3,expert=x': expected AXIS=SIZE pairs"),
    (["experiment", "architectures", "--scale", "toy", "--seeds", "0,0", "--dry-run"], "--seeds '0,0' repeats seed 0"),
    (["experiment", "architectures", "--scale", "toy", "--mesh", "data=8"], "--mesh plans the arms on a device mesh "
                                                                             "and needs --dry-run"),
])
def test_flags_that_would_be_taken_silently_are_refused_once(checkpoint, tmp_path, capsys, argv, message):
    ckpt = checkpoint(load_config("tiny", ["model.n_layers=1"]))
    argv = [ckpt if a == "CKPT" else a for a in argv]
    assert cli.main([*argv, *(["--workdir", str(tmp_path / "runs")] if argv[0] == "experiment" else [])]) == 2
    out, err = capsys.readouterr()
    assert err.count(message) == 1 and err.count("\n") == 1, err
    assert "loss" not in out and "total" not in out, "nothing ran"
    assert not (tmp_path / "runs").exists(), "no experiment was started"
