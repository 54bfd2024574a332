"""The Triton kernels under Triton's interpreter, each against a pure-jnp reference; the
"triton" backend's custom VJP against the dense reference's gradients; the MoE layer and a
model with backend "triton"; and every kernel compiled ahead of time for Hopper (sm_90)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import grouped
from dsmoe_jax.kernels import backend as kb
from helpers import GROUPS, grouped_inputs, grouped_loss, numpy_grouped_reference

# Triton's interpreter without a GPU, the compiled kernels on one
INTERPRET = {"interpret": kb.default_interpret()}

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}  # bf16: relative to the float32 reference
pytestmark = pytest.mark.gpu  # every kernel test runs natively in the GPU check


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


def _expert_of_rows(gs, rows):
    return np.asarray(grouped.row_experts(gs, rows))


def _close(got, want, dtype, what):
    got, want = _f32(got), _f32(want)
    scale = max(np.abs(want).max(), 1e-6) if dtype == jnp.bfloat16 else 1.0
    err = np.abs(got - want).max() / scale
    assert err < TOL[dtype], f"{what}: error {err}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_each_kernel_matches_jnp(groups, dtype):
    x, (wg, wu, wd), gs = grouped_inputs(GROUPS[groups], rows=50, dtype=dtype)  # more rows than the groups hold
    routed = int(gs.sum())
    e_G = _expert_of_rows(gs, x.shape[0])[:routed]
    sched = kb.kernel_schedule(gs, x.shape[0], **INTERPRET)
    x32, wg32, wu32, wd32 = (jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd))
    g = jnp.einsum("gd,gdf->gf", x32[:routed], wg32[e_G])
    u = jnp.einsum("gd,gdf->gf", x32[:routed], wu32[e_G])

    h = jax.jit(functools.partial(kb.gate_up, **INTERPRET))(x, wg, wu, sched)
    _close(h[:routed], jax.nn.silu(g) * u, dtype, "gate_up forward")

    dh = jax.random.normal(jax.random.key(7), h.shape, dtype)
    dg, du = jax.jit(functools.partial(kb.gate_up, **INTERPRET))(x, wg, wu, sched, dh_GF=dh)
    _, vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
    want_dg, want_du = vjp(jnp.asarray(dh[:routed], jnp.float32))
    _close(dg[:routed], want_dg, dtype, "gate_up backward dg")
    _close(du[:routed], want_du, dtype, "gate_up backward du")

    y = jax.jit(functools.partial(kb.grouped_matmul, **INTERPRET))(h, wd, sched)
    _close(y[:routed], jnp.einsum("gf,gfd->gd", _f32(h)[:routed], wd32[e_G]), dtype, "grouped_matmul")
    both = jax.jit(functools.partial(kb.grouped_matmul, transpose_w=True, second=(du, wu), **INTERPRET))(dg, wg, sched)
    want = (jnp.einsum("gf,gdf->gd", _f32(dg)[:routed], wg32[e_G])
            + jnp.einsum("gf,gdf->gd", _f32(du)[:routed], wu32[e_G]))
    _close(both[:routed], want, dtype, "grouped_matmul transposed, two operand pairs")

    dw = jax.jit(functools.partial(kb.weight_grad, **INTERPRET))(x, dg, gs)
    onehot = jax.nn.one_hot(e_G, len(GROUPS[groups]))
    _close(dw, jnp.einsum("gd,gf,ge->edf", x32[:routed], _f32(dg)[:routed], onehot), dtype, "weight_grad")
    empty = np.asarray(GROUPS[groups]) == 0
    assert np.all(np.asarray(dw)[empty] == 0), "an expert with no rows gets an exactly zero gradient"


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_backend_values_and_gradients_match_dense(groups):
    x, ws, gs = grouped_inputs(GROUPS[groups], rows=50)
    (_, y_ref), g_ref = jax.value_and_grad(grouped_loss("dense", gs), argnums=(0, 1, 2, 3), has_aux=True)(x, *ws)
    (_, y), g = jax.jit(jax.value_and_grad(grouped_loss("triton", gs), argnums=(0, 1, 2, 3), has_aux=True))(x, *ws)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, err_msg="triton forward != dense")
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"triton {name} != dense")


def test_bfloat16_backend_close_to_float32():
    x, ws, gs = grouped_inputs(GROUPS["uneven_with_empty"], rows=44, dtype=jnp.bfloat16)
    y = jax.jit(functools.partial(grouped.grouped_mlp, backend="triton"))(x, *ws, gs)
    assert y.dtype == jnp.bfloat16
    ref = numpy_grouped_reference(_f32(x), [_f32(w) for w in ws], gs)
    err = np.abs(_f32(y) - ref).max() / np.abs(ref).max()
    assert err < 2e-2, f"bf16 relative error {err}"
    loss = lambda *a: grouped_loss("triton", gs)(*a)[0].astype(jnp.float32)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, *ws)
    want = jax.grad(lambda *a: grouped_loss("dense", gs)(*a)[0], argnums=(0, 1, 2, 3))(_f32(x), *[_f32(w) for w in ws])
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, want):
        err = np.abs(_f32(a) - _f32(b)).max() / np.abs(_f32(b)).max()
        assert err < 3e-2, f"bf16 {name} relative error {err}"


def test_model_forward_and_backward_with_triton_equal_dense(small_cfg):
    params = dsmoe_jax.init_params(small_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, small_cfg.vocab_size)

    def loss(backend):
        cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, backend=backend))
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(dsmoe_jax.forward(p, tokens, cfg)[0] ** 2)))(params)

    (ref, g_ref), (got, g) = loss("dense"), loss("triton")
    assert abs(float(ref) - float(got)) < 1e-5 * abs(float(ref)), (float(ref), float(got))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
def test_the_fp8_kernel_matches_fp8_gemms_in_jnp(groups):
    """FP8 expert weights (``model.fp8_weights``): the kernel's e4m3 x e4m3 products with the
    row and block scales equal the jnp statement (rows in 1 x 128 tiles, weights dequantised),
    one GEMM and the whole gated MLP through the ``triton`` backend; widths past one block."""
    from dsmoe_jax import fp8

    gs = jnp.asarray(GROUPS[groups])
    E, G, D, F = gs.shape[0], int(gs.sum()) + 3, 160, 136
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.standard_normal((G, D)), jnp.float32)
    wg, wu = (fp8.quantize(jnp.asarray(rng.standard_normal((E, D, F)) * 0.1, jnp.float32)) for _ in range(2))
    wd = fp8.quantize(jnp.asarray(rng.standard_normal((E, F, D)) * 0.1, jnp.float32))
    rows = jnp.asarray(_expert_of_rows(gs, G))
    in_groups = (jnp.arange(G) < gs.sum())[:, None]

    def reference(a, w):  # each row against its expert's dequantised weight, its row quantised in tiles
        dense = jnp.einsum("gk,gkn->gn", fp8.fake_quantize_tiles(a, -1), fp8.dequantize(w)[jnp.minimum(rows, E - 1)])
        return jnp.where(in_groups, dense, 0)

    sched = kb.kernel_schedule(gs, G, **INTERPRET)
    got = jax.jit(functools.partial(kb.fp8_matmul, **INTERPRET))(x, wg, sched)
    np.testing.assert_allclose(np.where(in_groups, got, 0), reference(x, wg), rtol=1e-4, atol=1e-4,
                               err_msg=f"{groups}: one FP8 GEMM")
    h = (jax.nn.silu(reference(x, wg)) * reference(x, wu)).astype(jnp.float32)
    want = reference(h, wd)
    got = grouped.grouped_mlp(x, wg, wu, wd, gs, backend="triton")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{groups}: the gated MLP")


AOT = textwrap.dedent("""
    import json
    from dsmoe_jax.kernels import backend as kb
    kb.kernels(interpret=False)  # the compiler's kernels, whatever TRITON_INTERPRET said
    try:
        kb.kernels(interpret=True)
        raise AssertionError("one process cannot have both modes: Triton fixes its mode on import")
    except RuntimeError as e:
        assert "needs a fresh process" in str(e), e
    out = []
    # every kernel in bf16 (the training dtype); fp32 with ieee precision once (compiles are ~5 s each)
    for dtype, only in (("bf16", None), ("fp32", ("gate_up",))):
        for name, compiled in kb.compile_for_hopper(kb.blocks(interpret=False), dtype, only).items():
            out.append({"kernel": name, "dtype": dtype, "cubin": len(compiled.asm["cubin"]),
                        "wgmma": "wgmma" in compiled.asm["ptx"],
                        "fp8_wgmma": "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in compiled.asm["ptx"]})
    print(json.dumps(out))
""")


def test_every_kernel_compiles_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the explicit argument wins over the environment
    out = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == 7 and all(r["cubin"] > 0 for r in results), results
    assert all(r["wgmma"] for r in results if r["dtype"] == "bf16"), "bf16 GEMMs should use Hopper's wgmma"
    assert [r["kernel"] for r in results if r["fp8_wgmma"]] == ["fp8_matmul"], "FP8 weights: e4m3 x e4m3 wgmma"
