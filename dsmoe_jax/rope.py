"""Rotary position embeddings (RoPE), with optional YaRN scaling.

Shape legend: B batch, S sequence, N heads, H rotated head width, h = H / 2 frequencies.

Two pairings of the H rotated dimensions, each rotated by one frequency:
  halves       (x_j, x_{j+h}): the "rotate-half" convention of the v1 model (and Llama);
  interleaved  (x_{2j}, x_{2j+1}): DeepSeek-V2/V3's MLA weights. The rotated pairs come out in
               the halves layout (all first members, then all second members), as transformers
               returns them; a dot product of two rotated vectors does not see that permutation.

YaRN (``model.yarn``) interpolates the low frequencies by ``factor``, keeps the high ones, ramps
linearly between the ``beta_fast`` and ``beta_slow`` rotation counts over the original context,
and scales the rotated parts by ``rotation_scale`` and the softmax by ``softmax_scale``; the
formulas are those of transformers' YaRN, which the released DeepSeek-V2/V3 configs use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.config import YarnConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(H: int, theta: float, yarn: YarnConfig | None = None) -> np.ndarray:
    """The ``H / 2`` rotation frequencies (radians per position), float32."""
    inv_freq_h = 1.0 / theta ** (np.arange(0, H, 2, dtype=np.float32) / H)
    if yarn is None:
        return inv_freq_h
    # the frequency index at which a dimension rotates ``turns`` times over the original context
    index = lambda turns: H * math.log(yarn.original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(index(yarn.beta_fast)), 0), min(math.ceil(index(yarn.beta_slow)), H - 1)
    ramp_h = np.clip((np.arange(H // 2, dtype=np.float32) - low) / max(high - low, 1e-3), 0, 1)
    # below ``low`` (fast rotations) keep the frequency, above ``high`` divide it by ``factor``
    return (inv_freq_h / yarn.factor * ramp_h + inv_freq_h * (1 - ramp_h)).astype(np.float32)


def rotation_scale(yarn: YarnConfig | None) -> float:
    """The factor YaRN applies to the rotated dimensions (of queries and keys alike)."""
    if yarn is None:
        return 1.0
    if yarn.mscale and yarn.mscale_all_dim:
        return _yarn_mscale(yarn.factor, yarn.mscale) / _yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return _yarn_mscale(yarn.factor)


def softmax_scale(qk_head_dim: int, yarn: YarnConfig | None) -> float:
    """The attention logits' scale: 1/sqrt(qk_head_dim), times YaRN's temperature correction
    ``mscale(factor, mscale_all_dim)^2`` when ``mscale_all_dim`` is set."""
    scale = qk_head_dim**-0.5
    if yarn is not None and yarn.mscale_all_dim:
        scale *= _yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def rope(x_BSNH: jax.Array, positions_BS: jax.Array, theta: float, yarn: YarnConfig | None = None,
         interleaved: bool = False) -> jax.Array:
    """``x`` rotated by its positions (see the module docstring for the two pairings)."""
    H = x_BSNH.shape[-1]
    inv_freq_h = jnp.asarray(inverse_frequencies(H, theta, yarn))
    angle_BSh = positions_BS[..., None].astype(jnp.float32) * inv_freq_h
    scale = rotation_scale(yarn)
    cos_BS1h, sin_BS1h = (scale * f(angle_BSh)[:, :, None, :] for f in (jnp.cos, jnp.sin))
    x = x_BSNH.astype(jnp.float32)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BS1h - x2 * sin_BS1h, x2 * cos_BS1h + x1 * sin_BS1h], axis=-1)
    return rotated.astype(x_BSNH.dtype)
