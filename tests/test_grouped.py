"""Every grouped-MLP backend against the one-hot "dense" reference: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import grouped

D, F = 16, 8

GROUPS = {
    "uneven_with_empty": [7, 0, 20, 13, 0, 4],
    "all_in_one": [0, 0, 44, 0, 0, 0],
    "single_rows": [1, 1, 1, 1, 1, 1],
    "tile_multiple": [8, 16, 0, 8, 4, 8],
}


def _inputs(group_sizes, rows, dtype=jnp.float32):
    E = len(group_sizes)
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (rows, D), dtype)
    ws = [0.3 * jax.random.normal(k[i], s, dtype) for i, s in ((1, (E, D, F)), (2, (E, D, F)), (3, (E, F, D)))]
    return x, ws, jnp.asarray(group_sizes, jnp.int32)


def _numpy_reference(x, ws, group_sizes):
    """Row by row: the row's own expert's SwiGLU, zeros past the last group."""
    x, (wg, wu, wd) = np.asarray(x, np.float64), [np.asarray(w, np.float64) for w in ws]
    y = np.zeros_like(x)
    row = 0
    for e, n in enumerate(np.asarray(group_sizes)):
        for r in range(row, row + n):
            g, u = x[r] @ wg[e], x[r] @ wu[e]
            y[r] = (g / (1 + np.exp(-g)) * u) @ wd[e]
        row += n
    return y


# The tiled backend at several tile sizes, including tiles larger than every group.
for _m in (4, 8, 64):
    grouped.register_backend(f"tiled{_m}", functools.partial(grouped.tiled_grouped_mlp, tile_rows=_m))


def _loss(backend, group_sizes):
    def loss(x, wg, wu, wd):
        y = grouped.grouped_mlp(x, wg, wu, wd, group_sizes, backend=backend)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
    return loss


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_dense_reference_matches_row_by_row_numpy(groups):
    x, ws, gs = _inputs(GROUPS[groups], rows=50)
    y = grouped.grouped_mlp(x, *ws, gs, backend="dense")
    np.testing.assert_allclose(y, _numpy_reference(x, ws, gs), atol=1e-5, err_msg="dense backend != numpy loop")


@pytest.mark.parametrize("backend", ["ragged", "tiled", "tiled4", "tiled8", "tiled64"])
@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_backend_matches_dense_values_and_gradients(backend, groups):
    x, ws, gs = _inputs(GROUPS[groups], rows=50)  # more rows than the groups hold
    (_, y_ref), g_ref = jax.value_and_grad(_loss("dense", gs), argnums=(0, 1, 2, 3), has_aux=True)(x, *ws)
    (_, y), g = jax.jit(jax.value_and_grad(_loss(backend, gs), argnums=(0, 1, 2, 3), has_aux=True))(x, *ws)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg=f"{backend} forward != dense")
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{backend} {name} != dense")
    empty = np.asarray(GROUPS[groups]) == 0
    assert np.all(np.asarray(g[1])[empty] == 0), "an expert with no rows must get an exactly zero gradient"


@pytest.mark.parametrize("backend", ["ragged", "tiled"])
def test_bfloat16_close_to_float32(backend):
    x, ws, gs = _inputs(GROUPS["uneven_with_empty"], rows=44, dtype=jnp.bfloat16)
    y = grouped.grouped_mlp(x, *ws, gs, backend=backend)
    assert y.dtype == jnp.bfloat16
    ref = _numpy_reference(x.astype(jnp.float32), [w.astype(jnp.float32) for w in ws], gs)
    err = np.abs(np.asarray(y, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 2e-2, f"bf16 relative error {err}"


def test_tile_schedule_covers_every_row_once_per_expert():
    gs = jnp.array([5, 0, 9, 1], jnp.int32)
    expert, row, valid, used = grouped.tile_schedule(gs, num_rows=15, tile_rows=4)
    used = int(used)
    assert used == 2 + 0 + 3 + 1, f"cdiv(n_e, 4) tiles per expert, got {used}"
    covered = [(int(e), int(r) + i) for e, r, v in zip(expert[:used], row[:used], valid[:used]) for i in range(int(v))]
    expected = [(0, r) for r in range(5)] + [(2, r) for r in range(5, 14)] + [(3, 14)]
    assert covered == expected, f"tiles must cover each expert's rows exactly once: {covered}"


def test_unknown_backend_is_a_clear_error():
    x, ws, gs = _inputs([2, 2], rows=4)
    with pytest.raises(ValueError, match="unknown grouped-MLP backend 'nope'.*available"):
        grouped.grouped_mlp(x, *ws, gs, backend="nope")


def test_registered_backend_is_used():
    calls = []

    def spy(x, wg, wu, wd, gs):
        calls.append(x.shape)
        return grouped.dense_grouped_mlp(x, wg, wu, wd, gs)

    grouped.register_backend("spy", spy)
    x, ws, gs = _inputs([3, 1], rows=4)
    grouped.grouped_mlp(x, *ws, gs, backend="spy")
    assert calls == [(4, D)], "a registered backend must be called through grouped_mlp"
