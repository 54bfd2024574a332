"""Every grouped-MLP backend against the one-hot "dense" reference: values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import MoEConfig, grouped
from dsmoe_jax.errors import ConfigError
from helpers import GROUPS, D, grouped_inputs, grouped_loss, numpy_grouped_reference

# The tiled backend at several tile sizes, including tiles larger than every group.
TILED_SIZES = {f"tiled{m}": m for m in (4, 8, 64)}


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_dense_reference_matches_row_by_row_numpy(groups):
    x, ws, gs = grouped_inputs(GROUPS[groups], rows=50)
    y = grouped.grouped_mlp(x, *ws, gs, backend="dense")
    np.testing.assert_allclose(y, numpy_grouped_reference(x, ws, gs), atol=1e-5, err_msg="dense backend != numpy loop")


@pytest.mark.parametrize("backend", ["ragged", "tiled", "tiled4", "tiled8", "tiled64"])
@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_backend_matches_dense_values_and_gradients(backend, groups, registered_backend):
    if backend in TILED_SIZES:
        registered_backend(backend, functools.partial(grouped.tiled_grouped_mlp, tile_rows=TILED_SIZES[backend]))
    x, ws, gs = grouped_inputs(GROUPS[groups], rows=50)  # more rows than the groups hold
    (_, y_ref), g_ref = jax.value_and_grad(grouped_loss("dense", gs), argnums=(0, 1, 2, 3), has_aux=True)(x, *ws)
    (_, y), g = jax.jit(jax.value_and_grad(grouped_loss(backend, gs), argnums=(0, 1, 2, 3), has_aux=True))(x, *ws)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg=f"{backend} forward != dense")
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{backend} {name} != dense")
    empty = np.asarray(GROUPS[groups]) == 0
    assert np.all(np.asarray(g[1])[empty] == 0), "an expert with no rows must get an exactly zero gradient"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ragged", "tiled"])
def test_bfloat16_close_to_float32(backend):
    x, ws, gs = grouped_inputs(GROUPS["uneven_with_empty"], rows=44, dtype=jnp.bfloat16)
    y = grouped.grouped_mlp(x, *ws, gs, backend=backend)
    assert y.dtype == jnp.bfloat16
    ref = numpy_grouped_reference(x.astype(jnp.float32), [w.astype(jnp.float32) for w in ws], gs)
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


def test_auto_on_a_gpu_without_jax_triton_falls_back_with_a_warning(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_triton" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="needs jax_triton on a GPU.*using 'ragged'"):
        assert grouped.resolve_backend("auto") == "ragged"
    with pytest.raises(ValueError, match="the triton backend needs jax_triton on gpu"):
        grouped.resolve_backend("triton")


def test_unknown_backend_is_a_clear_error():
    x, ws, gs = grouped_inputs([2, 2], rows=4)
    with pytest.raises(ValueError, match="unknown grouped-MLP backend 'nope'.*available"):
        grouped.grouped_mlp(x, *ws, gs, backend="nope")


def test_registered_backend_is_used_and_accepted_by_configs(registered_backend):
    calls = []

    def spy(x, wg, wu, wd, gs):
        calls.append(x.shape)
        return grouped.dense_grouped_mlp(x, wg, wu, wd, gs)

    with pytest.raises(ConfigError, match="unknown moe.backend 'spy'"):
        MoEConfig(n_routed_experts=2, expert_d_ff=4, backend="spy")
    registered_backend("spy", spy)
    assert MoEConfig(n_routed_experts=2, expert_d_ff=4, backend="spy").backend == "spy"
    x, ws, gs = grouped_inputs([3, 1], rows=4)
    grouped.grouped_mlp(x, *ws, gs, backend="spy")
    assert calls == [(4, D)], "a registered backend must be called through grouped_mlp"


def test_unregistered_backends_are_gone_and_builtins_stay():
    grouped.register_backend("temporary", grouped.dense_grouped_mlp)
    grouped.unregister_backend("temporary")
    assert "temporary" not in grouped.available_backends()
    with pytest.raises(ConfigError, match="unknown moe.backend 'temporary'"):
        MoEConfig(n_routed_experts=2, expert_d_ff=4, backend="temporary")
    with pytest.raises(ValueError, match="built-in"):
        grouped.unregister_backend("tiled")
