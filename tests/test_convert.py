"""The HF DeepSeek-v1 name map and config translation, against an independent PyTorch model."""

import numpy as np
import pytest
import torch

import dsmoe_jax
from dsmoe_jax import ConfigError, convert

# A tiny config.json in the released format (deepseek-moe-16b-base's keys, small sizes).
TINY_HF = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 101, "hidden_size": 32,
    "intermediate_size": 72, "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 100, "eos_token_id": 100,
    "initializer_range": 0.02, "torch_dtype": "float32",
}


def _random_hf_checkpoint(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {name: (0.08 * rng.standard_normal(shape)).astype(np.float32) + (1.0 if "norm" in name else 0.0)
            for name, shape in convert.hf_shapes(cfg).items()}


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
    tensors = _random_hf_checkpoint(cfg)
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


def _qwen2moe_oracle(tensors, hf_cfg):
    """transformers' Qwen2Moe with the same weights: dense first layer via mlp_only_layers, zero
    q/k/v biases, and a shared-expert gate fixed at sigmoid(0) = 0.5 with the shared down
    projection doubled, so the shared experts count exactly once."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = hf_cfg
    qcfg = Qwen2MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        moe_intermediate_size=c["moe_intermediate_size"],
        shared_expert_intermediate_size=c["n_shared_experts"] * c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"], norm_topk_prob=False,
        mlp_only_layers=list(range(c["first_k_dense_replace"])), decoder_sparse_step=1,
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=False,
    )
    qcfg._attn_implementation = "eager"
    model = Qwen2MoeForCausalLM(qcfg).float().eval()
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    E = c["n_routed_experts"]
    for name, array in tensors.items():
        t = torch.from_numpy(array)
        if ".mlp.experts." in name:
            layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            prefix = f"model.layers.{layer}.mlp.experts."
            if proj == "down_proj":
                state[prefix + "down_proj"][e] = t
            else:
                F = t.shape[0]
                state[prefix + "gate_up_proj"][e, (0 if proj == "gate_proj" else F):][:F] = t
        elif ".mlp.shared_experts." in name:
            target = name.replace("shared_experts", "shared_expert")
            state[target] = 2 * t if "down_proj" in name else t
        else:
            state[name] = t
    assert E == state["model.layers.1.mlp.experts.gate_up_proj"].shape[0]
    model.load_state_dict(state)
    return model


def test_logits_match_an_independent_pytorch_implementation():
    cfg = convert.config_from_hf(TINY_HF)
    tensors = _random_hf_checkpoint(cfg, seed=1)
    params = _from_hf(tensors, cfg)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 20))
    ours, _ = dsmoe_jax.forward(params, tokens, cfg)
    with torch.no_grad():
        ref = _qwen2moe_oracle(tensors, TINY_HF)(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4, np.abs(np.asarray(ours) - ref).max()
