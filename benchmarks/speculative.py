"""Self-speculative decoding (the MTP module drafts, the model verifies) against plain greedy
decoding, on a trained checkpoint with ``model.mtp_depth`` >= 1: the drafts' acceptance, tokens
per pass of the model and the wall-time ratio, measured in one process. Prompts are the starts
of validation windows; each decoder is one jitted program (its loop a ``lax.while_loop``), timed
interleaved with the other, medians; the two must produce the same tokens. A markdown row per
batch size.

    dsmoe-jax train --config tiny-v3 --set model.mtp_depth=1 --workdir runs/tiny-v3-mtp
    python benchmarks/speculative.py --checkpoint runs/tiny-v3-mtp --prompts 8 --prompt-len 32 --new 64
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from dsmoe_jax import inference
from dsmoe_jax.loading import load_model, validation_tokens


def _timed(fn, reps: int):
    """The result of ``fn`` and its median wall time over ``reps`` calls after a warm-up call."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir or converted checkpoint with MTP")
    parser.add_argument("--prompts", type=int, default=8, help="validation windows to start from")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="prompts decoded together")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    params, cfg, _ = load_model(args.checkpoint)
    model = cfg.model
    val = validation_tokens(cfg, args.checkpoint)
    starts = np.linspace(0, len(val) - args.prompt_len - 1, args.prompts).astype(int)
    prompts = np.stack([val[s:s + args.prompt_len] for s in starts]).astype(np.int32)
    greedy = jax.jit(functools.partial(inference.generate, cfg=model, max_new_tokens=args.new, temperature=0.0))
    speculative = jax.jit(functools.partial(inference.generate_speculative, cfg=model, max_new_tokens=args.new))
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.checkpoint}: {args.prompts} prompts of "
          f"{args.prompt_len} validation tokens, {args.new} new tokens each, median of {args.reps}")
    print("| batch | drafts accepted | tokens per pass | greedy (ms per batch) | speculative (ms per batch) "
          "| speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        if args.prompts % batch:
            raise SystemExit(f"--batch {batch} does not divide --prompts {args.prompts}")
        accepted = drafted = passes = 0
        t_greedy = t_spec = 0.0
        same = True
        for group in np.split(prompts, args.prompts // batch):
            plain, t_g = _timed(lambda: greedy(params, group, rng=jax.random.key(0)), args.reps)
            (out, stats), t_s = _timed(lambda: speculative(params, group), args.reps)
            same &= bool(np.array_equal(plain, out))
            accepted += int(stats.accepted_B.sum())
            drafted += int(stats.drafted_B.sum())
            passes += int(stats.steps) + 1
            t_greedy += t_g
            t_spec += t_s
        groups = args.prompts // batch
        print(f"| {batch} | {accepted / max(drafted, 1):.1%} ({accepted}/{drafted}) | "
              f"{args.new * groups / passes:.2f} | {1e3 * t_greedy / groups:.1f} | {1e3 * t_spec / groups:.1f} | "
              f"{t_greedy / t_spec:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
