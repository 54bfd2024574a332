"""Dispatch (sorting assignments into expert groups, GShard capacity) against hand computations."""

import jax.numpy as jnp
import numpy as np

from dsmoe_jax import MoEConfig
from dsmoe_jax import dispatch as dispatch_lib

# Dispatch example: 4 tokens, top-2, 3 experts, capacity 2. Slot-major priority gives
# e0: (s0,t0) (s0,t1) | (s0,t2) (s1,t3) dropped; e1: (s0,t3) (s1,t0) | (s1,t2) dropped; e2: (s1,t1).
EXPERT_TK = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0]])
KEEP_TK = np.array([[1, 1], [1, 1], [0, 0], [1, 0]], bool)


def test_capacity_drops_the_assignments_gshard_drops():
    plan = dispatch_lib.dispatch(EXPERT_TK, num_experts=3, capacity_per_expert=2)
    np.testing.assert_array_equal(np.asarray(plan.keep_A).reshape(2, 4).T, KEEP_TK)
    np.testing.assert_array_equal(plan.group_sizes_E, [2, 2, 1])
    cfg = MoEConfig(n_routed_experts=3, top_k=2, expert_d_ff=1, capacity_factor=0.75)
    assert dispatch_lib.capacity(cfg, num_tokens=4) == 2, "ceil(0.75 * 4 * 2 / 3)"


def test_dispatch_sorts_assignments_into_expert_groups():
    plan = dispatch_lib.dispatch(EXPERT_TK, num_experts=3, capacity_per_expert=None)
    expert_A = np.asarray(EXPERT_TK).T.reshape(-1)
    np.testing.assert_array_equal(plan.group_sizes_E, [4, 3, 1])
    sorted_experts = expert_A[np.asarray(plan.order_A)]
    assert list(sorted_experts) == sorted(expert_A), "rows must be grouped by expert"
    assert np.all(plan.keep_A), "dropless keeps every assignment"
