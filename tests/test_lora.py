"""LoRA: its config keys; the merge against the HF-layout merge through the conversion map;
training (frozen params bitwise unchanged, optimizer state only for the adapter); PEFT's files,
read by peft itself onto transformers models; the routed experts against a hand merge; sums of
adapters; a training run end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from orbax.checkpoint import v1 as ocp_v1
from safetensors.numpy import load_file, save_file

import dsmoe_jax
from dsmoe_jax import cli, convert
from dsmoe_jax.checkpoint import write_config
from dsmoe_jax.config import Config, LoRAConfig, config_from_dict, load_config, resolve_config_path, updated
from dsmoe_jax.errors import CheckpointError, ConfigError, OutputExistsError
from dsmoe_jax.model import forward, match_layout
from dsmoe_jax.peft import lora
from dsmoe_jax.peft.adapter import apply_adapter
from dsmoe_jax.peft.tuning import ALL, count, make_tuning
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint, tiny_tokenizer

SMALL = ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "moe.expert_d_ff=16",
         "model.vocab_size=260", "model.max_seq_len=32", "train.seq_len=16", "train.batch_size=4",
         "moe.n_routed_experts=8", "moe.top_k=2", "train.warmup_steps=0", "train.lr=1e-2"]
EVERY = "train.lora.targets=['attention', 'dense_ffn', 'shared_experts', 'routed_experts']"
SMALL_EVERY_RANK_4 = 20_800  # the trained parameters of _cfg("train.lora.rank=4", EVERY)


def _cfg(*extra, base="tiny"):
    return load_config(base, [*(SMALL if base == "tiny" else []), *extra])


def _with_lora(cfg: Config, **keys) -> Config:
    """``cfg`` with ``train.lora`` set (a converted checkpoint's config keeps the default train
    section, whose seq_len its model may not take, so not through ``updated``)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=LoRAConfig(**keys)))


def _trained(adapter: dict, seed: int = 1, std: float = 0.2) -> dict:
    """``adapter`` with B drawn too: a fresh adapter's B is 0, which would pass every comparison."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(std * rng.standard_normal(a.shape), jnp.float32) if path[-1].key == "b_OR" else a,
        adapter)


def _tokens(vocab: int, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, shape).astype(np.int32)


# ---- config --------------------------------------------------------------------------------


def test_lora_keys_load_from_a_toml_table_and_set_and_round_trip(tmp_path):
    cfg = _cfg("train.lora.rank=8")
    assert cfg.train.lora == LoRAConfig(rank=8) and cfg.train.lora.scale == 1.0, "alpha defaults to the rank"
    toml = tmp_path / "lora.toml"
    toml.write_text(resolve_config_path("tiny").read_text() + "\n[train.lora]\nrank = 4\nalpha = 16\n"
                    "targets = ['attention', 'routed_experts']\n")
    loaded = load_config(toml)
    assert loaded.train.lora == LoRAConfig(4, 16.0, 0.0, ("attention", "routed_experts"))
    assert loaded.train.lora.scale == 4.0
    assert updated(loaded, train={"lora": {"rank": 8}}).train.lora.alpha == 16.0, "the table's other keys stay"
    assert config_from_dict(json.loads(json.dumps(loaded.to_dict()))) == loaded, "config.json round trip"
    assert _cfg().train.lora.rank == 0 and make_tuning(_cfg()) is ALL, "off by default"


@pytest.mark.parametrize("override, message", [
    ("train.lora.rank=-1", r"train.lora.rank must be >= 0"),
    ("train.lora.alpha=0", r"train.lora.alpha must be > 0"),
    ("train.lora.alpha=inf", r"train.lora.alpha must be a finite number"),
    ("train.lora.dropout=1.0", r"train.lora.dropout must be in \[0, 1\)"),
    ("train.lora.dropout=0.05", r"LoRA dropout is not supported yet .* set train.lora.dropout = 0"),
    ("train.lora.targets=['mlp']", r"train.lora.targets\[0\] must be one of \['attention', 'dense_ffn'"),
    ("train.lora.targets=[]", r"train.lora.targets must name each target once"),
    ("train.lora.rnk=4", r"unknown key train.lora.rnk; valid keys in \[train.lora\]: rank, alpha, dropout, targets"),
    ("train.steps.x=4", r"override 'train.steps.x=4': train.steps is not a table"),
])
def test_bad_lora_keys_are_refused_with_the_reason(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("train.lora.rank=4", override)


def test_targets_the_model_lacks_and_lora_with_esft_are_refused():
    with pytest.raises(ConfigError, match=r"train.lora.targets names what this model does not have: 'dense_ffn' "
                                          r"\(no dense block \(model.first_k_dense = 0, every block MoE\)\)"):
        _cfg("train.lora.rank=4", "model.first_k_dense=0", "train.lora.targets=['attention', 'dense_ffn']")
    with pytest.raises(ConfigError, match=r"'shared_experts' \(no shared experts"):
        _cfg("train.lora.rank=4", "moe.n_shared_experts=0", "train.lora.targets=['shared_experts']")
    with pytest.raises(ConfigError, match=r"train.lora.rank = 4 trains low-rank adapters .* train.trainable = "
                                          r"'esft:x.json' .*choose one"):
        _cfg("train.lora.rank=4", "train.trainable='esft:x.json'")
    assert _cfg("model.first_k_dense=0", "train.lora.targets=['dense_ffn']").train.lora.rank == 0, \
        "rank 0 adapts nothing: its targets are not checked"


# ---- the merge -----------------------------------------------------------------------------

# config, overrides, and the adapted HF modules (attention, dense FFN, shared and routed experts)
MERGE_CASES = {
    "mha": ("tiny", [], 4 * 4 + 3 + 3 * 3 + 3 * 3 * 8),
    "mha-scanned": ("tiny", ["model.scan_layers=true"], 4 * 4 + 3 + 3 * 3 + 3 * 3 * 8),
    "mla-query-latent": ("tiny-v3", [], 4 * 5 + 3 + 3 * 3 + 3 * 3 * 15),
    "mla-direct-query-mtp-scanned": ("tiny-v3", ["mla.q_lora_rank=0", "model.mtp_depth=1", "model.scan_layers=true"],
                                     4 * 4 + 3 + 3 * 3 + 3 * 3 * 15),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_the_merge_is_each_hf_weight_plus_scaled_b_a_of_the_factors_saved_under_its_name(case, tmp_path):
    """Through the conversion map, every adapted weight is its HF weight + (alpha / r) B @ A with
    the factors saved under that module's name, and every other tensor (MTP blocks included) is
    unchanged: our layouts of the factors are PEFT's."""
    base, extra, modules = MERGE_CASES[case]
    cfg = _cfg(*extra, "train.lora.rank=3", "train.lora.alpha=6", EVERY, base=base)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)))
    merged = lora.merge(params, adapter, cfg)
    lora.save_peft(tmp_path / "adapter", adapter, cfg)
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    before, after = (dict(convert.params_to_hf(p, cfg.model)) for p in (params, merged))
    adapted = set()
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            weight = key.removeprefix("base_model.model.").replace("lora_A.", "")
            want = before[weight] + 2.0 * factors[key.replace("lora_A", "lora_B")] @ a
            np.testing.assert_allclose(after[weight], want, rtol=1e-5, atol=1e-6, err_msg=weight)
            adapted.add(weight)
    assert len(adapted) == len(factors) // 2 == modules
    for name in set(before) - adapted:
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} is not adapted")


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])  # False: 14 s
def test_a_fresh_adapter_is_drawn_as_peft_draws_it_and_leaves_the_logits_as_they_were(scan):
    cfg = _cfg(f"model.scan_layers={str(scan).lower()}", "train.lora.rank=4", EVERY)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    adapter = lora.init_adapter(params, cfg, jax.random.key(1))
    block = jax.tree.map(lambda a: a[0], adapter["moe_layers"]) if scan else adapter["layers"][1]
    for path, fan_in in ((("attn", "w_q_DNH"), 32), (("attn", "w_o_NHD"), 2 * 16), (("ffn", "w_down_EFD"), 16)):
        a_RI = np.asarray(block[path[0]][path[1]]["a_RI"])
        bound = 1 / np.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5), PEFT's default
        assert 0.8 * bound < np.abs(a_RI).max() <= bound, path
    assert not any(np.asarray(b).any() for p, b in jax.tree_util.tree_leaves_with_path(adapter)
                   if p[-1].key == "b_OR"), "B = 0"
    tokens = _tokens(260)
    base, _ = forward(params, tokens, cfg.model)
    tuned, _ = forward(lora.merge(params, adapter, cfg), tokens, cfg.model)
    np.testing.assert_array_equal(np.asarray(tuned), np.asarray(base))


def test_weighted_sum_is_the_weighted_sum_of_the_merges():
    """PEFT's "cat" combination: ranks add up, and the merged update is exactly sum_i w_i s_i B_i A_i,
    adapters of different ranks, scales and targets alike."""
    base = _cfg("model.scan_layers=true")
    c1 = _with_lora(base, rank=2, alpha=4.0, targets=("attention",))
    c2 = _with_lora(base, rank=3, targets=("attention", "routed_experts"))
    params = dsmoe_jax.init_params(base, jax.random.key(0))
    a1 = _trained(lora.init_adapter(params, c1, jax.random.key(1)), seed=1)
    a2 = _trained(lora.init_adapter(params, c2, jax.random.key(2)), seed=2)
    combined, c = lora.weighted_sum([a1, a2], [0.7, -0.3], [c1, c2])
    assert (c.train.lora.rank, c.train.lora.alpha, c.train.lora.targets) == (5, 5.0, ("attention", "routed_experts"))
    update = lambda adapter, cfg: jax.tree.map(jnp.subtract, lora.merge(params, adapter, cfg), params)
    want = jax.tree.map(lambda x, y: 0.7 * x - 0.3 * y, update(a1, c1), update(a2, c2))
    for got, expected in zip(jax.tree.leaves(update(combined, c)), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, atol=2e-6)


# ---- training ------------------------------------------------------------------------------


def test_lora_training_leaves_every_param_bitwise_unchanged_and_keeps_moments_only_for_the_adapter():
    cfg = _cfg("train.lora.rank=4", EVERY)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tuning = make_tuning(cfg)
    optimizer = make_optimizer(cfg.train)
    state = init_state(params, optimizer, tuning, jax.random.key(1))
    assert tuning.name == "lora" and count(tuning, params) == SMALL_EVERY_RANK_4
    assert sum(a.size for a in jax.tree.leaves(state.adapter)) == SMALL_EVERY_RANK_4
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * SMALL_EVERY_RANK_4, "Adam's two moments of the adapter, nothing else"
    step = jax.jit(make_train_step(cfg, optimizer, tuning))
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 260, (4, 17)), jnp.int32)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        assert bool(metrics.finite)
        losses.append(float(metrics.loss))
    same = jax.tree.map(lambda a, b: bool((a == b).all()), state.params, params)
    assert all(jax.tree.leaves(same)), "every parameter is bitwise unchanged"
    moved = [bool(np.asarray(b).any()) for p, b in jax.tree_util.tree_leaves_with_path(state.adapter)
             if p[-1].key == "b_OR"]
    assert all(moved) and losses[-1] < losses[0], "every B trained, and the loss fell"


def test_the_train_state_xla_compiles_holds_the_adapter_and_its_moments_instead_of_the_params_moments():
    """XLA's memory analysis of the compiled train step: against training everything, the
    arguments lose Adam's two float32 moments of every parameter and gain the adapter and its two."""
    cfg = _cfg("train.lora.rank=4", EVERY)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer(cfg.train)
    batch = jax.ShapeDtypeStruct((4, 17), jnp.int32)
    sizes = {}
    for name, tuning in (("all", ALL), ("lora", make_tuning(cfg))):
        state = jax.eval_shape(lambda p: init_state(p, optimizer, tuning), params)
        compiled = jax.jit(make_train_step(cfg, optimizer, tuning)).lower(state, batch).compile()
        sizes[name] = compiled.memory_analysis().argument_size_in_bytes
    n_params = count(ALL, params)
    assert sizes["all"] - sizes["lora"] == 4 * (2 * n_params - 3 * SMALL_EVERY_RANK_4), sizes


def test_plan_counts_the_adapter_and_its_moments():
    from dsmoe_jax.plan import make_plan

    full = make_plan(_cfg(), {"data": 1})
    part = make_plan(_cfg("train.lora.rank=4", EVERY), {"data": 1})
    n = SMALL_EVERY_RANK_4
    assert (part.optimizer, part.grads, part.params) == (8 * n, 4 * n, full.params + 4 * n)


# ---- PEFT ----------------------------------------------------------------------------------


def test_save_peft_writes_peft_files_and_load_peft_reads_them_back_or_names_the_mismatch(tmp_path):
    cfg = _cfg("model.scan_layers=true", "train.lora.rank=4", "train.lora.targets=['attention', 'routed_experts']")
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)))
    out = lora.save_peft(tmp_path / "adapter", adapter, cfg)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert {k: raw[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora",
                                "fan_in_fan_out", "modules_to_save", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": None}
    experts = {f"mlp.experts.{e}.{p}_proj" for e in range(8) for p in ("gate", "up", "down")}
    assert set(raw["target_modules"]) == {f"self_attn.{p}_proj" for p in "qkvo"} | experts
    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, 2 * 16)
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"] == (32, 4)
    assert shapes["base_model.model.model.layers.3.mlp.experts.7.down_proj.lora_A.weight"] == (4, 16)
    assert len(shapes) == 2 * (4 * 4 + 3 * 3 * 8)

    back = lora.load_peft(out, cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), back, adapter))
    flat_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
    flat_merge = lora.merge(match_layout(params, flat_cfg), lora.load_peft(out, flat_cfg), flat_cfg)
    for a, b in zip(jax.tree.leaves(match_layout(flat_merge, cfg)), jax.tree.leaves(lora.merge(params, adapter, cfg))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(OutputExistsError):
        lora.save_peft(out, adapter, cfg)

    lora_keys = ["train.lora.rank=4", "train.lora.targets=['attention', 'routed_experts']"]
    with pytest.raises(CheckpointError, match=r"lora_A has shape \(4, 32\), this model needs \(4, 64\): an adapter "
                                              "of another base model"):
        lora.load_peft(out, _cfg("model.d_model=64", "model.n_heads=4", *lora_keys))
    with pytest.raises(CheckpointError, match=r"adapts 28 modules this model does not have \(first model.layers.3\."):
        lora.load_peft(out, _cfg("model.n_layers=3", *lora_keys))
    with pytest.raises(ConfigError, match=r"r = 4 \(adapter\) vs train.lora.rank = 8 \(config\); lora_alpha = 4 "
                                          r"\(adapter\) vs train.lora.alpha = 8 \(config\); targets \['attention', "
                                          r"'routed_experts'\] \(adapter\) vs train.lora.targets = \['attention'\]"):
        lora.load_peft(out, _cfg("train.lora.rank=8"))
    settings = lora.peft_lora_config(out, _cfg())
    assert settings.train.lora == LoRAConfig(4, 4.0, 0.0, ("attention", "routed_experts"))
    unrolled = lora.load_peft(out, settings)  # _cfg()'s layout: one subtree per block
    np.testing.assert_array_equal(unrolled["layers"][3]["ffn"]["w_down_EFD"]["b_OR"],
                                  adapter["moe_layers"]["ffn"]["w_down_EFD"]["b_OR"][2])
    (out / "adapter_config.json").write_text(json.dumps({**raw, "use_rslora": True}))
    with pytest.raises(CheckpointError, match=r"use_rslora = True is not supported \(plain LoRA only\)"):
        lora.load_peft(out, cfg)


def _deepseek_v2(tmp_path):
    """transformers' DeepseekV2 (MLA with a query latent, a dense block, shared experts) with
    weights large enough that routing and attention are far from uniform, and our conversion of it."""
    import transformers

    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=1, max_position_embeddings=128,
        q_lora_rank=24, topk_method="greedy", n_group=4, topk_group=2)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer(tmp_path / "hf" / "tokenizer.json")
    convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
    params, cfg = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    return model, params, cfg


def _peft_logits(model, adapter_dir, tokens):
    """The logits of ``model`` without, then with, the PEFT adapter in ``adapter_dir`` as peft
    loads it, and the modules peft adapted (Linear layers; ParamWrapper: fused expert parameters)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        base = model(torch.from_numpy(tokens).long()).logits.numpy()
        tuned = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        kinds = [type(m).__name__ for m in tuned.modules() if isinstance(m, LoraLayer)]
        return base, tuned(torch.from_numpy(tokens).long()).logits.numpy(), kinds


def test_peft_puts_our_attention_and_routed_expert_adapters_onto_transformers_deepseek_v2(tmp_path):
    """MLA's projections as Linear layers; the routed experts, saved one module per expert,
    converted by peft onto transformers 5's fused expert parameters (its v4 -> v5 conversion)."""
    model, params, cfg = _deepseek_v2(tmp_path)
    cfg = _with_lora(cfg, rank=4, alpha=8.0, targets=("attention", "routed_experts"))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)), std=0.3)
    lora.save_peft(tmp_path / "adapter", adapter, cfg)
    tokens = _tokens(64, (2, 20))
    base, want, kinds = _peft_logits(model, tmp_path / "adapter", tokens)
    assert kinds.count("Linear") == 3 * 5, "q_a, q_b, kv_a, kv_b and o of each block"
    assert kinds.count("ParamWrapper") == 2 * 2, "gate_up and down of each MoE block's experts"
    got, _ = forward(lora.merge(params, adapter, cfg), tokens, cfg.model)
    assert np.abs(want - base).max() > 0.1, "the adapter changes the logits"
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def _v1(seed=1):
    """The tiny HF DeepSeek-v1 checkpoint of the tests' helpers, as tensors and as our params."""
    m = convert.config_from_hf(TINY_HF)
    tensors = random_hf_checkpoint(m, seed=seed)
    return tensors, convert.params_from_hf(tensors.__getitem__, tensors.__contains__, m), Config(model=m)


def test_peft_puts_our_attention_dense_and_shared_adapters_onto_the_v1_oracle(tmp_path, monkeypatch):
    """Multi-head attention's q/k/v/o and the dense and shared FFNs, on transformers' Qwen2-MoE
    standing in for DeepSeek-v1 (helpers.qwen2moe_oracle: it names the shared experts
    ``shared_expert`` and doubles their down projection, so the adapter is renamed and that B
    doubled for it). peft 0.21 moves every gate/up/down_proj target of a transformers-5 MoE
    model (Qwen2-MoE, DeepSeek-V2/V3) onto the fused routed experts, leaving these Linear layers
    out; that conversion of the config is switched off here, so peft adapts the modules named."""
    from peft.utils import transformers_weight_conversion

    monkeypatch.setattr(transformers_weight_conversion, "convert_peft_config_for_transformers",
                        lambda *args, **kwargs: None)
    tensors, params, cfg = _v1()
    cfg = _with_lora(cfg, rank=4, alpha=8.0, targets=("attention", "dense_ffn", "shared_experts"))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)))
    lora.save_peft(tmp_path / "adapter", adapter, cfg)
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    renamed = {k.replace("shared_experts", "shared_expert"): 2 * v if "shared_experts.down_proj.lora_B" in k else v
               for k, v in factors.items()}
    (tmp_path / "oracle").mkdir()
    save_file(renamed, tmp_path / "oracle" / "adapter_model.safetensors", metadata={"format": "pt"})
    raw["target_modules"] = [t.replace("shared_experts", "shared_expert") for t in raw["target_modules"]]
    (tmp_path / "oracle" / "adapter_config.json").write_text(json.dumps(raw))
    tokens = _tokens(101, (2, 20))
    base, want, kinds = _peft_logits(qwen2moe_oracle(tensors, TINY_HF), tmp_path / "oracle", tokens)
    assert kinds == ["Linear"] * (3 * 4 + 3 + 2 * 3), "q, k, v, o per block; the dense FFN; two shared FFNs"
    got, _ = forward(lora.merge(params, adapter, cfg), tokens, cfg.model)
    assert np.abs(want - base).max() > 0.1, "the adapter changes the logits"
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_routed_expert_factors_merge_as_each_experts_linear_would(tmp_path):
    """transformers fuses the routed experts into 3-D parameters, which PEFT's module LoRA does not
    adapt; DeepSeek's own modeling code has one Linear per expert, whose names the adapter carries.
    Each saved module's W + s B A, by hand, put into the v1 oracle, gives our merged logits."""
    tensors, params, cfg = _v1()
    cfg = _with_lora(cfg, rank=2, alpha=3.0, targets=("attention", "dense_ffn", "shared_experts", "routed_experts"))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)), std=0.5)
    lora.save_peft(tmp_path / "adapter", adapter, cfg)
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    merged = dict(tensors)
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            weight = key.removeprefix("base_model.model.").replace("lora_A.", "")
            merged[weight] = tensors[weight] + 1.5 * factors[key.replace("lora_A", "lora_B")] @ a
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in {k.removeprefix("base_model.model.").replace(
        "lora_A.", "") for k in factors}
    tokens = _tokens(101, (2, 20))
    with torch.no_grad():
        want = qwen2moe_oracle(merged, TINY_HF)(torch.from_numpy(tokens).long()).logits.numpy()
        base = qwen2moe_oracle(tensors, TINY_HF)(torch.from_numpy(tokens).long()).logits.numpy()
    got, _ = forward(lora.merge(params, adapter, cfg), tokens, cfg.model)
    assert np.abs(want - base).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


# ---- a run ---------------------------------------------------------------------------------


def test_checkpoints_hold_the_adapter_and_resuming_with_other_adapters_is_refused(tmp_path):
    from dsmoe_jax import data
    from dsmoe_jax.train.checkpoint import Checkpointer

    cfg = _cfg("train.lora.rank=4", EVERY)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    optimizer, tuning = make_optimizer(cfg.train), make_tuning(cfg)
    state = init_state(params, optimizer, tuning, jax.random.key(1))
    state = state._replace(adapter=_trained(state.adapter))
    batches = data.batches(np.arange(5000) % 260, batch_size=2, seq_len=16, seed=0)
    write_config(tmp_path, cfg)
    ckpt = Checkpointer(tmp_path, cfg)
    ckpt.save(1, state, iter(batches))
    ckpt.wait()
    assert (tmp_path / "checkpoints" / "1" / "adapter").is_dir()
    fresh = init_state(params, optimizer, tuning, jax.random.key(7))
    restored = Checkpointer(tmp_path, cfg).restore(1, fresh, iter(batches))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    for other, message in ((_cfg("train.lora.rank=8", EVERY), r"train.lora.rank: 4 \(saved\) vs 8 \(now\)"),
                           (_cfg(), r"train.lora.rank: 4 \(saved\) vs 0 \(now\)")):
        with pytest.raises(CheckpointError, match=r"a run with other LoRA adapters \(" + message):
            Checkpointer(tmp_path, other).check_compatible(resume=True)
    assert Checkpointer(tmp_path, _cfg("train.lora.rank=4", EVERY, "train.lora.alpha=2")).check_compatible(True) == 1


@pytest.mark.slow
def test_a_lora_run_checkpoints_its_adapter_resumes_and_writes_it_for_peft(tmp_path, capsys):
    work = tmp_path / "run"
    args = ["train", "--config", "tiny", *[a for s in SMALL for a in ("--set", s)], "--set", "train.lora.rank=4",
            "--set", EVERY, "--workdir", str(work)]
    assert cli.main([*args, "--set", "train.steps=2"]) == 0
    assert "train.lora: rank 4 adapters on attention, dense_ffn, shared_experts, routed_experts: 20,800 trained" \
        in capsys.readouterr().out
    assert (work / "checkpoints" / "2" / "adapter").is_dir()
    cfg = _cfg("train.lora.rank=4", EVERY)
    first = lora.load_peft(work / "adapter", cfg)
    assert cli.main([*args, "--set", "train.steps=3", "--resume"]) == 0
    again = lora.load_peft(work / "adapter", cfg)
    assert any(bool((np.asarray(a) != np.asarray(b)).any()) for a, b in zip(jax.tree.leaves(first),
                                                                          jax.tree.leaves(again)))
    capsys.readouterr()
    assert cli.main([*args, "--set", "train.steps=4", "--set", "train.lora.rank=8", "--resume"]) != 0
    assert "train.lora.rank: 4 (saved) vs 8 (now)" in capsys.readouterr().err


def test_a_peft_adapter_applies_through_adapter_and_merges_into_a_checkpoint(tmp_path):
    """``--adapter`` and ``convert merge-adapter`` take a PEFT LoRA directory: the merge of its
    factors, as lora.merge gives it."""

    cfg = _cfg("train.lora.rank=4", EVERY)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    adapter = _trained(lora.init_adapter(params, cfg, jax.random.key(1)))
    lora.save_peft(tmp_path / "lora", adapter, cfg)
    expected = lora.merge(params, adapter, cfg)
    base_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=LoRAConfig()))
    applied = apply_adapter(params, base_cfg, tmp_path / "lora")
    same = jax.tree.map(lambda a, b: np.allclose(np.asarray(a), np.asarray(b), atol=1e-6), applied, expected)
    assert all(jax.tree.leaves(same)), "the adapter's own settings (rank, alpha, targets) are read from its files"
    base = tmp_path / "base"
    write_config(base, base_cfg)
    ocp_v1.partial.save(base / "params", params)
    ocp_v1.partial.finalize(base / "params")
    assert cli.main(["convert", "merge-adapter", str(base), str(tmp_path / "merged"), "--adapter",
                     str(tmp_path / "lora")]) == 0
    merged, _ = dsmoe_jax.load_checkpoint(tmp_path / "merged")
    tokens = _tokens(cfg.model.vocab_size)
    np.testing.assert_allclose(np.asarray(forward(merged, tokens, cfg.model)[0]),
                               np.asarray(forward(expected, tokens, cfg.model)[0]), atol=1e-5)
