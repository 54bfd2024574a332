"""The "triton" grouped-MLP backend: the kernels of ``triton_kernels`` tied together with a
custom VJP, launched with jax-triton on a GPU and through Triton's interpreter elsewhere.

Forward:   h = gate_up(x, Wg, Wu);  y = h Wd
Backward:  dh = dy Wd^T;  dg, du = gate_up backward (recomputes x Wg, x Wu: nothing but h is
           saved);  dx = dg Wg^T + du Wu^T;  dWd = h^T dy, dWg = x^T dg, dWu = x^T du per expert.

Shape legend: G rows (sorted by expert), D model width, F expert hidden width, E experts,
N tiles of the schedule.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.grouped import tile_schedule

from . import triton_kernels as tk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def blocks(interpret: bool) -> dict:
    """Tile sizes. Hopper: 64-row tiles, 128 columns, 64-deep K steps, 4 warps (chosen from
    the usual H100 grouped-GEMM configs; not yet tuned on a GPU here). The interpreter gets
    the smallest sizes tl.dot accepts, since its cost grows with the tile volume."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _to_torch(a: np.ndarray):
    import torch

    a = np.array(a, copy=True)  # jax hands the callback read-only views; torch wants to own its memory
    if a.dtype == jnp.bfloat16:  # torch cannot take numpy's bfloat16: pass the bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def _launch(kernel, grid: tuple, inputs: list, out_shapes: list, **meta):
    """Run ``kernel`` over ``grid``: pointer arguments are ``inputs`` then the outputs (fresh,
    uninitialised buffers of ``out_shapes``), the rest constexprs."""
    if not INTERPRET:
        import jax_triton

        out = jax_triton.triton_call(*inputs, kernel=kernel, out_shape=out_shapes, grid=grid, **meta)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}

    def run(*arrays):
        import torch

        outs = [torch.empty(s.shape, dtype=_to_torch(np.zeros((), s.dtype)).dtype) for s in out_shapes]
        kernel[grid](*map(_to_torch, arrays), *outs, **meta)
        return [_to_numpy(o) for o in outs]

    return jax.pure_callback(run, list(out_shapes), *inputs)


def _precision(dtype) -> str:
    return "ieee" if dtype == jnp.float32 else "tf32"


def _common(dtype) -> dict:
    return {**blocks(INTERPRET), "UPCAST": INTERPRET, "PRECISION": _precision(dtype)}


def _schedule(group_sizes_E, G):
    expert_N, row_N, valid_N, _ = tile_schedule(group_sizes_E, G, blocks(INTERPRET)["BLOCK_M"])
    return [a.astype(jnp.int32) for a in (expert_N, row_N, valid_N)]


def gate_up(x_GD, w_gate_EDF, w_up_EDF, schedule, dh_GF=None):
    """h = silu(x Wg) * (x Wu) per tile's expert; given ``dh``, (dg, du) instead."""
    G, D = x_GD.shape
    F = w_gate_EDF.shape[-1]
    meta = _common(x_GD.dtype)
    grid = (schedule[0].shape[0], -(-F // meta["BLOCK_N"]))
    backward = dh_GF is not None
    unused = jnp.zeros((1,), x_GD.dtype)  # the pointers one direction does not use
    out = jax.ShapeDtypeStruct((G, F), x_GD.dtype)
    outs = _launch(tk.gate_up_kernel, grid, [x_GD, w_gate_EDF, w_up_EDF, dh_GF if backward else unused, *schedule],
                   [out, out if backward else jax.ShapeDtypeStruct((1,), x_GD.dtype)], D=D, F=F, BACKWARD=backward,
                   **meta)
    return tuple(outs) if backward else outs[0]


def grouped_matmul(a_GK, w_EKN, schedule, transpose_w: bool = False, second=None):
    """out = a W_e (+ a2 W2_e) per tile's expert; ``transpose_w`` reads W [E, N, K] as [E, K, N]."""
    G, K = a_GK.shape
    E, W1, W2 = w_EKN.shape
    N = W1 if transpose_w else W2
    strides = {"STRIDE_WE": W1 * W2, "STRIDE_WK": 1 if transpose_w else W2, "STRIDE_WN": W2 if transpose_w else 1}
    meta = _common(a_GK.dtype)
    a2, w2 = second if second is not None else (jnp.zeros((1,), a_GK.dtype), jnp.zeros((1,), w_EKN.dtype))
    grid = (schedule[0].shape[0], -(-N // meta["BLOCK_N"]))
    (out,) = _launch(tk.grouped_matmul_kernel, grid, [a_GK, w_EKN, a2, w2, *schedule], [jax.ShapeDtypeStruct((G, N), a_GK.dtype)],
                     K=K, N=N, HAS_SECOND=second is not None, **strides, **meta)
    return out


def weight_grad(a_GK, b_GN, group_sizes_E):
    """dW_e = a_e^T b_e over each expert's rows: [E, K, N] in float32."""
    K, N, E = a_GK.shape[1], b_GN.shape[1], group_sizes_E.shape[0]
    meta = _common(a_GK.dtype)
    block = {"BLOCK_R": meta.pop("BLOCK_M"), "BLOCK_K": meta.pop("BLOCK_K"), "BLOCK_N": meta.pop("BLOCK_N")}
    starts_E = (jnp.cumsum(group_sizes_E) - group_sizes_E).astype(jnp.int32)
    grid = (E, -(-K // block["BLOCK_K"]), -(-N // block["BLOCK_N"]))
    (out,) = _launch(tk.weight_grad_kernel, grid, [a_GK, b_GN, starts_E, group_sizes_E.astype(jnp.int32)],
                     [jax.ShapeDtypeStruct((E, K, N), jnp.float32)], K=K, N=N, **block, **meta)
    return out


@jax.custom_vjp
def triton_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E):
    """The grouped gated MLP with the Triton kernels (the ``grouped.py`` backend contract)."""
    return _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E)[0]


def _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E):
    dt = x_GD.dtype
    schedule = _schedule(group_sizes_E, x_GD.shape[0])
    h_GF = gate_up(x_GD, w_gate_EDF.astype(dt), w_up_EDF.astype(dt), schedule)
    y_GD = grouped_matmul(h_GF, w_down_EFD.astype(dt), schedule)
    return _rows_in_groups(y_GD, group_sizes_E), (h_GF, schedule)


def _rows_in_groups(a_GX, group_sizes_E):
    """Rows past the last group belong to no tile: zero them (the kernels leave them unset)."""
    return jnp.where((jnp.arange(a_GX.shape[0]) < jnp.sum(group_sizes_E))[:, None], a_GX, 0)


def _fwd(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E):
    y_GD, (h_GF, schedule) = _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E)
    return y_GD, (x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, h_GF, schedule)


def _bwd(residuals, dy_GD):
    x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, h_GF, schedule = residuals
    dt = x_GD.dtype
    wg, wu, wd = (w.astype(dt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    dy_GD = dy_GD.astype(dt)
    dh_GF = grouped_matmul(dy_GD, wd, schedule, transpose_w=True)
    dg_GF, du_GF = gate_up(x_GD, wg, wu, schedule, dh_GF=dh_GF)
    dx_GD = grouped_matmul(dg_GF, wg, schedule, transpose_w=True, second=(du_GF, wu))
    dw = lambda a, b, w: weight_grad(a, b, group_sizes_E).astype(w.dtype)
    return (_rows_in_groups(dx_GD, group_sizes_E), dw(x_GD, dg_GF, w_gate_EDF), dw(x_GD, du_GF, w_up_EDF),
            dw(h_GF, dy_GD, w_down_EFD), None)


triton_grouped_mlp.defvjp(_fwd, _bwd)
