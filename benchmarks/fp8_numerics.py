"""FP8 training numerics: the relative loss error of ``model.fp8`` (DeepSeek-V3's FP8 GEMMs)
against the same run without it, paired by seed, over the whole of training. DeepSeek-V3's
report keeps it under 0.25%. Each run is an ordinary ``train`` run in its own workdir (an
existing finished one is read, not retrained); the same seed gives both runs the same
initialisation and batches, so the difference is the arithmetic's. CPU-sized:

    python benchmarks/fp8_numerics.py --config tiny --seeds 0,1,2 --workdir runs/fp8_numerics \\
        --json docs/benchmarks/fp8_numerics_tiny.json

Prints, per logged step, the mean relative error of the training cross-entropy (fp8 - base) /
base over seeds and its largest absolute value, and the final validation loss's relative
error per seed with its 95% t-interval.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import dsmoe_jax
from dsmoe_jax.experiments.stats import paired
from dsmoe_jax.train.loop import train


def _run(config: str, overrides: list[str], seed: int, fp8: bool, workdir: pathlib.Path) -> list[dict]:
    """The metrics of one run, trained unless its workdir already holds the finished run."""
    directory = workdir / f"{'fp8' if fp8 else 'base'}-seed{seed}"
    cfg = dsmoe_jax.load_config(config, [*overrides, f"train.seed={seed}", f"model.fp8={str(fp8).lower()}"])
    metrics = directory / "metrics.jsonl"
    done = metrics.is_file() and any(json.loads(line)["step"] == cfg.train.steps and "val_loss" in line
                                     for line in metrics.read_text().splitlines())
    if not done:
        train(cfg, directory, resume=(directory / "checkpoints").is_dir())
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def _final_val(records: list[dict]) -> float:
    val = _series(records, "val_loss")
    return val[max(val)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for train")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="runs/fp8_numerics")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = pathlib.Path(args.workdir) / args.config
    runs = {(s, fp8): _run(args.config, args.set, s, fp8, workdir) for s in seeds for fp8 in (False, True)}

    relative = {}  # step -> per-seed relative error of the training cross-entropy
    for s in seeds:
        base, quantised = _series(runs[s, False], "ce"), _series(runs[s, True], "ce")
        for step in sorted(set(base) & set(quantised)):
            relative.setdefault(step, []).append((quantised[step] - base[step]) / base[step])
    curve = [{"step": step, "mean": float(np.mean(v)), "max_abs": float(np.max(np.abs(v)))}
             for step, v in sorted(relative.items()) if len(v) == len(seeds)]
    val = {s: (_final_val(runs[s, False]), _final_val(runs[s, True])) for s in seeds}
    final = [(val[s][1] - val[s][0]) / val[s][0] for s in seeds]
    summary = paired(final)
    out = {"config": args.config, "overrides": args.set, "seeds": seeds,
           "val_loss": {str(s): {"base": val[s][0], "fp8": val[s][1]} for s in seeds},
           "final_val_relative_error": {"per_seed": final, "mean": summary.mean, "ci95": summary.ci95},
           "train_ce_relative_error": curve,
           "train_ce_max_abs_relative_error": max(p["max_abs"] for p in curve)}
    for point in curve:
        print(f"step {point['step']:5d}  relative error {100 * point['mean']:+.3f}% (largest seed "
              f"{100 * point['max_abs']:.3f}%)")
    ci = "" if summary.ci95 is None else f" [{100 * summary.ci95[0]:+.3f}%, {100 * summary.ci95[1]:+.3f}%]"
    print(f"final validation loss, fp8 - base relative: {', '.join(f'{100 * f:+.3f}%' for f in final)}; "
          f"mean {100 * summary.mean:+.3f}%{ci}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
