"""FP8 weights as DeepSeek-V3 ships them: float8_e4m3fn values with one float32 scale per
128 x 128 block, the scale being the block's absolute maximum / 448 (e4m3's largest value).

A weight of ours is a matrix seen through its axes: ``[*batch, *in, *out]`` (experts or stacked
layers in front, then the axes a matmul contracts, then the axes it produces). Its block scales
are over the ``[K, N]`` matrix with the ``in`` and ``out`` axes flattened, in that order: the
transpose of the ``[out, in]`` matrix HF's ``nn.Linear`` stores. So a released weight's scales
are ours transposed, and its bytes are ours permuted, with nothing re-rounded.

``Fp8Weight`` holds such a weight inside the params tree (an ``nnx.Param``'s value). It behaves
like the array it stands for where the model reads weights: ``w[...]``, ``w[e]`` (an expert),
``w.shape`` and ``w.astype(dtype)``, which dequantises. Every matmul of the model casts its weight
to the compute dtype first, so the model runs from FP8 weights unchanged, and compiled
programs take the weights in one byte per value.

Shape legend: K rows of the matrix (the ``in`` axes flattened: what a matmul contracts), N its
columns (the ``out`` axes), R, C blocks along them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
BLOCK = 128  # the block edge of DeepSeek-V3's weight scales
SCALE_SUFFIX = "_scale_inv"  # an HF FP8 weight's scales are the tensor of its name with this suffix


def blocks(n: int) -> int:
    """Blocks along an axis of ``n`` values, the last one partial when ``BLOCK`` does not divide it."""
    return -(-n // BLOCK)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A weight of shape ``data.shape`` in float8_e4m3fn, ``value = data * scale_inv`` per block.

    ``data``: ``[*batch, *in, *out]``; ``scale_inv``: ``[*batch, R, C]`` float32, R and C the
    blocks of the flattened ``in`` and ``out`` axes (``n_in`` and ``n_out`` of them)."""

    data: jax.Array
    scale_inv: jax.Array
    n_in: int = dataclasses.field(default=1, metadata={"static": True})
    n_out: int = dataclasses.field(default=1, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def n_batch(self) -> int:
        return self.ndim - self.n_in - self.n_out

    def __getitem__(self, index) -> Fp8Weight:
        """``w[...]`` is ``w``; ``w[i]`` (an int or an integer array) picks along the first batch
        axis, as ``w_gate_EDF[e]`` picks an expert."""
        if index is Ellipsis:
            return self
        if self.n_batch < 1 or isinstance(index, (tuple, slice)):
            raise IndexError(f"an FP8 weight of shape {self.shape} can be indexed only along its batch axes, "
                             "one integer at a time")
        return Fp8Weight(self.data[index], self.scale_inv[index], self.n_in, self.n_out)

    def astype(self, dtype) -> jax.Array:
        """The dequantised weight in ``dtype``: each value times its block's scale, in float32."""
        return dequantize(self).astype(dtype)


def _matrix_shape(shape: tuple[int, ...], n_in: int, n_out: int) -> tuple[tuple[int, ...], int, int]:
    """``(batch, K, N)`` of a ``[*batch, *in, *out]`` shape."""
    if n_in < 1 or n_out < 1 or n_in + n_out > len(shape):
        raise ValueError(f"a weight of shape {shape} has no {n_in} in and {n_out} out axes")
    batch = shape[:len(shape) - n_in - n_out]
    return batch, math.prod(shape[len(batch):len(batch) + n_in]), math.prod(shape[len(shape) - n_out:])


def _blocked(a_BIO: jax.Array) -> jax.Array:
    """``[*batch, K, N]`` zero-padded to whole blocks and split into ``[*batch, R, 128, C, 128]``."""
    *batch, K, N = a_BIO.shape
    R, C = blocks(K), blocks(N)
    pad = [(0, 0)] * len(batch) + [(0, R * BLOCK - K), (0, C * BLOCK - N)]
    return jnp.pad(a_BIO, pad).reshape(*batch, R, BLOCK, C, BLOCK)


def _unblocked(a: jax.Array, K: int, N: int) -> jax.Array:
    *batch, R, _, C, _ = a.shape
    return a.reshape(*batch, R * BLOCK, C * BLOCK)[..., :K, :N]


def _round(x: jax.Array, amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` in e4m3 at scale amax / 448 (1 where amax is 0), rounded to nearest even and
    saturated at +-448; and the scale."""
    # XLA turns a division by a constant into a product with its reciprocal, one ulp away from
    # amax / 448 as DeepSeek's quantiser computes it: the barrier keeps it a true division
    scale = jnp.where(amax > 0, amax / jax.lax.optimization_barrier(jnp.full_like(amax, E4M3_MAX)), 1.0)
    return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), scale


def quantize(w: jax.Array, n_in: int = 1, n_out: int = 1) -> Fp8Weight:
    """``w`` (``[*batch, *in, *out]``) in float8_e4m3fn with one scale per 128 x 128 block of its
    ``[K, N]`` matrix: scale = block amax / 448 (1 for an all-zero block, whose values stay 0),
    values rounded to nearest even and saturated at +-448. A NaN or inf makes its block's scale
    NaN or inf (the others are unaffected): ``check_finite`` names it beforehand."""
    batch, K, N = _matrix_shape(tuple(w.shape), n_in, n_out)
    x = _blocked(jnp.asarray(w, jnp.float32).reshape(*batch, K, N))
    q, scale = _round(x, jnp.max(jnp.abs(x), axis=(-3, -1), keepdims=True))
    data = _unblocked(q, K, N).reshape(w.shape)
    return Fp8Weight(data, scale[..., :, 0, :, 0], n_in, n_out)


def dequantize(w: Fp8Weight) -> jax.Array:
    """The float32 values of ``w``: each e4m3 value times its block's scale."""
    batch, K, N = _matrix_shape(w.shape, w.n_in, w.n_out)
    x = _blocked(w.data.astype(jnp.float32).reshape(*batch, K, N))
    values = x * w.scale_inv[..., :, None, :, None]
    return _unblocked(values, K, N).reshape(w.shape)


def check_finite(name: str, values: np.ndarray, what: str = "value") -> None:
    """Raise ``ValueError`` naming the first NaN or inf of ``values`` (and how many there are)."""
    bad = np.argwhere(~np.isfinite(np.asarray(values, np.float32)))
    if bad.size:
        raise ValueError(f"{name}: {len(bad)} non-finite {what}s (the first at {tuple(int(b) for b in bad[0])}): "
                         "quantising it would make every output NaN")


# ---- FP8 GEMMs for training (model.fp8): DeepSeek-V3's recipe -------------------------------
# Every GEMM of a projection or an expert takes e4m3 inputs scaled per tile along the axis it
# contracts: activations and gradients per 1 x 128 tile (one row, 128 channels), weights per
# 128 x 128 block, each scale from the tile's current amax (no history), products summed in
# float32. Here the e4m3 values are emulated: each input is rounded to e4m3 and scaled back in
# float32 before an ordinary float32 GEMM, which differs from a hardware FP8 GEMM (the scale
# applied to each 128-long partial sum) only by float32 rounding of the scaled values.


def quantize_tiles(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """``x`` in float8_e4m3fn with one float32 scale per tile of 128 values along ``axis`` (the
    last tile partial when 128 does not divide it): scale = tile amax / 448 (1 for a zero tile).
    Returns the values (``x``'s shape) and the scales (``axis`` shortened to its tiles)."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    n = x.shape[-1]
    tiles = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks(n) * BLOCK - n)]).reshape(*x.shape[:-1], -1, BLOCK)
    q, scale = _round(tiles, jnp.max(jnp.abs(tiles), axis=-1, keepdims=True))
    q = q.reshape(*x.shape[:-1], -1)[..., :n]
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(scale[..., 0], -1, axis)


def fake_quantize_tiles(x: jax.Array, axis: int = -1) -> jax.Array:
    """What an FP8 GEMM reads of ``x`` tiled along ``axis``: its e4m3 values times their scales (float32)."""
    q, scale = quantize_tiles(x, axis)
    scale = jnp.repeat(scale, BLOCK, axis=axis, total_repeat_length=blocks(x.shape[axis]) * BLOCK)
    return q.astype(jnp.float32) * jax.lax.slice_in_dim(scale, 0, x.shape[axis], axis=axis % x.ndim)


def fake_quantize_blocks(w: jax.Array) -> jax.Array:
    """What an FP8 GEMM reads of weight ``w`` (``[*batch, K, N]``): its 128 x 128-block e4m3 values
    times their scales (float32)."""
    return dequantize(quantize(w))


@jax.custom_vjp
def dot(x_TK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """``x @ w`` as an FP8 GEMM in the forward and backward passes: ``x`` in 1 x 128 tiles and
    ``w`` in 128 x 128 blocks; the input gradient from the output gradient in 1 x 128 tiles and
    the same blocks; the weight gradient from ``x`` and the output gradient each in 128 x 1 tiles
    (along the tokens it sums over). Output in ``x``'s dtype."""
    return _dot_fwd(x_TK, w_KN)[0]


def _dot_fwd(x_TK, w_KN):
    y_TN = jnp.einsum("tk,kn->tn", fake_quantize_tiles(x_TK, -1), fake_quantize_blocks(w_KN))
    return y_TN.astype(x_TK.dtype), (x_TK, w_KN)


def _dot_bwd(residuals, dy_TN):
    x_TK, w_KN = residuals
    dx_TK = jnp.einsum("tn,kn->tk", fake_quantize_tiles(dy_TN, -1), fake_quantize_blocks(w_KN))
    dw_KN = jnp.einsum("tk,tn->kn", fake_quantize_tiles(x_TK, 0), fake_quantize_tiles(dy_TN, 0))
    return dx_TK.astype(x_TK.dtype), dw_KN.astype(w_KN.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)
