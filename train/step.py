"""The loss and the jitted train step: ``(state, batch) -> (state, metrics)``, a pure function.

Shape legend: B batch, S sequence, V vocabulary, A gradient-accumulation micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsmoe_jax.config import Config
from dsmoe_jax.evaluation import cross_entropy
from dsmoe_jax.model import Aux, forward, forward_mtp, init_params, param_shapes, update_score_bias
from dsmoe_jax.sharding import param_shardings


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: train steps taken (batches consumed), skipped ones included
    params: dict  # float32 master weights
    opt_state: optax.OptState


class StepMetrics(NamedTuple):
    """What a train step reports (means over its micro-batches)."""

    loss: jax.Array  # cross-entropy + balance losses: what the gradient is of
    ce: jax.Array  # next-token cross-entropy
    grad_norm: jax.Array  # global norm before clipping
    finite: jax.Array  # bool: loss and gradient were finite, so the step was applied
    aux: Aux  # balance losses and expert load, as ``forward`` reports them
    mtp_ce: jax.Array  # [model.mtp_depth] each multi-token-prediction depth's cross-entropy


def init_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def state_shardings(cfg: Config, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
    """Where each part of the train state lives on ``mesh``: params and the optimizer's
    per-parameter moments by the logical-axis rules, everything else (step, counts) replicated."""
    params = param_shardings(cfg, mesh)
    replicated = jax.NamedSharding(mesh, jax.P())
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, param_shapes(cfg)), params,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return TrainState(replicated, params, opt_state)


def init_sharded_state(cfg: Config, optimizer: optax.GradientTransformation, key: jax.Array,
                       shardings: TrainState) -> TrainState:
    """A fresh train state created directly in its shardings (no device ever holds all of it)."""
    return jax.jit(lambda k: init_state(init_params(cfg.model, k), optimizer), out_shardings=shardings)(key)


def loss_fn(params: dict, windows_BS1: jax.Array, cfg: Config) -> tuple[jax.Array, tuple]:
    """Cross-entropy of each window's next tokens plus the configured balance losses, plus, with
    multi-token prediction, ``train.mtp_weight`` times the mean over depths of each depth's
    cross-entropy (depth k predicts the token k + 1 places ahead). The auxiliary output is
    ``(cross-entropy, aux, the depths' cross-entropies [model.mtp_depth])``."""
    inputs, targets = windows_BS1[:, :-1], windows_BS1[:, 1:]
    if cfg.model.mtp_depth:
        logits, aux, ahead = forward_mtp(params, inputs, cfg.model)
    else:
        (logits, aux), ahead = forward(params, inputs, cfg.model), ()
    with jax.named_scope("loss"):
        ce = cross_entropy(logits, targets)
        mtp_ce = jnp.stack([cross_entropy(a, windows_BS1[:, k + 1:]) for k, a in enumerate(ahead, 1)]) if ahead \
            else jnp.zeros((0,), jnp.float32)
    mtp_loss = cfg.train.mtp_weight * jnp.mean(mtp_ce) if ahead else 0.0
    return ce + aux.balance_loss + mtp_loss, (ce, aux, mtp_ce)


def make_train_step(cfg: Config, optimizer: optax.GradientTransformation):
    """The train step for ``cfg``: gradient accumulation over ``train.grad_accum`` micro-batches,
    clipping and AdamW; a non-finite loss or gradient leaves the state unchanged and reports it."""
    A, moe = cfg.train.grad_accum, cfg.model.moe
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, windows_BS1):
        """Loss, cross-entropy, aux and the MTP depths' cross-entropies (means over micro-batches),
        the mean gradient, and the expert load of the whole batch (for the score-bias update)."""
        if A == 1:  # no accumulator: it would cost a zero-filled copy of the params and a pass adding into it
            (loss, (ce, aux, mtp_ce)), grads = grad_fn(params, windows_BS1, cfg)
            return loss, ce, aux, mtp_ce, grads, aux.expert_load

        def accumulate(grads, micro):
            (loss, (ce, aux, mtp_ce)), g = grad_fn(params, micro, cfg)
            return jax.tree.map(jnp.add, grads, g), (loss, ce, aux, mtp_ce)

        micro_ABS1 = windows_BS1.reshape(A, -1, *windows_BS1.shape[1:])
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, per_micro = jax.lax.scan(accumulate, zeros, micro_ABS1)
        loss, ce, aux, mtp_ce = jax.tree.map(lambda a: jnp.mean(a, axis=0), per_micro)
        return loss, ce, aux, mtp_ce, jax.tree.map(lambda g: g / A, grads), jnp.sum(per_micro[2].expert_load, axis=0)

    def update(grads, opt_state, params, expert_load_LE):
        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if moe is not None and moe.bias_update_speed:
                params = update_score_bias(params, expert_load_LE, cfg.model)
        return params, opt_state

    def step(state: TrainState, windows_BS1: jax.Array):
        loss, ce, aux, mtp_ce, grads, expert_load_LE = gradients(state.params, windows_BS1)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A bad step leaves params and optimizer state as they were: nothing non-finite is kept.
        # A cond, not a select of new against old: the update then runs in place in the donated
        # buffers, where a select needs the old state kept, a copy of params and moments per step.
        params, opt_state = jax.lax.cond(finite, update, lambda g, o, p, load: (p, o),
                                         grads, state.opt_state, state.params, expert_load_LE)
        return TrainState(state.step + 1, params, opt_state), StepMetrics(loss, ce, grad_norm, finite, aux, mtp_ce)

    return step
