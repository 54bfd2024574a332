"""One decoder block, the keys its queries may see, and the KV cache that blocks fill.

Shape legend: B batch, S sequence (the tokens of this call), T cache slots (or, without a cache,
the keys: the same S tokens), D model width, K key/value heads, H head width.

Every block: RMSNorm -> causal attention with RoPE -> residual -> RMSNorm -> FFN -> residual.
The attention is multi-head (``mha.py``; grouped-query when n_kv_heads < n_heads), or multi-head latent
attention (``mla.py``) when the config has an ``[mla]`` section.
The FFN is a dense SwiGLU or DeepSeekMoE (``ModelConfig.moe_layers`` says which blocks).
Its own module, below both the decoder (``model.py``) and the multi-token-prediction depths
(``mtp.py``), which each run it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax import mla
from dsmoe_jax.config import ModelConfig
from dsmoe_jax.layers import MLP, RMSNorm
from dsmoe_jax.mha import Attention
from dsmoe_jax.moe import MoE


class KVCache(NamedTuple):
    """Keys and values of every layer for ``T`` slots, filled left to right (inference.py).
    With MLA, ``k`` holds each token's latent and rope key ``[B, T, 1, A]`` and ``v`` is empty
    ``[B, T, 1, 0]``: the values are expanded from the latent (``mla.py``)."""

    k: tuple[jax.Array, ...]  # per layer [B, T, K, H]
    v: tuple[jax.Array, ...]
    valid_BT: jax.Array  # the slot holds a real token: written, and not padding
    index: jax.Array  # int32: the next slot to write


class Block(nnx.Module):
    """Pre-norm decoder block; the FFN is a dense MLP or a DeepSeekMoE layer."""

    def __init__(self, cfg: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        self.attn = Attention(cfg, rngs=rngs) if cfg.mla is None else mla.MLAttention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        if moe:
            self.ffn = MoE(cfg, rngs=rngs)
        else:
            self.ffn = MLP(cfg.d_model, cfg.d_ff, std=cfg.init_std, param_dtype=dt, rngs=rngs, fp8=cfg.fp8_weights,
                           fp8_gemm=cfg.fp8)

    def __call__(self, x_BSD, positions_BS, valid_BS, tokens_BS, valid_keys_BT, kv=None, index=0,
                 segment_ids_BS=None, route=None):
        # Named scopes label each phase's kernels in profiles (benchmarks/profile_step.py).
        h_BSD = self.attn_norm(x_BSD)
        with jax.named_scope("attention"):
            a_BSD, kv = self.attn(h_BSD, positions_BS, valid_keys_BT, kv, index, segment_ids_BS)
        x_BSD = x_BSD + a_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoE):
            y_BSD, stats = self.ffn(h_BSD, tokens_BS, valid_BS, route, segment_ids_BS)
        else:
            with jax.named_scope("dense_mlp"):
                y_BSD, stats = self.ffn(h_BSD), None
        return x_BSD + y_BSD, stats, kv


def cache_keys(cache: KVCache, valid_BS, fresh: bool):
    """Where new tokens go in ``cache`` (slot index; 0 when ``fresh``, forgetting what it held)
    and which slots are then valid keys: the cache's, plus the new tokens' ``valid_BS``."""
    index = 0 if fresh else cache.index
    before_BT = jnp.zeros_like(cache.valid_BT) if fresh else cache.valid_BT
    return index, jax.lax.dynamic_update_slice_in_dim(before_BT, valid_BS.astype(bool), index, 1)


def own_keys(valid_BS, segment_ids_BS):
    """The keys a sequence attending to itself may see: its real tokens, or with packed examples
    every slot, the segment ids then keeping each example (and the padding, segment 0) to
    itself. So no query is left without a key, which cuDNN's kernel answers with NaN."""
    return valid_BS if segment_ids_BS is None else jnp.ones_like(valid_BS)
