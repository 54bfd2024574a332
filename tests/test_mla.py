"""Multi-head latent attention: the compressed cache and the absorbed decode path against the full
forward pass, every attention implementation against the others, and the cache's size.
(Parity with transformers' DeepSeek-V2/V3 attention is in test_convert.py.)"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import inference
from dsmoe_jax.config import MLAConfig, YarnConfig
from dsmoe_jax.costs import cache_dims


def _mla_cfg(q_lora_rank: int, **changes):
    base = dsmoe_jax.load_config("tiny").model
    mla = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=q_lora_rank)
    yarn = YarnConfig(factor=4.0, original_max_seq_len=8, mscale=0.7, mscale_all_dim=0.7)
    return dataclasses.replace(base, mla=mla, yarn=yarn, head_dim=None, init_std=0.1, **changes)


@pytest.mark.parametrize("q_lora_rank", [pytest.param(0, marks=pytest.mark.slow), 24])  # 0: 30 s, -m slow
def test_cached_decoding_equals_the_full_forward_at_every_position(q_lora_rank):
    cfg = _mla_cfg(q_lora_rank)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    want, _ = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg))(params, tokens)
    cache = inference.init_cache(cfg, 2, 12)
    decode = jax.jit(functools.partial(inference.decode_step, cfg=cfg))
    assert cache.k[0].shape == (2, 12, 1, 16 + 4) and cache.v[0].shape == (2, 12, 1, 0), \
        "the cache holds the latent and the rope key only"
    logits, cache = inference.prefill(params, tokens[:, :5], cache, cfg)
    steps = [logits]
    for t in range(5, 12):  # decode reads the compressed cache through the absorbed weights
        step, cache = decode(params, tokens[:, t], jnp.full((2,), t), cache)
        steps.append(step[:, None])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(want), atol=2e-5,
                               err_msg=f"q_lora_rank={q_lora_rank}: cached decoding differs from the full forward")


def test_every_attention_implementation_gives_the_same_mla_output():
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 512)
    mask = jnp.array([[1] * 10, [0] * 3 + [1] * 7])  # left padding: the cudnn path rolls it
    outs = {}
    for implementation in ("xla", "blocked", "cudnn"):
        cfg = _mla_cfg(24, attention=implementation)
        params = dsmoe_jax.init_params(cfg, jax.random.key(0))
        outs[implementation], _ = dsmoe_jax.forward(params, tokens, cfg, attention_mask=mask)
    real = np.asarray(mask, bool)
    for implementation in ("blocked", "cudnn"):
        np.testing.assert_allclose(np.asarray(outs[implementation])[real], np.asarray(outs["xla"])[real], atol=2e-5,
                                   err_msg=f"{implementation} differs from xla (value heads narrower than keys)")


def test_the_v2_lite_cache_is_about_nine_times_smaller_than_full_keys_and_values():
    lite = dsmoe_jax.load_config("deepseek-v2-lite").model
    heads, k_width, v_width = cache_dims(lite)
    mha_equivalent = lite.n_heads * (lite.mla.qk_head_dim + lite.mla.v_head_dim)
    assert heads * (k_width + v_width) == 512 + 64
    assert mha_equivalent / (heads * (k_width + v_width)) == pytest.approx(8.9, abs=0.05)


def test_mla_trains_gradients_reach_every_latent_weight():
    cfg = _mla_cfg(24)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    loss = lambda p: jnp.mean(dsmoe_jax.forward(p, tokens, cfg)[0] ** 2)
    grads = jax.jit(jax.grad(loss))(params)["layers"][0]["attn"]
    for name in ("w_q_a_DQ", "w_q_b_QNJ", "w_kv_a_DA", "w_kv_b_CNX", "w_o_NWD"):
        assert float(jnp.abs(grads[name]).max()) > 0, f"no gradient reaches {name}"
    for norm in ("kv_norm", "q_norm"):
        assert float(jnp.abs(grads[norm]["scale_D"]).max()) > 0, f"no gradient reaches {norm}"
