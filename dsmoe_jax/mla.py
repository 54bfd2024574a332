"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and V3.

Shape legend: B batch, S sequence, T cache slots, D model width, N heads, Q query latent
(``q_lora_rank``), C key/value latent (``kv_lora_rank``), P rope width (``qk_rope_head_dim``),
H per-head query/key width without position (``qk_nope_head_dim``), J = H + P, W value head
width, X = H + W, A = C + P (what the cache holds per token).

    queries  x -> [Wq_a -> RMSNorm ->] Wq_b -> per head [q_nope (H) | q_rope (P)], rope on q_rope
    latent   x -> Wkv_a -> [c (C) | k_rope (P)]; c -> RMSNorm; k_rope -> rope (one key, all heads)
    keys     per head [c Wk_b (H) | k_rope], values c Wv_b (W)       (Wkv_b = [Wk_b | Wv_b])

Training and a prefill over the sequence's own keys expand the latent into per-head keys and
values and run the configured attention implementation. Decoding against a cache never expands
it: q_nope . (c Wk_b) = (q_nope Wk_b^T) . c, so each query is first "absorbed" into the latent
space and attends, as one shared key/value head of width A, to the cached [c | k_rope]; the
output, a mix of latents, goes through Wv_b afterwards. The cache thus holds A numbers per token
and layer, where multi-head attention would hold N (J + W) (V2-Lite: 576 against 5120).
RoPE pairs dimensions interleaved, as DeepSeek's released weights do (``rope.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax.attention import attention
from dsmoe_jax.config import ModelConfig
from dsmoe_jax.layers import RMSNorm, linear, param
from dsmoe_jax.rope import rope, softmax_scale

LATENT_NORM_EPS = 1e-6  # the latents' RMSNorms use this whatever model.norm_eps is, as DeepSeek's do


def cache_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, key width, value width) of one layer's cache entry per token: one head of the
    latent and rope key; no separate values (they are the latent's first C numbers)."""
    return 1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim, 0


class MLAttention(nnx.Module):
    """Causal multi-head latent attention, no biases; the same call contract as ``Attention``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, D, N, dt = cfg.mla, cfg.d_model, cfg.n_heads, jnp.dtype(cfg.param_dtype)
        p = functools.partial(param, rngs, std=cfg.init_std, dtype=dt)
        io = lambda n_in, n_out: (n_in, n_out) if cfg.fp8_weights else None
        if m.q_lora_rank:
            self.w_q_a_DQ = p((D, m.q_lora_rank), ("embed", "q_lora"), fp8=io(1, 1))
            self.q_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, dt, axis="q_lora")
            self.w_q_b_QNJ = p((m.q_lora_rank, N, m.qk_head_dim), ("q_lora", "heads", "head_dim"), fp8=io(1, 2))
        else:
            self.w_q_DNJ = p((D, N, m.qk_head_dim), ("embed", "heads", "head_dim"), fp8=io(1, 2))
        self.w_kv_a_DA = p((D, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", "kv_lora"), fp8=io(1, 1))
        self.kv_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, dt, axis="kv_lora")
        self.w_kv_b_CNX = p((m.kv_lora_rank, N, m.qk_nope_head_dim + m.v_head_dim), ("kv_lora", "heads", "head_dim"),
                            fp8=io(1, 2))
        self.w_o_NWD = p((N, m.v_head_dim, D), ("heads", "head_dim", "embed"), fp8=io(2, 1))
        self.dims = (m.kv_lora_rank, m.qk_nope_head_dim)
        self.theta, self.yarn = cfg.rope_theta, cfg.yarn
        self.scale = softmax_scale(m.qk_head_dim, cfg.yarn)
        self.implementation = cfg.attention
        self.fp8 = cfg.fp8  # the projections as FP8 GEMMs (layers.linear); absorbed decoding as it is

    def _proj(self, x_TK, w, dt):
        """``x`` through projection ``w`` (its first axis contracted): ``[T, *w.shape[1:]]``."""
        return linear(x_TK, w[...].astype(dt).reshape(w.shape[0], -1), self.fp8).reshape(-1, *w.shape[1:])

    def _queries(self, x_TD, dt):
        if hasattr(self, "w_q_a_DQ"):
            return self._proj(self.q_norm(self._proj(x_TD, self.w_q_a_DQ, dt)), self.w_q_b_QNJ, dt)
        return self._proj(x_TD, self.w_q_DNJ, dt)

    def __call__(self, x_BSD, positions_BS, valid_keys_BT, kv=None, index=0, segment_ids_BS=None):
        """As ``mha.Attention``: attend to the sequence's own keys (``kv`` None) or to a cache
        into which this call's latents are first written at ``index``; returns the output and
        the cache entries (``kv[0]`` the [c | k_rope] latents ``[B, T, 1, A]``, ``kv[1]`` empty)."""
        (B, S, D), dt = x_BSD.shape, x_BSD.dtype
        C, H = self.dims
        x_TD = x_BSD.reshape(B * S, D)  # one token axis: see mha.Attention
        q_BSNJ = self._queries(x_TD, dt).reshape(B, S, *self.w_kv_b_CNX.shape[1:2], -1)
        rotate = functools.partial(rope, positions_BS=positions_BS, theta=self.theta, yarn=self.yarn, interleaved=True)
        q_nope_BSNH, q_rope_BSNP = q_BSNJ[..., :H], rotate(q_BSNJ[..., H:])
        kv_TA = self._proj(x_TD, self.w_kv_a_DA, dt)
        c_BS1C = self.kv_norm(kv_TA[:, :C]).reshape(B, S, 1, C)
        k_rope_BS1P = rotate(kv_TA[:, C:].reshape(B, S, 1, -1))
        latent_BS1A = jnp.concatenate([c_BS1C, k_rope_BS1P], axis=-1)
        w_kv_b_CNX = self.w_kv_b_CNX[...].astype(dt)
        cache = None
        if kv is not None:
            cache = jax.lax.dynamic_update_slice_in_dim(kv[0], latent_BS1A.astype(kv[0].dtype), index, 1).astype(dt)
        if kv is None or (isinstance(index, int) and index == 0):
            kv_BSNX = self._proj(c_BS1C.reshape(B * S, C), self.w_kv_b_CNX, dt).reshape(B, S, *w_kv_b_CNX.shape[1:])
            k_BSNJ = jnp.concatenate([kv_BSNX[..., :H], jnp.broadcast_to(k_rope_BS1P, q_rope_BSNP.shape)], axis=-1)
            q_BSNJ = jnp.concatenate([q_nope_BSNH, q_rope_BSNP], axis=-1)
            out_BSNW = attention(q_BSNJ, k_BSNJ, kv_BSNX[..., H:], valid_keys_BT[:, :S],
                                 implementation=self.implementation, scale=self.scale, segment_ids_BT=segment_ids_BS)
        else:  # absorbed: queries move into the latent space, the cache is read as it is
            q_latent_BSNC = jnp.einsum("bsnh,cnh->bsnc", q_nope_BSNH, w_kv_b_CNX[..., :H])
            q_BSNA = jnp.concatenate([q_latent_BSNC, q_rope_BSNP], axis=-1)
            # values are the latents: the cache doubles as the value array, the rope part cut off after
            mixed_BSNA = attention(q_BSNA, cache, cache, valid_keys_BT, start=index, scale=self.scale)
            out_BSNW = jnp.einsum("bsnc,cnw->bsnw", mixed_BSNA[..., :C], w_kv_b_CNX[..., H:])
        out_TNW = out_BSNW.reshape(B * S, *out_BSNW.shape[2:])
        y_BSD = linear(out_TNW.reshape(B * S, -1), self.w_o_NWD[...].astype(dt).reshape(-1, D), self.fp8)
        y_BSD = y_BSD.reshape(B, S, D)
        return y_BSD, (kv, None) if kv is None else (cache, kv[1])
