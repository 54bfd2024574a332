"""TFLOP/s of the grouped gated MLP, forward and forward+backward, for our backends and the
peers' grouped GEMMs against a dense GEMM chain of the same FLOPs, in one run (a markdown row
per backend).

Meant for a GPU, at the 16B model's layer shapes (64 experts, D 2048, F 1408, top-6, bf16):

    python benchmarks/grouped_mlp.py --tokens 8192 32768 --backends triton ragged pallas_mgpu torch

Backends: any of ``dsmoe_jax.grouped``'s (``triton``, ``ragged``, ``tiled``, ...), and two peers
built here the way their users would: ``pallas_mgpu``, JAX's own Pallas Mosaic GPU kernels
(``ragged_dot_mgpu`` for the three projections and the input gradient,
``transposed_ragged_dot_mgpu`` for the weight gradients; Hopper only), and ``torch``, PyTorch's
``torch._grouped_mm`` (what transformers' grouped_mm experts call), timed with autograd. A JAX
backend whose compiled program needs more memory than the device has is skipped, saying how much
(``lax.ragged_dot`` at 32K tokens on a GPU).

On a CPU the Triton backend runs under the interpreter (useless for timing): compare the XLA
backends at a small shape instead, e.g. ``--tokens 2048 --d-model 256 --d-ff 128 --backends tiled
ragged torch --dtype float32``. Routing is uniform at random, so every expert gets about T*K/E rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax import grouped

PEERS = ("pallas_mgpu", "torch")


def _time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _inputs(tokens, d_model, d_ff, experts, top_k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    rows = tokens * top_k
    experts_of_rows = np.sort(rng.integers(0, experts, rows))
    sizes = jnp.asarray(np.bincount(experts_of_rows, minlength=experts), jnp.int32)
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (rows, d_model), dtype)
    w = lambda key, shape: (0.02 * jax.random.normal(key, shape)).astype(dtype)
    w_gate, w_up = w(k[1], (experts, d_model, d_ff)), w(k[2], (experts, d_model, d_ff))
    return x, w_gate, w_up, w(k[3], (experts, d_ff, d_model)), sizes


def _dense_chain(x, wg, wu, wd):
    """The same FLOPs as the grouped MLP, as three plain GEMMs (every row with expert 0)."""
    h = jax.nn.silu(x @ wg[0]) * (x @ wu[0])
    return h.astype(x.dtype) @ wd[0]


def gated_mlp_from_ragged_dots(ragged, transposed):
    """The grouped gated MLP, differentiable, from two grouped products over rows sorted by group:
    ``ragged(lhs_MK, rhs_GKN, sizes, transpose_rhs)`` -> ``[M, N]`` (with ``transpose_rhs`` the
    weights come as ``[G, N, K]``), and ``transposed(lhs_MK, rhs_MN, sizes)`` -> ``[G, K, N]``,
    each group's lhs^T rhs (the weight gradient). Backward: dh = dy Wd^T, then the SwiGLU's
    derivative, dx = dg Wg^T + du Wu^T, and the three weight gradients."""

    def forward(x, wg, wu, wd, sizes):
        g = ragged(x, wg, sizes, False).astype(jnp.float32)
        u = ragged(x, wu, sizes, False).astype(jnp.float32)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        return ragged(h, wd, sizes, False), (x, wg, wu, wd, sizes, g, u, h)

    @jax.custom_vjp
    def mlp(x, wg, wu, wd, sizes):
        return forward(x, wg, wu, wd, sizes)[0]

    def backward(res, dy):
        x, wg, wu, wd, sizes, g, u, h = res
        dt = x.dtype
        dh = ragged(dy, wd, sizes, True).astype(jnp.float32)
        sig = jax.nn.sigmoid(g)
        du = (dh * g * sig).astype(dt)
        dg = (dh * u * sig * (1 + g * (1 - sig))).astype(dt)
        dx = (ragged(dg, wg, sizes, True).astype(jnp.float32) + ragged(du, wu, sizes, True)).astype(dt)
        weight_grad = lambda a, b, w: transposed(a, b, sizes).astype(w.dtype)
        return dx, weight_grad(x, dg, wg), weight_grad(x, du, wu), weight_grad(h, dy, wd), None

    mlp.defvjp(forward, backward)
    return mlp


@functools.cache
def pallas_mgpu_mlp():
    """The gated MLP on Pallas Mosaic GPU's ragged dots (Hopper). Tiles: 128 x 128 outputs,
    64-deep steps; 128 divides both widths of the 16B shapes (1408 = 11 x 128, 2048)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    tiles = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
    ragged = lambda lhs, rhs, sizes, transpose_rhs: ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=sizes, transpose_rhs=transpose_rhs, **tiles)
    transposed = lambda lhs, rhs, sizes: transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, rhs, group_sizes=sizes, **tiles)
    return gated_mlp_from_ragged_dots(ragged, transposed)


def torch_inputs(x, wg, wu, wd, sizes):
    """The arrays as torch tensors (the GPU when there is one, the same dtype, requiring
    gradients) and the groups' end offsets that ``torch._grouped_mm`` takes."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float32): torch.float32}[jnp.dtype(x.dtype)]
    to_torch = lambda a: torch.from_numpy(np.array(a.astype(jnp.float32))).to(device, dtype).requires_grad_()
    offs = torch.from_numpy(np.cumsum(np.asarray(sizes))).to(device, torch.int32)
    return [to_torch(a) for a in (x, wg, wu, wd)], offs


def torch_mlp(x, wg, wu, wd, offs):
    """The gated MLP on ``torch._grouped_mm``, as transformers' grouped_mm experts compute it."""
    import torch

    h = torch.nn.functional.silu(torch._grouped_mm(x, wg, offs=offs)) * torch._grouped_mm(x, wu, offs=offs)
    return torch._grouped_mm(h, wd, offs=offs)


def torch_timings(x, wg, wu, wd, sizes, reps: int) -> tuple[float, float]:
    """Forward and forward+backward seconds of ``torch_mlp`` in the inputs' dtype."""
    import torch

    tensors, offs = torch_inputs(x, wg, wu, wd, sizes)
    device = tensors[0].device.type
    mlp = lambda: torch_mlp(*tensors, offs)

    def seconds(fn):
        fn()  # warm up
        times = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def forward():
        with torch.no_grad():
            mlp()

    def forward_backward():  # the gradient of sum(y), as the JAX rows take it (contiguous: _grouped_mm needs that)
        y = mlp()
        y.backward(torch.ones_like(y))
        for t in tensors:
            t.grad = None

    return seconds(forward), seconds(forward_backward)


def _too_big(compiled) -> str | None:
    """Why a compiled program cannot run on this device: it needs more memory than there is."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    memory = compiled.memory_analysis()
    if not limit or memory is None:
        return None
    need = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return f"needs {need / 2**30:.0f} GiB, the device has {limit / 2**30:.0f} GiB" if need > limit else None


def _is_hopper() -> bool:
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["triton", "ragged", *PEERS])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print("| tokens | backend | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd vs dense GEMM | fwd+bwd vs dense GEMM |")
    print("|---|---|---|---|---|---|")
    rows = []

    def record(row):
        rows.append(row)
        if args.json:  # after every row, so that a run stopped midway keeps what it measured
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))

    def row(tokens, backend, flops, fwd, both, dense_fwd, dense_both):
        r = {"tokens": tokens, "backend": backend, "fwd_tflops": flops / fwd / 1e12,
             "fwd_bwd_tflops": 3 * flops / both / 1e12, "fwd_vs_dense": dense_fwd / fwd,
             "fwd_bwd_vs_dense": dense_both / both}
        print(f"| {tokens} | {backend} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_tflops']:.1f} | "
              f"{r['fwd_vs_dense']:.2f}x | {r['fwd_bwd_vs_dense']:.2f}x |", flush=True)
        record(r)

    def skipped(tokens, backend, reason):
        print(f"| {tokens} | {backend} | skipped: {reason} | | | |", flush=True)
        record({"tokens": tokens, "backend": backend, "skipped": reason})

    for tokens in args.tokens:
        x, wg, wu, wd, sizes = _inputs(tokens, args.d_model, args.d_ff, args.experts, args.top_k, dtype)
        flops = 2 * 3 * x.shape[0] * args.d_model * args.d_ff  # three GEMMs over every routed row

        def timings(fn):
            """Seconds forward and forward+backward, or why the backend cannot run here."""
            loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
            both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(x, wg, wu, wd).compile()
            reason = _too_big(both)
            if reason:
                return reason
            fwd = jax.jit(fn).lower(x, wg, wu, wd).compile()
            return _time(fwd, x, wg, wu, wd, reps=args.reps), _time(both, x, wg, wu, wd, reps=args.reps)

        dense_fwd, dense_both = timings(_dense_chain)
        row(tokens, "dense GEMM", flops, dense_fwd, dense_both, dense_fwd, dense_both)
        for backend in args.backends:
            if backend == "torch":
                result = torch_timings(x, wg, wu, wd, sizes, args.reps)
            elif backend == "pallas_mgpu" and not _is_hopper():
                result = f"Mosaic GPU's kernels need a Hopper GPU, not {jax.devices()[0].device_kind}"
            elif backend == "pallas_mgpu":
                result = timings(lambda *a: pallas_mgpu_mlp()(*a, sizes))
            else:
                result = timings(lambda *a, b=backend: grouped.grouped_mlp(*a, sizes, backend=b))
            if isinstance(result, str):
                skipped(tokens, backend, result)
            else:
                row(tokens, backend, flops, *result, dense_fwd, dense_both)


if __name__ == "__main__":
    main()
