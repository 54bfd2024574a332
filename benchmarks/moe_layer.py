"""MoE layer time / dense SwiGLU time at equal activated FLOPs, per grouped-MLP backend.

The dense baseline is one SwiGLU MLP of width (top_k + n_shared) * expert_d_ff on the same
tokens: the FLOPs the MoE layer's experts do. The MoE side includes everything the layer does
(router, balance loss, sort, gathers, combine, shared experts). Both are timed in the same
process, interleaved, and the ratio of medians is printed as a markdown row.

    python benchmarks/moe_layer.py --shapes tiny --backends tiled,ragged,dense --reps 5
    python benchmarks/moe_layer.py --shapes 2b --backends tiled,ragged --tokens 2048 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsmoe_jax
from dsmoe_jax.layers import MLP
from dsmoe_jax.moe import MoE

SHAPES = {"tiny": ("tiny", 2048), "2b": ("2b", 4096)}  # config name, default tokens per step


def _timer(fn, *args):
    jax.block_until_ready(fn(*args))  # compile and warm up

    def run():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t

    return run


def _fwd_and_grad(module):
    graphdef, params = nnx.split(module)

    def apply(params, x):
        out = nnx.merge(graphdef, params)(x)
        y, aux = out if isinstance(out, tuple) else (out, 0.0)
        return jnp.sum(y.astype(jnp.float32) * 1e-3) + aux

    fwd = jax.jit(apply)
    grad = jax.jit(jax.grad(apply, argnums=(0, 1)))
    return params, fwd, grad


class _MoEOnly(nnx.Module):
    def __init__(self, cfg, rngs):
        self.moe = MoE(cfg, rngs=rngs)

    def __call__(self, x_BSD):
        B, S, _ = x_BSD.shape
        y, stats = self.moe(x_BSD, jnp.zeros((B, S), jnp.int32), jnp.ones((B, S)))
        return y, stats.expert_balance_loss


def bench(shape: str, backend: str, tokens: int, reps: int) -> dict:
    name, _ = SHAPES[shape]
    cfg = dsmoe_jax.load_config(name).model
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend=backend))
    e = cfg.moe
    width = (e.top_k + e.n_shared_experts) * e.expert_d_ff
    x = jax.random.normal(jax.random.key(0), (1, tokens, cfg.d_model), jnp.dtype(cfg.dtype))
    rngs = nnx.Rngs(0)
    moe_params, moe_fwd, moe_grad = _fwd_and_grad(_MoEOnly(cfg, rngs))
    mlp_params, mlp_fwd, mlp_grad = _fwd_and_grad(
        MLP(cfg.d_model, width, std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs))
    runs = {
        "moe_fwd": _timer(moe_fwd, moe_params, x), "mlp_fwd": _timer(mlp_fwd, mlp_params, x),
        "moe_fwdbwd": _timer(moe_grad, moe_params, x), "mlp_fwdbwd": _timer(mlp_grad, mlp_params, x),
    }
    times = {k: [] for k in runs}
    for _ in range(reps):  # interleaved, so drift in machine speed hits both sides alike
        for k, run in runs.items():
            times[k].append(run())
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"shape": shape, "backend": dsmoe_jax.grouped.resolve_backend(backend) if backend == "auto" else backend,
            "tokens": tokens, "D": cfg.d_model, "experts": f"{e.n_shared_experts}+{e.n_routed_experts} top-{e.top_k}",
            "F": e.expert_d_ff, "mlp_fwd_ms": 1e3 * med["mlp_fwd"],
            "fwd_ratio": med["moe_fwd"] / med["mlp_fwd"], "fwdbwd_ratio": med["moe_fwdbwd"] / med["mlp_fwdbwd"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,2b")
    parser.add_argument("--backends", default="tiled,ragged")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default per shape)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"# jax {jax.__version__}, {jax.default_backend()} ({jax.device_count()} devices), "
          f"{platform.processor() or platform.machine()}")
    print("| shape | backend | tokens | D | experts | F | dense MLP fwd ms | MoE/dense fwd | MoE/dense fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for backend in args.backends.split(","):
            r = bench(shape, backend, args.tokens or SHAPES[shape][1], args.reps)
            print(f"| {r['shape']} | {r['backend']} | {r['tokens']} | {r['D']} | {r['experts']} | {r['F']} | "
                  f"{r['mlp_fwd_ms']:.1f} | {r['fwd_ratio']:.2f}x | {r['fwdbwd_ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
