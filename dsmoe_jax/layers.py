"""Building blocks shared by the dense and MoE blocks: parameters, RMSNorm, the SwiGLU MLP.

Shape legend: B batch, S sequence, D model width, F MLP hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax.fp8 import dot as fp8_dot
from dsmoe_jax.fp8 import quantize


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype,
          fp8: tuple[int, int] | None = None) -> nnx.Param:
    """A normally initialised weight annotated with its logical axes (mapped to mesh axes by
    ``mesh.RULES``). ``fp8 = (n_in, n_out)``: held as an ``fp8.Fp8Weight`` whose last ``n_in +
    n_out`` axes are the matrix a matmul contracts and produces (``model.fp8_weights``)."""
    assert len(shape) == len(axes), (shape, axes)
    w = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(w if fp8 is None else quantize(w, *fp8), axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm, statistics in float32, output in the input's dtype. ``D`` is the
    normalised width: the model's (logical axis ``embed``) or a latent's (``axis``)."""

    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "embed"):
        self.scale_D = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))
        self.eps = eps

    @jax.named_scope("norm")
    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        x = x_BSD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale_D[...].astype(jnp.float32)).astype(x_BSD.dtype)


def linear(x_TK: jax.Array, w_KN: jax.Array, fp8: bool = False) -> jax.Array:
    """``x @ w`` in ``x``'s dtype; with ``fp8``, as an FP8 GEMM in the forward and backward
    passes (``fp8.dot``: DeepSeek-V3's recipe, ``model.fp8``)."""
    w_KN = w_KN.astype(x_TK.dtype)
    return fp8_dot(x_TK, w_KN) if fp8 else jnp.einsum("tk,kn->tn", x_TK, w_KN)


def swiglu(x_TD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
           fp8: bool = False) -> jax.Array:
    """silu(x Wg) * (x Wu) Wd over the last axis of ``x``, in ``x``'s dtype, accumulating in
    float32; with ``fp8`` its three GEMMs are FP8 GEMMs (``linear``)."""
    dt, shape = x_TD.dtype, x_TD.shape
    # Flatten leading axes: XLA:CPU computes weight gradients that contract over several axes
    # (batch and sequence) about 3x slower than over one.
    x_TD = x_TD.reshape(-1, shape[-1])
    if fp8:
        dot = lambda a, w: linear(a, w, fp8=True)
    else:
        dot = lambda a, w: jnp.einsum("td,df->tf", a, w.astype(dt), preferred_element_type=jnp.float32)
    h_TF = (jax.nn.silu(dot(x_TD, w_gate_DF)) * dot(x_TD, w_up_DF)).astype(dt)
    return dot(h_TF, w_down_FD).astype(dt).reshape(shape)


class MLP(nnx.Module):
    """Dense SwiGLU MLP: the FFN of the first dense blocks and the fused shared experts."""

    def __init__(self, d_model: int, d_ff: int, *, std: float, param_dtype, rngs: nnx.Rngs, fp8: bool = False,
                 fp8_gemm: bool = False):
        """``fp8``: weights held in FP8 (``model.fp8_weights``); ``fp8_gemm``: FP8 GEMMs (``model.fp8``)."""
        io = (1, 1) if fp8 else None
        self.fp8_gemm = fp8_gemm
        self.w_gate_DF = param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype, io)
        self.w_up_DF = param(rngs, (d_model, d_ff), ("embed", "mlp"), std, param_dtype, io)
        self.w_down_FD = param(rngs, (d_ff, d_model), ("mlp", "embed"), std, param_dtype, io)

    def __call__(self, x: jax.Array) -> jax.Array:
        return swiglu(x, self.w_gate_DF[...], self.w_up_DF[...], self.w_down_FD[...], self.fp8_gemm)
