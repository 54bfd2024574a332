"""Where a training step's time goes: each part of the model timed alone at the step's shapes.

Times, jitted and in one process, the forward and the forward+backward (gradients wrt params and
input) of each sublayer of one block (attention with its norm, the dense MLP, the MoE layer and,
inside it, the router + dispatch + combine without the grouped MLP), the LM head with the
cross-entropy, and the optimizer update alone; then the whole train step. Per-model totals
multiply by the layer counts, so a reader sees which phase dominates and whether the parts add
up to the step (the rest is what XLA does differently across a whole step).

    python benchmarks/step_phases.py --models tiny --reps 5
    python benchmarks/step_phases.py --models 85m --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from vs_transformers import MODELS

import dsmoe_jax
from dsmoe_jax import grouped
from dsmoe_jax.evaluation import cross_entropy
from dsmoe_jax.layers import MLP, RMSNorm
from dsmoe_jax.mha import Attention
from dsmoe_jax.moe import MoE
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step


def median_seconds(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fwd_and_bwd(module_fn, module: nnx.Module, x, reps: int) -> tuple[float, float]:
    """Median seconds of ``module_fn(module, x)`` forward and forward+backward (params and x)."""
    graph, state = nnx.split(module)
    out = lambda s, x: module_fn(nnx.merge(graph, s), x)
    fwd = jax.jit(out)
    loss = lambda s, x: jnp.sum(jax.tree.leaves(out(s, x))[0].astype(jnp.float32) ** 2)
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return median_seconds(lambda: fwd(state, x), reps), median_seconds(lambda: bwd(state, x), reps)


def phases(name: str, batch: int, seq: int, reps: int) -> list[tuple[str, int, float, float]]:
    cfg = dsmoe_jax.load_config("tiny", [*MODELS[name], f"train.batch_size={batch}", f"train.seq_len={seq}"])
    m, rngs, dt = cfg.model, nnx.Rngs(0), jnp.float32
    B, S, D = batch, seq, m.d_model
    x_BSD = jax.random.normal(jax.random.key(1), (B, S, D), dt)
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    tokens = jax.random.randint(jax.random.key(2), (B, S), 0, m.vocab_size)
    valid = jnp.ones((B, S), bool)
    n_moe, n_dense = m.n_layers - m.first_k_dense, m.first_k_dense

    class Head(nnx.Module):  # final norm, LM head, cross-entropy
        def __init__(self):
            self.norm = RMSNorm(D, m.norm_eps, dt)
            self.lm_head_DV = nnx.Param(0.02 * jax.random.normal(rngs.params(), (D, m.vocab_size)))

        def __call__(self, x):
            logits = jnp.einsum("td,dv->tv", self.norm(x).reshape(B * S, D), self.lm_head_DV[...])
            return cross_entropy(logits.reshape(B, S, -1), tokens)

    class AttentionSublayer(nnx.Module):
        def __init__(self):
            self.norm, self.attn = RMSNorm(D, m.norm_eps, dt), Attention(m, rngs=rngs)

        def __call__(self, x):
            return self.attn(self.norm(x), positions, valid)[0]

    # The MoE layer with an identity grouped MLP: router, sort, gathers, combine, shared experts.
    grouped.register_backend("identity", lambda x_GD, *_: x_GD)
    routing_cfg = dsmoe_jax.load_config("tiny", [*MODELS[name], "moe.backend=identity"]).model
    moe_call = lambda mod, x: mod(x, tokens, valid)[0]

    rows = [("attention (norm + attn)", m.n_layers, *fwd_and_bwd(lambda a, x: a(x), AttentionSublayer(), x_BSD, reps))]
    if n_dense:
        mlp = MLP(D, m.d_ff, std=0.02, param_dtype=dt, rngs=rngs)
        rows.append(("dense MLP", n_dense, *fwd_and_bwd(lambda mod, x: mod(x), mlp, x_BSD, reps)))
    rows.append(("MoE layer", n_moe, *fwd_and_bwd(moe_call, MoE(m, rngs=rngs), x_BSD, reps)))
    rows.append(("  of which all but the grouped MLP", n_moe,
                 *fwd_and_bwd(moe_call, MoE(routing_cfg, rngs=rngs), x_BSD, reps)))
    rows.append(("LM head + cross-entropy", 1, *fwd_and_bwd(lambda h, x: h(x), Head(), x_BSD, reps)))

    optimizer = make_optimizer(cfg.train)
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    state = init_state(params, optimizer)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(lambda g, s, p: optimizer.update(g, s, p))
    optimizer_s = median_seconds(lambda: update(grads, state.opt_state, params), reps)
    rows.append(("optimizer (clip + AdamW)", 1, optimizer_s, 0.0))

    step = jax.jit(make_train_step(cfg, optimizer))
    windows = jax.random.randint(jax.random.key(3), (B, S + 1), 0, m.vocab_size)
    rows.append(("whole train step", 1, 0.0, median_seconds(lambda: step(state, windows)[1].loss, reps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,85m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"# jax {jax.__version__} ({jax.default_backend()}), batch {args.batch} x {args.seq}, medians")
    print("| model | phase | x layers | fwd ms | fwd+bwd ms | fwd+bwd ms x layers |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for phase, n, f, b in phases(name, args.batch, args.seq, args.reps):
            total = n * (b or f)
            print(f"| {name} | {phase} | {n} | {1e3 * f:.1f} | {1e3 * b:.1f} | {1e3 * total:.1f} |", flush=True)


if __name__ == "__main__":
    main()
