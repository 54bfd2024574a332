"""ESFT: relevance scores against a hand aggregation of the router's recorded choices, selection
by hand, DeepSeek's expert_cfg.json, and training only the chosen experts (the rest bitwise
unchanged, optimizer state only for them)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsmoe_jax
from dsmoe_jax import cli
from dsmoe_jax.config import load_config
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.model import forward, match_layout, param_shapes
from dsmoe_jax.moe import RouteOptions
from dsmoe_jax.packing import Packed
from dsmoe_jax.peft import ExpertConfig, esft_tuning, relevance, select
from dsmoe_jax.peft.esft import moe_layers
from dsmoe_jax.peft.tuning import ALL, count
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step

SMALL = ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "moe.expert_d_ff=16",
         "model.vocab_size=260", "model.max_seq_len=32", "train.seq_len=16", "train.batch_size=4",
         "moe.n_routed_experts=8", "moe.top_k=2", "train.warmup_steps=0", "train.lr=1e-2"]


def _cfg(*extra):
    return load_config("tiny", [*SMALL, *extra])


def test_relevance_is_the_recorded_routing_aggregated_by_hand():
    """Gate: each layer's mean gate per expert (0 where not chosen), token: the share of the
    layer's K selections per expert, both over the counted tokens only, each layer summing to 1."""
    cfg = _cfg()
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 260, (2, 17)).astype(np.int32)
    mask = np.zeros((2, 17), np.int32)
    mask[0, 5:12] = mask[1, 2:9] = 1  # the "answer" tokens
    batch = Packed(tokens, np.ones((2, 17), np.int32), mask)
    got = relevance(params, cfg, [batch])
    aux = forward(params, jnp.asarray(tokens[:, :-1]), cfg.model, route=RouteOptions(record=True),
                  segment_ids=jnp.ones((2, 16), jnp.int32))[1]
    experts, gates = np.asarray(aux.expert_choices), np.asarray(aux.expert_gates)
    counted = (mask[:, :-1] > 0).reshape(-1)
    E, K = cfg.model.moe.n_routed_experts, cfg.model.moe.top_k
    gate, token = np.zeros((experts.shape[0], E)), np.zeros((experts.shape[0], E))
    for layer in range(experts.shape[0]):
        for t in np.flatnonzero(counted):
            for k in range(K):
                gate[layer, experts[layer, t, k]] += gates[layer, t, k]
                token[layer, experts[layer, t, k]] += 1 / K
    assert got["tokens"] == counted.sum() == 14
    np.testing.assert_allclose(got["gate"], gate / gate.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(got["token"], token / token.sum(1, keepdims=True), rtol=1e-5)
    assert np.allclose(got["token"].sum(1), 1) and np.allclose(got["gate"].sum(1), 1), "normalised per layer"


def test_selection_by_hand():
    r = np.array([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.9, 0.0]])
    chosen = select(r, 0.6, [1, 2, 3]).experts
    assert chosen[1] == (1, 2), "0.5 < 0.6, then 0.8 crosses it: the crossing expert is included"
    assert chosen[2] == (0, 1, 2), "ties: the lower id first; 0.75 reaches 0.6 at the third"
    assert chosen[3] == (2,), "the top expert alone reaches it"
    assert select(r, 1.0, [1, 2, 3]).experts[1] == (1, 2, 0, 3), "top_p 1: every expert"
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        select(r, 0.0, [1, 2, 3])


def test_expert_cfg_is_deepseeks_format_and_bad_ones_are_named(tmp_path):
    cfg = _cfg()  # tiny: layer 0 dense, layers 1-3 MoE
    ExpertConfig({1: (3, 0), 3: (7,)}).write(tmp_path / "expert_cfg.json")
    raw = json.loads((tmp_path / "expert_cfg.json").read_text())
    assert raw == {"experts": {"1": [3, 0], "3": [7]}, "shared_experts": False, "non_expert_modules": False}
    assert ExpertConfig.read(tmp_path, cfg) == ExpertConfig({1: (3, 0), 3: (7,)}), "a directory holding one"
    bad = {"0": ([1], "layer '0' is not an MoE layer of this model .* 1..3"),
           "4": ([1], "layer '4' is not an MoE layer"),
           "2": ([8], "expert 8 is out of range; this model has 8 routed experts"),
           "1": ([2, 2], "layer 1 names an expert twice")}
    for layer, (ids, message) in bad.items():
        (tmp_path / "bad.json").write_text(json.dumps({"experts": {layer: ids}}))
        with pytest.raises(ConfigError, match=message):
            ExpertConfig.read(tmp_path / "bad.json", cfg)
    (tmp_path / "bad.json").write_text(json.dumps({"experts": {}, "lora": 1}))
    with pytest.raises(ConfigError, match="unknown keys \\['lora'\\]"):
        ExpertConfig.read(tmp_path / "bad.json", cfg)
    with pytest.raises(ConfigError, match="does not exist: write one with `dsmoe-jax esft-score`"):
        ExpertConfig.read(tmp_path / "none.json", cfg)
    with pytest.raises(ConfigError, match="expected 'all' or 'esft:PATH'"):
        _cfg("train.trainable='lora'")


@pytest.mark.parametrize("scan", [False, True])
def test_select_then_apply_is_the_identity_and_writes_only_the_chosen_rows(scan):
    cfg = _cfg(f"model.scan_layers={str(scan).lower()}")
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tuning = esft_tuning(ExpertConfig({1: (2, 5), 3: (0,)}), cfg)
    trained = tuning.select(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), tuning.apply(params, trained), params))
    changed = tuning.apply(params, jax.tree.map(lambda a: a + 1.0, trained))
    unrolled = match_layout(changed, cfg.model.__class__(**{**cfg.model.__dict__, "scan_layers": False})) \
        if scan else changed
    before = match_layout(params, cfg.model.__class__(**{**cfg.model.__dict__, "scan_layers": False})) \
        if scan else params
    for layer in (1, 2, 3):
        w_after, w_before = (np.asarray(t["layers"][layer]["ffn"]["w_gate_EDF"]) for t in (unrolled, before))
        rows = {1: [2, 5], 3: [0]}.get(layer, [])
        moved = [e for e in range(8) if not (w_after[e] == w_before[e]).all()]
        assert moved == rows, (layer, moved)
    D, F = cfg.model.d_model, cfg.model.moe.expert_d_ff
    assert count(tuning, param_shapes(cfg)) == 3 * 3 * D * F, "three experts, three matrices each"


def test_esft_training_leaves_every_frozen_parameter_bitwise_unchanged_and_keeps_moments_only_for_the_chosen():
    cfg = _cfg()
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tuning = esft_tuning(ExpertConfig({1: (2, 5), 3: (0,)}), cfg)
    optimizer = make_optimizer(cfg.train)
    state = init_state(params, optimizer, tuning)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * count(tuning, params), "Adam's two moments of the trained rows, nothing else"
    step = jax.jit(make_train_step(cfg, optimizer, tuning))
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 260, (4, 17)), jnp.int32)
    for _ in range(3):
        state, metrics = step(state, batch)
        assert bool(metrics.finite)
    frozen = tuning.apply(state.params, tuning.select(params))  # the trained rows put back as they were
    same = jax.tree.map(lambda a, b: bool((a == b).all()), frozen, params)
    assert all(jax.tree.leaves(same)), "every parameter but the chosen experts' rows is bitwise unchanged"
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), tuning.select(state.params), tuning.select(params))
    assert all(jax.tree.leaves(moved)), "each chosen expert trained"


def test_the_optimizer_memory_xla_compiles_scales_with_the_trained_count():
    """XLA's memory analysis of the compiled train step: its arguments shrink by Adam's two float32
    moments of every parameter ESFT freezes."""
    cfg = _cfg()
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer(cfg.train)
    batch = jax.ShapeDtypeStruct((4, 17), jnp.int32)
    sizes = {}
    for name, tuning in (("all", ALL), ("esft", esft_tuning(ExpertConfig({1: (2, 5), 3: (0,)}), cfg))):
        state = jax.eval_shape(lambda p: init_state(p, optimizer, tuning), params)
        compiled = jax.jit(make_train_step(cfg, optimizer, tuning)).lower(state, batch).compile()
        sizes[name] = (compiled.memory_analysis().argument_size_in_bytes, count(tuning, params))
    (args_all, n_all), (args_esft, n_esft) = sizes["all"], sizes["esft"]
    assert args_all - args_esft == 2 * 4 * (n_all - n_esft), sizes


def test_plan_counts_the_optimizer_state_of_the_trained_part_only(tmp_path):
    from dsmoe_jax.plan import make_plan

    ExpertConfig({1: (2, 5), 3: (0,)}).write(tmp_path / "expert_cfg.json")
    full = make_plan(_cfg(), {"data": 1})
    part = make_plan(_cfg(f"train.trainable='esft:{tmp_path}/expert_cfg.json'"), {"data": 1})
    D, F = 32, 16
    assert part.optimizer == 8 * 3 * 3 * D * F and full.optimizer == 2 * full.params, (part.optimizer, full.optimizer)
    assert part.params == full.params, "every parameter is still held"


def test_esft_score_writes_scores_a_selection_and_trains_with_it(tmp_path, capsys):
    """The command end to end on a tiny model and text data: scores.json's per-layer relevance sums
    to 1, expert_cfg.json selects per top_p, and a fine-tuning run trains only those experts."""
    base = tmp_path / "base"
    assert cli.main(["train", "--config", "tiny", *[a for s in SMALL for a in ("--set", s)], "--set", "train.steps=2",
                     "--workdir", str(base)]) == 0
    corpus = tmp_path / "task.txt"
    corpus.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200)))
    out = tmp_path / "esft"
    assert cli.main(["esft-score", "--checkpoint", str(base), "--data", str(corpus), "--out", str(out),
                     "--tokens", "2048", "--score", "gate", "--top-p", "0.3"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["layers"] == moe_layers(_cfg()) == [1, 2, 3] and scores["tokens"] >= 2048
    assert np.allclose(np.sum(scores["gate"], axis=1), 1, atol=1e-4), "normalised within each layer"
    chosen = ExpertConfig.read(out, _cfg())
    for layer, row in zip(scores["layers"], scores["gate"]):
        picked = np.asarray(row)[list(chosen.experts[layer])]
        assert picked.sum() >= 0.3 - 1e-4 and picked[:-1].sum() < 0.3, "the fewest reaching top_p"
    assert (out / "relevance.png").stat().st_size > 1000
    assert "train.trainable='esft:" in capsys.readouterr().out
    tuned = tmp_path / "tuned"
    assert cli.main(["train", "--config", "tiny", *[a for s in SMALL for a in ("--set", s)], "--set", "train.steps=2",
                     "--set", f"train.init_from='{base}'", "--set", f"train.trainable='esft:{out}/expert_cfg.json'",
                     "--workdir", str(tuned)]) == 0
    before, after = (dsmoe_jax.load_checkpoint(d)[0] for d in (base, tuned))
    tuning = esft_tuning(chosen, _cfg())
    frozen_same = jax.tree.map(lambda a, b: bool((a == b).all()), tuning.apply(after, tuning.select(before)), before)
    assert all(jax.tree.leaves(frozen_same)), "the run wrote only the chosen experts"
    assert optax.tree.norm(jax.tree.map(jnp.subtract, tuning.select(after), tuning.select(before))) > 0


MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import dsmoe_jax
from dsmoe_jax import mesh as mesh_lib
from dsmoe_jax.config import load_config
from dsmoe_jax.peft import ExpertConfig, esft_tuning
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_sharded_state, make_train_step, state_shardings

cfg = load_config("tiny", json.loads(sys.argv[1]))
tuning = esft_tuning(ExpertConfig({1: (2, 5), 3: (0,)}), cfg)
optimizer = make_optimizer(cfg.train)
mesh = dsmoe_jax.make_mesh({"data": 2, "expert": 2, "tensor": 2})
with jax.set_mesh(mesh):
    shardings = state_shardings(cfg, optimizer, mesh, tuning)
    state = init_sharded_state(cfg, optimizer, jax.random.key(0), shardings, tuning)
    first = jax.device_get(state.params)
    step = jax.jit(make_train_step(cfg, optimizer, tuning), in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, jax.NamedSharding(mesh, jax.P())))
    rows = np.random.default_rng(1).integers(0, 260, (4, 17)).astype(np.int32)
    batch = jax.device_put(rows, mesh_lib.batch_sharding(mesh))
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics.loss))
    last = jax.device_get(state.params)
frozen = tuning.apply(last, tuning.select(first))
same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), frozen, first)))
print(json.dumps({"losses": losses, "frozen_same": same}))
"""


def test_esft_trains_on_an_expert_and_tensor_parallel_mesh_as_on_one_device():
    """data=2, expert=2, tensor=2 on 8 CPU devices: the same losses as one device, and the frozen
    parameters untouched there too (the chosen rows live outside the expert axis)."""
    from conftest import run_python

    overrides = [*SMALL, "model.scan_layers=true"]
    out = json.loads(run_python(MESH_SCRIPT, json.dumps(overrides)).strip().splitlines()[-1])
    cfg = _cfg("model.scan_layers=true")
    tuning = esft_tuning(ExpertConfig({1: (2, 5), 3: (0,)}), cfg)
    optimizer = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(cfg, jax.random.key(0)), optimizer, tuning)
    step = jax.jit(make_train_step(cfg, optimizer, tuning))
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 260, (4, 17)), jnp.int32)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics.loss))
    assert out["frozen_same"], "frozen parameters bitwise unchanged on the mesh"
    np.testing.assert_allclose(out["losses"], losses, rtol=2e-5, err_msg="the mesh trains as one device does")
