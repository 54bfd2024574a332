"""The jitted train step: learning, gradient accumulation, and non-finite steps."""

import dataclasses

import jax
import numpy as np

from dsmoe_jax import Config, TrainConfig, init_params
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
