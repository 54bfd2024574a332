"""Inference tokens/s: our jitted prefill and KV-cache decoding vs a PyTorch reference loop.

The PyTorch side is the benchmark model of ``train_throughput.py`` (HF-style expert loop) with
HF-style ``past_key_values``: a prefill call, then one call per new token under
``torch.inference_mode``. Ours: ``prefill`` and ``generate`` (its decode loop is a
``lax.while_loop`` inside one jit). Greedy, same prompt shape, interleaved, medians. Needs torch.

    python benchmarks/inference.py --configs tiny --batch 4 --prompt 128 --new 64
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from train_throughput import CONFIGS, TorchDecoder

import dsmoe_jax
from dsmoe_jax import inference


def _time(fn, reps):
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(name: str, batch: int, prompt: int, new: int, reps: int) -> dict:
    cfg = CONFIGS[name][0]().model
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt), dtype=np.int32)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    prefill = jax.jit(functools.partial(inference.prefill, cfg=cfg))
    generate = jax.jit(functools.partial(inference.generate, cfg=cfg, max_new_tokens=new, temperature=0.0))
    cache = inference.init_cache(cfg, batch, prompt + new)
    ours_prefill = lambda: jax.block_until_ready(prefill(params, tokens=jnp.asarray(ids), cache=cache))
    ours_generate = lambda: jax.block_until_ready(generate(params, prompt_ids=jnp.asarray(ids), rng=jax.random.key(0)))

    torch.manual_seed(0)
    model = TorchDecoder(cfg).eval()
    tokens = torch.from_numpy(ids).long()

    @torch.inference_mode()
    def torch_prefill():
        return model(tokens)

    @torch.inference_mode()
    def torch_generate():
        logits, _, past = model(tokens)
        for _ in range(new - 1):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits, _, past = model(nxt, past)

    t = {"ours_prefill": _time(ours_prefill, reps), "torch_prefill": _time(torch_prefill, reps),
         "ours_generate": _time(ours_generate, reps), "torch_generate": _time(torch_generate, reps)}
    # decode time = generate - prefill, per side
    ours_decode, torch_decode = t["ours_generate"] - t["ours_prefill"], t["torch_generate"] - t["torch_prefill"]
    return {"config": name, "shape": f"{batch}x{prompt}+{new}",
            "prefill": (batch * prompt / t["ours_prefill"], batch * prompt / t["torch_prefill"]),
            "decode": (batch * (new - 1) / ours_decode, batch * (new - 1) / torch_decode)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,100m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"# jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("| config | batch x prompt + new | prefill tok/s ours / torch | decode tok/s ours / torch | prefill ratio "
          "| decode ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = bench(name, args.batch, args.prompt, args.new, args.reps)
        (po, pt), (do, dt) = r["prefill"], r["decode"]
        print(f"| {name} | {r['shape']} | {po:.0f} / {pt:.0f} | {do:.0f} / {dt:.0f} | {po / pt:.2f}x | "
              f"{do / dt:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
