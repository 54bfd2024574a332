"""The "triton" grouped-MLP backend: the kernels of ``triton_kernels`` tied together with a
custom VJP, launched with jax-triton on a GPU and through Triton's interpreter elsewhere.

Forward:   h = gate_up(x, Wg, Wu);  y = h Wd
Backward:  dh = dy Wd^T;  dg, du = gate_up backward (recomputes x Wg, x Wu: nothing but h is
           saved);  dx = dg Wg^T + du Wu^T;  dWd = h^T dy, dWg = x^T dg, dWu = x^T du per expert.

Every function takes ``interpret``: run the kernels through Triton's interpreter (on the host,
slowly: how the tests check them without a GPU) or compile them and launch them with
jax-triton. ``default_interpret`` is the one place that chooses by platform, and ``_triton`` the
one place that imports Triton in that mode; importing this package changes nothing.

Shape legend: G rows (sorted by expert), D model width, F expert hidden width, E experts,
N tiles of the schedule.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.fp8 import Fp8Weight, quantize_tiles
from dsmoe_jax.grouped import tile_schedule


def default_interpret() -> bool:
    """Whether the kernels run under Triton's interpreter: everywhere but on a GPU."""
    return jax.default_backend() != "gpu"


def _triton(interpret: bool):
    """Triton, imported for its interpreter or its compiler.

    Triton's mode is process-wide: it reads ``TRITON_INTERPRET`` when it is first imported (its
    standard library's ``@triton.jit`` functions, such as ``tl.sigmoid``, are built then) and
    again whenever it imports more of itself later. So the first call sets the variable for the
    rest of the process (this is the only place the project touches it), and a later call
    asking for the other mode is refused rather than failing inside a kernel."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    imported_for_interpreter = isinstance(triton.language.standard.sigmoid, InterpretedFunction)
    if imported_for_interpreter != interpret:
        have, want = ("interpreter", "compiler") if imported_for_interpreter else ("compiler", "interpreter")
        raise RuntimeError(f"Triton was imported in this process for its {have}; the {want} needs a fresh process "
                           "(Triton fixes the mode when first imported)")
    return triton


@functools.cache
def kernels(interpret: bool) -> types.ModuleType:
    """The kernels of ``triton_kernels.py``, defined for Triton's interpreter or its compiler (the
    mode ``@triton.jit`` reads from Triton's ``runtime.interpret`` knob, set only meanwhile)."""
    triton = _triton(interpret)
    source = pathlib.Path(__file__).with_name("triton_kernels.py")
    name = f"{__package__}.triton_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec.loader.exec_module(module)
    return module


@functools.cache
def blocks(interpret: bool) -> dict:
    """Tile sizes. Hopper: 64-row tiles, 128 columns, 64-deep K steps, 8 warps: compiled ahead of
    time for sm_90, 4 warps make two of the five kernels spill registers and 8 warps none
    (``benchmarks/kernel_tiles.py``, BENCHMARKS.md); not yet timed on a GPU. The interpreter
    gets the smallest sizes tl.dot accepts, since its cost grows with the tile volume."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def compile_for_hopper(tiles: dict, dtype: str = "bf16", only: tuple[str, ...] | None = None,
                       D: int = 2048, F: int = 1408) -> dict:
    """Each kernel variant (or those in ``only``) compiled ahead of time for sm_90, no GPU needed,
    at ``tiles`` (the keys of ``blocks``) for a layer of width ``D`` and expert width ``F``:
    ``{variant: Triton's compiled kernel}`` (its ``asm`` holds the PTX and the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget

    tk = kernels(interpret=False)
    mnk = {k: tiles[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    variants = {
        "gate_up": (tk.gate_up_kernel, dict(D=D, F=F, BACKWARD=False, **mnk)),
        "gate_up_backward": (tk.gate_up_kernel, dict(D=D, F=F, BACKWARD=True, **mnk)),
        "down": (tk.grouped_matmul_kernel, dict(K=F, N=D, STRIDE_WE=F * D, STRIDE_WK=D, STRIDE_WN=1,
                                                HAS_SECOND=False, **mnk)),
        "gate_up_input_grad": (tk.grouped_matmul_kernel, dict(K=F, N=D, STRIDE_WE=F * D, STRIDE_WK=1, STRIDE_WN=F,
                                                              HAS_SECOND=True, **mnk)),
        "weight_grad": (tk.weight_grad_kernel, dict(K=D, N=F, BLOCK_R=mnk["BLOCK_M"], BLOCK_K=mnk["BLOCK_K"],
                                                    BLOCK_N=mnk["BLOCK_N"])),
        "fp8_matmul": (tk.fp8_matmul_kernel, dict(K=D, N=F, BLOCK_M=mnk["BLOCK_M"])),  # FP8 expert weights
    }
    int_ptrs = {"expert_ptr", "row_ptr", "valid_ptr", "start_ptr", "size_ptr"}
    compiled = {}
    for name, (kernel, consts) in variants.items():
        if only is not None and name not in only:
            continue
        names = kernel.arg_names
        fp8_ptrs = {"a_ptr", "w_ptr"} if kernel is tk.fp8_matmul_kernel else set()
        sig = {n: ("*i32" if n in int_ptrs else "*fp8e4nv" if n in fp8_ptrs else "*fp32"
                   if n.endswith("scale_ptr") or n == "out_ptr" and kernel is tk.weight_grad_kernel
                   else f"*{dtype}") for n in names if n.endswith("_ptr")}
        consts = {**consts, "UPCAST": False, "PRECISION": "tf32" if dtype == "bf16" else "ieee"}
        consts = {k: v for k, v in consts.items() if k in names}
        sig.update(dict.fromkeys(consts, "constexpr"))
        src = triton.compiler.ASTSource(fn=kernel, signature=sig,
                                        constexprs={(names.index(k),): v for k, v in consts.items()})
        compiled[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]})
    return compiled


def _to_torch(a: np.ndarray):
    import torch

    a = np.array(a, copy=True)  # jax hands the callback read-only views; torch wants to own its memory
    if a.dtype == jnp.bfloat16:  # torch cannot take numpy's bfloat16 or float8: pass the bits
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == jnp.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def _launch(name: str, interpret: bool, grid: tuple, inputs: list, out_shapes: list, **meta):
    """Run kernel ``name`` over ``grid``: pointer arguments are ``inputs`` then the outputs (fresh,
    uninitialised buffers of ``out_shapes``), the rest constexprs."""
    kernel = getattr(kernels(interpret), name)
    if not interpret:
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


def _common(dtype, interpret: bool) -> dict:
    return {**blocks(interpret), "UPCAST": interpret, "PRECISION": _precision(dtype)}


def kernel_schedule(group_sizes_E, G, interpret: bool):
    """The tile schedule (expert, first row, valid rows per tile) at the kernels' BLOCK_M."""
    expert_N, row_N, valid_N, _ = tile_schedule(group_sizes_E, G, blocks(interpret)["BLOCK_M"])
    return [a.astype(jnp.int32) for a in (expert_N, row_N, valid_N)]


def gate_up(x_GD, w_gate_EDF, w_up_EDF, schedule, dh_GF=None, *, interpret: bool):
    """h = silu(x Wg) * (x Wu) per tile's expert; given ``dh``, (dg, du) instead."""
    G, D = x_GD.shape
    F = w_gate_EDF.shape[-1]
    meta = _common(x_GD.dtype, interpret)
    grid = (schedule[0].shape[0], -(-F // meta["BLOCK_N"]))
    backward = dh_GF is not None
    unused = jnp.zeros((1,), x_GD.dtype)  # the pointers one direction does not use
    out = jax.ShapeDtypeStruct((G, F), x_GD.dtype)
    inputs = [x_GD, w_gate_EDF, w_up_EDF, dh_GF if backward else unused, *schedule]
    outs = _launch("gate_up_kernel", interpret, grid, inputs,
                   [out, out if backward else jax.ShapeDtypeStruct((1,), x_GD.dtype)], D=D, F=F, BACKWARD=backward,
                   **meta)
    return tuple(outs) if backward else outs[0]


def grouped_matmul(a_GK, w_EKN, schedule, transpose_w: bool = False, second=None, *, interpret: bool):
    """out = a W_e (+ a2 W2_e) per tile's expert; ``transpose_w`` reads W [E, N, K] as [E, K, N]."""
    G, K = a_GK.shape
    E, W1, W2 = w_EKN.shape
    N = W1 if transpose_w else W2
    strides = {"STRIDE_WE": W1 * W2, "STRIDE_WK": 1 if transpose_w else W2, "STRIDE_WN": W2 if transpose_w else 1}
    meta = _common(a_GK.dtype, interpret)
    a2, w2 = second if second is not None else (jnp.zeros((1,), a_GK.dtype), jnp.zeros((1,), w_EKN.dtype))
    grid = (schedule[0].shape[0], -(-N // meta["BLOCK_N"]))
    (out,) = _launch("grouped_matmul_kernel", interpret, grid, [a_GK, w_EKN, a2, w2, *schedule],
                     [jax.ShapeDtypeStruct((G, N), a_GK.dtype)], K=K, N=N, HAS_SECOND=second is not None, **strides,
                     **meta)
    return out


def weight_grad(a_GK, b_GN, group_sizes_E, *, interpret: bool):
    """dW_e = a_e^T b_e over each expert's rows: [E, K, N] in float32."""
    K, N, E = a_GK.shape[1], b_GN.shape[1], group_sizes_E.shape[0]
    meta = _common(a_GK.dtype, interpret)
    block = {"BLOCK_R": meta.pop("BLOCK_M"), "BLOCK_K": meta.pop("BLOCK_K"), "BLOCK_N": meta.pop("BLOCK_N")}
    starts_E = (jnp.cumsum(group_sizes_E) - group_sizes_E).astype(jnp.int32)
    grid = (E, -(-K // block["BLOCK_K"]), -(-N // block["BLOCK_N"]))
    (out,) = _launch("weight_grad_kernel", interpret, grid, [a_GK, b_GN, starts_E, group_sizes_E.astype(jnp.int32)],
                     [jax.ShapeDtypeStruct((E, K, N), jnp.float32)], K=K, N=N, **block, **meta)
    return out


def fp8_matmul(a_GK, w: Fp8Weight, schedule, *, interpret: bool):
    """out = a W_e per tile's expert on FP8 operands (``fp8_matmul_kernel``): ``W`` an FP8 weight
    ``[E, K, N]`` with 128 x 128 block scales, the rows of ``a`` quantised to e4m3 per 1 x 128
    tile first (``fp8.quantize_tiles``: Triton's interpreter rounds to e4m3 wrongly across binades,
    so the kernel only reads e4m3). Output in ``a``'s dtype."""
    G, K = a_GK.shape
    N = w.shape[-1]
    a_q, a_scale = quantize_tiles(a_GK, -1)
    grid = (schedule[0].shape[0], -(-N // 128))
    tiles = blocks(interpret)
    meta = {"BLOCK_M": tiles["BLOCK_M"], "UPCAST": interpret, "num_warps": tiles["num_warps"],
            "num_stages": tiles["num_stages"]}
    (out,) = _launch("fp8_matmul_kernel", interpret, grid, [a_q, a_scale, w.data, w.scale_inv, *schedule],
                     [jax.ShapeDtypeStruct((G, N), a_GK.dtype)], K=K, N=N, **meta)
    return out


def fp8_grouped_mlp(x_GD, w_gate_EDF: Fp8Weight, w_up_EDF: Fp8Weight, w_down_EFD: Fp8Weight, group_sizes_E, *,
                    interpret: bool):
    """The grouped gated MLP from FP8 expert weights (``model.fp8_weights``), each GEMM an FP8 GEMM
    (``fp8_matmul``): for serving, not differentiable."""
    dt = x_GD.dtype
    sched = kernel_schedule(group_sizes_E, x_GD.shape[0], interpret)
    gate_GF = fp8_matmul(x_GD, w_gate_EDF, sched, interpret=interpret).astype(jnp.float32)
    up_GF = fp8_matmul(x_GD, w_up_EDF, sched, interpret=interpret).astype(jnp.float32)
    h_GF = _rows_in_groups((jax.nn.silu(gate_GF) * up_GF).astype(dt), group_sizes_E)
    return _rows_in_groups(fp8_matmul(h_GF, w_down_EFD, sched, interpret=interpret), group_sizes_E)


def triton_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, *, interpret: bool | None = None):
    """The grouped gated MLP with the Triton kernels (the ``grouped.py`` backend contract);
    ``interpret`` defaults to ``default_interpret()``. FP8 weights (``fp8.Fp8Weight``) take the
    FP8 kernel (``fp8_grouped_mlp``)."""
    interpret = default_interpret() if interpret is None else interpret
    if isinstance(w_gate_EDF, Fp8Weight):
        return fp8_grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret=interpret)
    return _grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_mlp(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret):
    return _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret)[0]


def _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret):
    dt = x_GD.dtype
    sched = kernel_schedule(group_sizes_E, x_GD.shape[0], interpret)
    h_GF = gate_up(x_GD, w_gate_EDF.astype(dt), w_up_EDF.astype(dt), sched, interpret=interpret)
    y_GD = grouped_matmul(h_GF, w_down_EFD.astype(dt), sched, interpret=interpret)
    return _rows_in_groups(y_GD, group_sizes_E), (h_GF, sched)


def _rows_in_groups(a_GX, group_sizes_E):
    """Rows past the last group belong to no tile: zero them (the kernels leave them unset)."""
    return jnp.where((jnp.arange(a_GX.shape[0]) < jnp.sum(group_sizes_E))[:, None], a_GX, 0)


def _fwd(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret):
    y_GD, (h_GF, sched) = _forward(x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, interpret)
    return y_GD, (x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, h_GF, sched)


def _bwd(interpret, residuals, dy_GD):
    x_GD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, h_GF, sched = residuals
    dt = x_GD.dtype
    wg, wu, wd = (w.astype(dt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    dy_GD = dy_GD.astype(dt)
    dh_GF = grouped_matmul(dy_GD, wd, sched, transpose_w=True, interpret=interpret)
    dg_GF, du_GF = gate_up(x_GD, wg, wu, sched, dh_GF=dh_GF, interpret=interpret)
    dx_GD = grouped_matmul(dg_GF, wg, sched, transpose_w=True, second=(du_GF, wu), interpret=interpret)
    dw = lambda a, b, w: weight_grad(a, b, group_sizes_E, interpret=interpret).astype(w.dtype)
    return (_rows_in_groups(dx_GD, group_sizes_E), dw(x_GD, dg_GF, w_gate_EDF), dw(x_GD, du_GF, w_up_EDF),
            dw(h_GF, dy_GD, w_down_EFD), None)


_grouped_mlp.defvjp(_fwd, _bwd)
