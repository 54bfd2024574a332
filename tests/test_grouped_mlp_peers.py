"""The peers' grouped GEMMs that benchmarks/grouped_mlp.py times against ours compute the same
grouped gated MLP: the custom-VJP wiring of the Pallas Mosaic GPU row (checked here with
reference ragged products, since Mosaic GPU needs a Hopper GPU) and the torch._grouped_mm row,
each against the dense reference backend, values and gradients."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import grouped
from helpers import GROUPS, grouped_inputs

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("grouped_mlp_bench", REPO / "benchmarks" / "grouped_mlp.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _ragged(lhs, rhs, sizes, transpose_rhs):
    return jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, sizes,
                              preferred_element_type=jnp.float32).astype(lhs.dtype)


def _transposed(lhs, rhs, sizes):
    onehot = jax.nn.one_hot(grouped.row_experts(sizes, lhs.shape[0]), sizes.shape[0], dtype=jnp.float32)
    return jnp.einsum("mg,mk,mn->gkn", onehot, lhs, rhs)


def _dense(*args):
    return grouped.grouped_mlp(*args, backend="dense")


def _values_and_grads(fn, x, ws, sizes):
    loss = lambda x, *ws: jnp.sum(fn(x, *ws, sizes).astype(jnp.float32) ** 2)
    return fn(x, *ws, sizes), jax.grad(loss, argnums=(0, 1, 2, 3))(x, *ws)


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_the_ragged_dot_wiring_of_the_mosaic_gpu_row_equals_dense(groups):
    x, ws, sizes = grouped_inputs(GROUPS[groups], sum(GROUPS[groups]))
    mlp = bench.gated_mlp_from_ragged_dots(_ragged, _transposed)
    (got, got_grads), (want, want_grads) = (_values_and_grads(f, x, ws, sizes) for f in (mlp, _dense))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(["x", "w_gate", "w_up", "w_down"], got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_torch_grouped_mm_row_equals_dense():
    groups = GROUPS["uneven_with_empty"]
    x, ws, sizes = grouped_inputs(groups, sum(groups))
    tensors, offs = bench.torch_inputs(x, *ws, sizes)
    y = bench.torch_mlp(*tensors, offs)
    (y ** 2).sum().backward()
    want, want_grads = _values_and_grads(_dense, x, ws, sizes)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    for name, t, w in zip(["x", "w_gate", "w_up", "w_down"], tensors, want_grads):
        np.testing.assert_allclose(t.grad.numpy(), w, rtol=1e-4, atol=1e-5, err_msg=name)
