"""Causal dot-product attention: queries ``[B, S, N, H]`` against keys and values ``[B, T, K, H]``.

Shape legend: B batch, S query slots, T key slots, N query heads, K key/value heads,
G = N / K query heads per key head (grouped-query attention), H query/key head width, W value
head width (H unless MLA makes them differ).

The queries sit at slots ``start .. start + S - 1`` of the ``T`` key slots; query slot s sees
key slot t when t <= s and ``valid_BT[b, t]`` (a real token, not padding). When ``start`` is
the Python int 0 and T = S, the keys are the queries' own sequence ("own keys": training,
evaluation, a prefill); otherwise they come from a KV cache. Over its own keys a row may hold
several packed examples: ``segment_ids_BS`` (example numbers, as ``packing.py`` writes them) then
also hides every key of another example, in every implementation.

Implementations share one contract (softmax in float32, logits scaled by ``scale``, default
1/sqrt(H), output in the queries' dtype; a query row that sees no key gives an arbitrary finite
value). Values narrower than the keys are zero-padded for the two implementations that need
equal widths (JAX's attention API), and the padding sliced off the output:
  "xla"      ``jax.nn.dot_product_attention`` with a [B, 1, S, T] mask: the score of every query
             against every key slot. The only one that serves a cache.
  "blocked"  own keys only: queries in blocks of ``QUERY_BLOCK`` rows, block i scoring only the
             keys up to its own end, so the scores above the causal diagonal (about half) are
             never computed and no [S, S] matrix exists at once. On XLA:CPU 2-4x faster than
             "xla" forward and backward (BENCHMARKS.md).
  "cudnn"    own keys only: cuDNN's fused flash attention (``is_causal`` and per-row sequence
             lengths, no mask and no materialised scores). cuDNN only knows padding at the end
             of a row, so left-padded rows (``inference.pad_prompts``) are rolled to start at
             slot 0 and rolled back; each row's real tokens must be one contiguous run. Off a
             GPU the same call runs through XLA's reference implementation, which is how the
             tests check these arguments on CPU.
``resolve_implementation`` maps "auto" (and a cache) to one of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUERY_BLOCK = 128  # rows per query block of "blocked": 64 and 128 measured in BENCHMARKS.md
IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what cuDNN's fused attention takes


def resolve_implementation(name: str, own_keys: bool = True, platform: str | None = None,
                           dtype="bfloat16") -> str:
    """The implementation ``attention`` runs for ``name`` on ``platform`` (default: JAX's backend)
    with queries of ``dtype``.

    "auto" is "blocked" on CPU, and on GPU "cudnn" for the 16-bit dtypes cuDNN's kernel takes
    ("xla" for float32); attention over a cache is always "xla"."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; one of {', '.join(IMPLEMENTATIONS)}")
    if not own_keys:
        return "xla"
    if name == "auto":
        platform = platform or jax.default_backend()
        if platform == "gpu":
            return "cudnn" if jnp.dtype(dtype) in CUDNN_DTYPES else "xla"
        return "blocked" if platform == "cpu" else "xla"
    return name


def causal_mask(valid_keys_BT: jax.Array, query_slots_S: jax.Array, segment_ids_BT: jax.Array | None = None
                ) -> jax.Array:
    """[B, 1, S, T]: query slot s sees key slot t when t <= s and key t is a real token (and,
    with ``segment_ids_BT``, of the query's own example)."""
    T = valid_keys_BT.shape[1]
    causal_ST = jnp.arange(T)[None, :] <= query_slots_S[:, None]
    mask_B1ST = valid_keys_BT.astype(bool)[:, None, None, :] & causal_ST[None, None]
    if segment_ids_BT is not None:
        query_BS = jnp.take(segment_ids_BT, query_slots_S, axis=1)
        mask_B1ST = mask_B1ST & (query_BS[:, None, :, None] == segment_ids_BT[:, None, None, :])
    return mask_B1ST


def _grouped(x_BSNH: jax.Array, K: int) -> jax.Array:
    """[B, S, N, H] -> [B, K, G, S, H]: query heads grouped under the key head they share."""
    B, S, N, H = x_BSNH.shape
    return x_BSNH.reshape(B, S, K, N // K, H).transpose(0, 2, 3, 1, 4)


def blocked_attention(q_BSNH, k_BSKH, v_BSKW, valid_BS, block: int = QUERY_BLOCK, scale: float | None = None,
                      segment_ids_BS: jax.Array | None = None) -> jax.Array:
    """Causal attention of a sequence over its own keys, one block of queries at a time."""
    (B, S, N, H), K, W = q_BSNH.shape, k_BSKH.shape[2], v_BSKW.shape[3]
    scale = H**-0.5 if scale is None else scale
    q_BKGSH = _grouped(q_BSNH, K)
    k_BKSH, v_BKSW = (a.transpose(0, 2, 1, 3) for a in (k_BSKH, v_BSKW))
    outs = []
    for start in range(0, S, block):
        end = min(start + block, S)  # a query in this block sees no key at or past ``end``
        s_BKGQT = jnp.einsum("bkgqh,bkth->bkgqt", q_BKGSH[:, :, :, start:end], k_BKSH[:, :, :end],
                             preferred_element_type=jnp.float32) * scale
        segments_BT = None if segment_ids_BS is None else segment_ids_BS[:, :end]
        visible_B1QT = causal_mask(valid_BS[:, :end], jnp.arange(start, end), segments_BT)
        s_BKGQT = jnp.where(visible_B1QT[:, :, None], s_BKGQT, jnp.finfo(jnp.float32).min)
        p_BKGQT = jax.nn.softmax(s_BKGQT, axis=-1).astype(v_BKSW.dtype)
        outs.append(jnp.einsum("bkgqt,bktw->bkgqw", p_BKGQT, v_BKSW[:, :, :end]))
    out_BKGSW = jnp.concatenate(outs, axis=3)
    return out_BKGSW.transpose(0, 3, 1, 2, 4).reshape(B, S, N, W).astype(q_BSNH.dtype)


def _roll_rows(x_BS___: jax.Array, shift_B: jax.Array) -> jax.Array:
    """Row b rolled left by ``shift_B[b]`` slots along axis 1."""
    S = x_BS___.shape[1]
    index_BS = (jnp.arange(S)[None, :] + shift_B[:, None]) % S
    return jnp.take_along_axis(x_BS___, index_BS.reshape(*index_BS.shape, *[1] * (x_BS___.ndim - 2)), axis=1)


def flash_attention(q_BSNH, k_BSKH, v_BSKH, valid_BS, scale: float | None = None,
                    segment_ids_BS: jax.Array | None = None) -> jax.Array:
    """Causal attention of a sequence over its own keys through cuDNN's fused kernel (XLA's
    reference implementation of the same call off a GPU); see the module docstring. Packed
    examples (``segment_ids_BS``) go to cuDNN as a boolean mask beside ``is_causal``: the
    public API has no segment ids, and the mask also hides padding wherever it sits."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and q_BSNH.dtype not in CUDNN_DTYPES:
        raise ValueError(f"cuDNN flash attention takes bfloat16 or float16, not {q_BSNH.dtype}: set "
                         "model.dtype = 'bfloat16', or model.attention = 'auto' (which uses 'xla' for float32)")
    if segment_ids_BS is not None:
        mask_B1ST = causal_mask(valid_BS, jnp.arange(q_BSNH.shape[1]), segment_ids_BS)
        return jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, mask=mask_B1ST, scale=scale, is_causal=True,
                                            implementation="cudnn" if on_gpu else "xla")
    lead_B = jnp.argmax(valid_BS, axis=1)  # the first real slot: left padding ends there
    length_B = jnp.sum(valid_BS, axis=1, dtype=jnp.int32)
    q_BSNH, k_BSKH, v_BSKH = (_roll_rows(a, lead_B) for a in (q_BSNH, k_BSKH, v_BSKH))
    out_BSNH = jax.nn.dot_product_attention(
        q_BSNH, k_BSKH, v_BSKH, scale=scale, is_causal=True, query_seq_lengths=length_B,
        key_value_seq_lengths=length_B, implementation="cudnn" if on_gpu else "xla")
    return _roll_rows(out_BSNH, -lead_B)


def attention(q_BSNH, k_BTKH, v_BTKW, valid_BT, *, start=0, implementation: str = "auto",
              scale: float | None = None, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Attention output ``[B, S, N, W]`` of queries at slots ``start ..`` over ``T`` key slots of
    which ``valid_BT`` marks the real tokens, logits scaled by ``scale`` (default 1/sqrt(H)).
    ``implementation`` applies to attention over the queries' own keys; over a cache it is
    always "xla" (``resolve_implementation``). ``segment_ids_BT`` (own keys only): a query sees
    only the keys of its own packed example."""
    own_keys = isinstance(start, int) and start == 0 and k_BTKH.shape[1] == q_BSNH.shape[1]
    if segment_ids_BT is not None and not own_keys:
        raise ValueError("segment ids separate packed examples of a sequence attending to its own keys; a KV cache "
                         "holds one sequence per row: leave them out")
    implementation = resolve_implementation(implementation, own_keys, dtype=q_BSNH.dtype)
    if implementation == "blocked":
        return blocked_attention(q_BSNH, k_BTKH, v_BTKW, valid_BT, scale=scale, segment_ids_BS=segment_ids_BT)
    H, W = k_BTKH.shape[-1], v_BTKW.shape[-1]
    v_BTKH = jnp.pad(v_BTKW, [(0, 0)] * 3 + [(0, H - W)]) if W < H else v_BTKW
    if implementation == "cudnn":
        out_BSNH = flash_attention(q_BSNH, k_BTKH, v_BTKH, valid_BT, scale=scale, segment_ids_BS=segment_ids_BT)
    else:
        mask_B1ST = causal_mask(valid_BT, start + jnp.arange(q_BSNH.shape[1]), segment_ids_BT)
        out_BSNH = jax.nn.dot_product_attention(q_BSNH, k_BTKH, v_BTKH, mask=mask_B1ST, scale=scale)
    return out_BSNH[..., :W]
