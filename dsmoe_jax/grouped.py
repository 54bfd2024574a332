"""The grouped gated MLP: ``y_g = silu(x_g Wg_e) * (x_g Wu_e) Wd_e`` for rows sorted by expert.

Shape legend: G rows (sorted by expert), D model width, F expert hidden width, E experts,
M rows per tile, N tiles.

Every backend has the signature ``fn(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E)``
and the same contract: rows ``[0, sum(group_sizes))`` hold the groups of experts ``0..E-1`` in
order; rows past ``sum(group_sizes)`` (dropped assignments) give zeros; the output has ``x``'s
dtype with float32 accumulation; it is differentiable in ``x`` and the three weights.

Backends:
  "dense"   every expert on every row, selected by a one-hot mask: the readable reference.
  "ragged"  ``jax.lax.ragged_dot``. On XLA:CPU it costs about as much as "dense" (it computes
            every expert), so it is not the CPU default.
  "tiled"   the CPU default: a loop over M-row tiles, each inside one expert's group, one GEMM
            per tile with that expert's weights; hand-written backward. Dropless; the work is the
            routed rows plus less than one tile of padding per expert.
  "tiled_fp8"  "tiled" with every GEMM, forward and backward, as an FP8 GEMM (``model.fp8``).
  "triton"  the Triton kernels of ``kernels/`` (the GPU default), which build on this module and
            register themselves when the package imports them (``dsmoe_jax/__init__.py``), with
            the modules they need: Triton, and jax-triton on a GPU.
Other backends plug in with ``register_backend``; ``moe.py`` only names one.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from dsmoe_jax.config import GROUPED_BACKENDS
from dsmoe_jax.fp8 import fake_quantize_blocks, fake_quantize_tiles

GroupedMLP = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

_BACKENDS: dict[str, GroupedMLP] = {}
# What a backend needs installed to run, by platform ("*": any other platform).
_NEEDS: dict[str, Mapping[str, tuple[str, ...]]] = {}
_BUILTIN = frozenset(GROUPED_BACKENDS)

TILE_ROWS = 256  # rows per tile of the "tiled" backend: 128 and 256 measured in BENCHMARKS.md


def register_backend(name: str, fn: GroupedMLP, needs: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Make ``fn`` available as ``moe.backend = name`` (configs built afterwards accept it).
    ``needs``: the modules it imports when it runs, by platform (``"*"``: any other), e.g.
    ``{"gpu": ("triton", "jax_triton"), "*": ("triton",)}``; without them it is not chosen."""
    _BACKENDS[name] = fn
    _NEEDS[name] = dict(needs or {})
    GROUPED_BACKENDS.add(name)


def unregister_backend(name: str) -> None:
    """Forget a backend added with ``register_backend``; the built-in ones cannot be removed."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in grouped-MLP backend and cannot be unregistered")
    _BACKENDS.pop(name, None)
    _NEEDS.pop(name, None)
    GROUPED_BACKENDS.discard(name)


def available_backends() -> tuple[str, ...]:
    return ("auto", *sorted(_BACKENDS))


def _missing(name: str) -> list[str]:
    """The modules backend ``name`` needs on this platform that are not installed."""
    needs = _NEEDS.get(name, {})
    return [m for m in needs.get(jax.default_backend(), needs.get("*", ())) if importlib.util.find_spec(m) is None]


def resolve_backend(name: str) -> str:
    """The concrete backend for ``name``; ``"auto"`` picks by platform."""
    if name == "auto":
        platform = jax.default_backend()
        if platform == "gpu" and "triton" in _BACKENDS:
            if not _missing("triton"):
                return "triton"
            warnings.warn(f"moe.backend 'auto': the triton backend needs {' and '.join(_missing('triton'))} on a GPU "
                          "(pip install -e '.[gpu]'); using 'ragged' (lax.ragged_dot) instead", stacklevel=2)
        return "tiled" if platform == "cpu" else "ragged"
    if name not in _BACKENDS:
        raise ValueError(f"unknown grouped-MLP backend {name!r}; available: {', '.join(available_backends())}")
    if _missing(name):
        raise ValueError(f"the {name} backend needs {' and '.join(_missing(name))} on {jax.default_backend()}: "
                         "pip install -e '.[gpu]'")
    return name


def grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, *, backend: str = "auto") -> jax.Array:
    """Apply expert ``e``'s SwiGLU MLP to the ``e``-th contiguous group of rows of ``x_GD``."""
    fn = _BACKENDS[resolve_backend(backend)]
    y_GD = fn(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E)
    in_groups_G = jnp.arange(x_GD.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(in_groups_G[:, None], y_GD, 0)


def _dot(a, b, spec: str):
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def row_experts(group_sizes_E: jax.Array, num_rows: int) -> jax.Array:
    """The expert of each row of a grouped buffer; ``E`` for rows past the last group."""
    return jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(num_rows), side="right")


def dense_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E):
    """Reference: every expert on every row, keep the row's own expert (memory G x E x F)."""
    onehot_GE = jax.nn.one_hot(row_experts(group_sizes_E, x_GD.shape[0]), w_gate_EDF.shape[0])
    h_GEF = jax.nn.silu(_dot(x_GD, w_gate_EDF, "gd,edf->gef")) * _dot(x_GD, w_up_EDF, "gd,edf->gef")
    y_GED = _dot(h_GEF.astype(x_GD.dtype), w_down_EFD, "gef,efd->ged")
    return jnp.einsum("ged,ge->gd", y_GED, onehot_GE).astype(x_GD.dtype)


def ragged_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E):
    """``lax.ragged_dot`` for the three projections."""
    dt = x_GD.dtype
    dot = lambda a, w: lax.ragged_dot(a, w.astype(dt), group_sizes_E, preferred_element_type=jnp.float32)
    h_GF = jax.nn.silu(dot(x_GD, w_gate_EDF)) * dot(x_GD, w_up_EDF)
    return dot(h_GF.astype(dt), w_down_EFD).astype(dt)


def tile_schedule(group_sizes_E: jax.Array, num_rows: int, tile_rows: int):
    """Split every group into tiles of ``tile_rows`` rows.

    Returns, for ``N = cdiv(num_rows, tile_rows) + E`` tiles (a static bound on the number
    needed): each tile's expert, first row and number of rows that belong to its expert, and
    the number of tiles actually used (a traced scalar; the rest are never visited).
    """
    E, M = group_sizes_E.shape[0], tile_rows
    N = -(-num_rows // M) + E
    tiles_E = (group_sizes_E + M - 1) // M
    tile_end_E = jnp.cumsum(tiles_E)
    tile_start_E = tile_end_E - tiles_E
    row_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    t_N = jnp.arange(N)
    expert_N = jnp.minimum(jnp.searchsorted(tile_end_E, t_N, side="right"), E - 1)
    row_N = row_start_E[expert_N] + (t_N - tile_start_E[expert_N]) * M
    valid_N = jnp.clip(row_start_E[expert_N] + group_sizes_E[expert_N] - row_N, 0, M)
    return expert_N, row_N, valid_N, tile_end_E[-1]


# A tile starts at its first row and reads M rows; the rows past its group's end belong to the
# next group and get wrong values, but tiles run in row order, so the next group's own tile
# overwrites them. Buffers carry M rows of slack so the last tile never reads out of bounds.


def _pad_rows(a, M):
    return jnp.pad(a, ((0, M), (0, 0)))


# With fp8, what FP8 GEMMs read (fp8.py's emulation of DeepSeek-V3's recipe): of activations
# and gradients, 128-value tiles along ``axis`` (a row's channels, or with axis 0 the rows); of
# weights, 128 x 128 blocks. Without, the arrays themselves.


def _rows_fp8(a, fp8: bool, axis: int = -1):
    return fake_quantize_tiles(a, axis).astype(a.dtype) if fp8 else a


def _weights_fp8(weights: tuple, fp8: bool) -> tuple:
    return tuple(fake_quantize_blocks(w).astype(w.dtype) for w in weights) if fp8 else weights


def _tiled_forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile_rows, fp8=False):
    (G, D), F, M, dt = x_GD.shape, w_gate_EDF.shape[-1], tile_rows, x_GD.dtype
    expert_N, row_N, _, num_tiles = tile_schedule(group_sizes_E, G, M)
    w_gate_EDF, w_up_EDF, w_down_EFD = _weights_fp8((w_gate_EDF, w_up_EDF, w_down_EFD), fp8)
    x_pad = _pad_rows(_rows_fp8(x_GD, fp8), M)

    def tile(t, bufs):
        y, gate, up = bufs
        e, r = expert_N[t], row_N[t]
        x_MD = lax.dynamic_slice_in_dim(x_pad, r, M)
        g_MF = _dot(x_MD, w_gate_EDF[e], "md,df->mf")
        u_MF = _dot(x_MD, w_up_EDF[e], "md,df->mf")
        h_MF = _rows_fp8((jax.nn.silu(g_MF) * u_MF).astype(dt), fp8)
        y_MD = _dot(h_MF, w_down_EFD[e], "mf,fd->md")
        put = lambda buf, v: lax.dynamic_update_slice_in_dim(buf, v.astype(buf.dtype), r, 0)
        return put(y, y_MD), put(gate, g_MF), put(up, u_MF)

    zeros = lambda width: jnp.zeros((G + M, width), dt)
    y, gate, up = lax.fori_loop(0, num_tiles, tile, (zeros(D), zeros(F), zeros(F)))
    return y[:G], (gate[:G], up[:G])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _tiled(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile_rows, fp8):
    return _tiled_forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile_rows, fp8)[0]


def _tiled_fwd(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile_rows, fp8):
    y_GD, (gate_GF, up_GF) = _tiled_forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile_rows, fp8)
    return y_GD, (x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, gate_GF, up_GF)


def _tiled_bwd(tile_rows, fp8, residuals, dy_GD):
    """The backward GEMMs; with ``fp8`` each reads its inputs as FP8 tiles along the axis it sums
    over: dh and dx along the row (1 x 128), the weight gradients along the rows of the tile
    (128 x 1), the weights in their blocks."""
    x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, gate_GF, up_GF = residuals
    G, M, dt = x_GD.shape[0], tile_rows, x_GD.dtype
    expert_N, row_N, valid_N, num_tiles = tile_schedule(group_sizes_E, G, M)
    wg, wu, wd = _weights_fp8((w_gate_EDF, w_up_EDF, w_down_EFD), fp8)
    x_pad, dy_pad, gate_pad, up_pad = (_pad_rows(a, M) for a in (x_GD, dy_GD, gate_GF, up_GF))

    def tile(t, acc):
        dx, dw_gate, dw_up, dw_down = acc
        e, r = expert_N[t], row_N[t]
        rows = lambda a: lax.dynamic_slice_in_dim(a, r, M)
        # Rows past the group's end belong to another expert: they must not reach this
        # expert's weight gradients (their dx is overwritten by their own tile later).
        mine_M1 = (jnp.arange(M) < valid_N[t])[:, None]
        dy_MD = jnp.where(mine_M1, rows(dy_pad), 0)
        x_MD = rows(x_pad)
        g_MF, u_MF = rows(gate_pad).astype(jnp.float32), rows(up_pad).astype(jnp.float32)
        sig_MF = jax.nn.sigmoid(g_MF)
        silu_MF = g_MF * sig_MF
        h_MF = (silu_MF * u_MF).astype(dt)
        dh_MF = _dot(_rows_fp8(dy_MD, fp8), wd[e], "md,fd->mf")
        du_MF = (dh_MF * silu_MF).astype(dt)
        dg_MF = (dh_MF * u_MF * sig_MF * (1 + g_MF * (1 - sig_MF))).astype(dt)
        dx_MD = _dot(_rows_fp8(dg_MF, fp8), wg[e], "mf,df->md") + _dot(_rows_fp8(du_MF, fp8), wu[e], "mf,df->md")
        add = lambda acc_EXY, g_XY: lax.dynamic_update_index_in_dim(acc_EXY, acc_EXY[e] + g_XY, e, 0)
        # tiles down the tile's own rows (what a weight gradient sums over), the others zeroed
        col = (lambda a: _rows_fp8(jnp.where(mine_M1, a, 0), fp8, axis=0)) if fp8 else (lambda a: a)
        return (
            lax.dynamic_update_slice_in_dim(dx, dx_MD.astype(dt), r, 0),
            add(dw_gate, _dot(col(x_MD), col(dg_MF), "md,mf->df")),
            add(dw_up, _dot(col(x_MD), col(du_MF), "md,mf->df")),
            add(dw_down, _dot(col(h_MF), col(dy_MD), "mf,md->fd")),
        )

    f32_zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
    init = (jnp.zeros_like(x_pad), f32_zeros(w_gate_EDF), f32_zeros(w_up_EDF), f32_zeros(w_down_EFD))
    dx, dw_gate, dw_up, dw_down = lax.fori_loop(0, num_tiles, tile, init)
    return (
        dx[:G],
        dw_gate.astype(w_gate_EDF.dtype),
        dw_up.astype(w_up_EDF.dtype),
        dw_down.astype(w_down_EFD.dtype),
        None,
    )


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def tiled_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, *, tile_rows: int | None = None,
                      fp8: bool = False):
    """Loop over expert-aligned row tiles, one GEMM per tile (see ``tile_schedule``).

    By default tiles have ``TILE_ROWS`` rows, fewer (down to 8, a power of two) when the mean
    group is smaller, as in decoding, where a few rows per expert would each pay for a whole tile.
    ``fp8``: every GEMM, forward and backward, as an FP8 GEMM (``fp8.dot``'s recipe; the weight
    gradients' 128-row tiles start at each expert's first row, as a grouped FP8 kernel's would)."""
    if tile_rows is None:
        mean_group = max(-(-x_GD.shape[0] // w_gate_EDF.shape[0]), 1)
        tile_rows = min(TILE_ROWS, max(8, 1 << (mean_group - 1).bit_length()))
    return _tiled(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E.astype(jnp.int32), tile_rows, fp8)


register_backend("dense", dense_grouped_mlp)
register_backend("ragged", ragged_grouped_mlp)
register_backend("tiled", tiled_grouped_mlp)
register_backend("tiled_fp8", functools.partial(tiled_grouped_mlp, fp8=True))  # model.fp8's experts
