"""What a config costs: its parameters (total, and activated per token), its forward FLOPs per
token, and the KV cache a token takes. Read from the model's parameter shapes and logical axes,
never by building it; ``plan.py`` and ``dsmoe-jax info`` report them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsmoe_jax import mla
from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.model import param_axes, param_shapes


def count_params(cfg: Config | ModelConfig, experts_per_token: float | None = None) -> tuple[int, int]:
    """(total, activated per token): the activated count leaves out the unchosen routed experts,
    i.e. (E - K) / E of every parameter with a logical ``expert`` axis. K is ``moe.top_k``, or
    for top-p routing the most a token can take (``max_experts``) unless ``experts_per_token``
    (a measured mean) is given."""
    cfg = model_config(cfg)
    # the axes leaves are tuples of names, which jax would otherwise walk into
    axes = jax.tree.leaves(param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree.leaves(param_shapes(cfg))
    total = sum(s.size for s in shapes)
    routed = sum(s.size for s, a in zip(shapes, axes) if "expert" in a)
    if routed == 0:
        return total, total
    K = cfg.moe.slots if experts_per_token is None else experts_per_token
    idle = int(routed * (cfg.moe.n_routed_experts - K) // cfg.moe.n_routed_experts)
    return total, total - idle


def flops_per_token(cfg: Config | ModelConfig, seq_len: int, experts_per_token: float | None = None) -> int:
    """Forward FLOPs per token: 2 x activated matmul params + causal attention scores at
    ``seq_len`` (``experts_per_token``: as ``count_params`` takes it)."""
    cfg = model_config(cfg)
    _, activated = count_params(cfg, experts_per_token)
    embedding = cfg.vocab_size * cfg.d_model  # a lookup, not a matmul
    v_head_dim = cfg.head_dim if cfg.mla is None else cfg.mla.v_head_dim
    # QK^T and AV, over the causal half of the keys
    attention = 2 * cfg.n_layers * cfg.n_heads * (cfg.head_dim + v_head_dim) * seq_len // 2
    return 2 * (activated - embedding) + attention


def cache_dims(cfg: Config | ModelConfig) -> tuple[int, int, int]:
    """(heads, key width, value width) of one layer's KV-cache entry per token: the key/value
    heads for multi-head attention, one latent head (and no separate values) for MLA."""
    cfg = model_config(cfg)
    return (cfg.kv_heads, cfg.head_dim, cfg.head_dim) if cfg.mla is None else mla.cache_dims(cfg)


def cache_bytes_per_token(cfg: Config | ModelConfig) -> int:
    """Bytes one token takes in the KV cache, all layers, in ``model.dtype``."""
    cfg = model_config(cfg)
    heads, k_width, v_width = cache_dims(cfg)
    return cfg.n_layers * heads * (k_width + v_width) * jnp.dtype(cfg.dtype).itemsize
