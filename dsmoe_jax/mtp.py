"""Multi-token prediction (DeepSeek-V3): the MTP depths, their predictions for training, and
the first depth's draft for self-speculative decoding.

Shape legend: B batch, S sequence, D model width, C = 2 D ([embedding; hidden state]),
V vocabulary, T cache slots.

The depths share the model's token embedding and LM head: the functions here take them as
``embed`` (ids ``[B, S]`` -> ``[B, S, D]``) and ``head`` (normalised ``[B, S, D]`` -> float32
logits ``[B, S, V]``), so this module sits below the decoder (``model.py``), which builds the
depths and passes its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax.block import Block, KVCache, cache_keys, own_keys
from dsmoe_jax.config import ModelConfig
from dsmoe_jax.layers import RMSNorm, linear, param
from dsmoe_jax.moe import MoEStats


class MTPBlock(nnx.Module):
    """One depth of multi-token prediction (DeepSeek-V3): the previous depth's hidden state and
    the embedding of the token that many places ahead, each RMS-normalised, concatenated
    (embedding first, the order the released weights expect) and projected back to the model
    width; then one transformer block (MoE when the model's later blocks are); its output,
    RMS-normalised, goes through the model's own LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, dt = cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.embed_norm = RMSNorm(D, cfg.norm_eps, dt)
        self.hidden_norm = RMSNorm(D, cfg.norm_eps, dt)
        self.fp8 = cfg.fp8  # the projection as an FP8 GEMM (layers.linear)
        self.w_proj_CD = param(rngs, (2 * D, D), (None, "embed"), cfg.init_std, dt, (1, 1) if cfg.fp8_weights else None)
        self.block = Block(cfg, cfg.n_moe_layers > 0, rngs=rngs)
        self.head_norm = RMSNorm(D, cfg.norm_eps, dt)

    def __call__(self, h_BSD, e_BSD, positions_BS, valid_BS, tokens_BS, route=None, valid_keys_BT=None, kv=None,
                 index=0, segment_ids_BS=None):
        """(this depth's hidden state, its normalised form for the LM head, the block's MoE stats,
        its keys and values); with ``kv``, the block attends through that cache as a main block."""
        c_BSC = jnp.concatenate([self.embed_norm(e_BSD), self.hidden_norm(h_BSD)], axis=-1)
        B, S, C = c_BSC.shape
        x_BSD = linear(c_BSC.reshape(B * S, C), self.w_proj_CD[...], self.fp8).reshape(B, S, -1)
        valid_keys_BT = valid_BS if valid_keys_BT is None else valid_keys_BT
        x_BSD, stats, kv = self.block(x_BSD, positions_BS, valid_BS, tokens_BS, valid_keys_BT, kv, index,
                                      segment_ids_BS, route=route)
        return x_BSD, self.head_norm(x_BSD), stats, kv


Embed = Callable[[jax.Array], jax.Array]  # token ids [B, S] -> embeddings [B, S, D]
Head = Callable[[jax.Array], jax.Array]  # normalised hidden states [B, S, D] -> float32 logits [B, S, V]


def predict_ahead(depths: Sequence[MTPBlock], embed: Embed, head: Head, h_BSD, tokens_BS, positions_BS, valid_BS,
                  route=None, segment_ids_BS=None) -> tuple[tuple[jax.Array, ...], MoEStats | None]:
    """Every depth's predictions from the main model's final hidden states ``h_BSD`` of
    ``tokens_BS`` (training): depth k at position i reads token i + k and predicts token
    i + k + 1, so its logits cover the first S - k positions. Returns each depth's logits and
    the stats of the MoE blocks among them (stacked on a leading axis, or None). With packed
    examples (``segment_ids_BS``) position i attends within its own example; a position whose
    token i + k lies in the next example reads it, and its prediction is left out of the loss
    (``train.step``)."""
    S = tokens_BS.shape[1]
    logits, stats = [], []
    for k, depth in enumerate(depths, 1):
        ahead_BS = tokens_BS[:, k:]
        valid_ahead_BS = valid_BS[:, k:]
        segments_BS = None if segment_ids_BS is None else segment_ids_BS[:, :S - k]
        if segments_BS is not None:  # a position reading the next example's token is no example's
            valid_ahead_BS = valid_ahead_BS * (segment_ids_BS[:, k:] == segments_BS).astype(valid_ahead_BS.dtype)
        h_BSD, normed_BSD, depth_stats, _ = depth(
            h_BSD[:, :S - k], embed(ahead_BS), positions_BS[:, :S - k], valid_ahead_BS, ahead_BS, route,
            own_keys(valid_ahead_BS, segments_BS), segment_ids_BS=segments_BS)
        logits.append(head(normed_BSD))
        if depth_stats is not None:
            stats.append(depth_stats)
    return tuple(logits), jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else None


def draft(depth: MTPBlock, embed: Embed, head: Head, h_BSD, logits_BSV, positions_BS, valid_BS, cache: KVCache,
          fresh: bool = False) -> tuple[jax.Array, KVCache]:
    """The draft of self-speculative decoding: ``depth`` (the first) reads the main model's hidden
    states ``h_BSD`` with the embedding of its greedy next token at each position (the argmax of
    its ``logits_BSV``), through the depth's own one-layer ``cache`` (slots aligned with the
    model's); returns the logits ``[B, S, V]`` of the token after that one, and the cache.
    ``fresh``: fill the cache from its first slot, whatever it held."""
    next_BS = jnp.argmax(logits_BSV, axis=-1).astype(jnp.int32)
    index, valid_keys_BT = cache_keys(cache, valid_BS, fresh)
    _, normed_BSD, _, (k, v) = depth(h_BSD, embed(next_BS), positions_BS, valid_BS, next_BS,
                                     valid_keys_BT=valid_keys_BT, kv=(cache.k[0], cache.v[0]), index=index)
    return head(normed_BSD), KVCache((k,), (v,), valid_keys_BT, jnp.asarray(index + h_BSD.shape[1]))
