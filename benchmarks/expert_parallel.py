"""Train-step time with the routed experts expert-parallel vs plain data parallelism, same devices.

Both meshes use every device (8 fake CPU devices unless XLA_FLAGS says otherwise); the step is
the real jitted train step with its state shardings. The two are timed interleaved in one
process and printed as a markdown row with the ratio and the all_to_all bytes per step
(``dsmoe_jax.plan``). On CPU the fake devices share the machine's cores, so the ratio measures
the extra work of the exchange (buffers, sorts, all_to_all copies), not network time.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/expert_parallel.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import numpy as np  # noqa: E402

import dsmoe_jax  # noqa: E402
from dsmoe_jax import mesh as mesh_lib  # noqa: E402
from dsmoe_jax import plan  # noqa: E402
from dsmoe_jax.train.optimizer import make_optimizer  # noqa: E402
from dsmoe_jax.train.step import init_sharded_state, make_train_step, state_shardings  # noqa: E402

CONFIGS = {
    "tiny16": ["moe.n_routed_experts=16", "train.batch_size=16", "train.seq_len=128"],
    "wide": ["moe.n_routed_experts=32", "moe.top_k=6", "model.d_model=256", "moe.expert_d_ff=256",
             "train.batch_size=16", "train.seq_len=256"],
}


def _stepper(cfg, sizes):
    mesh = mesh_lib.make_mesh(sizes)
    opt = make_optimizer(cfg.train)
    with jax.set_mesh(mesh):
        shardings = state_shardings(cfg, opt, mesh)
        state = init_sharded_state(cfg, opt, jax.random.key(0), shardings)
        batch_sharding = mesh_lib.batch_sharding(mesh)
        step = jax.jit(make_train_step(cfg, opt), in_shardings=(shardings, batch_sharding))
        windows = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                                    (cfg.train.batch_size, cfg.train.seq_len + 1), np.int32)
        batch = jax.device_put(windows, batch_sharding)
        jax.block_until_ready(step(state, batch))  # compile

    def run():
        with jax.set_mesh(mesh):
            t = time.perf_counter()
            jax.block_until_ready(step(state, batch))
            return time.perf_counter() - t

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    n = jax.device_count()
    print(f"| config | devices | data-parallel step ms | expert-parallel (expert={n}) step ms | EP / DP | "
          "all_to_all MiB/step/device (routed) |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        cfg = dsmoe_jax.load_config("tiny", CONFIGS[name])
        dp, ep = _stepper(cfg, {"data": n}), _stepper(cfg, {"expert": n})
        times = {"dp": [], "ep": []}
        for _ in range(args.steps):
            times["dp"].append(dp())
            times["ep"].append(ep())
        dp_ms, ep_ms = (1e3 * float(np.median(times[k])) for k in ("dp", "ep"))
        p = plan.make_plan(cfg, {"expert": n})
        print(f"| {name} | {n} | {dp_ms:.1f} | {ep_ms:.1f} | {ep_ms / dp_ms:.2f}x | "
              f"{p.all_to_all_bytes / 2**20:.1f} ({p.routed_bytes / 2**20:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
