"""One arm at one seed: trained once (resumably), evaluated on the scale's held-out windows, its
``final.json`` written with the provenance of every invocation that trained it. Every study's
runs, and the fine-tuning study's pretrained bases, are made here.

A workdir (default ``runs/experiments/<scale>``) holds each run under
``runs/<arm>[@<variant>]/seed<k>/``: a training workdir, plus ``final.json`` once the run is
trained and evaluated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.checkpoint import CHECKPOINTS_DIR, read_config
from dsmoe_jax.config import Config
from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.evaluation import evaluate
from dsmoe_jax.experiments import measures
from dsmoe_jax.experiments.records import Provenance, RunResult, decode
from dsmoe_jax.experiments.specs import Arm, Scale, arm_config
from dsmoe_jax.loading import load_model, validation_tokens
from dsmoe_jax.train.loop import train

FINAL = "final.json"
INVOCATIONS = "invocations.json"  # the provenance of each invocation that trained a run, kept until it is final


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
              progress: bool = True) -> RunResult:
    """Train and evaluate one arm at one seed (or read the result of a finished one): ``final.json``."""
    cfg = arm_config(arm, scale, seed)
    final = directory / FINAL
    if (directory / "config.json").is_file() and _comparable(read_config(directory)) != _comparable(cfg):
        raise ExperimentError(f"{directory} holds a run of another config than arm {arm.name!r} at scale "
                              f"{scale.name!r}, seed {seed}; choose a new --workdir")
    if final.is_file():
        return RunResult.read(final)
    outcome, trained, started = train_recorded(cfg, directory, resume, progress, f"run of arm {arm.name!r}")
    per_step = scale.batch_size * scale.seq_len
    params = load_model(directory).params
    result = evaluate(params, cfg, validation_tokens(cfg), max_tokens=scale.eval_tokens)
    record = RunResult(
        result.loss, result.stderr, result.tokens, scale.tokens, scale.steps, sum(p.wall_s for p in trained),
        len(trained), started, result.window_losses, measures.window_documents(cfg, scale.eval_tokens),
        tuple((step * per_step, loss) for step, loss in outcome.val_curve) if outcome else (),
        outcome.train_curve if outcome else (), trained)
    record.write(final)
    return record


def train_recorded(cfg: Config, directory: pathlib.Path, resume: bool, progress: bool, what: str):
    """``train(cfg, directory)``, continuing a started run only with ``resume`` (``what`` names
    it in the refusal), its invocation's provenance added to ``invocations.json``; returns the
    ``TrainResult``, the provenance of every invocation so far and whether it resumed."""
    checkpoints = directory / CHECKPOINTS_DIR
    started = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if started and not resume:
        raise ExperimentError(f"{directory} holds an unfinished {what}; pass --resume to continue it")
    invocations = directory / INVOCATIONS
    trained = decode(tuple[Provenance, ...], json.loads(invocations.read_text())) if invocations.is_file() else ()
    tick = time.perf_counter()
    record = lambda: _write_invocations(invocations, trained + (Provenance.now(started, time.perf_counter() - tick),))
    try:
        outcome = train(cfg, directory, resume=started, progress=progress)
    except BaseException:
        # an interrupted invocation is recorded too (its time counts, the next one resumes it),
        # unless the workdir takes no writes: then the error in flight is the one that says so
        with contextlib.suppress(OSError):
            record()
        raise
    return outcome, record(), started


def _write_invocations(path: pathlib.Path, trained: tuple[Provenance, ...]) -> tuple[Provenance, ...]:
    if path.parent.is_dir():
        with atomic_file(path) as f:
            json.dump([dataclasses.asdict(t) for t in trained], f, indent=2)
    return trained
