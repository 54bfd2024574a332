"""Whole-checkpoint conversion through files: HF directories (sharded safetensors, .bin shards)
-> Orbax -> HF, the CLI, errors that leave nothing behind, peak memory, loading onto a mesh."""

import json
import pathlib
import re
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import run_python

import dsmoe_jax
from dsmoe_jax import ConfigError, cli, convert, errors
from dsmoe_jax.convert.hf_files import plan_shards, write_safetensors
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint, tiny_tokenizer


def _write_hf(directory: pathlib.Path, tensors: dict, hf_config: dict = TINY_HF, shard_bytes: int = 20_000):
    """An HF checkpoint directory as released: config.json, sharded safetensors and their index."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    shards = plan_shards(((n, a.shape, a.dtype) for n, a in tensors.items()), shard_bytes)
    write_safetensors(iter(tensors.items()), shards, directory)
    return directory


def _assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, f"{jax.tree_util.keystr(path)}: {x.dtype} vs {y.dtype}"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_bf16_sharded_safetensors_round_trip_bit_exact_through_the_cli(tmp_path, capsys):
    cfg = convert.config_from_hf(TINY_HF)
    tensors = {n: a.astype(ml_dtypes.bfloat16) for n, a in random_hf_checkpoint(cfg, seed=3).items()}
    hf_cfg = {**TINY_HF, "torch_dtype": "bfloat16"}
    hf = _write_hf(tmp_path / "hf", tensors, hf_cfg)
    tiny_tokenizer(hf / "tokenizer.json")
    assert len(list(hf.glob("model-*.safetensors"))) > 3, "the source must be multi-shard"

    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "jax")]) == 0
    params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    assert loaded.model.param_dtype == "bfloat16", "the default dtype is the checkpoint's torch_dtype"
    _assert_params_equal(params, convert.params_from_hf(tensors.__getitem__, tensors.__contains__, loaded.model))
    assert (tmp_path / "jax" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()

    assert cli.main(["convert", "jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "back"),
                     "--max-shard-gb", "0.00003"]) == 0
    back = convert.HFCheckpoint(tmp_path / "back")
    assert sorted(back.names()) == sorted(tensors), "exactly the released tensor names"
    for name, array in tensors.items():
        got = back.read(name)
        assert got.dtype == array.dtype, name
        np.testing.assert_array_equal(got.view(np.uint16), array.view(np.uint16), err_msg=name)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert convert.config_from_hf(back.config) == convert.config_from_hf(hf_cfg) == loaded.model
    assert back.config["bos_token_id"] == 100, "fields we do not model come back from the source config"

    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "jax"), "--prompt", "the cat",
                     "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_pytorch_bin_shards_convert_and_match_an_independent_pytorch_model(tmp_path):
    cfg = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(cfg, seed=4)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(TINY_HF))
    names = list(tensors)
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        filename = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: torch.from_numpy(tensors[n]) for n in chunk}, hf / filename)
        weight_map.update(dict.fromkeys(chunk, filename))
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    convert.hf_to_jax(hf, tmp_path / "jax", progress=False)
    params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    assert loaded.model.param_dtype == "float32"
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12))
    ours, _ = dsmoe_jax.forward(params, tokens, loaded.model)
    with torch.no_grad():
        ref = qwen2moe_oracle(tensors, TINY_HF)(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4, np.abs(np.asarray(ours) - ref).max()


def _leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out"))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("model.layers.2.mlp.experts.7.down_proj.weight"),
     "1 tensors the config needs are missing \\(model.layers.2.mlp.experts.7.down_proj.weight\\)"),
    (lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": np.zeros((16, 32), np.float32)}),
     "1 tensors are not part of this model \\(model.layers.1.mlp.experts.8.up_proj.weight\\)"),
    # found only after earlier arrays were written: the partial output must vanish
    (lambda t: t.update({"model.layers.2.mlp.shared_experts.down_proj.weight": np.zeros((32, 16), np.float32)}),
     "model.layers.2.mlp.shared_experts.down_proj.weight has shape \\(32, 16\\), the config needs \\(32, 32\\)"),
])
def test_a_bad_checkpoint_is_named_and_leaves_no_output(tmp_path, damage, message):
    cfg = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(cfg)
    damage(tensors)
    hf = _write_hf(tmp_path / "hf", tensors)
    with pytest.raises(convert.ConversionError, match=message):
        convert.hf_to_jax(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_existing_output_and_unsupported_models_are_refused(tmp_path, capsys):
    cfg = convert.config_from_hf(TINY_HF)
    hf = _write_hf(tmp_path / "hf", random_hf_checkpoint(cfg))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "out")]) == errors.OutputExistsError.exit_code
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and not _leftovers(tmp_path)

    (hf / "config.json").write_text(json.dumps({**TINY_HF, "model_type": "mixtral"}))
    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "mixtral")]) == 2
    assert "unsupported model_type 'mixtral'" in capsys.readouterr().err and not (tmp_path / "mixtral").exists()
    (hf / "config.json").write_text(json.dumps({**TINY_HF, "model_type": "deepseek_v3"}))  # a v1 file relabelled
    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "v3")]) == 2
    assert "scoring_func = 'softmax' is not supported by deepseek_v3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no HF DeepSeek format"):
        convert.config_to_hf(dsmoe_jax.load_config("hash-2b").model)


def _truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def _bin_shards(hf: pathlib.Path) -> None:
    """Replace the safetensors of ``hf`` by two PyTorch .bin shards and their index."""
    source = convert.HFCheckpoint(hf)
    names = source.names()
    weight_map = {}
    for i, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        torch.save({n: torch.from_numpy(source.read(n)) for n in chunk}, hf / f"pytorch_model-{i + 1:05d}-of-00002.bin")
        weight_map.update(dict.fromkeys(chunk, f"pytorch_model-{i + 1:05d}-of-00002.bin"))
    for f in [*hf.glob("*.safetensors"), hf / "model.safetensors.index.json"]:
        f.unlink()
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("damage, message", [
    (lambda hf: _truncate(hf / "model-00003-of-00014.safetensors"),
     r"hf/model-00003-of-00014.safetensors is damaged or truncated \(.*\): an interrupted download\? Download it "
     "again"),
    (lambda hf: _truncate(hf / "model.safetensors.index.json"),
     r"hf/model.safetensors.index.json \(the index of the weight shards\) is not valid JSON \(.*\); download it "
     "again"),
    (lambda hf: (hf / "model.safetensors.index.json").write_text("{}"),
     "hf/model.safetensors.index.json has no valid weight_map .*; download it again"),
    (lambda hf: (hf / "model-00002-of-00014.safetensors").unlink(),
     "lists shards that are not in .*hf: model-00002-of-00014.safetensors; download them"),
    (lambda hf: _truncate(hf / "config.json"),
     r"hf/config.json \(the model's config\) is not valid JSON \(.*\); download it again"),
    (lambda hf: (hf / "config.json").write_text(json.dumps({k: v for k, v in TINY_HF.items() if k != "hidden_size"})),
     "hf/config.json is damaged: KeyError 'hidden_size' reading it; download it again"),
    (lambda hf: (hf / "config.json").unlink(),
     "hf has no config.json: not an HF checkpoint directory; pass the directory that holds config.json"),
    # found only when that shard is read, after earlier arrays were written
    (lambda hf: (_bin_shards(hf), _truncate(hf / "pytorch_model-00002-of-00002.bin", 0.9)),
     r"hf/pytorch_model-00002-of-00002.bin is damaged or truncated \(.*\): an interrupted download\?"),
])
def test_damaged_hf_files_are_named_with_the_fix_and_leave_no_output(tmp_path, capsys, damage, message):
    hf = _write_hf(tmp_path / "hf", random_hf_checkpoint(convert.config_from_hf(TINY_HF)))
    assert len(list(hf.glob("model-*-of-00014.safetensors"))) == 14
    damage(hf)
    assert cli.main(["convert", "hf-to-jax", str(hf), str(tmp_path / "out")]) == errors.ConversionError.exit_code
    err = capsys.readouterr().err
    assert re.search(message, err.splitlines()[-1]) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_training_workdir_exports_to_hf_and_back(tmp_path, small_cfg, scan_layers):
    """A run in either params layout exports to HF; importing gives the unrolled layout (HF's),
    equal tensor for tensor."""
    import dataclasses

    from dsmoe_jax import Config, data
    from dsmoe_jax.checkpoint import write_config
    from dsmoe_jax.train.checkpoint import Checkpointer
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import init_state

    small_cfg = dataclasses.replace(small_cfg, scan_layers=scan_layers)
    cfg = Config(model=small_cfg)
    state = init_state(dsmoe_jax.init_params(small_cfg, jax.random.key(0)), make_optimizer(cfg.train))
    write_config(tmp_path / "run", cfg)
    ckpt = Checkpointer(tmp_path / "run", cfg)
    ckpt.save(7, state, iter(data.batches(np.arange(500) % 97, batch_size=2, seq_len=8, seed=0)))
    ckpt.wait()
    convert.jax_to_hf(tmp_path / "run", tmp_path / "hf", step=7, progress=False)
    assert (tmp_path / "hf" / "model.safetensors").is_file(), "a small model is one unsharded file"
    convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
    params, imported = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    assert not imported.model.scan_layers, "HF checkpoints import in the unrolled layout"
    _assert_params_equal(params, dsmoe_jax.match_layout(state.params, imported))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from dsmoe_jax import convert
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    convert.hf_to_jax(sys.argv[1], sys.argv[3], progress=False)  # warm up jax, Orbax and tensorstore
    before = peak()
    convert.hf_to_jax(sys.argv[2], sys.argv[4], progress=False)
    print(json.dumps({"before": before, "after": peak()}))
""")


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_peak_memory_is_a_small_multiple_of_the_largest_array(tmp_path):
    hf_cfg = {**TINY_HF, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 2048,
              "moe_intermediate_size": 1024, "num_hidden_layers": 5, "num_attention_heads": 8,
              "num_key_value_heads": 8, "n_routed_experts": 16, "num_experts_per_tok": 4}
    cfg = convert.config_from_hf(hf_cfg)
    shapes = convert.hf_shapes(cfg)
    hf = tmp_path / "big"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_cfg))
    rng = np.random.default_rng(0)
    write_safetensors(((n, rng.standard_normal(s, dtype=np.float32)) for n, s in shapes.items()),
                      plan_shards(((n, s, np.float32) for n, s in shapes.items()), 100 * 2**20), hf)
    _write_hf(tmp_path / "tiny", random_hf_checkpoint(convert.config_from_hf(TINY_HF)))

    out = run_python(MEMORY_SCRIPT, str(tmp_path / "tiny"), str(hf), str(tmp_path / "warm"), str(tmp_path / "out"),
                     devices=1)
    rss = json.loads(out.strip().splitlines()[-1])
    largest = max(a.size for a in jax.tree.leaves(dsmoe_jax.param_shapes(cfg))) * 4  # stacked experts, 32 MiB
    model = sum(np.prod(s) for s in shapes.values()) * 4  # 480 MiB
    grew = rss["after"] - rss["before"]
    assert model > 12 * largest, "the model must be far larger than the bound, or the test cannot fail"
    assert grew < 6 * largest, f"peak RSS grew by {grew / 2**20:.0f} MiB converting a {model / 2**20:.0f} MiB model; " \
                               f"the bound is 6 x the largest array ({largest / 2**20:.0f} MiB)"


MESH_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    import dsmoe_jax
    mesh = dsmoe_jax.make_mesh({"data": 2, "expert": 4})
    params, cfg = dsmoe_jax.load_checkpoint(sys.argv[1], mesh=mesh)
    ref, _ = dsmoe_jax.load_checkpoint(sys.argv[1])
    w = params["layers"][1]["ffn"]["w_gate_EDF"]
    assert w.sharding.spec[0] == "expert", w.sharding
    assert {s.data.shape[0] for s in w.addressable_shards} == {w.shape[0] // 4}, "each device holds E/4 experts"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("ok")
""")


def test_load_checkpoint_restores_straight_into_mesh_shardings(tmp_path):
    hf = _write_hf(tmp_path / "hf", random_hf_checkpoint(convert.config_from_hf(TINY_HF)))
    convert.hf_to_jax(hf, tmp_path / "jax", progress=False)
    assert run_python(MESH_SCRIPT, str(tmp_path / "jax")).strip().endswith("ok")
