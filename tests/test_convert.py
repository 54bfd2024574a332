"""The HF name maps (DeepSeek v1, V2, V3; Dynamic_MoE) and config translation, against independent
PyTorch models: transformers' Qwen2-MoE as a v1 oracle, transformers' own DeepseekV2ForCausalLM /
DeepseekV3ForCausalLM, and a hand-written statement of the dynamic-routing model
(``dynamic_moe_reference.py``)."""

import numpy as np
import pytest
import torch

import dsmoe_jax
from dsmoe_jax import ConfigError, cli, convert
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint, tiny_tokenizer


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
    ({"model_type": "mixtral"}, "unsupported model_type 'mixtral'.*'deepseek', 'deepseek_v2', 'deepseek_v3', 'llama'"),
    ({"model_type": "llama"}, "model_type 'llama' with num_experts = None.*not dense Llama models"),
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


# ---- DeepSeek-V2 / V3 ----------------------------------------------------------------------

V2V3_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                   num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                   kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=1,
                   max_position_embeddings=128, routed_scaling_factor=1.5)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
V2V3_CASES = {  # the released variants: query compression on (V2, V3) and off (V2-Lite, Moonlight)
    "v2-group-limited-q-lora": ("DeepseekV2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                                   topk_group=2, rope_scaling=YARN)),
    "v2-lite-greedy": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", n_group=4, topk_group=2)),
    "v3-sigmoid-bias-q-lora": ("DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, rope_scaling=YARN)),
    "moonlight-like-no-groups": ("DeepseekV3", dict(q_lora_rank=None, n_group=1, topk_group=1)),
}


def _transformers_model(case: str):
    import transformers

    family, extra = V2V3_CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(
        **V2V3_COMMON, **extra)).eval()
    with torch.no_grad():  # weights large enough that routing and attention are far from uniform
        for _, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("case", list(V2V3_CASES))
def test_v2_v3_logits_match_transformers_and_the_round_trip_is_bit_exact(case, tmp_path, capsys):
    from safetensors.numpy import load_file

    model = _transformers_model(case)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer(tmp_path / "hf" / "tokenizer.json")
    cfg = convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
    assert cfg.model.mla is not None and (cfg.model.mla.q_lora_rank > 0) == ("q-lora" in case)
    assert cfg.model.moe.routing == ("sigmoid" if "v3" in case or "moonlight" in case else "softmax")
    groups = {"v2-group-limited-q-lora": 4, "v2-lite-greedy": 1, "v3-sigmoid-bias-q-lora": 4}.get(case, 1)
    assert cfg.model.moe.n_group == groups, f"{case}: n_group (V2's greedy top-k ignores the file's n_group)"
    params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    tokens = np.random.RandomState(0).randint(0, 64, (2, 20))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got, _ = dsmoe_jax.forward(params, tokens.astype(np.int32), loaded.model)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0, err_msg=f"{case}: logits differ")

    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", progress=False)
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after), f"{case}: tensor names changed in the round trip"
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{case}: {name}")
    reloaded = type(model).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor(tokens)).logits.numpy(), want,
                                      err_msg=f"{case}: transformers reads our export differently")
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "jax"), "--prompt", "the cat", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0, f"{case}: generate on the converted checkpoint"
    assert capsys.readouterr().out.startswith("the cat")


def test_v3_multi_token_prediction_layers_convert_both_ways_or_are_dropped(tmp_path, capsys):
    """The released layout of V3's MTP module: block ``num_hidden_layers`` holds enorm, hnorm,
    eh_proj ([D, 2D]: embedding, then hidden state), shared_head.norm, a transformer block, and
    copies of the embedding and LM head. transformers writes none of it (its configs still count
    one layer), so the tensors are made here by name."""
    import json

    from safetensors.numpy import load_file, save_file

    model = _transformers_model("moonlight-like-no-groups")
    model.save_pretrained(tmp_path / "hf")
    transformers_written = convert.hf_to_jax(tmp_path / "hf", tmp_path / "plain", progress=False)
    assert transformers_written.model.mtp_depth == 0 and "holds none: converted without them" in capsys.readouterr().err
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    rng = np.random.default_rng(0)
    D = tensors["model.norm.weight"].shape[0]
    mtp = {name.replace("layers.2.", "layers.3."): a + 0.01 for name, a in tensors.items() if ".layers.2." in name}
    mtp.update({"model.layers.3.enorm.weight": rng.random(D, np.float32) + 0.5,
                "model.layers.3.hnorm.weight": rng.random(D, np.float32) + 0.5,
                "model.layers.3.eh_proj.weight": rng.standard_normal((D, 2 * D)).astype(np.float32),
                "model.layers.3.shared_head.norm.weight": rng.random(D, np.float32) + 0.5,
                "model.layers.3.shared_head.head.weight": tensors["lm_head.weight"],
                "model.layers.3.embed_tokens.weight": tensors["model.embed_tokens.weight"]})
    save_file({**tensors, **mtp}, tmp_path / "hf" / "model.safetensors")

    cfg = convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
    assert cfg.model.n_layers == 3 and cfg.model.mtp_depth == 1
    params, _ = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    depth = params["mtp"][0]
    np.testing.assert_array_equal(depth["w_proj_CD"], mtp["model.layers.3.eh_proj.weight"].T)
    np.testing.assert_array_equal(depth["embed_norm"]["scale_D"], mtp["model.layers.3.enorm.weight"])
    np.testing.assert_array_equal(depth["block"]["ffn"]["score_bias_E"],
                                  mtp["model.layers.3.mlp.gate.e_score_correction_bias"])
    np.testing.assert_array_equal(depth["block"]["attn"]["w_kv_a_DA"],
                                  mtp["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"].T)

    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", progress=False)
    before, after = {**tensors, **mtp}, load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after), set(before) ^ set(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_nextn_predict_layers"] == 1

    dropped = convert.hf_to_jax(tmp_path / "hf", tmp_path / "dropped", progress=False, drop_mtp=True)
    assert dropped.model.mtp_depth == 0 and "mtp" not in dsmoe_jax.load_checkpoint(tmp_path / "dropped")[0]
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_config, "num_nextn_predict_layers": 0}))
    refused = (r"holds 1 multi-token-prediction layer\(s\) \(model.layers.3.\*\), but its config.json's "
               r"num_nextn_predict_layers says 0.*--drop-mtp")
    with pytest.raises(convert.ConversionError, match=refused):
        convert.hf_to_jax(tmp_path / "hf", tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists(), "nothing is written before the refusal"


@pytest.mark.parametrize("change, message", [
    ({"routing": "sigmoid", "score_bias": False}, "DeepSeek-V3.*score_bias = true"),
    ({"routing": "softmax", "score_bias": True}, "DeepSeek-V2.*score_bias = false"),
    ({"routing": "hash", "top_k": 1, "score_bias": False}, "no HF DeepSeek format"),
])
def test_models_without_an_hf_format_are_refused_on_export(change, message):
    import dataclasses

    cfg = convert.config_from_hf(dict(_transformers_model("v3-sigmoid-bias-q-lora").config.to_dict()))
    moe = dataclasses.replace(cfg.moe, n_group=1, topk_group=1, group_score="max", **change)
    with pytest.raises(ConfigError, match=message):
        convert.config_to_hf(dataclasses.replace(cfg, moe=moe))


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "moonlight-16b-a3b", "tiny-v3",
                                  # building transformers' 60-layer models, even on the meta device, takes 20-30 s
                                  pytest.param("deepseek-v2", marks=pytest.mark.slow),
                                  pytest.param("deepseek-v3", marks=pytest.mark.slow)])
def test_shipped_v2_v3_configs_count_exactly_the_parameters_of_transformers_models(name):
    import transformers

    cfg = dsmoe_jax.load_config(name).model
    hf = convert.config_to_hf(cfg)
    family = {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3"}[hf["model_type"]]
    fields = {k: v for k, v in hf.items() if k not in ("model_type", "architectures", "torch_dtype")}
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**fields))
    want = sum(p.numel() for p in model.parameters())
    want += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert dsmoe_jax.count_params(cfg)[0] == want, f"{name}: parameter count differs from transformers'"
    assert convert.hf_shapes(convert.config_from_hf(hf)) == convert.hf_shapes(cfg), \
        f"{name}: the architecture does not survive config.json"


def test_only_v3_exports_multi_token_prediction_depths():
    cfg = dsmoe_jax.load_config("tiny", ["model.mtp_depth=1"]).model  # multi-head attention: a v1 model
    with pytest.raises(ConfigError, match="only DeepSeek-V3 files carry multi-token-prediction depths, and this "
                                          "model converts as deepseek: set model.mtp_depth = 0"):
        convert.config_to_hf(cfg)


# ---- Dynamic_MoE (arXiv 2403.07652's released layout) ----------------------------------------

DYNAMIC_HF = {"model_type": "llama", "architectures": ["MoEForCausalLM"], "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4, "num_experts": 8,
              "experts_topk": 2, "expert_frequency": 2, "top_p_threshold": 0.5, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 64, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float32"}


def _dynamic_checkpoint(directory, seed=0):
    """A random Dynamic_MoE checkpoint as its users have them (``config.json`` and
    ``pytorch_model.bin``), and the reference model that holds it."""
    import json

    from dynamic_moe_reference import DynamicMoEReference

    torch.manual_seed(seed)
    model = DynamicMoEReference(DYNAMIC_HF).eval()
    with torch.no_grad():  # routers sharp enough that tokens take from one to all of the experts
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if "router" in name else 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(DYNAMIC_HF))
    tiny_tokenizer(directory / "tokenizer.json")
    return model


def test_dynamic_moe_config_maps_its_keys_and_round_trips():
    cfg = convert.config_from_hf({**DYNAMIC_HF, "rope_theta": 500000.0})
    assert (cfg.moe.routing, cfg.moe.top_p, cfg.moe.n_routed_experts, cfg.moe.n_shared_experts) == ("top_p", 0.5, 8, 0)
    assert cfg.moe.expert_d_ff == cfg.d_ff == 24, "every expert is as wide as the dense FFN"
    assert cfg.moe_layers == (0, 2), "expert_frequency 2: blocks 0 and 2 route, 1 and 3 are dense"
    assert cfg.rope_theta == 10000.0, "their rotary embedding is built at base 10000 whatever the file says"
    hf = convert.config_to_hf(cfg)
    assert (hf["model_type"], hf["architectures"], hf["top_p_threshold"], hf["expert_frequency"]) == (
        "llama", ["MoEForCausalLM"], 0.5, 2), hf
    assert convert.config_from_hf(hf) == cfg
    defaults = convert.config_from_hf({k: v for k, v in DYNAMIC_HF.items()
                                       if k not in ("expert_frequency", "top_p_threshold", "rms_norm_eps")})
    assert (defaults.moe.top_p, defaults.moe_layer_freq, defaults.norm_eps) == (0.4, 2, 1e-6), \
        "their MoEConfig's defaults"


def test_dynamic_moe_logits_and_experts_match_the_reference_and_the_round_trip_is_bit_exact(tmp_path):
    import json

    from dynamic_moe_reference import DynamicMoEReference
    from safetensors.numpy import load_file

    from dsmoe_jax.moe import RouteOptions

    reference = _dynamic_checkpoint(tmp_path / "hf")
    cfg = convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
    params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    tokens = np.random.RandomState(0).randint(0, 64, (2, 12))
    with torch.no_grad():
        want = reference(torch.tensor(tokens)).numpy()
        probs = [torch.softmax(b.mlp.router(b.post_attention_norm(h)), -1)
                 for b, h in _block_inputs(reference, tokens) if hasattr(b.mlp, "router")]
    margins = [float((torch.sort(p, descending=True)[0].cumsum(-1) - 0.5).abs().min()) for p in probs]
    assert min(margins) > 1e-5, f"a token's running sum lies within {min(margins)} of the threshold: pick another seed"
    got, aux = dsmoe_jax.forward(params, tokens.astype(np.int32), loaded.model, route=RouteOptions(record=True))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0, err_msg="logits differ from the reference")
    taken = np.sum(np.asarray(aux.expert_choices) < cfg.model.moe.n_routed_experts, axis=-1)
    np.testing.assert_array_equal(taken, np.array(reference.experts_per_token()),
                                  err_msg="experts per token differ from the reference's rule")
    assert len(set(taken.ravel())) >= 3, f"the tokens should take varied numbers of experts: {np.unique(taken)}"

    convert.jax_to_hf(tmp_path / "jax", tmp_path / "back", progress=False)
    before, after = reference.state_dict(), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after), set(before) ^ set(after)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array.numpy(), err_msg=name)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    reloaded = DynamicMoEReference(exported).eval()
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in after.items()})
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.tensor(tokens)).numpy(), want,
                                      err_msg="the reference reads our export differently")


def _block_inputs(model, tokens):
    """(block, its input hidden state) for each block of the reference on ``tokens``, so a test
    can inspect the router's probabilities."""
    h = model.model.embed_tokens(torch.tensor(tokens))
    out = []
    for block in model.model.layers:
        h_attn = h + block.self_attn(block.input_norm(h))
        out.append((block, h_attn))
        h = h_attn + block.mlp(block.post_attention_norm(h_attn))
    return out


@pytest.mark.parametrize("change, message", [
    ({"n_shared_experts": 1}, "no shared experts"),
    ({"max_experts": 3}, "without a cap"),
    ({"norm_topk_prob": True}, "norm_topk_prob false"),
])
def test_top_p_models_outside_dynamic_moe_s_architecture_are_refused_on_export(change, message):
    import dataclasses

    cfg = convert.config_from_hf(DYNAMIC_HF)
    refused = f"top-p models convert as Dynamic_MoE's files, whose model needs .*{message}"
    with pytest.raises(ConfigError, match=refused):
        convert.config_to_hf(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change)))
    with pytest.raises(ConfigError, match="whose model needs RoPE at base 10000"):
        convert.config_to_hf(dataclasses.replace(cfg, rope_theta=500000.0))
