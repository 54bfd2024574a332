"""The jitted train step: learning, gradient accumulation, and non-finite steps."""

import dataclasses

import jax
import numpy as np
import pytest

from dsmoe_jax import Config, TrainConfig, init_params, match_layout
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step


def _setup(model_cfg, **train):
    cfg = Config(model=model_cfg, train=TrainConfig(lr=3e-3, warmup_steps=0, steps=100, **train))
    opt = make_optimizer(cfg.train)
    state = init_state(init_params(model_cfg, jax.random.key(0)), opt)
    batch = jax.random.randint(jax.random.key(1), (4, 17), 0, model_cfg.vocab_size)
    return cfg, opt, state, batch


def test_repeated_batch_loss_falls(small_cfg):
    cfg, opt, state, batch = _setup(small_cfg)
    step = jax.jit(make_train_step(cfg, opt))
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m.loss))
    assert losses[-1] < losses[0] - 1.0, f"memorising one batch should cut the loss: {losses}"
    assert int(state.step) == 15


def test_gradient_accumulation_matches_one_batch(small_cfg):
    cfg, opt, state, batch = _setup(small_cfg)
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=2))
    # Balance statistics are per micro-batch, so compare without them.
    no_aux = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, aux_loss_alpha=0.0))
    cfg, cfg2 = (dataclasses.replace(c, model=no_aux) for c in (cfg, cfg2))
    one, m1 = jax.jit(make_train_step(cfg, opt))(state, batch)
    two, m2 = jax.jit(make_train_step(cfg2, opt))(state, batch)
    np.testing.assert_allclose(m1.loss, m2.loss, rtol=1e-5)
    # Adam's first update is about lr * sign(g): where g is ~0, rounding may flip it slightly.
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=0.02 * cfg.train.lr)


def test_non_finite_step_changes_nothing(small_cfg):
    # bfloat16 activations with absurd weights overflow to inf: a real non-finite loss.
    blowup = dataclasses.replace(small_cfg, dtype="bfloat16", init_std=1e20)
    cfg, opt, state, batch = _setup(blowup)
    new, m = jax.jit(make_train_step(cfg, opt))(state, batch)
    assert not bool(m.finite), f"expected an overflow, got loss {float(m.loss)}"
    assert int(new.step) == 1, "the step is counted (skipped), the update is not applied"
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])  # True: 14 s
def test_auxiliary_loss_free_bias_moves_toward_balance_by_hand(small_cfg, scan_layers):
    """After a step, each MoE layer's score bias is b + speed * sign(mean load - load), from the
    step's expert load; the optimizer leaves it alone (no gradient, no weight decay)."""
    moe = dataclasses.replace(small_cfg.moe, score_bias=True, bias_update_speed=0.01)
    cfg, opt, state, batch = _setup(dataclasses.replace(small_cfg, moe=moe, scan_layers=scan_layers),
                                    weight_decay=0.5)
    new, m = jax.jit(make_train_step(cfg, opt))(state, batch)
    params = match_layout(new.params, dataclasses.replace(cfg.model, scan_layers=False))
    load_LE = np.asarray(m.aux.expert_load)
    assert load_LE.shape == (2, 8) and load_LE.sum() == 2 * 4 * 16 * 3, "2 MoE layers, 64 tokens, top-3"
    for j, i in enumerate((1, 2)):
        want = 0.01 * np.sign(load_LE[j].mean() - load_LE[j])
        np.testing.assert_array_equal(params["layers"][i]["ffn"]["score_bias_E"], want.astype(np.float32))
    assert np.any(want != 0), "the example must be unbalanced"
