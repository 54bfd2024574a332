"""Config loading and validation: every shipped config loads; bad input is a clear error."""

import pathlib

import pytest

import dsmoe_jax
from dsmoe_jax.config import config_from_dict, load_config
from dsmoe_jax.errors import ConfigError

SHIPPED = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.toml"))
TINY = {"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64},
        "moe": {"n_routed_experts": 4, "top_k": 2, "expert_d_ff": 16}}


def _with(section, **kv):
    return {**TINY, section: {**TINY.get(section, {}), **kv}}


def test_shipped_configs_are_all_found():
    assert {"tiny", "2b", "16b", "145b", "dense-2b", "hash-2b", "switch-2b", "gshard-2b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_by_name_and_path(name):
    by_name = load_config(name)
    by_path = load_config(pathlib.Path(__file__).parents[1] / "configs" / f"{name}.toml")
    assert by_name == by_path
    assert config_from_dict(by_name.to_dict()) == by_name, "to_dict must round-trip"
    hash(by_name.model)  # jit needs a hashable (static) config


def test_16b_matches_the_released_config():
    m = load_config("16b").model
    assert (m.vocab_size, m.d_model, m.n_layers, m.first_k_dense, m.d_ff) == (102400, 2048, 28, 1, 10944)
    assert (m.n_heads, m.head_dim, m.rope_theta, m.norm_eps, m.max_seq_len) == (16, 128, 10000.0, 1e-6, 4096)
    e = m.moe
    assert (e.n_shared_experts, e.n_routed_experts, e.top_k, e.expert_d_ff) == (2, 64, 6, 1408)
    assert (e.seq_aux, e.aux_loss_alpha, e.norm_topk_prob) == (True, 0.001, False)


def test_overrides_apply_and_parse_values():
    cfg = load_config("tiny", ["train.steps=7", "model.dtype=bfloat16", "moe.top_k=2", "train.lr=3e-4",
                               "moe.seq_aux=true", "train.decay_at=[0.5, 0.75]"])
    assert (cfg.train.steps, cfg.model.dtype, cfg.model.moe.top_k) == (7, "bfloat16", 2)
    assert (cfg.train.lr, cfg.model.moe.seq_aux, cfg.train.decay_at) == (3e-4, True, (0.5, 0.75))


@pytest.mark.parametrize(
    "tables, message",
    [
        (_with("model", hiden=3), r"unknown key model\.hiden; valid keys in \[model\]: vocab_size, d_model"),
        (_with("moe", topk=3), r"unknown key moe\.topk; valid keys in \[moe\]: n_routed_experts"),
        ({**TINY, "optim": {}}, r"unknown section \[optim\]"),
        (_with("model", d_model="big"), r"model\.d_model must be an integer, got 'big'"),
        (_with("model", n_layers=2.5), r"model\.n_layers must be an integer"),
        (_with("moe", seq_aux=1), r"moe\.seq_aux must be of type bool"),
        (_with("moe", routing="random"), r"moe\.routing must be one of \['softmax', 'sigmoid', 'hash', 'top_p'\]"),
        (_with("moe", top_k=5), r"moe\.top_k=5 must be between 1 and moe\.n_routed_experts=4"),
        (_with("model", n_heads=5), r"model\.n_heads=5 does not divide model\.d_model=32"),
        (_with("model", n_kv_heads=3), r"model\.n_kv_heads=3 must divide model\.n_heads=4"),
        (_with("model", dtype="fp8"), r"model\.dtype must be one of"),
        (_with("model", fp8=True, fp8_weights=True), r"model\.fp8 trains with FP8 GEMMs .* set one of them"),
        ({**_with("model", fp8=True), "moe": {**TINY["moe"], "backend": "ragged"}},
         r"model\.fp8 runs the routed experts' GEMMs in FP8 on the tiled backend .* not moe\.backend = 'ragged'"),
        (_with("moe", device_groups=3), r"moe\.device_groups=3 must divide moe\.n_routed_experts=4"),
        (_with("moe", routing="hash"), r"hash routing sends each token to exactly one expert"),
        ({"model": TINY["model"]}, r"no \[moe\] section"),
        ({"model": {"d_model": 32}}, r"\[model\]: .*missing"),
        (_with("train", decay_at=[0.9, 0.8]), r"train\.decay_at must be increasing"),
        (_with("moe", backend="tiledd"),
         r"unknown moe\.backend 'tiledd'; valid: auto, dense, ragged, tiled, tiled_fp8, triton"),
        ({**TINY, "moe": {"top_k": 1, "expert_d_ff": 8}}, r"\[moe\]: .*missing .*n_routed_experts"),
        ({**TINY, "mesh": {"data": -1, "expert": -1}}, r"at most one mesh axis may be -1"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(tables, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tables)


def test_bad_override_and_missing_file_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["steps=3"])
    with pytest.raises(ConfigError, match="no config file 'nope'; shipped configs: .*tiny"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nx = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_dense_model_needs_no_moe_section():
    cfg = config_from_dict({"model": {**TINY["model"], "first_k_dense": 2}})
    assert cfg.model.moe is None and cfg.model.n_moe_layers == 0
    assert dsmoe_jax.count_params(cfg)[0] == dsmoe_jax.count_params(cfg)[1]


def test_training_sequences_longer_than_the_model_takes_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"tiny.toml: train.seq_len=1024 exceeds model.max_seq_len=512, the longest "
                                          "sequence the model takes; lower train.seq_len or raise model.max_seq_len"):
        load_config("tiny", ["train.seq_len=1024"])
    assert load_config("tiny", ["train.seq_len=512"]).train.seq_len == 512, "equal is fine"


@pytest.mark.parametrize("override", ["train.mtp_weight=inf", "train.step_timeout=inf", "train.lr=nan",
                                      "moe.aux_loss_alpha=-inf", "train.decay_at=[0.5, inf]"])
def test_every_float_is_finite(override):
    """inf and nan pass range checks (inf >= 0) and would fail far from the setting."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}(\[1\])? must be a finite number"):
        load_config("tiny", [override])


def test_multi_token_prediction_needs_windows_longer_than_its_depth():
    with pytest.raises(ConfigError, match=r"model.mtp_depth=4 predicts tokens that far ahead.*train.seq_len=4 is too "
                                          "short"):
        load_config("tiny", ["model.mtp_depth=4", "train.seq_len=4"])
    assert load_config("tiny", ["model.mtp_depth=3", "train.seq_len=4"]).model.mtp_depth == 3
