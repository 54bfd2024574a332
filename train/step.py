"""The loss and the jitted train step: ``(state, batch) -> (state, metrics)``, a pure function.

Shape legend: B batch, S sequence, V vocabulary, A gradient-accumulation micro-batches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsmoe_jax.config import Config
from dsmoe_jax.evaluation import token_losses
from dsmoe_jax.model import Aux, forward, forward_mtp, init_params, param_axes, param_shapes
from dsmoe_jax.packing import Packed, row_tokens, row_weights
from dsmoe_jax.peft.tuning import ALL, Tuning, trained_shapes
from dsmoe_jax.sharding import axes_shardings, param_shardings
from dsmoe_jax.train.balance import update_score_bias


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: train steps taken (batches consumed), skipped ones included
    params: dict  # float32 master weights, frozen ones included
    opt_state: optax.OptState  # of the trained part only (``Tuning.select``)
    # LoRA's factors (peft/lora.py), the trained part a LoRA run holds beside the frozen params; {} otherwise
    adapter: dict = {}  # one empty dict shared by every state without one: never mutated


class StepMetrics(NamedTuple):
    """What a train step reports: losses of the whole batch (every counted token weighing the
    same), ``aux`` the mean over micro-batches."""

    loss: jax.Array  # cross-entropy + balance losses: what the gradient is of
    ce: jax.Array  # next-token cross-entropy
    grad_norm: jax.Array  # global norm before clipping
    finite: jax.Array  # bool: loss and gradient were finite, so the step was applied
    aux: Aux  # balance losses and expert load, as ``forward`` reports them
    mtp_ce: jax.Array  # [model.mtp_depth] each multi-token-prediction depth's cross-entropy


def init_state(params: dict, optimizer: optax.GradientTransformation, tuning: Tuning = ALL,
               key: jax.Array | None = None) -> TrainState:
    """Step 0: ``params``, the tuning's first adapter (drawn from ``key``, default key 0) and a
    fresh optimizer state of the trained part."""
    adapter = tuning.init(params, jax.random.key(0) if key is None else key)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(tuning.select(params, adapter)), adapter)


def state_shardings(cfg: Config, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    tuning: Tuning = ALL) -> TrainState:
    """Where each part of the train state lives on ``mesh``: params, the adapter and the
    optimizer's per-parameter moments (of the trained part) by the logical-axis rules, everything
    else (step, counts) replicated."""
    params = param_shardings(cfg, mesh)
    replicated = jax.NamedSharding(mesh, jax.P())
    trained = trained_shapes(tuning, param_shapes(cfg))
    trained_shardings = axes_shardings(tuning.axes(param_axes(cfg)), trained, mesh)
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, trained), trained_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    # a tuning that holds an adapter (LoRA) trains exactly it; the others hold none
    holds_adapter = jax.tree.leaves(jax.eval_shape(lambda p: tuning.init(p, jax.random.key(0)), param_shapes(cfg)))
    return TrainState(replicated, params, opt_state, trained_shardings if holds_adapter else {})


def init_sharded_state(cfg: Config, optimizer: optax.GradientTransformation, key: jax.Array,
                       shardings: TrainState, tuning: Tuning = ALL) -> TrainState:
    """A fresh train state created directly in its shardings (no device ever holds all of it);
    the params are drawn from ``key`` whatever the tuning, an adapter from a key folded from it."""
    return jax.jit(lambda k: init_state(init_params(cfg.model, k), optimizer, tuning, jax.random.fold_in(k, 1)),
                   out_shardings=shardings)(key)


class TargetCounts(NamedTuple):
    """How many predictions a whole step's batch trains on: the divisors of its cross-entropies,
    so that every counted token weighs the same whichever micro-batch or device holds it."""

    main: jax.Array  # float32: next-token predictions
    ahead: jax.Array  # [model.mtp_depth] float32: each multi-token-prediction depth's predictions
    micro_batches: int = 1  # the balance losses are averaged over them


def count_targets(batch: jax.Array | Packed, cfg: Config, micro_batches: int = 1) -> TargetCounts:
    """The predictions ``batch`` trains on (``TargetCounts``)."""
    ahead = [jnp.sum(row_weights(batch, k + 1)) for k in range(1, cfg.model.mtp_depth + 1)]
    return TargetCounts(jnp.sum(row_weights(batch, 1)), jnp.stack(ahead) if ahead else jnp.zeros((0,), jnp.float32),
                        micro_batches)


def loss_fn(params: dict, batch: jax.Array | Packed, cfg: Config, counts: TargetCounts | None = None
            ) -> tuple[jax.Array, tuple]:
    """Cross-entropy of the next tokens plus the configured balance losses, plus, with
    multi-token prediction, ``train.mtp_weight`` times the mean over depths of each depth's
    cross-entropy (depth k predicts the token k + 1 places ahead). The auxiliary output is
    ``(cross-entropy, aux, the depths' cross-entropies [model.mtp_depth])``.

    ``batch``: windows ``[B, S + 1]`` of consecutive tokens, or ``Packed`` rows of examples,
    whose loss counts only the targets ``packing.target_weights`` keeps (an example's answer
    tokens, never a prediction across examples). Each cross-entropy is a sum over the counted
    predictions divided by ``counts`` (those of the whole step's batch; default this batch's),
    and the balance losses are divided by ``counts.micro_batches``: summed over the micro-batches
    of a step, the losses are the mean over every counted token of the whole batch."""
    counts = count_targets(batch, cfg) if counts is None else counts
    tokens_BS1, segments_BS = row_tokens(batch)
    inputs = tokens_BS1[:, :-1]
    if cfg.model.mtp_depth:
        logits, aux, ahead = forward_mtp(params, inputs, cfg.model, segment_ids=segments_BS)
    else:
        (logits, aux), ahead = forward(params, inputs, cfg.model, segment_ids=segments_BS), ()
    with jax.named_scope("loss"):
        # where, not a product: a padding position's loss may be anything, NaN included
        summed = lambda logits_BSV, ahead: jnp.sum(jnp.where(
            row_weights(batch, ahead) > 0, token_losses(logits_BSV, tokens_BS1[:, ahead:]), 0.0))
        ce = summed(logits, 1) / jnp.maximum(counts.main, 1.0)
        mtp_ce = jnp.stack([summed(a, k + 1) for k, a in enumerate(ahead, 1)]) / jnp.maximum(counts.ahead, 1.0) \
            if ahead else jnp.zeros((0,), jnp.float32)
    mtp_loss = cfg.train.mtp_weight * jnp.mean(mtp_ce) if ahead else 0.0
    return ce + aux.balance_loss / counts.micro_batches + mtp_loss, (ce, aux, mtp_ce)


def make_train_step(cfg: Config, optimizer: optax.GradientTransformation, tuning: Tuning = ALL):
    """The train step for ``cfg``, ``(state, batch) -> (state, metrics)`` with ``batch`` windows
    ``[B, S + 1]`` or ``Packed`` rows: gradient accumulation over ``train.grad_accum`` micro-batches,
    clipping and AdamW; a non-finite loss or gradient leaves the state unchanged and reports it.
    ``tuning``: what is trained (``peft.tuning``); the gradient is of its trained part only, and
    the rest of the params is never written."""
    A, moe = cfg.train.grad_accum, cfg.model.moe
    tuned_loss = lambda trained, params, batch, cfg, counts: loss_fn(tuning.apply(params, trained), batch, cfg, counts)
    grad_fn = jax.value_and_grad(tuned_loss, has_aux=True)

    def gradients(params, adapter, batch):
        """Loss, cross-entropy and the MTP depths' cross-entropies of the whole batch (each
        counted token weighs the same in every micro-batch: ``loss_fn``), aux (the mean over
        micro-batches), the gradient, and the expert load of the whole batch (for the
        score-bias update)."""
        counts = count_targets(batch, cfg, A)
        trained = tuning.select(params, adapter)
        if A == 1:  # no accumulator: it would cost a zero-filled copy of the params and a pass adding into it
            (loss, (ce, aux, mtp_ce)), grads = grad_fn(trained, params, batch, cfg, counts)
            return loss, ce, aux, mtp_ce, grads, aux.expert_load

        def accumulate(grads, micro):
            (loss, (ce, aux, mtp_ce)), g = grad_fn(trained, params, micro, cfg, counts)
            return jax.tree.map(jnp.add, grads, g), (loss, ce, aux, mtp_ce)

        micro_batches = jax.tree.map(lambda a: a.reshape(A, -1, *a.shape[1:]), batch)
        zeros = jax.tree.map(jnp.zeros_like, trained)
        grads, (loss, ce, aux, mtp_ce) = jax.lax.scan(accumulate, zeros, micro_batches)
        total = lambda a: jnp.sum(a, axis=0)
        return (total(loss), total(ce), jax.tree.map(lambda a: jnp.mean(a, axis=0), aux), total(mtp_ce), grads,
                total(aux.expert_load))

    def update(grads, opt_state, params, adapter, expert_load_LE):
        with jax.named_scope("optimizer"):
            trained = tuning.select(params, adapter)
            updates, opt_state = optimizer.update(grads, opt_state, trained)
            params, adapter = tuning.store(params, adapter, optax.apply_updates(trained, updates))
            # the score bias balances a router that trains; a frozen router keeps its bias too
            if moe is not None and moe.bias_update_speed and tuning is ALL:
                params = update_score_bias(params, expert_load_LE, cfg.model)
        return params, opt_state, adapter

    def step(state: TrainState, batch: jax.Array | Packed):
        loss, ce, aux, mtp_ce, grads, expert_load_LE = gradients(state.params, state.adapter, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A bad step leaves params and optimizer state as they were: nothing non-finite is kept.
        # A cond, not a select of new against old: the update then runs in place in the donated
        # buffers, where a select needs the old state kept, a copy of params and moments per step.
        params, opt_state, adapter = jax.lax.cond(finite, update, lambda g, o, p, a, load: (p, o, a),
                                                  grads, state.opt_state, state.params, state.adapter, expert_load_LE)
        return (TrainState(state.step + 1, params, opt_state, adapter),
                StepMetrics(loss, ce, grad_norm, finite, aux, mtp_ce))

    return step
