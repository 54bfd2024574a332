"""Causal dot-product attention: queries ``[B, S, N, H]`` against keys and values ``[B, T, K, H]``.

Shape legend: B batch, S query slots, T key slots, N query heads, K key/value heads,
G = N / K query heads per key head (grouped-query attention), H head width.

Two implementations with one contract (softmax in float32, scale 1/sqrt(H), output in the
queries' dtype; a query row whose keys are all masked gives an arbitrary finite value):
  "xla"      ``jax.nn.dot_product_attention``: the score of every query against every key slot.
  "blocked"  for a sequence attending to its own keys (no cache: T = S and query slot s is key
             slot s): queries in blocks of ``QUERY_BLOCK`` rows, block i scoring only the keys
             up to its own end. The scores above the causal diagonal, about half of them, are
             never computed, and no [S, S] matrix is materialised at once. On XLA:CPU this is
             2-4x faster than "xla" forward and backward (BENCHMARKS.md).
``attention(..., own_keys=True)`` picks "blocked" on CPU; a cache (``own_keys=False``) always
uses "xla", because the number of keys a query can see is then only known at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUERY_BLOCK = 128  # rows per query block of "blocked": 64 and 128 measured in BENCHMARKS.md
IMPLEMENTATIONS = ("auto", "xla", "blocked")


def _grouped(x_BSNH: jax.Array, K: int) -> jax.Array:
    """[B, S, N, H] -> [B, K, G, S, H]: query heads grouped under the key head they share."""
    B, S, N, H = x_BSNH.shape
    return x_BSNH.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4)


def blocked_attention(q_BSNH, k_BSKH, v_BSKH, mask_B1SS, block: int = QUERY_BLOCK) -> jax.Array:
    """Causal attention of a sequence over its own keys, one block of queries at a time."""
    (B, S, N, H), K = q_BSNH.shape, k_BSKH.shape[2]
    q_BKGSH = _grouped(q_BSNH, K)
    k_BKSH, v_BKSH = (a.transpose(0, 2, 1, 3) for a in (k_BSKH, v_BSKH))
    outs = []
    for start in range(0, S, block):
        end = min(start + block, S)  # a query in this block sees no key at or past ``end``
        s_BKGQT = jnp.einsum("bkgqh,bkth->bkgqt", q_BKGSH[:, :, :, start:end], k_BKSH[:, :, :end],
                             preferred_element_type=jnp.float32) * H**-0.5
        visible_B1QT = mask_B1SS[:, :, start:end, :end]
        s_BKGQT = jnp.where(visible_B1QT[:, :, None], s_BKGQT, jnp.finfo(jnp.float32).min)
        p_BKGQT = jax.nn.softmax(s_BKGQT, axis=-1).astype(v_BKSH.dtype)
        outs.append(jnp.einsum("bkgqt,bkth->bkgqh", p_BKGQT, v_BKSH[:, :, :end]))
    out_BKGSH = jnp.concatenate(outs, axis=3)
    return out_BKGSH.transpose(0, 3, 1, 2, 4).reshape(B, S, N, H).astype(q_BSNH.dtype)


def attention(q_BSNH, k_BTKH, v_BTKH, mask_B1ST, *, own_keys: bool, implementation: str = "auto") -> jax.Array:
    """Attention output ``[B, S, N, H]``; ``mask_B1ST`` says which key slots each query sees.

    ``own_keys``: the keys are the queries' own sequence in order (T = S, causal), which is what
    lets "blocked" skip the scores above the diagonal."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "blocked" if own_keys and jax.default_backend() == "cpu" else "xla"
    if implementation == "blocked":
        if not own_keys:
            raise ValueError("blocked attention needs own_keys=True (a sequence over its own keys, no cache)")
        return blocked_attention(q_BSNH, k_BTKH, v_BTKH, mask_B1ST)
    return jax.nn.dot_product_attention(q_BSNH, k_BTKH, v_BTKH, mask=mask_B1ST)
