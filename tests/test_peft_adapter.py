"""ESFT adapters as DeepSeek ships them: applied here, merged into a checkpoint, and loaded into
transformers (the Qwen2-MoE oracle of the v1 layout) give the same logits; a run with
train.trainable = 'esft:...' writes one; adapters of another model are named."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import dsmoe_jax
from dsmoe_jax import cli, convert
from dsmoe_jax.errors import CheckpointError
from dsmoe_jax.peft import ExpertConfig
from dsmoe_jax.peft.adapter import apply_adapter, esft_names, merge_adapter, save_esft
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint

CHOSEN = ExpertConfig({1: (5, 0), 2: (3,)})  # TINY_HF: layer 0 dense, layers 1-2 MoE of 8 experts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A converted tiny v1 checkpoint and its HF tensors."""
    root = tmp_path_factory.mktemp("adapter")
    cfg = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(cfg, seed=3)
    hf = root / "hf"
    hf.mkdir()
    save_file(tensors, hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(TINY_HF))
    convert.hf_to_jax(hf, root / "base", progress=False)
    return root, cfg, tensors


def _deepseek_adapter(directory, tensors, seed=4):
    """An adapter in DeepSeek's layout: expert_cfg.json and the chosen experts' tensors, changed."""
    directory.mkdir()
    CHOSEN.write(directory / "expert_cfg.json")
    rng = np.random.default_rng(seed)
    names = esft_names(CHOSEN, convert.config_from_hf(TINY_HF))
    trained = {n: tensors[n] + 0.05 * rng.standard_normal(tensors[n].shape).astype(np.float32) for n in names}
    save_file(trained, directory / "model.safetensors")
    return trained


def test_the_adapter_names_only_the_chosen_experts(base):
    _, cfg, _ = base
    names = esft_names(CHOSEN, cfg)
    assert len(names) == 3 * 3 and all(".mlp.experts." in n for n in names), names
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.1.gate_proj.weight" not in names
    with_shared = esft_names(ExpertConfig({1: (5,)}, shared_experts=True), cfg)
    assert sum(".shared_experts." in n for n in with_shared) == 2 * 3, "both MoE layers' shared experts"


def test_applied_merged_and_transformers_give_the_same_logits(base, tmp_path):
    root, cfg, tensors = base
    trained = _deepseek_adapter(tmp_path / "adapter", tensors)
    params, run_cfg = dsmoe_jax.load_checkpoint(root / "base")
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12))
    applied = dsmoe_jax.forward(apply_adapter(params, run_cfg, tmp_path / "adapter"), tokens, run_cfg)[0]
    merge_adapter(root / "base", tmp_path / "adapter", tmp_path / "merged")
    merged_params, _ = dsmoe_jax.load_checkpoint(tmp_path / "merged")
    merged = dsmoe_jax.forward(merged_params, tokens, run_cfg)[0]
    with torch.no_grad():
        oracle = qwen2moe_oracle({**tensors, **trained}, TINY_HF)(torch.from_numpy(tokens)).logits.numpy()
        untouched = qwen2moe_oracle(tensors, TINY_HF)(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_array_equal(np.asarray(applied), np.asarray(merged), err_msg="applied == merged checkpoint")
    assert np.abs(np.asarray(applied) - oracle).max() < 1e-4, "transformers with the adapter's tensors loaded"
    assert np.abs(oracle - untouched).max() > 1e-3, "the adapter changes the model"


def test_a_run_writes_an_adapter_of_its_trained_experts(tmp_path):
    """train.trainable = 'esft:...' ends with <workdir>/adapter: the chosen experts under their HF names,
    which on the base model give the trained model."""
    small = ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "moe.expert_d_ff=16",
             "model.vocab_size=260", "model.max_seq_len=32", "train.seq_len=16", "train.batch_size=4",
             "moe.n_routed_experts=8", "moe.top_k=2", "train.warmup_steps=0", "train.steps=2"]
    sets = [a for s in small for a in ("--set", s)]
    assert cli.main(["train", "--config", "tiny", *sets, "--workdir", str(tmp_path / "base")]) == 0
    ExpertConfig({1: (2,), 3: (0, 7)}).write(tmp_path / "expert_cfg.json")
    assert cli.main(["train", "--config", "tiny", *sets, "--set", f"train.init_from='{tmp_path / 'base'}'",
                     "--set", f"train.trainable='esft:{tmp_path / 'expert_cfg.json'}'", "--workdir",
                     str(tmp_path / "tuned")]) == 0
    adapter = tmp_path / "tuned" / "adapter"
    assert json.loads((adapter / "expert_cfg.json").read_text())["experts"] == {"1": [2], "3": [0, 7]}
    base_params, cfg = dsmoe_jax.load_checkpoint(tmp_path / "base")
    tuned_params, _ = dsmoe_jax.load_checkpoint(tmp_path / "tuned")
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                        apply_adapter(base_params, cfg, adapter), tuned_params)
    assert all(jax.tree.leaves(same)), "base + adapter is the fine-tuned model, bit for bit"
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "base"), "--adapter", str(adapter), "--prompt", "x",
                     "--max-new-tokens", "2", "--temperature", "0"]) == 0


def test_adapters_of_another_model_are_named(base, tmp_path):
    root, cfg, tensors = base
    params, run_cfg = dsmoe_jax.load_checkpoint(root / "base")
    trained = _deepseek_adapter(tmp_path / "ok", tensors)
    cases = {
        "shape": ({**trained, "model.layers.1.mlp.experts.5.up_proj.weight": np.zeros((8, 32), np.float32)},
                  r"has shape \(8, 32\), the base model's is \(16, 32\): the adapter was made for another base"),
        "unnamed": ({**trained, "model.layers.1.mlp.experts.1.up_proj.weight": np.zeros((16, 32), np.float32)},
                    "not named by its expert_cfg.json"),
        "foreign": ({**trained, "model.layers.9.mlp.experts.1.up_proj.weight": np.zeros((16, 32), np.float32)},
                    "not a tensor of this base model"),
        "missing": ({k: v for k, v in trained.items() if "experts.0." not in k}, "holds no such tensor"),
    }
    for name, (held, message) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        CHOSEN.write(directory / "expert_cfg.json")
        save_file(held, directory / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            apply_adapter(params, run_cfg, directory)
    with pytest.raises(CheckpointError, match="is not an adapter: it holds neither expert_cfg.json .* nor adapter_"):
        apply_adapter(params, run_cfg, root)
    assert cli.main(["convert", "merge-adapter", str(root / "base"), str(tmp_path / "out")]) == 2


def test_save_esft_writes_deepseeks_layout(base, tmp_path):
    root, cfg, _ = base
    params, run_cfg = dsmoe_jax.load_checkpoint(root / "base")
    save_esft(tmp_path / "a", params, run_cfg, CHOSEN)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "expert_cfg.json"]
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                        apply_adapter(params, run_cfg, tmp_path / "a"), params)
    assert all(jax.tree.leaves(same)), "an adapter of the base's own experts changes nothing"
