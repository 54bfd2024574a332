"""Auxiliary-loss-free load balancing (DeepSeek-V3): the score-bias rule a train step applies
after the optimizer, from the step's expert load rather than from a gradient.

Shape legend: L MoE layers (the model's, then the MTP depths' MoE blocks), E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.model import as_module, params_of


def update_score_bias(params: dict, expert_load_LE: jax.Array, cfg: Config | ModelConfig) -> dict:
    """Each MoE layer's ``score_bias_E`` moved by ``moe.bias_update_speed`` toward balance,
    b_i += speed * sign(mean load - load_i), from ``expert_load_LE`` (tokens per expert of each
    MoE layer over the whole batch, as ``Aux.expert_load`` reports; with multi-token prediction,
    ``forward_mtp``'s rows for the MTP depths' MoE blocks follow the model's). Without those rows
    the depths' biases stay. Returns new params; ``params`` is unchanged."""
    cfg = model_config(cfg)
    step_LE = cfg.moe.bias_update_speed * jnp.sign(jnp.mean(expert_load_LE, axis=-1, keepdims=True) - expert_load_LE)
    # The model's own modules, in the rows' order: whatever the params layout, no key is spelled out.
    decoder = as_module(params, cfg)
    row = 0
    for moe in decoder.moe_ffns():
        bias = moe.score_bias_E
        rows = bias[...].size // cfg.moe.n_routed_experts  # a scanned group stacks one per block
        if row + rows > step_LE.shape[0]:
            break
        bias[...] = bias[...] + step_LE[row:row + rows].reshape(bias[...].shape)
        row += rows
    return params_of(decoder)
