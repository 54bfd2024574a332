"""TFLOP/s of the grouped gated MLP, forward and forward+backward, for several backends against
a dense GEMM chain of the same FLOPs, in one run (a markdown row per backend).

Meant for a GPU, at the 16B model's layer shapes (64 experts, D 2048, F 1408, top-6, bf16):

    python benchmarks/grouped_mlp.py --tokens 8192 32768 --backends triton ragged

On a CPU the Triton backend runs under the interpreter (useless for timing): compare the XLA
backends at a small shape instead, e.g. ``--tokens 2048 --d-model 256 --d-ff 128 --backends tiled
ragged --dtype float32``. Routing is uniform at random, so every expert gets about T*K/E rows.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax import grouped


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
    return x, w(k[1], (experts, d_model, d_ff)), w(k[2], (experts, d_model, d_ff)), w(k[3], (experts, d_ff, d_model)), sizes


def _dense_chain(x, wg, wu, wd):
    """The same FLOPs as the grouped MLP, as three plain GEMMs (every row with expert 0)."""
    h = jax.nn.silu(x @ wg[0]) * (x @ wu[0])
    return h.astype(x.dtype) @ wd[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backends", nargs="+", default=["triton", "ragged"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print("| tokens | backend | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd vs dense GEMM | fwd+bwd vs dense GEMM |")
    print("|---|---|---|---|---|---|")
    rows = []

    def row(tokens, backend, flops, fwd, both, dense_fwd, dense_both):
        rows.append({"tokens": tokens, "backend": backend, "fwd_tflops": flops / fwd / 1e12,
                     "fwd_bwd_tflops": 3 * flops / both / 1e12, "fwd_vs_dense": dense_fwd / fwd,
                     "fwd_bwd_vs_dense": dense_both / both})
        r = rows[-1]
        print(f"| {tokens} | {backend} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_tflops']:.1f} | "
              f"{r['fwd_vs_dense']:.2f}x | {r['fwd_bwd_vs_dense']:.2f}x |", flush=True)

    for tokens in args.tokens:
        x, wg, wu, wd, sizes = _inputs(tokens, args.d_model, args.d_ff, args.experts, args.top_k, dtype)
        flops = 2 * 3 * x.shape[0] * args.d_model * args.d_ff  # three GEMMs over every routed row

        def timings(fn):
            loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
            fwd = _time(jax.jit(fn), x, wg, wu, wd, reps=args.reps)
            both = _time(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), x, wg, wu, wd, reps=args.reps)
            return fwd, both

        dense_fwd, dense_both = timings(_dense_chain)
        row(tokens, "dense GEMM", flops, dense_fwd, dense_both, dense_fwd, dense_both)
        for backend in args.backends:
            fwd, both = timings(lambda *a, b=backend: grouped.grouped_mlp(*a, sizes, backend=b))
            row(tokens, backend, flops, fwd, both, dense_fwd, dense_both)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
