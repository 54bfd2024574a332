"""Orbax checkpoints: exact round trip, the data position, and refusing the wrong workdir."""

import asyncio
import dataclasses
import errno
import json
import os
import tempfile
import time

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import Config, TrainConfig, convert, data
from dsmoe_jax.checkpoint import CheckpointError, check_workdir_writable, params_location, write_config
from dsmoe_jax.train.checkpoint import Checkpointer, DrainingLoop, draining_event_loops
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step
from helpers import TINY_HF


@pytest.fixture
def run(small_cfg):
    cfg = Config(model=small_cfg, train=TrainConfig(lr=1e-3, warmup_steps=0, steps=10))
    opt = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(small_cfg, jax.random.key(0)), opt)
    ds = data.batches(np.arange(5000) % small_cfg.vocab_size, batch_size=2, seq_len=16, seed=0)
    return cfg, opt, state, ds


def test_round_trip_restores_identical_state_and_data_position(tmp_path, run):
    cfg, opt, state, ds = run
    it = iter(ds)
    state, _ = jax.jit(make_train_step(cfg, opt))(state, next(it))  # non-trivial Adam moments
    ckpt = Checkpointer(tmp_path, cfg)
    write_config(tmp_path, cfg)
    ckpt.save(1, state, it)
    ckpt.wait()
    expected_batch = next(it)

    fresh = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(9)), opt)
    it2 = iter(ds)
    restored = Checkpointer(tmp_path, cfg).restore(1, fresh, it2)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(next(it2), expected_batch, err_msg="the data iterator must resume")

    params, loaded_cfg = dsmoe_jax.load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_refuses_unrequested_resume_and_other_models(tmp_path, run):
    cfg, _, state, ds = run
    ckpt = Checkpointer(tmp_path, cfg)
    write_config(tmp_path, cfg)
    ckpt.save(3, state, iter(ds))
    ckpt.wait()
    with pytest.raises(CheckpointError, match="latest step 3.*pass --resume"):
        Checkpointer(tmp_path, cfg).check_compatible(resume=False)
    assert Checkpointer(tmp_path, cfg).check_compatible(resume=True) == 3
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=128))
    with pytest.raises(CheckpointError, match=r"different model \(model.d_ff: 64 \(saved\) vs 128 \(now\)\)"):
        Checkpointer(tmp_path, other).check_compatible(resume=True)
    changed_schedule = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=99))
    assert Checkpointer(tmp_path, changed_schedule).check_compatible(resume=True) == 3, "train keys may change"


def test_load_checkpoint_of_an_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        dsmoe_jax.load_checkpoint(tmp_path)


def test_a_hugging_face_folder_is_named_with_the_convert_command(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a Hugging Face checkpoint \\(model_type 'deepseek'\\), "
                       f"not a dsmoe-jax one: convert it first with `dsmoe-jax convert hf-to-jax {tmp_path} OUT`"):
        dsmoe_jax.load_checkpoint(tmp_path)
    # our config.json beside HF weights: found where the params are looked for
    write_config(tmp_path, Config(model=convert.config_from_hf(TINY_HF)))
    with pytest.raises(CheckpointError, match="is a Hugging Face checkpoint, not a dsmoe-jax one"):
        params_location(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {"d_mo')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON .*: damaged; restore it from a copy"):
        dsmoe_jax.load_checkpoint(tmp_path)


def test_an_unusable_workdir_is_refused_before_training(tmp_path, monkeypatch):
    check_workdir_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir()), "no probe left"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match="the workdir .*file is a file, not a directory; pass a directory"):
        check_workdir_writable(tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"the workdir .*file/run is not writable \(Not a directory\)"):
        check_workdir_writable(tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CheckpointError, match=r"is not writable \(Read-only file system\); pass a --workdir on a "
                                              "writable disk"):
        check_workdir_writable(tmp_path / "new" / "run")


def test_a_restores_event_loop_closes_only_after_the_reads_it_started():
    """Orbax closes the loop of a restore that raised at once; a read of another array still in
    flight would then call into the closed loop ("Event loop is closed" tracebacks)."""
    previous = asyncio.get_event_loop_policy()
    with draining_event_loops():
        loop = asyncio.new_event_loop()
    assert isinstance(loop, DrainingLoop), type(loop)
    assert asyncio.get_event_loop_policy() is previous, "the policy is back after the block"

    async def restore():
        asyncio.ensure_future(asyncio.to_thread(time.sleep, 0.2))  # another array, read in a thread
        await asyncio.sleep(0)
        raise OSError("damaged")

    with pytest.raises(OSError, match="damaged"):
        loop.run_until_complete(restore())
    pending = asyncio.all_tasks(loop)
    assert pending, "the read outlives the failed restore"
    loop.close()
    assert loop.is_closed() and all(t.done() for t in pending), "closed only once the read was in"
