"""Dispatch and combine: (token, slot) assignments sorted into contiguous expert groups and back.

    expert_TK -> dispatch -> rows x[order_A % T] grouped by expert -> grouped MLP -> combine -> y_TD

Shape legend: T tokens, D model width, E routed experts, K experts per token (top-k, or top-p
routing's cap),
A = K*T (token, slot) assignments in slot-major order, G rows of the grouped buffer (= A).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsmoe_jax import grouped
from dsmoe_jax.config import MoEConfig


class Dispatch(NamedTuple):
    order_A: jax.Array  # assignment index of each grouped row (rows sorted by expert)
    position_A: jax.Array  # grouped row of each assignment: the inverse permutation of order_A
    group_sizes_E: jax.Array  # rows per expert; dropped assignments sit after the last group
    keep_A: jax.Array  # False for assignments dropped by the capacity limit


def capacity(cfg: MoEConfig, num_tokens: int) -> int | None:
    """Per-expert capacity in assignments, or None when dropless."""
    if cfg.capacity_factor == 0:
        return None
    return math.ceil(cfg.capacity_factor * num_tokens * cfg.slots / cfg.n_routed_experts)


def dispatch(expert_TK: jax.Array, num_experts: int, capacity_per_expert: int | None) -> Dispatch:
    """Sort (token, slot) assignments by expert into contiguous groups.

    Assignments are numbered slot-major (a = k * T + t), so under a capacity limit every
    token's first choice outranks any token's second choice and earlier tokens outrank later
    ones, as in GShard; the sort is stable to keep that order inside each group. A slot that
    top-p routing left empty (expert id ``num_experts``) is no assignment: it sorts past the last
    group with the dropped ones and takes no capacity.
    """
    expert_A = expert_TK.T.reshape(-1)
    A = expert_A.shape[0]
    keep_A = expert_A < num_experts
    if capacity_per_expert is not None:
        order_A = jnp.argsort(expert_A, stable=True)
        sizes_E = jnp.bincount(expert_A, length=num_experts)  # empty slots (id num_experts) not counted
        starts_E = jnp.append(jnp.cumsum(sizes_E) - sizes_E, A)
        rank_sorted_A = jnp.arange(A) - starts_E[expert_A[order_A]]
        keep_A = keep_A & jnp.zeros_like(keep_A).at[order_A].set(rank_sorted_A < capacity_per_expert)
    expert_A = jnp.where(keep_A, expert_A, num_experts)  # past the last group
    order_A = jnp.argsort(expert_A, stable=True).astype(jnp.int32)
    position_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
    group_sizes_E = jnp.bincount(expert_A, length=num_experts + 1)[:num_experts]
    return Dispatch(order_A, position_A, group_sizes_E.astype(jnp.int32), keep_A)


def combine(y_GD: jax.Array, plan: Dispatch, gate_TK: jax.Array) -> jax.Array:
    """Undo the sort and sum each token's expert outputs weighted by their gates (float32)."""
    T, K = gate_TK.shape
    y_KTD = y_GD[plan.position_A].reshape(K, T, -1)
    weight_KT = gate_TK.T * plan.keep_A.reshape(K, T)
    # An einsum, not multiply-then-sum: XLA:CPU fuses the latter with the gather, 5x slower.
    return jnp.einsum("ktd,kt->td", y_KTD, weight_KT.astype(y_GD.dtype), preferred_element_type=jnp.float32)


def keep_by_token(plan: Dispatch, num_tokens: int) -> jax.Array:
    """``keep_TK``: which (token, slot) assignments survived the capacity limit."""
    return plan.keep_A.reshape(-1, num_tokens).T


def routed_experts(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: MoEConfig):
    """dispatch -> grouped experts -> combine on one device: the routed experts' float32 output
    ``y_TD`` and which (token, slot) assignments were kept (``keep_TK``, all True when dropless).
    Decoding takes this path too: the backends run only the groups that have rows, so a step
    reads only the chosen experts' weights (``benchmarks/decode_experts.py`` measures the
    alternative of gathering them per assignment: slower)."""
    T = x_TD.shape[0]
    with jax.named_scope("dispatch"):
        plan = dispatch(expert_TK, w_gate_EDF.shape[0], capacity(cfg, T))
        x_GD = x_TD[plan.order_A % T]
    with jax.named_scope("experts"):
        y_GD = grouped.grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, plan.group_sizes_E, backend=cfg.backend)
    with jax.named_scope("combine"):
        return combine(y_GD, plan, gate_TK), keep_by_token(plan, T)
