"""FP8 weights (``fp8.py``): block quantisation against a numpy reference written from the
definition (scale = block amax / 448, round to nearest even, saturate), the weight as the model
reads it, and where its parts live on a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from dsmoe_jax import fp8
from dsmoe_jax.config import MESH_AXES
from dsmoe_jax.model import forward, init_params, param_shapes
from dsmoe_jax.sharding import param_shardings


def _reference(w_IO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block by block with ml_dtypes' float8_e4m3fn rounding: (values, scales)."""
    rows, cols = w_IO.shape
    R, C = -(-rows // 128), -(-cols // 128)
    q = np.zeros(w_IO.shape, ml_dtypes.float8_e4m3fn)
    scale = np.zeros((R, C), np.float32)
    for r in range(R):
        for c in range(C):
            block = w_IO[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].astype(np.float32)
            amax = np.abs(block).max()
            scale[r, c] = amax / np.float32(448) if amax > 0 else 1
            q[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = np.clip(block / scale[r, c], -448, 448).astype(q.dtype)
    return q, scale


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


@pytest.mark.parametrize("shape", [(200, 130), (128, 256), (5, 3), (300, 129)])
def test_quantize_rounds_and_scales_each_block_as_the_reference(shape):
    w = np.random.RandomState(0).standard_normal(shape).astype(np.float32) * 3
    w[:5, :3] *= 1000  # one block with a far larger range than the rest
    got = fp8.quantize(w)
    q, scale = _reference(w)
    assert got.data.dtype == jnp.float8_e4m3fn and got.scale_inv.dtype == jnp.float32, "e4m3 values, f32 scales"
    np.testing.assert_array_equal(np.asarray(got.scale_inv), scale, err_msg=f"{shape}: block scales")
    np.testing.assert_array_equal(_bits(got.data), _bits(q), err_msg=f"{shape}: e4m3 values")
    # e4m3 keeps 3 mantissa bits: each value within half a step (2^-4 relative) of the original, or
    # of e4m3's smallest subnormal step (2^-9 of the block's scale) for values that small
    err = np.abs(np.asarray(fp8.dequantize(got)) - w)
    step = np.kron(scale, np.ones((128, 128)))[:shape[0], :shape[1]] * 2.0**-10
    assert (err <= np.maximum(np.abs(w) * 2.0**-4, step)).all(), f"{shape}: dequantised values too far"


def test_the_block_maximum_maps_to_448_and_nothing_overflows_and_zero_blocks_stay_zero():
    w = np.zeros((256, 256), np.float32)
    w[:128, :128] = np.linspace(-3e4, 5e4, 128 * 128).reshape(128, 128)  # amax 5e4 -> 448
    w[128:, 128:] = 1e-30  # subnormal range: scaled up to 448, not lost
    got = fp8.quantize(w)
    data = np.asarray(got.data).astype(np.float32)
    assert data[:128, :128].max() == 448 and np.isfinite(data).all(), "the block max saturates exactly at 448"
    assert np.asarray(got.scale_inv)[0, 1] == 1 and (data[:128, 128:] == 0).all(), "a zero block: scale 1, values 0"
    np.testing.assert_allclose(np.asarray(fp8.dequantize(got))[128:, 128:], 1e-30, rtol=2**-4)


def test_weights_with_several_in_or_out_axes_and_batch_axes_block_their_flattened_matrix():
    rng = np.random.RandomState(1)
    w_EDNH = rng.standard_normal((3, 130, 4, 40)).astype(np.float32)  # experts, in D, out N x H = 160
    got = fp8.quantize(w_EDNH, n_in=1, n_out=2)
    assert got.n_batch == 1 and got.scale_inv.shape == (3, 2, 2), got.scale_inv.shape
    for e in range(3):
        q, scale = _reference(w_EDNH[e].reshape(130, 160))
        np.testing.assert_array_equal(np.asarray(got.scale_inv[e]), scale, err_msg=f"expert {e}")
        np.testing.assert_array_equal(_bits(got.data[e]).reshape(130, 160), _bits(q), err_msg=f"expert {e}")
        one = got[e]  # as the tiled backend picks an expert
        assert one.shape == (130, 4, 40) and one.n_batch == 0
        np.testing.assert_array_equal(np.asarray(one.astype(jnp.float32)), np.asarray(fp8.dequantize(got))[e])
    w_NHD = rng.standard_normal((4, 40, 130)).astype(np.float32)  # in N x H, out D
    q, scale = _reference(w_NHD.reshape(160, 130))
    got = fp8.quantize(w_NHD, n_in=2, n_out=1)
    np.testing.assert_array_equal(np.asarray(got.scale_inv), scale)
    assert got[...] is got
    with pytest.raises(IndexError, match="only along its batch axes"):
        got[0]


def test_non_finite_values_are_named():
    w = np.ones((200, 130), np.float32)
    w[150, 7] = np.inf
    with pytest.raises(ValueError, match=r"layer\.w: 1 non-finite values \(the first at \(150, 7\)\)"):
        fp8.check_finite("layer.w", w)
    scale = np.asarray(fp8.quantize(w).scale_inv)
    assert not np.isfinite(scale[1, 0]) and np.isfinite(scale).sum() == 3, "an inf poisons its block's scale only"


def test_an_fp8_model_holds_fp8_projections_and_runs_as_its_dequantised_weights(small_cfg):
    cfg = dataclasses.replace(small_cfg, fp8_weights=True)
    shapes = param_shapes(cfg)
    ffn = shapes["layers"][1]["ffn"]
    assert isinstance(ffn["w_gate_EDF"], fp8.Fp8Weight) and ffn["w_gate_EDF"].dtype == jnp.float8_e4m3fn
    assert isinstance(shapes["layers"][0]["attn"]["w_o_NHD"], fp8.Fp8Weight)
    kept = [shapes["embed_VD"], shapes["lm_head_DV"], ffn["w_router_DE"], shapes["final_norm"]["scale_D"]]
    assert all(s.dtype == jnp.float32 for s in kept), "embeddings, head, router and norms stay unquantised"
    params = init_params(cfg, jax.random.key(0))
    dequantised = jax.tree.map(lambda w: fp8.dequantize(w) if isinstance(w, fp8.Fp8Weight) else w, params,
                               is_leaf=lambda w: isinstance(w, fp8.Fp8Weight))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size
    got, _ = forward(params, tokens, cfg)
    want, _ = forward(dequantised, tokens, small_cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5,
                               err_msg="FP8 weights compute as their dequantised values")


def test_fp8_weights_split_on_the_mesh_as_the_weights_would_their_scales_only_by_expert(small_cfg):
    cfg = dataclasses.replace(small_cfg, fp8_weights=True)
    mesh = jax.sharding.AbstractMesh((1, 1, 4, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    s = param_shardings(cfg, mesh)["layers"][1]["ffn"]["w_gate_EDF"]
    assert s.data.spec == PartitionSpec("expert", None, None), s.data.spec
    assert s.scale_inv.spec == PartitionSpec("expert", None, None), s.scale_inv.spec


# ---- FP8 GEMMs (model.fp8) --------------------------------------------------------------------


def _tiles_reference(x: np.ndarray, axis: int) -> np.ndarray:
    """Each 128-long tile along ``axis`` rounded to e4m3 at scale amax / 448 and scaled back."""
    x = np.moveaxis(x.astype(np.float32), axis, -1)
    out = np.zeros_like(x)
    for start in range(0, x.shape[-1], 128):
        tile = x[..., start:start + 128]
        amax = np.abs(tile).max(axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / np.float32(448), np.float32(1))
        q = np.clip(tile / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        out[..., start:start + 128] = q.astype(np.float32) * scale
    return np.moveaxis(out, -1, axis)


def _blocks_reference(w: np.ndarray) -> np.ndarray:
    q, scale = _reference(w)
    return q.astype(np.float32) * np.kron(scale, np.ones((128, 128), np.float32))[:w.shape[0], :w.shape[1]]


@pytest.mark.parametrize("axis", [-1, 0])
def test_activation_tiles_quantise_along_the_axis_a_gemm_sums_over(axis):
    x = np.random.RandomState(2).standard_normal((300, 200)).astype(np.float32)
    x[7, :] *= 500  # an outlier row (axis -1 keeps it to its own tiles) and column (axis 0)
    x[:, 3] *= 500
    q, scale = fp8.quantize_tiles(x, axis)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == ((300, 2) if axis == -1 else (3, 200)), scale.shape
    np.testing.assert_array_equal(np.asarray(fp8.fake_quantize_tiles(x, axis)), _tiles_reference(x, axis))


def test_the_fp8_gemm_and_its_gradients_read_fp8_inputs_as_deepseek_v3_tiles_them():
    rng = np.random.RandomState(3)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((260, 200), (200, 150), (260, 150)))
    y, vjp = jax.vjp(fp8.dot, x, w)
    dx, dw = vjp(jnp.asarray(dy))
    wq = _blocks_reference(w)
    np.testing.assert_allclose(np.asarray(y), _tiles_reference(x, -1) @ wq, rtol=1e-5, atol=1e-4,
                               err_msg="forward: x in 1 x 128 tiles, w in 128 x 128 blocks")
    np.testing.assert_allclose(np.asarray(dx), _tiles_reference(dy, -1) @ wq.T, rtol=1e-5, atol=1e-4,
                               err_msg="input gradient: dy in 1 x 128 tiles, the same weight blocks")
    np.testing.assert_allclose(np.asarray(dw), _tiles_reference(x, 0).T @ _tiles_reference(dy, 0), rtol=1e-5,
                               atol=1e-3, err_msg="weight gradient: x and dy in 128 x 1 tiles along the tokens")
    exact = x @ w
    assert 0 < np.abs(np.asarray(y) - exact).max() < 0.1 * np.abs(exact).max(), "FP8 rounding, nothing more"


def test_the_fp8_expert_backend_is_each_expert_through_fp8_gemms():
    """``tiled_fp8`` against each expert's rows through three ``fp8.dot`` GEMMs, values and
    gradients; groups with partial 128-row tiles, an empty one and one past a tile."""
    from dsmoe_jax import grouped
    from dsmoe_jax.layers import linear

    rng = np.random.RandomState(4)
    sizes = [130, 0, 5, 300]
    G, D, F = sum(sizes) + 7, 140, 136  # 7 rows past the groups: dropped
    x = jnp.asarray(rng.standard_normal((G, D)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in ((4, D, F), (4, D, F), (4, F, D))]
    dy = jnp.asarray(rng.standard_normal((G, D)), jnp.float32)

    def reference(x, wg, wu, wd):
        out, start = [], 0
        for e, n in enumerate(sizes):
            if not n:
                continue
            x_e = x[start:start + n]
            h = jax.nn.silu(linear(x_e, wg[e], True)) * linear(x_e, wu[e], True)
            out.append(linear(h, wd[e], True))
            start += n
        return jnp.concatenate(out + [jnp.zeros((G - start, D))])

    tiled = lambda x, wg, wu, wd: grouped.grouped_mlp(x, wg, wu, wd, jnp.asarray(sizes), backend="tiled_fp8")
    got, got_vjp = jax.vjp(tiled, x, *ws)
    want, want_vjp = jax.vjp(reference, x, *ws)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg="forward")
    for name, g, r in zip(("dx", "dw_gate", "dw_up", "dw_down"), got_vjp(dy), want_vjp(dy)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4, err_msg=name)
    plain = grouped.grouped_mlp(x, *ws, jnp.asarray(sizes), backend="tiled")
    assert float(jnp.abs(got - plain).max()) > 0, "fp8 changes the arithmetic"


def test_a_model_trains_with_fp8_gemms(small_cfg):
    cfg = dataclasses.replace(small_cfg, fp8=True)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(4, 16) % cfg.vocab_size

    def loss(p, c):
        logits, _ = forward(p, tokens[:, :-1], c)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    (l8, g8), (l32, g32) = (jax.value_and_grad(loss)(params, c) for c in (cfg, small_cfg))
    assert abs(float(l8) - float(l32)) < 0.01 * float(l32), (float(l8), float(l32))
    cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
           for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g32))]
    assert min(cos) > 0.9, f"every gradient points where the unquantised one does: cosines {min(cos):.3f}"
