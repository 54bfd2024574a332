"""Running an experiment: train each arm and seed once (resumably), evaluate, measure, report.

A workdir (default ``runs/experiments/<scale>``) holds every trained arm under
``runs/<arm>/seed<k>/`` (a normal training workdir, plus ``final.json`` once the arm is trained
and evaluated) and each experiment's outputs under ``<experiment>/``: ``results.json``,
``results.md`` and the plots. Arms are shared: an arm finished for one experiment is reused by
every other that compares it. An interrupted experiment continues with ``resume``: finished arms
are kept, an unfinished arm resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import resource
import subprocess
import time
from collections.abc import Sequence

import jax
import numpy as np
import scipy.stats

from dsmoe_jax import data
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.checkpoint import CHECKPOINTS_DIR, read_config
from dsmoe_jax.config import Config, ConfigError
from dsmoe_jax.errors import ExperimentError  # noqa: F401 - raised here, and importable from here
from dsmoe_jax.evaluation import evaluate
from dsmoe_jax.experiments import measures, report
from dsmoe_jax.experiments.specs import (
    ARMS,
    EXPERIMENTS,
    SCALES,
    SENSITIVITY_ARMS,
    VARIANTS,
    Arm,
    Scale,
    Variant,
    arm_config,
    overrides_dict,
    variant,
)
from dsmoe_jax.loading import load_model, validation_tokens
from dsmoe_jax.model import count_params
from dsmoe_jax.tokenizer import train_bpe
from dsmoe_jax.train.loop import train

FINAL = "final.json"
RESULTS = "results.json"
WALLS = "wall_s.json"  # seconds of each invocation that trained the arm


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One trained and evaluated arm and seed: what ``final.json`` holds."""

    val_loss: float
    val_loss_stderr: float  # over the validation windows
    eval_tokens: int
    train_tokens: int
    steps: int
    wall_s: float  # every invocation that trained the arm, summed
    invocations: int = 1
    resumed: bool = False
    # each validation window's loss: the same windows for every arm of a seed (runs recorded
    # before the windows were: empty)
    val_window_losses: tuple[float, ...] = ()
    # (training tokens seen, validation loss) at each validation during training, on the scale's
    # curve_tokens: the same windows for every arm (runs trained before curves were: empty)
    val_curve: tuple[tuple[int, float], ...] = ()

    @classmethod
    def read(cls, path: pathlib.Path) -> RunRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        record = {k: v for k, v in json.loads(path.read_text()).items() if k in fields}
        return cls(**{**record, "val_window_losses": tuple(record.get("val_window_losses", ())),
                      "val_curve": tuple((int(t), float(v)) for t, v in record.get("val_curve", ()))})

    def write(self, path: pathlib.Path) -> None:
        with atomic_file(path) as f:
            json.dump({**dataclasses.asdict(self), "val_window_losses": list(self.val_window_losses),
                       "val_curve": [list(p) for p in self.val_curve]}, f, indent=2)


def validation_curve(directory: pathlib.Path, scale: Scale) -> tuple[tuple[int, float], ...]:
    """(tokens seen, val_loss) at every validation a training run logged in ``metrics.jsonl``;
    empty for a run that validated on other windows than the scale's ``curve_tokens`` (one trained
    before curves were), whose losses would not pair with other runs'."""
    path = directory / "metrics.jsonl"
    if not path.is_file() or read_config(directory).train.eval_tokens != scale.curve_tokens:
        return ()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    per_step = scale.batch_size * scale.seq_len
    return tuple((r["step"] * per_step, r["val_loss"]) for r in rows if "val_loss" in r)


def default_workdir(scale: str) -> pathlib.Path:
    return pathlib.Path("runs") / "experiments" / scale


def run_dir(root: pathlib.Path, arm: Arm, seed: int) -> pathlib.Path:
    return root / "runs" / arm.name / f"seed{seed}"


def _comparable(cfg: Config) -> dict:
    """What must agree for a saved run to count as this arm: what shapes its weights (training
    keeps them in float32), not how often it was evaluated or logged."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype="float32"),
                              train=dataclasses.replace(cfg.train, eval_every=1, eval_tokens=0, log_every=1))
    return {k: v for k, v in cfg.to_dict().items() if k in ("model", "moe", "train", "data")}


def train_arm(arm: Arm, scale: Scale, seed: int, directory: pathlib.Path, resume: bool = False,
              progress: bool = True) -> RunRecord:
    """Train and evaluate one arm (or return the record of a finished one): ``final.json``."""
    cfg = arm_config(arm, scale, seed)
    final = directory / FINAL
    if (directory / "config.json").is_file() and _comparable(read_config(directory)) != _comparable(cfg):
        raise ExperimentError(f"{directory} holds a run of another config than arm {arm.name!r} at scale "
                              f"{scale.name!r}, seed {seed}; choose a new --workdir")
    if final.is_file():
        record = RunRecord.read(final)
        return record if record.val_curve else dataclasses.replace(record, val_curve=validation_curve(directory, scale))
    checkpoints = directory / CHECKPOINTS_DIR
    started = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if started and not resume:
        raise ExperimentError(f"{directory} holds an unfinished run of arm {arm.name!r}; pass --resume to continue it")
    # Wall time of every invocation that trained this arm (an interrupted arm resumes in another).
    walls_file = directory / WALLS
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else []
    tick = time.perf_counter()
    try:
        train(cfg, directory, resume=started, progress=progress)
    finally:
        walls.append(time.perf_counter() - tick)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(walls_file) as f:
            json.dump(walls, f)
    params = load_model(directory).params
    val_tokens = validation_tokens(cfg)
    result = evaluate(params, cfg, val_tokens, max_tokens=scale.eval_tokens)
    record = RunRecord(result.loss, result.stderr, result.tokens, scale.tokens, scale.steps, sum(walls), len(walls),
                       started, tuple(result.window_losses), validation_curve(directory, scale))
    record.write(final)
    return record


def _arm_summary(arm: Arm, scale: Scale, records: list[RunRecord], paper: float | None) -> dict:
    total, activated = count_params(arm_config(arm, scale, 0))
    losses = [r.val_loss for r in records]
    return {
        "label": arm.label, "structure": arm.structure(), "overrides": overrides_dict(arm, scale),
        "params_total": total, "params_activated": activated,
        "val_loss": losses, "val_loss_stderr": [r.val_loss_stderr for r in records],
        "val_loss_mean": float(np.mean(losses)),
        "val_loss_seed_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
        "eval_tokens": records[0].eval_tokens, "wall_s": [r.wall_s for r in records],
        "resumed": [r.resumed for r in records],
        "val_curve": _mean_curve(records),
        "paper_val_loss": paper,
    }


def _mean_curve(records: list[RunRecord]) -> dict:
    """Validation loss against tokens seen, mean over the seeds, at the points every seed logged."""
    curves = [dict(r.val_curve) for r in records]
    tokens = sorted(set.intersection(*map(set, curves))) if curves else []
    return {"tokens": tokens, "mean": [float(np.mean([c[t] for c in curves])) for t in tokens]}


def compare(name_a: str, records_a: list[RunRecord], name_b: str, records_b: list[RunRecord],
            seeds: Sequence[int]) -> dict:
    """Arm A against arm B, paired by seed (a seed gives both the same batches and the same
    validation windows): the per-seed differences of validation loss (A - B), their mean,
    standard deviation and 95% t-interval over seeds, and per seed the paired standard error
    over the shared windows (None for runs recorded before their window losses were)."""
    diffs = [a.val_loss - b.val_loss for a, b in zip(records_a, records_b)]
    mean, sd, ci = paired(diffs)
    window_se = []
    for a, b in zip(records_a, records_b):
        wa, wb = np.asarray(a.val_window_losses), np.asarray(b.val_window_losses)
        same_windows = len(wa) > 1 and len(wa) == len(wb)
        window_se.append(float((wa - wb).std(ddof=1) / np.sqrt(len(wa))) if same_windows else None)
    return {"a": name_a, "b": name_b, "seeds": list(seeds), "per_seed": diffs, "mean": mean, "seed_std": sd,
            "ci95": ci, "window_se": window_se, "curve": gap_curve(records_a, records_b)}


def gap_curve(records_a: list[RunRecord], records_b: list[RunRecord]) -> dict:
    """A - B against training tokens seen, paired by seed at each validation: ``{"tokens", "mean",
    "ci95", "seeds"}`` lists, where ``seeds`` counts the pairs that logged that point (a run trained
    before curves were logs none) and a 95% interval is None where fewer than two did."""
    curves = [(dict(a.val_curve), dict(b.val_curve)) for a, b in zip(records_a, records_b)]
    tokens = sorted({t for a, b in curves for t in set(a) & set(b)})
    diffs = [[a[t] - b[t] for a, b in curves if t in a and t in b] for t in tokens]
    points = [paired(d) for d in diffs]
    return {"tokens": tokens, "mean": [p[0] for p in points], "ci95": [p[2] for p in points],
            "seeds": [len(d) for d in diffs]}


def paired(diffs: Sequence[float]) -> tuple[float, float | None, list[float] | None]:
    """Per-seed differences: their mean, standard deviation and 95% t-interval (None for one)."""
    d = np.asarray(diffs, float)
    if len(d) < 2:
        return float(d.mean()), None, None
    sd = float(d.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d)))
    return float(d.mean()), sd, [float(d.mean()) - half, float(d.mean()) + half]


def run_sensitivity(scale: str = "cpu", seeds: Sequence[int] = (0, 1, 2), variants: Sequence[str] | None = None,
                    workdir: str | pathlib.Path | None = None, resume: bool = False, progress: bool = True,
                    arms: Sequence[str] = SENSITIVITY_ARMS) -> dict:
    """GShard against DeepSeekMoE under one change of the setting at a time (``specs.VARIANTS``,
    default all): every variant's arms for every seed (``arms``: GShard, DeepSeekMoE and any other
    of ``specs.ARMS`` to train beside them), the pair compared by seed (``compare``: DeepSeekMoE -
    GShard). Writes ``sensitivity/results.json``, ``results.md`` and ``gap_vs_tokens.png``."""
    _check_scale_and_seeds(scale, seeds)
    _check_arms(arms)
    chosen = {v.name: v for v in map(variant, variants or VARIANTS)}  # names an unknown or conflicting one
    root = pathlib.Path(workdir) if workdir is not None else default_workdir(scale)
    for v in chosen.values():
        changed = dataclasses.replace(SCALES[scale], **v.scale)
        if changed.tokens != SCALES[scale].tokens:
            raise ExperimentError(f"variant {v.name} trains on {changed.tokens:,} tokens at scale {scale}, not the "
                                  f"scale's {SCALES[scale].tokens:,}: it was written for another scale's budget, and "
                                  "the comparison with the other variants would not be at equal tokens")
    tick = time.perf_counter()
    rows = {}
    # seed by seed, both arms: a run stopped part-way has complete pairs to resume from
    runs = [(v, a, s) for v in chosen for s in seeds for a in arms]
    records: dict[tuple[str, str], list[RunRecord]] = {}
    for i, (v, a, s) in enumerate(runs, 1):
        arm, sc = chosen[v].apply(ARMS[a], SCALES[scale], variant_tokenizer(chosen[v], root))
        if progress:
            print(f"[{i}/{len(runs)}] {v}: {arm.name} ({arm.structure()}), seed {s}", flush=True)
        records.setdefault((v, a), []).append(train_arm(arm, sc, s, run_dir(root, arm, s), resume, progress))
    for v in chosen.values():
        gshard, deepseek = records[(v.name, "gshard")], records[(v.name, "deepseekmoe")]
        rows[v.name] = {"reason": v.reason, "scale": v.scale, "overrides": list(v.overrides),
                        "vocab_size": v.vocab_size,
                        "tokens_per_arm": deepseek[0].train_tokens,
                        "val_loss": {a: [r.val_loss for r in records[(v.name, a)]] for a in arms},
                        "wall_s": sum(r.wall_s for a in arms for r in records[(v.name, a)]),
                        "deepseekmoe_minus_gshard": compare("deepseekmoe", deepseek, "gshard", gshard, seeds),
                        "others_minus_gshard": {a: compare(a, records[(v.name, a)], "gshard", gshard, seeds)
                                                for a in arms if a not in SENSITIVITY_ARMS}}
    results = {"experiment": "sensitivity", "scale": scale, "seeds": list(seeds), "variants": rows,
               "wall_s": time.perf_counter() - tick, "environment": _environment()}
    out = root / "sensitivity"
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = report.gap_curves(results, out)
    return _write(out, results, report.sensitivity_markdown(results), progress)


def _check_arms(arms: Sequence[str]) -> None:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if not set(SENSITIVITY_ARMS) <= set(arms) or len(set(arms)) < len(arms):
        raise ConfigError(f"arms {', '.join(arms)}: name {' and '.join(SENSITIVITY_ARMS)} (the pair compared), "
                          "each once, plus any other arm to train beside them")


def _check_scale_and_seeds(scale: str, seeds: Sequence[int]) -> None:
    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if not seeds:
        raise ExperimentError("give at least one seed")


def variant_tokenizer(v: Variant, root: pathlib.Path) -> str | None:
    """The path of a variant's BPE ``tokenizer.json`` under ``root/tokenizers/``, trained on the
    embedded corpus's training split (never its held-out documents) the first time it is asked
    for; None for the byte tokenizer."""
    if not v.vocab_size:
        return None
    out = root / "tokenizers" / f"bpe-{v.vocab_size}"
    if not (out / "tokenizer.json").is_file():
        train_bpe([text for _, text in data.split_documents(data.embedded_documents())[0]], v.vocab_size, out)
    return str(out / "tokenizer.json")


def run_probes(scale: str = "cpu", seeds: Sequence[int] = (0, 1, 2), variants: Sequence[str] | None = None,
               workdir: str | pathlib.Path | None = None, progress: bool = True,
               arms: Sequence[str] = SENSITIVITY_ARMS) -> dict:
    """Evaluation-only probes (``measures.probe_arm``) of the sensitivity experiment's trained
    arms (variants: default ``base``; ``arms``: GShard, DeepSeekMoE and any other it trained):
    validation loss on code and on documentation, DeepSeekMoE - GShard paired by seed, and every
    arm's expert load and routing by token id. Trains nothing; an arm not trained yet is named
    with the command that trains it. Writes ``probes/results.json`` and ``results.md``."""
    _check_scale_and_seeds(scale, seeds)
    _check_arms(arms)
    root = pathlib.Path(workdir) if workdir is not None else default_workdir(scale)
    rows = {}
    for v in map(variant, variants or ["base"]):
        probed: dict[str, list[dict]] = {}
        for a in arms:
            arm, sc = v.apply(ARMS[a], SCALES[scale], variant_tokenizer(v, root))
            for s in seeds:
                directory = run_dir(root, arm, s)
                if not (directory / FINAL).is_file():
                    raise ExperimentError(f"{directory} holds no trained arm; train it first: dsmoe-jax experiment "
                                          f"sensitivity --scale {scale} --variants {v.name} --seeds "
                                          f"{','.join(map(str, seeds))} --arms {','.join(arms)}")
                if progress:
                    print(f"probing {arm.name}, seed {s}", flush=True)
                params, cfg, _ = load_model(directory)
                probed.setdefault(a, []).append(measures.probe_arm(params, cfg, sc))
        gaps = {}
        for kind in probed["gshard"][0]["loss"]:
            diffs = [d["loss"][kind] - g["loss"][kind] for d, g in zip(probed["deepseekmoe"], probed["gshard"])]
            mean, sd, ci = paired(diffs)
            gaps[kind] = {"per_seed": diffs, "mean": mean, "seed_std": sd, "ci95": ci}
        rows[v.name] = {"arms": probed, "deepseekmoe_minus_gshard": gaps}
    results = {"experiment": "probes", "scale": scale, "seeds": list(seeds), "variants": rows,
               "environment": _environment()}
    return _write(root / "probes", results, report.probes_markdown(results), progress)


def _write(out: pathlib.Path, results: dict, table: str, progress: bool) -> dict:
    """``results.json`` and ``results.md`` in ``out``, each written whole; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / RESULTS) as f:
        json.dump(results, f, indent=2)
    with atomic_file(out / "results.md") as f:
        f.write(table)
    if progress:
        print(table)
    return results


def _git_commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=pathlib.Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


_COMMIT = _git_commit()  # when this process imported the code it runs, not when a long run ends


def _environment() -> dict:
    """What produced the results: the commit (when run from a git checkout), versions, peak memory."""
    return {"commit": _COMMIT, "jax": jax.__version__, "python": platform.python_version(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB


def describe_arms(name: str, scale: str) -> list[dict]:
    """Each arm's overrides and parameter counts, without training (``--dry-run``)."""
    experiment, sc = _lookup(name, scale)
    rows = []
    for arm_name in experiment.arms:
        arm, cfg = ARMS[arm_name], arm_config(ARMS[arm_name], sc, 0)
        total, activated = count_params(cfg)
        rows.append({"arm": arm_name, "structure": arm.structure(), "overrides": overrides_dict(arm, sc),
                     "params_total": total, "params_activated": activated, "config": cfg})
    return rows


def _lookup(name: str, scale: str):
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if scale not in SCALES:
        raise ExperimentError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return EXPERIMENTS[name], SCALES[scale]


def run_experiment(name: str, scale: str = "cpu", seeds: Sequence[int] = (0, 1, 2),
                   workdir: str | pathlib.Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train every arm of experiment ``name`` for every seed, evaluate them on the same held-out
    tokens, run the experiment's measurements, and write ``results.json``, ``results.md`` and
    the plots; returns the results."""
    experiment, sc = _lookup(name, scale)
    if not seeds:
        raise ExperimentError("give at least one seed")
    root = pathlib.Path(workdir) if workdir is not None else default_workdir(scale)
    out = root / name
    tick = time.perf_counter()
    records: dict[str, list[RunRecord]] = {}
    runs = [(ARMS[a], s) for a in experiment.arms for s in seeds]
    for i, (arm, seed) in enumerate(runs, 1):
        if progress:
            print(f"[{i}/{len(runs)}] {arm.name} ({arm.structure()}), seed {seed}", flush=True)
        records.setdefault(arm.name, []).append(train_arm(arm, sc, seed, run_dir(root, arm, seed), resume, progress))
    results = {
        "experiment": name, "title": experiment.title, "scale": scale, "seeds": list(seeds),
        "scale_config": dataclasses.asdict(sc), "tokens_per_arm": sc.tokens,
        "arms": {a: _arm_summary(ARMS[a], sc, records[a], experiment.paper.get(a)) for a in experiment.arms},
        "comparisons": [compare(a, records[a], b, records[b], seeds)
                        for i, a in enumerate(experiment.arms) for b in experiment.arms[i + 1:]],
    }
    if experiment.measure == "specialisation":
        results["specialisation"] = measures.specialisation(root, sc, seeds, run_dir)
    elif experiment.measure == "balance":
        results["balance"] = measures.balance(root, [ARMS[a] for a in experiment.arms], sc, seeds, run_dir)
    results["wall_s"] = time.perf_counter() - tick
    results["environment"] = _environment()
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = report.plots(results, out, {a: run_dir(root, ARMS[a], seeds[0]) for a in experiment.arms})
    return _write(out, results, report.markdown(results), progress)
