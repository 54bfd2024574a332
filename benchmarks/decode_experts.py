"""The routed experts at decoding sizes: ours (``dispatch.routed_experts``: sort into groups, the
grouped MLP runs only the groups with rows, combine) against reading each assignment's expert
weights directly, without the sort, in two forms: gathered per assignment (``w[expert_TK]``, one
batched matmul) and one matrix-vector product per assignment, unrolled. Same inputs, one process,
interleaved repetitions; a markdown row per token count.

    python benchmarks/decode_experts.py --config 2b --tokens 1 4 8 --reps 20
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import dsmoe_jax
from dsmoe_jax import dispatch


def gathered(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Each assignment's weights gathered (a copy of T * K experts' weights), then batched matmuls."""
    dot = lambda spec, a, w: jnp.einsum(spec, a, w, preferred_element_type=jnp.float32)
    g_TKF = dot("td,tkdf->tkf", x_TD, w_gate_EDF[expert_TK])
    u_TKF = dot("td,tkdf->tkf", x_TD, w_up_EDF[expert_TK])
    y_TKD = dot("tkf,tkfd->tkd", (jax.nn.silu(g_TKF) * u_TKF).astype(x_TD.dtype), w_down_EFD[expert_TK])
    return jnp.einsum("tkd,tk->td", y_TKD, gate_TK)


def per_assignment(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    """One matrix-vector product per assignment and projection, each reading its expert's slice."""
    T, K = expert_TK.shape
    rows = []
    for t in range(T):
        y_D = jnp.zeros((x_TD.shape[1],), jnp.float32)
        for k in range(K):
            w = lambda w_E: jax.lax.dynamic_index_in_dim(w_E, expert_TK[t, k], keepdims=False)
            h_F = jax.nn.silu(x_TD[t] @ w(w_gate_EDF)) * (x_TD[t] @ w(w_up_EDF))
            y_D = y_D + gate_TK[t, k] * (h_F.astype(x_TD.dtype) @ w(w_down_EFD))
        rows.append(y_D)
    return jnp.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="2b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    m = dsmoe_jax.load_config(args.config).model
    E, K, D, F = m.moe.n_routed_experts, m.moe.top_k, m.d_model, m.moe.expert_d_ff
    dt = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    weights = [(0.02 * jax.random.normal(k, s)).astype(dt) for k, s in zip(keys[1:], [(E, D, F), (E, D, F), (E, F, D)])]
    ours = lambda x, expert, gate, *w: dispatch.routed_experts(x, expert, gate, *w, m.moe)[0]
    fns = {"ours (sorted)": jax.jit(ours), "gathered": jax.jit(gathered), "per assignment": jax.jit(per_assignment)}
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.config}: E {E}, top-{K}, D {D}, F {F}, "
          f"{args.dtype}, grouped backend {m.moe.backend}; ms, median; ratio = time / ours")
    print("| tokens | " + " | ".join(fns) + " | " + " | ".join(f"{n} / ours" for n in list(fns)[1:]) + " |")
    print("|---|" + "---|" * (2 * len(fns) - 1))
    rng = np.random.default_rng(0)
    for T in args.tokens:
        x = jax.random.normal(keys[0], (T, D), dt)
        expert = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]), jnp.int32)
        gate = jnp.full((T, K), 1.0 / K, jnp.float32)
        outs = {name: fn(x, expert, gate, *weights) for name, fn in fns.items()}  # compile and warm up
        for name, y in outs.items():  # all three compute the same thing
            np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(outs["ours (sorted)"], np.float32),
                                       rtol=2e-2, atol=2e-3, err_msg=name)
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(x, expert, gate, *weights))
                times[name].append(time.perf_counter() - t)
        ms = {name: 1e3 * float(np.median(v)) for name, v in times.items()}
        ours_ms = ms["ours (sorted)"]
        print(f"| {T} | " + " | ".join(f"{v:.2f}" for v in ms.values()) + " | "
              + " | ".join(f"{ms[n] / ours_ms:.2f}x" for n in list(fns)[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
