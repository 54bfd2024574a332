"""Blocked causal attention against ``jax.nn.dot_product_attention`` (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax.attention import attention, blocked_attention
from dsmoe_jax.model import causal_mask

SHAPES = {  # B, S, N query heads, K key heads, H
    "one_block": (2, 16, 2, 2, 8),
    "ragged_last_block": (2, 300, 4, 4, 16),
    "grouped_query": (1, 260, 4, 2, 8),
}


def _inputs(B, S, N, K, H, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, S, N, H), dtype)
    k, v = (jax.random.normal(kk, (B, S, K, H), dtype) for kk in ks[1:])
    valid_BS = jnp.ones((B, S), bool).at[0, :5].set(False)  # left padding in the first row
    return q, k, v, valid_BS, causal_mask(valid_BS, jnp.arange(S))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_blocked_equals_xla_attention_values_and_gradients(shape):
    q, k, v, valid_BS, mask = _inputs(*shape)
    real = valid_BS[:, :, None, None]  # padding queries see no key: their output is arbitrary

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, mask), 0) ** 2)

    xla = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m)
    np.testing.assert_allclose(jnp.where(real, blocked_attention(q, k, v, mask, block=128), 0),
                               jnp.where(real, xla(q, k, v, mask), 0), atol=2e-6, err_msg="values")
    grads = [jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v) for fn in (blocked_attention, xla)]
    for name, ours, ref in zip("qkv", *grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5, err_msg=f"d{name}")


def test_blocked_attention_in_bfloat16_stays_close():
    q, k, v, valid_BS, mask = _inputs(2, 200, 2, 2, 16, jnp.bfloat16)
    out = blocked_attention(q, k, v, mask, block=64)
    ref = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask=mask)
    assert out.dtype == jnp.bfloat16, out.dtype
    np.testing.assert_allclose(jnp.where(valid_BS[:, :, None, None], out.astype(jnp.float32), 0),
                               jnp.where(valid_BS[:, :, None, None], ref, 0), atol=3e-2)


def test_attention_picks_an_implementation_and_refuses_bad_ones():
    q, k, v, _, mask = _inputs(*SHAPES["one_block"])
    np.testing.assert_allclose(attention(q, k, v, mask, own_keys=True), attention(q, k, v, mask, own_keys=False),
                               atol=2e-6, err_msg="auto with and without own keys")
    with pytest.raises(ValueError, match="own_keys=True"):
        attention(q, k, v, mask, own_keys=False, implementation="blocked")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention(q, k, v, mask, own_keys=True, implementation="flash")
