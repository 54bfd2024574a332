"""Multi-head attention with RoPE (grouped-query when ``n_kv_heads < n_heads``), no biases: the
attention of DeepSeekMoE and the paper's models. Multi-head latent attention, DeepSeek-V2/V3's,
is its neighbour ``mla.py``; both write a KV cache the same way (``inference.py``).

Shape legend: B batch, S sequence, T cache slots (or keys), D model width, N query heads,
K key/value heads, H head width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax.attention import attention
from dsmoe_jax.config import ModelConfig
from dsmoe_jax.layers import linear, param
from dsmoe_jax.rope import rope, softmax_scale


class Attention(nnx.Module):
    """Causal multi-head attention (grouped-query when n_kv_heads < n_heads), no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        p = functools.partial(param, rngs, std=cfg.init_std, dtype=jnp.dtype(cfg.param_dtype))
        io = lambda n_in, n_out: (n_in, n_out) if cfg.fp8_weights else None
        self.w_q_DNH = p((D, N, H), ("embed", "heads", "head_dim"), fp8=io(1, 2))
        self.w_k_DKH = p((D, K, H), ("embed", "kv_heads", "head_dim"), fp8=io(1, 2))
        self.w_v_DKH = p((D, K, H), ("embed", "kv_heads", "head_dim"), fp8=io(1, 2))
        self.w_o_NHD = p((N, H, D), ("heads", "head_dim", "embed"), fp8=io(2, 1))
        self.theta, self.yarn = cfg.rope_theta, cfg.yarn
        self.scale = softmax_scale(H, cfg.yarn)
        self.implementation = cfg.attention
        self.fp8 = cfg.fp8  # the projections as FP8 GEMMs (layers.linear)

    def __call__(self, x_BSD, positions_BS, valid_keys_BT, kv=None, index=0, segment_ids_BS=None):
        """Attend from ``x``'s positions to ``T`` key slots, of which ``valid_keys_BT`` marks the
        real tokens: its own keys (``kv`` None, T = S) or a cache's, into which this call's keys
        and values are first written at ``index``. Returns the output and the keys and values
        (the cache's when there is one).

        At ``index`` 0 (a Python int: a fresh cache) the cache holds nothing before this call's
        own keys, so attention reads those directly, the same as without a cache."""
        (B, S, D), dt = x_BSD.shape, x_BSD.dtype
        # Projections see tokens as one flat axis T = B * S: XLA:CPU computes weight gradients
        # that contract over two axes (batch and sequence) several times slower than over one.
        x_TD = x_BSD.reshape(B * S, D)
        proj = lambda w: linear(x_TD, w[...].astype(dt).reshape(D, -1), self.fp8).reshape(B, S, *w.shape[1:])
        q_BSNH = rope(proj(self.w_q_DNH), positions_BS, self.theta, self.yarn)
        k_BTKH = rope(proj(self.w_k_DKH), positions_BS, self.theta, self.yarn)
        v_BTKH = proj(self.w_v_DKH)
        k_cache, v_cache = k_BTKH, v_BTKH
        if kv is not None:
            write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, 1)
            k_cache, v_cache = write(kv[0], k_BTKH).astype(dt), write(kv[1], v_BTKH).astype(dt)
        if kv is None or (isinstance(index, int) and index == 0):
            out_BSNH = attention(q_BSNH, k_BTKH, v_BTKH, valid_keys_BT[:, :S], implementation=self.implementation,
                                 scale=self.scale, segment_ids_BT=segment_ids_BS)
        else:
            out_BSNH = attention(q_BSNH, k_cache, v_cache, valid_keys_BT, start=index, scale=self.scale)
        out_TNH = out_BSNH.reshape(B * S, *out_BSNH.shape[2:])
        y_BSD = linear(out_TNH.reshape(B * S, -1), self.w_o_NHD[...].astype(dt).reshape(-1, D), self.fp8)
        y_BSD = y_BSD.reshape(B, S, D)
        return y_BSD, (k_cache, v_cache)
