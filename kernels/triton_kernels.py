"""The Triton kernels of the grouped gated MLP, over rows sorted by expert.

Not imported directly: ``backend.kernels(interpret)`` loads this source for Triton's interpreter
or its compiler, as Triton fixes the mode when ``@triton.jit`` runs.

Every kernel walks a tile schedule (``grouped.tile_schedule``): tile ``t`` covers rows
``row[t] .. row[t] + valid[t]`` of expert ``expert[t]``, at most BLOCK_M rows, with a fixed
number of tiles (cdiv(G, BLOCK_M) + E) so the grid is static; unused tiles have ``valid = 0``
and return at once. Operands are read in their dtype and accumulated in float32.

    gate_up        h = silu(x Wg_e) * (x Wu_e): x read once for both GEMMs, the gate fused in the
                   epilogue. With BACKWARD it recomputes both and turns dh into dg and du, the
                   SiLU-gate derivative fused in the same epilogue.
    grouped_matmul out = a W_e (+ a2 W2_e): the down projection, dh = dy Wd_e^T and
                   dx = dg Wg_e^T + du Wu_e^T; weights are addressed by strides, so a
                   transposed weight is a stride swap, not a copy.
    weight_grad    dW_e = a_e^T b_e over the rows of expert e (a ragged K); an empty expert
                   gets exact zeros.

Shape legend: G rows, K contraction width, N output width, E experts. Sizes and strides are
constexprs: every call site knows them statically. Pointer arguments are the inputs, then the
outputs, as jax-triton passes them. ``UPCAST`` casts tiles to float32 before
``tl.dot``, for Triton's interpreter, whose bf16 dot is wrong; ``PRECISION`` "ieee" keeps float32
GEMMs exact on GPUs that would otherwise use TF32.
"""

import triton
import triton.language as tl


@triton.jit
def _tile(expert_ptr, row_ptr, valid_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its expert, rows, which rows are real, and how many are. Expert and
    rows are int64: offsets such as ``e * D * F`` and ``rows * D`` pass 2^31 elements at real
    sizes (about 524K routed rows at D = 4096) and would wrap silently in int32."""
    t = tl.program_id(0)
    e = tl.load(expert_ptr + t).to(tl.int64)
    row = tl.load(row_ptr + t).to(tl.int64)
    valid = tl.load(valid_ptr + t)
    rows_m = row + tl.arange(0, BLOCK_M)
    mask_m = tl.arange(0, BLOCK_M) < valid
    return e, rows_m, mask_m, valid


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, dh_ptr, expert_ptr, row_ptr, valid_ptr, out_ptr, out2_ptr,
    D: tl.constexpr, F: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward: out = h = silu(x Wg_e) * (x Wu_e) (dh, out2 unused). BACKWARD: out = dg, out2 = du."""
    e, rows_m, mask_m, valid = _tile(expert_ptr, row_ptr, valid_ptr, BLOCK_M)
    if valid == 0:  # a tile past the used ones (most of them when decoding): nothing to do
        return
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < F
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < D
        x = tl.load(x_ptr + rows_m[:, None] * D + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_offsets = e * D * F + ks[:, None] * F + cols_n[None, :]
        w_mask = mask_k[:, None] & mask_n[None, :]
        acc_g = _mma(acc_g, x, tl.load(wg_ptr + w_offsets, mask=w_mask, other=0.0), UPCAST, PRECISION)
        acc_u = _mma(acc_u, x, tl.load(wu_ptr + w_offsets, mask=w_mask, other=0.0), UPCAST, PRECISION)
    out_offsets = rows_m[:, None] * F + cols_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    sig = tl.sigmoid(acc_g)
    if BACKWARD:
        dh = tl.load(dh_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        du = dh * acc_g * sig
        dg = dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))
        tl.store(out_ptr + out_offsets, dg.to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(out2_ptr + out_offsets, du.to(out2_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + out_offsets, (acc_g * sig * acc_u).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _accumulate(acc, a_ptr, w_ptr, e, rows_m, mask_m, cols_n, mask_n,
                K: tl.constexpr, STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(a_ptr + rows_m[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + e * STRIDE_WE + ks[:, None] * STRIDE_WK + cols_n[None, :] * STRIDE_WN,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(acc, a, w, UPCAST, PRECISION)
    return acc


@triton.jit
def grouped_matmul_kernel(
    a_ptr, w_ptr, a2_ptr, w2_ptr, expert_ptr, row_ptr, valid_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr,
    STRIDE_WE: tl.constexpr, STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr, HAS_SECOND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[rows of tile] = a W_e (+ a2 W2_e); W element (e, k, n) at e*STRIDE_WE + k*STRIDE_WK + n*STRIDE_WN."""
    e, rows_m, mask_m, valid = _tile(expert_ptr, row_ptr, valid_ptr, BLOCK_M)
    if valid == 0:
        return
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _accumulate(acc, a_ptr, w_ptr, e, rows_m, mask_m, cols_n, mask_n, K, STRIDE_WE, STRIDE_WK, STRIDE_WN,
                      BLOCK_K, UPCAST, PRECISION)
    if HAS_SECOND:
        acc = _accumulate(acc, a2_ptr, w2_ptr, e, rows_m, mask_m, cols_n, mask_n, K, STRIDE_WE, STRIDE_WK,
                          STRIDE_WN, BLOCK_K, UPCAST, PRECISION)
    tl.store(out_ptr + rows_m[:, None] * N + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def weight_grad_kernel(
    a_ptr, b_ptr, start_ptr, size_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[e] = a[rows of e]^T b[rows of e]: grid (E, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    e = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k, mask_n = ks < K, cols_n < N
    start = tl.load(start_ptr + e).to(tl.int64)
    size = tl.load(size_ptr + e)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for r0 in range(0, size, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        mask_r = rs < size
        a = tl.load(a_ptr + (start + rs)[:, None] * K + ks[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + (start + rs)[:, None] * N + cols_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                    other=0.0)
        acc = _mma(acc, tl.trans(a), b, UPCAST, PRECISION)
    tl.store(out_ptr + e * K * N + ks[:, None] * N + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def fp8_matmul_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, expert_ptr, row_ptr, valid_ptr, out_ptr,
    K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[rows of tile] = a W_e on FP8 operands: ``a`` float8_e4m3fn ``[G, K]`` with float32
    scales ``[G, cdiv(K, 128)]`` per 1 x 128 tile (quantised beforehand, ``fp8.quantize_tiles``),
    ``W_e`` float8_e4m3fn ``[K, N]`` with float32 scales ``[cdiv(K, 128), cdiv(N, 128)]`` per
    128 x 128 block (``fp8.Fp8Weight``, expert-major). One tl.dot per 128-deep step on e4m3
    operands, its float32 product scaled by the row's and the block's scales before it is summed.
    Grid (tiles, cdiv(N, 128)): one 128-wide block of columns, so one weight scale per step."""
    e, rows_m, mask_m, valid = _tile(expert_ptr, row_ptr, valid_ptr, BLOCK_M)
    if valid == 0:
        return
    nb = tl.program_id(1)
    cols_n = nb * 128 + tl.arange(0, 128)
    mask_n = cols_n < N
    R: tl.constexpr = (K + 127) // 128
    C: tl.constexpr = (N + 127) // 128
    acc = tl.zeros((BLOCK_M, 128), tl.float32)
    for kb in range(0, R):
        ks = kb * 128 + tl.arange(0, 128)
        mask_k = ks < K
        a = tl.load(a_ptr + rows_m[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + e * K * N + ks[:, None] * N + cols_n[None, :], mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, w)
        a_scale = tl.load(a_scale_ptr + rows_m * R + kb, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + e * R * C + kb * C + nb)
        acc += part * (a_scale[:, None] * w_scale)
    tl.store(out_ptr + rows_m[:, None] * N + cols_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
