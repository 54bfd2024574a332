"""train.init_from: fine-tuning from a converted checkpoint or a training workdir, bit for bit;
MTP depths on one side only; resuming; every refusal named, with nothing written."""

import dataclasses
import functools
import json
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import dsmoe_jax
from dsmoe_jax import ConfigError, convert, data, load_config
from dsmoe_jax.checkpoint import CheckpointError, write_config
from dsmoe_jax.config import parse_init_from
from dsmoe_jax.convert.hf_files import plan_shards, write_safetensors
from dsmoe_jax.mesh import make_mesh
from dsmoe_jax.train.checkpoint import Checkpointer, model_differences
from dsmoe_jax.train.init_from import check_init_from, init_from_state
from dsmoe_jax.train.loop import train
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_sharded_state, init_state, state_shardings
from helpers import TINY_HF, random_hf_checkpoint, tiny_tokenizer

SETS = ["model.n_layers=2", "train.steps=2", "train.seq_len=16", "train.batch_size=2", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_tokens=256"]


def _cfg(*more: str):
    return load_config("tiny", SETS + list(more))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``dsmoe-jax convert hf-to-jax`` output of an HF checkpoint of the 2-block tiny model."""
    root = tmp_path_factory.mktemp("converted")
    model = _cfg().model
    tensors = random_hf_checkpoint(model, seed=1)
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(convert.config_to_hf(model)))
    write_safetensors(iter(tensors.items()), plan_shards(((n, a.shape, a.dtype) for n, a in tensors.items()),
                                                         1 << 30), root / "hf")
    convert.hf_to_jax(root / "hf", root / "jax", progress=False)
    return root / "jax"


def _workdir(path, cfg, seeds: dict[int, int]):
    """A training workdir of ``cfg`` whose checkpoint at each step holds the params drawn from its seed."""
    write_config(path, cfg)
    ckpt = Checkpointer(path, cfg)
    optimizer = make_optimizer(cfg.train)
    for step, seed in seeds.items():
        state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(seed)), optimizer)
        ckpt.save(step, state, iter(data.batches(np.arange(500) % 97, batch_size=2, seq_len=8, seed=0)))
    ckpt.wait()
    ckpt.close()
    return path


def _initial_state(cfg):
    """The state ``train`` would start ``cfg`` from with ``train.init_from``."""
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        optimizer = make_optimizer(cfg.train)
        return init_from_state(check_init_from(cfg), cfg, optimizer, state_shardings(cfg, optimizer, mesh),
                               jax.random.key(cfg.train.seed))


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, f"{jax.tree_util.keystr(path)}: {x.dtype} vs {y.dtype}"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _assert_fresh_optimizer(state):
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(state.opt_state)), \
        "Adam's moments and counts start at zero"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_converted_checkpoint_gives_its_own_logits_bit_for_bit(converted, scan_layers):
    cfg = _cfg(f"train.init_from={converted}", f"model.scan_layers={str(scan_layers).lower()}")
    state = _initial_state(cfg)
    _assert_fresh_optimizer(state)
    params, saved = dsmoe_jax.load_checkpoint(converted)
    _assert_equal(state.params, dsmoe_jax.match_layout(params, cfg.model))
    if not scan_layers:
        tokens = jnp.asarray(np.arange(32).reshape(2, 16) * 7 % cfg.model.vocab_size)
        ours, _ = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg.model))(state.params, tokens)
        theirs, _ = jax.jit(functools.partial(dsmoe_jax.forward, cfg=saved.model))(params, tokens)
        assert ours.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_bfloat16_checkpoint_loads_as_exact_float32_master_weights(converted, tmp_path):
    convert.hf_to_jax(converted.parent / "hf", tmp_path / "bf16", dtype="bfloat16", progress=False)
    state = _initial_state(_cfg(f"train.init_from={tmp_path / 'bf16'}"))
    params, _ = dsmoe_jax.load_checkpoint(tmp_path / "bf16")
    _assert_equal(state.params, jax.tree.map(lambda a: a.astype(jnp.float32), params))


def test_a_workdir_at_its_latest_step_and_at_a_named_step(tmp_path):
    run = _workdir(tmp_path / "run", _cfg(), {1: 11, 2: 12})
    latest = _initial_state(_cfg(f"train.init_from={run}"))
    _assert_fresh_optimizer(latest)
    _assert_equal(latest.params, dsmoe_jax.load_checkpoint(run)[0])
    first = _initial_state(_cfg(f"train.init_from={run}@1"))
    _assert_fresh_optimizer(first)
    _assert_equal(first.params, dsmoe_jax.load_checkpoint(run, step=1)[0])
    assert check_init_from(_cfg(f"train.init_from={run}@1")).description == f"step 1 of the training run {run}"


def test_a_scanned_workdir_loads_into_an_unrolled_run(tmp_path):
    run = _workdir(tmp_path / "run", _cfg("model.scan_layers=true"), {3: 5})
    state = _initial_state(_cfg(f"train.init_from={run}"))
    _assert_equal(state.params, dsmoe_jax.match_layout(dsmoe_jax.load_checkpoint(run)[0], _cfg().model))


def test_a_run_starts_from_the_weights_and_resume_ignores_init_from(tmp_path, converted, capsys):
    """The first update's learning rate is 0 (warmup from 0), so the step-1 checkpoint holds exactly
    the weights the run started from."""
    train(_cfg("train.steps=1", f"train.init_from={converted}"), tmp_path, progress=False)
    assert f"starting from the parameters of the converted checkpoint {converted}" in capsys.readouterr().out
    _assert_equal(dsmoe_jax.load_checkpoint(tmp_path)[0], dsmoe_jax.load_checkpoint(converted)[0])

    last = train(_cfg("train.steps=2", f"train.init_from={tmp_path / 'gone'}"), tmp_path, resume=True,
                 progress=False)
    assert last.step == 2
    assert f"--resume: continuing from this run's own checkpoints; train.init_from ({tmp_path / 'gone'}) is " \
           "ignored" in capsys.readouterr().out


def test_every_difference_is_named_in_one_error_and_nothing_is_written(converted, tmp_path):
    cfg = _cfg(f"train.init_from={converted}", "model.n_layers=3", "model.d_ff=256", "moe.top_k=2",
               # how the same model runs or trains: not differences
               "model.dtype=bfloat16", "model.remat=true", "moe.aux_loss_alpha=0.1", "moe.capacity_factor=1.5",
               "model.init_std=0.02", "model.attention=xla")
    with pytest.raises(CheckpointError) as e:
        train(cfg, tmp_path / "run", progress=False)
    message = str(e.value)
    for named in ("model.n_layers: 2 (checkpoint) vs 3 (run)", "model.d_ff: 512 (checkpoint) vs 256 (run)",
                  "moe.top_k: 3 (checkpoint) vs 2 (run)"):
        assert named in message, message
    assert message.count("(checkpoint) vs") == 3, message
    assert not (tmp_path / "run").exists()


def test_mtp_depths_on_one_side_need_drop_or_fresh(tmp_path):
    with_mtp = _workdir(tmp_path / "mtp", _cfg("model.mtp_depth=1"), {1: 3})
    without = _workdir(tmp_path / "plain", _cfg(), {1: 4})
    with pytest.raises(CheckpointError, match=r"model.mtp_depth: 1 \(checkpoint\) vs 0 \(run\): set "
                       r"train.init_mtp = 'drop' .*, or model.mtp_depth = 1"):
        train(_cfg(f"train.init_from={with_mtp}"), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"model.mtp_depth: 0 \(checkpoint\) vs 1 \(run\): set "
                       r"train.init_mtp = 'fresh' .*, or model.mtp_depth = 0"):
        train(_cfg(f"train.init_from={without}", "model.mtp_depth=1", "train.init_mtp=drop"), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()

    dropped = _initial_state(_cfg(f"train.init_from={with_mtp}", "train.init_mtp=drop"))
    saved = dsmoe_jax.load_checkpoint(with_mtp)[0]
    _assert_equal(dropped.params, {k: v for k, v in saved.items() if k != "mtp"})

    cfg = _cfg(f"train.init_from={without}", "model.mtp_depth=1", "train.init_mtp=fresh")
    fresh = _initial_state(cfg)
    _assert_fresh_optimizer(fresh)
    _assert_equal({k: v for k, v in fresh.params.items() if k != "mtp"}, dsmoe_jax.load_checkpoint(without)[0])
    optimizer = make_optimizer(cfg.train)
    scratch = init_sharded_state(cfg, optimizer, jax.random.key(cfg.train.seed),
                                 state_shardings(cfg, optimizer, make_mesh(cfg.mesh)))
    _assert_equal(fresh.params["mtp"], scratch.params["mtp"])  # as a run from scratch draws them


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    import dsmoe_jax
    from dsmoe_jax import load_config
    from dsmoe_jax.mesh import make_mesh
    from dsmoe_jax.train.init_from import check_init_from, init_from_state
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import state_shardings
    cfg = load_config("tiny", sys.argv[2:] + [f"train.init_from={sys.argv[1]}", "mesh.data=1", "mesh.fsdp=2",
                                              "mesh.tensor=2", "model.scan_layers=true", "model.mtp_depth=1",
                                              "train.init_mtp=fresh"])
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        optimizer = make_optimizer(cfg.train)
        shardings = state_shardings(cfg, optimizer, mesh)
        state = init_from_state(check_init_from(cfg), cfg, optimizer, shardings, jax.random.key(0))
    placed = jax.tree.map(lambda a, sharding: a.sharding.is_equivalent_to(sharding, a.ndim), state, shardings)
    assert all(jax.tree.leaves(placed)), placed
    assert not state.params["moe_layers"]["ffn"]["w_gate_EDF"].sharding.is_fully_replicated
    params, _ = dsmoe_jax.load_checkpoint(sys.argv[1])
    want = dsmoe_jax.match_layout(params, cfg.model)
    for a, b in zip(jax.tree.leaves({k: v for k, v in state.params.items() if k != "mtp"}), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("ok")
""")


def test_the_weights_are_read_straight_into_the_runs_shardings(converted):
    """On a 2 x 2 (fsdp x tensor) mesh, into the scanned layout, with a fresh MTP depth: every part
    of the state lies where the run's shardings say."""
    assert run_python(MESH_SCRIPT, str(converted), *SETS, devices=4).strip().endswith("ok")


def _hf_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_HF))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("source, message", [
    (lambda tmp, conv: tmp / "missing", r"train.init_from: .*missing does not exist"),
    (lambda tmp, conv: _hf_dir(tmp / "hf"), r"train.init_from: .*hf is a Hugging Face checkpoint \(model_type "
                                            r"'deepseek'\), not a dsmoe-jax one: convert it first with "
                                            r"`dsmoe-jax convert hf-to-jax .*hf OUT`"),
    (lambda tmp, conv: tmp, r"train.init_from: .* has no config.json: not a dsmoe-jax run or checkpoint"),
    (lambda tmp, conv: f"{conv}@5", r"is a converted checkpoint: it has no steps to choose from"),
    (lambda tmp, conv: f"{_workdir(tmp / 'ran', _cfg(), {1: 0, 2: 0})}@9",
     r"ran holds no complete checkpoint at step 9; it has steps \[1, 2\]"),
])
def test_a_bad_source_is_named_and_nothing_is_written(tmp_path, converted, source, message):
    with pytest.raises(CheckpointError, match=message):
        train(_cfg(f"train.init_from={source(tmp_path, converted)}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_checkpoints_tokenizer_must_be_the_runs(tmp_path, converted):
    shutil.copytree(converted, tmp_path / "ckpt")
    tiny_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    tokenizer = tmp_path / "ckpt" / "tokenizer.json"
    with pytest.raises(CheckpointError, match=rf"trained with the tokenizer '{tokenizer}', but the run's "
                       rf"data.tokenizer 'byte' is another one \(.*\); set data.tokenizer = '{tokenizer}'"):
        train(_cfg(f"train.init_from={tmp_path / 'ckpt'}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    check_init_from(_cfg(f"train.init_from={tmp_path / 'ckpt'}", f"data.tokenizer='{tokenizer}'"))

    trained = _workdir(tmp_path / "ran", _cfg(f"data.tokenizer='{tokenizer}'"), {1: 0})
    with pytest.raises(CheckpointError, match=rf"set data.tokenizer = '{tokenizer}'"):
        check_init_from(_cfg(f"train.init_from={trained}"))


def test_a_different_vocabulary_is_a_difference(converted):
    with pytest.raises(CheckpointError, match=r"model.vocab_size: 512 \(checkpoint\) vs 1024 \(run\)"):
        check_init_from(_cfg(f"train.init_from={converted}", "model.vocab_size=1024"))


def test_an_unset_n_kv_heads_is_n_heads():
    """Converted checkpoints always set model.n_kv_heads; the shipped configs of the same models do not."""
    cfg = _cfg()
    explicit = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_kv_heads=cfg.model.n_heads))
    assert model_differences(explicit, cfg) == []
    grouped = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_kv_heads=2))
    assert model_differences(grouped, cfg) == ["model.n_kv_heads: 2 (saved) vs 4 (now)"]


def test_the_source_is_parsed_and_checked_statically():
    assert parse_init_from("runs/a") == ("runs/a", None)
    assert parse_init_from("runs/a@200") == ("runs/a", 200)
    assert parse_init_from("me@host/ckpt") == ("me@host/ckpt", None), "an @ in a path is not a step"
    for bad in ("", "@3", "runs/a@", "runs/a@@3"):
        with pytest.raises(ConfigError, match="must be a directory .* or DIR@STEP"):
            parse_init_from(bad)
    with pytest.raises(ConfigError, match="train.init_from '@3' must be"):
        _cfg("train.init_from='@3'")
    with pytest.raises(ConfigError, match=r"train.init_mtp must be one of \['match', 'drop', 'fresh'\]"):
        _cfg("train.init_mtp=keep")
    assert dataclasses.replace(_cfg().train, init_from="ckpt/16b@7").init_from == "ckpt/16b@7"
