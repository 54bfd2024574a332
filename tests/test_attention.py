"""Every attention implementation against ``jax.nn.dot_product_attention`` with an explicit
mask (values and gradients), and the model's choice of implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import attention as attention_lib
from dsmoe_jax.attention import attention, blocked_attention, causal_mask, flash_attention, resolve_implementation
from helpers import CUDNN_ARGUMENTS

SHAPES = {  # B, S, N query heads, K key heads, H
    "one_block": (2, 16, 2, 2, 8),
    "ragged_last_block": (2, 300, 4, 4, 16),
    "grouped_query": (1, 260, 4, 2, 8),
}
PADDING = {  # rows of valid_BS: real tokens one contiguous run, as pad_prompts and right padding make them
    "none": lambda B, S: jnp.ones((B, S), bool),
    "left": lambda B, S: jnp.ones((B, S), bool).at[0, :5].set(False),
    "right": lambda B, S: jnp.ones((B, S), bool).at[-1, S - 7:].set(False),
}


def _inputs(B, S, N, K, H, padding="left", dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, S, N, H), dtype)
    k, v = (jax.random.normal(kk, (B, S, K, H), dtype) for kk in ks[1:])
    return q, k, v, PADDING[padding](B, S)


def _masked(q, k, v, valid_BS):
    """The reference: every score computed, the causal and padding mask given explicitly."""
    return jax.nn.dot_product_attention(q, k, v, mask=causal_mask(valid_BS, jnp.arange(q.shape[1])))


def _assert_same_on_real_queries(fn, shape, padding):
    """``fn`` equals the masked reference on every real query (padding queries see no key: their
    output is arbitrary), in value and in the gradients of q, k and v."""
    q, k, v, valid_BS = _inputs(*shape, padding=padding)
    real = valid_BS[:, :, None, None]
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v, valid_BS), 0) ** 2)
    np.testing.assert_allclose(jnp.where(real, fn(q, k, v, valid_BS), 0),
                               jnp.where(real, _masked(q, k, v, valid_BS), 0), atol=2e-6, err_msg="values")
    grads = [jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (fn, _masked)]
    for name, ours, ref in zip("qkv", *grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_blocked_equals_masked_attention(shape):
    _assert_same_on_real_queries(blocked_attention, shape, "left")


@CUDNN_ARGUMENTS.marks[0]
@pytest.mark.parametrize(("shape", "padding"), [(SHAPES["one_block"], p) for p in PADDING]
                         + [(SHAPES["ragged_last_block"], "left"), (SHAPES["grouped_query"], "right")],
                         ids=[f"one_block-{p}" for p in PADDING] + ["ragged_last_block-left", "grouped_query-right"])
def test_the_arguments_of_the_cudnn_path_equal_masked_attention(shape, padding):
    """Off a GPU ``flash_attention`` hands cuDNN's arguments (is_causal, sequence lengths, rows
    rolled past their left padding) to XLA's reference implementation: this is the GPU path's
    logic checked on CPU."""
    _assert_same_on_real_queries(flash_attention, shape, padding)


@pytest.mark.gpu
def test_blocked_attention_in_bfloat16_stays_close():
    q, k, v, valid_BS = _inputs(2, 200, 2, 2, 16, dtype=jnp.bfloat16)
    out = blocked_attention(q, k, v, valid_BS, block=64)
    ref = _masked(*(a.astype(jnp.float32) for a in (q, k, v)), valid_BS)
    assert out.dtype == jnp.bfloat16, out.dtype
    np.testing.assert_allclose(jnp.where(valid_BS[:, :, None, None], out.astype(jnp.float32), 0),
                               jnp.where(valid_BS[:, :, None, None], ref, 0), atol=3e-2)


def test_resolve_implementation_by_platform_and_cache():
    assert resolve_implementation("auto", platform="cpu") == "blocked"
    assert resolve_implementation("auto", platform="gpu") == "cudnn"
    assert resolve_implementation("auto", platform="gpu", dtype="float32") == "xla", "cuDNN takes 16-bit only"
    assert resolve_implementation("auto", platform="tpu") == "xla"
    assert resolve_implementation("blocked", platform="gpu") == "blocked", "an explicit choice is kept"
    for name in ("auto", "blocked", "cudnn"):
        assert resolve_implementation(name, own_keys=False, platform="gpu") == "xla", "a cache needs the mask"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_implementation("flash")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["auto", "xla", "blocked", CUDNN_ARGUMENTS])
def test_attention_over_a_cache_matches_its_own_keys(implementation):
    """The same keys seen as a cache (a traced start: the masked path) and as the queries' own
    keys (the path ``implementation`` names) agree."""
    q, k, v, valid_BS = _inputs(*SHAPES["one_block"], padding="left")
    real = valid_BS[:, :, None, None]
    cached = jax.jit(lambda q, k, v, valid, start: attention(q, k, v, valid, start=start))(q, k, v, valid_BS, 0)
    own = attention(q, k, v, valid_BS, implementation=implementation)
    np.testing.assert_allclose(jnp.where(real, own, 0), jnp.where(real, cached, 0), atol=2e-6)


@CUDNN_ARGUMENTS.marks[0]
def test_model_attention_follows_the_config(monkeypatch, small_cfg):
    """``model.attention`` reaches the attention call of every block (own keys only)."""
    from dsmoe_jax.model import forward, init_params

    seen = []
    real_resolve = attention_lib.resolve_implementation
    monkeypatch.setattr(attention_lib, "resolve_implementation",
                        lambda name, own_keys=True, platform=None, dtype="bfloat16": seen.append((name, own_keys))
                        or real_resolve(name, own_keys, platform, dtype))
    cfg = dataclasses.replace(small_cfg, attention="cudnn")
    forward(init_params(cfg, jax.random.key(0)), jnp.zeros((1, 8), jnp.int32), cfg)
    assert seen == [("cudnn", True)] * cfg.n_layers, seen
