"""Dispatch (sorting assignments into expert groups, GShard capacity) against hand computations;
the routed experts' output (dispatch -> experts -> combine) against a token-by-token reference."""

import jax.numpy as jnp
import numpy as np
import pytest

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


def _token_by_token(x_TD, expert_TK, gate_TK, w_gate, w_up, w_down):
    """y_t = sum_k g_tk * MLP_e(x_t) for e = expert_TK[t, k], in float64."""
    x, (wg, wu, wd) = np.float64(x_TD), (np.float64(w) for w in (w_gate, w_up, w_down))
    y = np.zeros_like(x)
    for t, k in np.ndindex(*expert_TK.shape):
        e = expert_TK[t, k]
        g = x[t] @ wg[e]
        y[t] += gate_TK[t, k] * ((g / (1 + np.exp(-g)) * (x[t] @ wu[e])) @ wd[e])
    return y


def _routed_inputs(tokens, experts=8, top_k=3, d=12, f=16, seed=0):
    rng = np.random.default_rng(seed)
    expert_TK = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int32)
    arrays = [rng.standard_normal(shape).astype(np.float32) * scale for shape, scale in
              [((tokens, d), 1.0), ((tokens, top_k), 1.0), ((experts, d, f), 0.3), ((experts, d, f), 0.3),
               ((experts, f, d), 0.3)]]
    return expert_TK, arrays


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("tokens", [1, 5])  # decoding, and several tokens sharing experts
def test_routed_experts_sum_each_tokens_experts_weighted_by_gate(tokens, backend):
    expert_TK, (x, gate, wg, wu, wd) = _routed_inputs(tokens)
    cfg = MoEConfig(n_routed_experts=8, top_k=3, expert_d_ff=16, backend=backend)
    y, keep = dispatch_lib.routed_experts(*map(jnp.asarray, (x, expert_TK, gate, wg, wu, wd)), cfg)
    np.testing.assert_allclose(np.asarray(y), _token_by_token(x, expert_TK, gate, wg, wu, wd), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(keep)), "dropless: every assignment kept"
