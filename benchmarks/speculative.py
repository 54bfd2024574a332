"""Self-speculative decoding (the MTP module drafts, the model verifies) against plain greedy
decoding, on a trained checkpoint with ``model.mtp_depth`` >= 1: the drafts' acceptance, tokens
per pass of the model and the wall-time ratio, measured in one process. Prompts are the starts
of validation windows; each decoder is one jitted program (its loop a ``lax.while_loop``), timed
interleaved with the other, medians; the two must produce the same tokens. A markdown row per
batch size, with the distinct tokens each continuation holds (a small model's greedy text soon
repeats itself, which any draft predicts). Then the drafts' acceptance along real text: on
validation windows, wherever the model's greedy token is the text's next token, how often the
MTP depth's guess of the token after it is the model's own choice there (what speculative
decoding would accept on that text).

    dsmoe-jax train --config tiny-v3 --set model.mtp_depth=1 --workdir runs/tiny-v3-mtp
    python benchmarks/speculative.py --checkpoint runs/tiny-v3-mtp --prompts 8 --prompt-len 32 --new 64
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from dsmoe_jax import inference, model
from dsmoe_jax.data import WindowSource
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
    parser.add_argument("--windows", type=int, default=64, help="validation windows for the acceptance along text")
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
          "| speed-up | same tokens | distinct tokens per continuation |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batch:
        if args.prompts % batch:
            raise SystemExit(f"--batch {batch} does not divide --prompts {args.prompts}")
        accepted = drafted = passes = 0
        t_greedy = t_spec = 0.0
        same, distinct = True, []
        for group in np.split(prompts, args.prompts // batch):
            plain, t_g = _timed(lambda: greedy(params, group, rng=jax.random.key(0)), args.reps)
            (out, stats), t_s = _timed(lambda: speculative(params, group), args.reps)
            same &= bool(np.array_equal(plain, out))
            distinct += [len(set(row)) for row in np.asarray(out).tolist()]
            accepted += int(stats.accepted_B.sum())
            drafted += int(stats.drafted_B.sum())
            passes += int(stats.steps) + 1
            t_greedy += t_g
            t_spec += t_s
        groups = args.prompts // batch
        print(f"| {batch} | {accepted / max(drafted, 1):.1%} ({accepted}/{drafted}) | "
              f"{args.new * groups / passes:.2f} | {1e3 * t_greedy / groups:.1f} | {1e3 * t_spec / groups:.1f} | "
              f"{t_greedy / t_spec:.2f}x | {'yes' if same else 'NO'} | {np.mean(distinct):.1f} of {args.new} |")
    print(along_text(params, model_cfg=cfg.model, tokens=val, seq_len=cfg.train.seq_len, windows=args.windows))


def along_text(params, model_cfg, tokens, seq_len: int, windows: int) -> str:
    """The drafts' acceptance on validation text, teacher-forced (see the module docstring)."""
    source = WindowSource(tokens, seq_len)
    index = np.linspace(0, len(source) - 1, min(windows, len(source))).astype(int)
    forward = jax.jit(lambda p, x: model.forward_mtp(p, x, model_cfg))
    hits = trials = 0
    for chunk in np.array_split(index, max(len(index) // 8, 1)):
        x_BS = np.stack([source[i][:-1] for i in chunk])
        logits, _, ahead = forward(params, x_BS)
        choice_BS = np.asarray(logits.argmax(-1))
        guess_BS = np.asarray(ahead[0].argmax(-1))  # at i: the token after i + 1, reading token i + 1
        on_text = choice_BS[:, :-1] == x_BS[:, 1:]  # the model's token after i is the text's
        hits += int((on_text & (guess_BS == choice_BS[:, 1:])).sum())
        trials += int(on_text.sum())
    return (f"along validation text ({len(index)} windows of {seq_len}): the draft is the model's own choice at "
            f"{hits / max(trials, 1):.1%} of the {trials:,} positions where the model's greedy token is the text's")


if __name__ == "__main__":
    main()
