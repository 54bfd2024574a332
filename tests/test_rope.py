"""RoPE pairings and YaRN against independent computations: complex rotation by hand, and
transformers' own YaRN frequencies and attention scales."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax.config import YarnConfig
from dsmoe_jax.rope import inverse_frequencies, rope, rotation_scale, softmax_scale

YARN = YarnConfig(factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                  mscale_all_dim=0.707)  # DeepSeek-V2-Lite's rope_scaling


def _complex_rotation(x, position, inv_freq):
    """Each pair of ``x`` as one complex number, multiplied by e^(i position freq)."""
    z = x[..., 0] + 1j * x[..., 1]
    return z * np.exp(1j * position * inv_freq)


@pytest.mark.parametrize("interleaved", [False, True])
def test_each_pair_is_rotated_by_its_frequency(interleaved):
    rng = np.random.RandomState(0)
    x = rng.randn(1, 1, 1, 8).astype(np.float32)
    inv_freq = inverse_frequencies(8, 100.0)
    got = np.asarray(rope(jnp.asarray(x), jnp.array([[7]]), 100.0, interleaved=interleaved))[0, 0, 0]
    pairs = x[0, 0, 0].reshape(4, 2) if interleaved else np.stack([x[0, 0, 0, :4], x[0, 0, 0, 4:]], axis=-1)
    want = _complex_rotation(pairs, 7, inv_freq)
    # both pairings return the halves layout: real parts, then imaginary parts
    np.testing.assert_allclose(got, np.concatenate([want.real, want.imag]), atol=1e-5,
                               err_msg=f"interleaved={interleaved}")


def test_yarn_frequencies_and_scales_match_transformers():
    import torch
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    hf = DeepseekV2Config(hidden_size=2048, num_attention_heads=16, qk_rope_head_dim=64, qk_nope_head_dim=128,
                          max_position_embeddings=163840,
                          rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    np.testing.assert_allclose(inverse_frequencies(64, 10000.0, YARN), inv_freq.numpy(), rtol=1e-6)
    assert rotation_scale(YARN) == pytest.approx(attention_factor)
    with torch.device("meta"):  # the scale the attention layer multiplies its scores by; no weights needed
        hf_scale = DeepseekV2Attention(hf, layer_idx=0).scaling
    assert softmax_scale(192, YARN) == pytest.approx(hf_scale)
    by_hand = 192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2  # DeepSeek-V2's mscale, squared (q and k)
    assert softmax_scale(192, YARN) == pytest.approx(by_hand)
    assert softmax_scale(192, None) == 192**-0.5 and rotation_scale(None) == 1.0


def test_yarn_keeps_fast_frequencies_and_interpolates_slow_ones():
    plain, scaled = inverse_frequencies(64, 10000.0), inverse_frequencies(64, 10000.0, YARN)
    np.testing.assert_array_equal(scaled[:5], plain[:5], err_msg="fast rotations are extrapolated unchanged")
    np.testing.assert_allclose(scaled[-5:], plain[-5:] / 40, rtol=1e-6, err_msg="slow ones are divided by factor")
    assert math.isclose(rotation_scale(YarnConfig(factor=4.0, original_max_seq_len=32)), 0.1 * math.log(4) + 1)
