"""The HF DeepSeek-v1 name map and config translation, against an independent PyTorch model."""

import numpy as np
import pytest
import torch

import dsmoe_jax
from dsmoe_jax import ConfigError, convert
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint

def _from_hf(tensors, cfg):
    return convert.params_from_hf(tensors.__getitem__, tensors.__contains__, cfg)


def test_16b_name_map_covers_every_parameter_exactly():
    cfg = dsmoe_jax.load_config("16b").model
    shapes = convert.hf_shapes(cfg)
    assert len(shapes) == len(set(convert.hf_names(cfg))) == 3 + 28 * 6 + 3 + 27 * (1 + 64 * 3 + 3)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 16_375_728_128
    assert shapes["model.layers.5.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    assert shapes["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (2 * 1408, 2048)
    assert shapes["lm_head.weight"] == (102400, 2048)


def test_config_round_trip_and_released_defaults():
    cfg = convert.config_from_hf(TINY_HF)
    assert (cfg.moe.aux_loss_alpha, cfg.moe.seq_aux) == (0.001, True), "absent in some copies of the 16B config"
    assert cfg.rope_theta == 10000.0 and isinstance(cfg.rope_theta, float)
    assert convert.config_from_hf(convert.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "deepseek_v2"}, "unsupported model_type 'deepseek_v2'.*MLA"),
    ({"scoring_func": "sigmoid"}, "scoring_func = 'sigmoid' is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq = 2 is not supported"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        convert.config_from_hf({**TINY_HF, **change})


def test_round_trip_is_bit_exact_and_bad_tensors_are_named():
    cfg = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(cfg)
    back = dict(convert.params_to_hf(_from_hf(tensors, cfg), cfg))
    assert list(back) == convert.hf_names(cfg)
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match="no tensor model.layers.2.mlp.experts.5.up_proj.weight"):
        _from_hf(missing, cfg)
    wrong = {**tensors, "model.layers.1.self_attn.o_proj.weight": np.zeros((32, 16), np.float32)}
    with pytest.raises(ValueError, match=r"tensor model.layers.1.self_attn.o_proj.weight has shape \(32, 16\), "
                                         r"the config needs \(32, 32\)"):
        _from_hf(wrong, cfg)


def test_logits_match_an_independent_pytorch_implementation():
    cfg = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(cfg, seed=1)
    params = _from_hf(tensors, cfg)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 20))
    ours, _ = dsmoe_jax.forward(params, tokens, cfg)
    with torch.no_grad():
        ref = qwen2moe_oracle(tensors, TINY_HF)(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4, np.abs(np.asarray(ours) - ref).max()
