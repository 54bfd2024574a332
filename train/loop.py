"""The training loop behind ``dsmoe-jax train``: data, state, steps, logs, evaluation, checkpoints.

    dsmoe-jax train --config tiny --set train.steps=50 --workdir runs/tiny
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsmoe_jax import data, errors
from dsmoe_jax import mesh as mesh_lib
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.checkpoint import CHECKPOINTS_DIR, check_workdir_writable, write_config
from dsmoe_jax.config import Config, parse_trainable
from dsmoe_jax.costs import count_params, flops_per_token
from dsmoe_jax.evaluation import evaluate, jitted_eval_step, perplexity
from dsmoe_jax.lock import output_lock
from dsmoe_jax.model import param_shapes
from dsmoe_jax.packing import PackedRows
from dsmoe_jax.peft import lora
from dsmoe_jax.peft.adapter import ADAPTER_DIR, save_esft
from dsmoe_jax.peft.esft import ExpertConfig
from dsmoe_jax.peft.tuning import count, make_tuning, model_params
from dsmoe_jax.plan import device_peak_flops
from dsmoe_jax.train.checkpoint import Checkpointer, nothing_to_resume
from dsmoe_jax.train.init_from import check_init_from, init_from_state
from dsmoe_jax.train.optimizer import learning_rate, make_optimizer
from dsmoe_jax.train.step import StepMetrics, init_sharded_state, make_train_step, state_shardings

# these were importable from here; errors.py holds them (until 0.4 they resolve here too)
__getattr__ = errors.moved_errors(__name__, "DataError", "TrainingError", "TrainingInterrupted")


class _StepWatchdog:
    """In a multi-process run a stopped peer (``kill -STOP``, a hung host) leaves every other
    process waiting inside a collective until JAX's own coordination timeout aborts it, without a
    word on where to resume. Armed for a step, this fires after ``seconds`` unless disarmed: the
    process says so, with the checkpoint to resume from (``message(step)``), and exits with
    ``TrainingError``'s exit code."""

    def __init__(self, seconds: float, message):
        self.seconds, self.message = seconds, message
        self._timer: threading.Timer | None = None

    def arm(self, step: int) -> None:
        self.disarm()
        if self.seconds:
            self._timer = threading.Timer(self.seconds, self._expire, (step,))
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, step: int) -> None:
        sys.stderr.write(f"\ndsmoe-jax: {self.message(step)}\n")
        sys.stderr.flush()
        os._exit(errors.TrainingError.exit_code)


class _StopSignals:
    """The first SIGINT (Ctrl-C) or SIGTERM (what schedulers such as SLURM send before killing a
    job) asks the loop to finish its step, write a checkpoint and stop. A second one stops the
    process at once, without that checkpoint, with one line and exit code 128 + the signal: not
    by raising KeyboardInterrupt, which lands wherever Python happens to be (a weakref callback,
    a finaliser) and prints tracebacks there. Like kill -9, it leaves the newest complete
    checkpoint to resume from. Signals reach only the main thread, so elsewhere (train() called
    from a thread) this does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            sys.stderr.write(f"\ndsmoe-jax: {signal.Signals(signum).name} again: stopped at once, without a checkpoint "
                             "of this step; --resume continues from the newest checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                   "(Ctrl-C again to stop at once, without one)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def requested(self) -> int:
        """The signal that asked to stop (0: none), agreed by every process: all of them must
        stop at the same step, since checkpointing is collective."""
        signum = self.signum or 0
        if jax.process_count() > 1:
            signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
        return signum


def _load_image(load_LE: np.ndarray, pixels: int = 12) -> np.ndarray:
    """Expert load heat map, HWC uint8: rows are MoE layers, columns experts; blue = idle,
    white = the mean load, red = twice the mean or more."""
    rel = np.clip(load_LE / np.maximum(load_LE.mean(-1, keepdims=True), 1e-9) / 2, 0, 1)
    rgb = np.stack([np.minimum(2 * rel, 1), 1 - 2 * np.abs(rel - 0.5), np.minimum(2 - 2 * rel, 1)], -1)
    return np.kron((255 * rgb).astype(np.uint8), np.ones((pixels, pixels, 1), np.uint8))


class _Logger:
    """metrics.jsonl (one object per logged step) and TensorBoard event files, written by
    process 0 only. A run that starts at step ``start`` (0: a fresh run) first drops what an
    earlier run logged after it: the lines of later steps from metrics.jsonl, and TensorBoard's
    later events through its ``purge_step``. So no step is ever logged twice."""

    def __init__(self, workdir: pathlib.Path, start: int):
        from tensorboardX import SummaryWriter

        self.enabled = jax.process_index() == 0
        self.history: list[dict] = []  # every step logged in this workdir up to now, earlier runs' included
        if self.enabled:
            path = workdir / "metrics.jsonl"
            if path.is_file():
                lines = path.read_text().splitlines(keepends=True)
                kept = [line for line in lines if _logged_step(line) <= start]
                if len(kept) < len(lines):
                    tqdm.write(f"{path}: dropped {len(lines) - len(kept)} lines logged after step {start} by an "
                               "earlier run" + ("" if start else " without a checkpoint"))
                    with atomic_file(path) as f:
                        f.writelines(kept)
                self.history = [json.loads(line) for line in kept]
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, metrics: dict, load_LE: np.ndarray | None = None,
            histograms: dict[str, np.ndarray] | None = None) -> None:
        """One step's scalars (both files), expert load image and histograms of counts (TensorBoard)."""
        if not self.enabled:
            return
        self.history.append({"step": step, **metrics})
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if load_LE is not None and load_LE.size:
            self.tb.add_image("expert_load", _load_image(load_LE), step, dataformats="HWC")
        for tag, counts in (histograms or {}).items():
            self.tb.add_histogram_raw(tag, **_count_histogram(counts), global_step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()


def _count_histogram(counts: np.ndarray) -> dict:
    """TensorBoard's raw histogram of ``counts[k]`` observations of the value k: one bucket per
    value, its right edge halfway to the next."""
    values = np.arange(len(counts), dtype=np.float64)
    seen = values[counts > 0]
    low, high = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 0.0)
    return {"min": low, "max": high, "num": float(counts.sum()),
            "sum": float(counts @ values), "sum_squares": float(counts @ values**2),
            "bucket_limits": (values + 0.5).tolist(), "bucket_counts": counts.astype(np.float64).tolist()}


def _experts_histograms(m: StepMetrics, cfg: Config) -> dict[str, np.ndarray]:
    """Top-p routing's distribution of routed experts per token, per MoE layer: tokens taking
    0..K experts (top-k routing: always K, nothing to show)."""
    if cfg.model.moe is None or cfg.model.moe.routing != "top_p":
        return {}
    return {f"experts_per_token/moe_layer_{layer}": counts
            for layer, counts in enumerate(np.asarray(m.aux.active_histogram))}


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash mid-write
        return float("inf")


def _step_metrics(m: StepMetrics, lr: float, tokens_per_s: float, cfg: Config) -> dict:
    out = {"loss": float(m.loss), "ce": float(m.ce), "lr": lr, "tokens_per_s": tokens_per_s,
           "grad_norm": float(m.grad_norm), "balance_loss": float(m.aux.balance_loss),
           "expert_balance_loss": float(m.aux.expert_balance_loss),
           "device_balance_loss": float(m.aux.device_balance_loss)}
    model_flops = 3 * flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_s
    out["model_tflops_per_s"] = model_flops / 1e12
    peak = device_peak_flops()
    if peak:
        out["mfu"] = model_flops / (peak * jax.device_count())
    for depth, ce in enumerate(np.asarray(m.mtp_ce), 1):
        out[f"mtp_ce/depth_{depth}"] = float(ce)
    load = np.asarray(m.aux.expert_load)
    for layer, (row, gates) in enumerate(zip(load, np.asarray(m.aux.gate_sum))):
        out[f"load_max_over_mean/moe_layer_{layer}"] = float(row.max() / max(row.mean(), 1e-9))
        out[f"gate_sum/moe_layer_{layer}"] = float(gates)
    if cfg.model.moe is not None and cfg.model.moe.routing == "top_p":  # top-k routing: always K
        out["dynamic_loss"] = float(m.aux.dynamic_loss)
        for layer, active in enumerate(np.asarray(m.aux.active_experts)):
            out[f"active_experts/moe_layer_{layer}"] = float(active)
    if np.asarray(m.aux.drop_fraction).size:
        out["drop_fraction"] = float(np.mean(m.aux.drop_fraction))
    return out


def _validate(params, cfg: Config, training: data.TrainingData, eval_step) -> dict:
    """``val_loss`` (with its standard error and perplexity) on the held-out split of the training
    data: with a mixture, its sources' losses weighted as training draws them. Each named set
    (mixture sources, ``data.val``) is also logged on its own as ``val_loss/<name>``."""
    held_out = [(s, evaluate(params, cfg, s.held_out, eval_step=eval_step)) for s in training.sources]
    total = sum(s.weight for s in training.sources)
    loss = sum(s.weight / total * r.loss for s, r in held_out)
    stderr = sum((s.weight / total * r.stderr) ** 2 for s, r in held_out) ** 0.5
    named = {s.name: r for s, r in held_out if s.name is not None}
    named |= {name: evaluate(params, cfg, tokens, eval_step=eval_step) for name, tokens in training.val_sets.items()}
    out = {"val_loss": loss, "val_loss_stderr": stderr, "val_perplexity": perplexity(loss)}
    for name, r in named.items():
        out[f"val_loss/{name}"], out[f"val_loss_stderr/{name}"] = r.loss, r.stderr
    return out


def _steps_for_epochs(cfg: Config, rows) -> Config:
    """``cfg`` with ``train.steps`` set to ``train.epochs`` passes over the one training dataset,
    read as ``rows`` (``data.row_source``; whole batches: the last partial batch of the last epoch
    is left out)."""
    t = cfg.train
    if len(rows) > 1:
        raise errors.DataError("train.epochs counts passes over one finite dataset, but data.mix draws from "
                               f"{len(rows)} datasets without end; set train.steps (and train.epochs = 0), or train on "
                               "one dataset")
    per_epoch = rows[0].rows_per_epoch if isinstance(rows[0], PackedRows) else len(rows[0])
    steps = per_epoch * t.epochs // t.batch_size
    if steps < 1:
        raise errors.DataError(f"{t.epochs} epochs of {per_epoch} rows of train.seq_len + 1 tokens make no batch of "
                               f"train.batch_size = {t.batch_size}; lower train.batch_size or add data")
    if jax.process_index() == 0:
        tqdm.write(f"train.epochs = {t.epochs}: {per_epoch} rows of {t.seq_len + 1} tokens per epoch, batches of "
                   f"{t.batch_size}: {steps} steps (train.steps = {t.steps} is replaced)")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))


def _packing_metrics(training: data.TrainingData, rows) -> dict:
    """For packed training data (``rows``: each source's ``data.row_source``), the packing
    efficiency (real tokens / row tokens) of each source, logged at the start and with every
    step; empty for windows."""
    out = {}
    for s, source in zip(training.sources, rows):
        if isinstance(source, PackedRows):
            key = "packing_efficiency" + (f"/{s.name}" if s.name else "")
            out[key] = source.efficiency
            if jax.process_index() == 0:
                tqdm.write(f"{key}: {source.efficiency:.1%} ({len(source.lengths)} examples in "
                           f"{source.rows_per_epoch} rows of {source.capacity} tokens; {source.truncated} longer "
                           "than a row were cut)")
    return out


def _lora_start(cfg: Config, tuning, workdir: pathlib.Path) -> pathlib.Path | None:
    """Say what a LoRA run trains; the directory its adapter will be written to, None for a model
    without HF module names (the adapter then stays in the checkpoints)."""
    shapes = param_shapes(cfg)
    if jax.process_index() == 0:
        trained, total = count(tuning, shapes), count_params(cfg)[0]
        tqdm.write(f"train.lora: rank {cfg.train.lora.rank} adapters on {', '.join(cfg.train.lora.targets)}: "
                   f"{trained:,} trained parameters ({trained / total:.3%} of the model's {total:,}, all frozen)")
    try:
        lora.lora_modules(cfg.model, cfg.train.lora.targets)
    except errors.ConfigError as e:
        if jax.process_index() == 0:
            tqdm.write(f"train.lora: {e}; the adapter is kept in the checkpoints only (no {ADAPTER_DIR}/)")
        return None
    return workdir / ADAPTER_DIR


def _write_adapter(state, cfg: Config, out: pathlib.Path) -> None:
    """The run's adapter at ``out``, replacing one an earlier run of the workdir wrote: LoRA's in
    PEFT's format, ESFT's trained experts as DeepSeek ships adapters (``peft/adapter.py``); every
    process gathers what it holds, the first writes it."""
    gathered = lambda tree: jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)
    if state.adapter:
        adapter = gathered(state.adapter)
        write, what = lambda: lora.save_peft(out, adapter, cfg), "the LoRA adapter in PEFT's format"
    else:
        params = gathered(state.params)
        expert_cfg = ExpertConfig.read(parse_trainable(cfg.train.trainable)[1], cfg)
        write, what = lambda: save_esft(out, params, cfg, expert_cfg), "the ESFT adapter as DeepSeek ships them"
    if jax.process_index() == 0:
        shutil.rmtree(out, ignore_errors=True)  # the newer adapter replaces it
        write()
        tqdm.write(f"wrote {what}: {out}")


class TrainResult(NamedTuple):
    """What ``train`` returns: the last logged step (the last line of ``metrics.jsonl``) and the
    run's curves, from its first step (an earlier invocation's steps included when resumed)."""

    step: int
    loss: float
    val_loss: float | None  # None when that step was not an evaluation step
    metrics: dict  # every value logged at that step (per-layer load, ``val_loss/<name>``, ...)
    val_curve: tuple[tuple[int, float], ...] = ()  # (step, val_loss) at every validation
    train_curve: tuple[tuple[int, float], ...] = ()  # (step, training cross-entropy) at every logged step


def _result(history: list[dict]) -> TrainResult | None:
    """``TrainResult`` of the steps logged so far (None before any)."""
    if not history:
        return None
    last = history[-1]
    return TrainResult(last["step"], last["loss"], last.get("val_loss"), {k: v for k, v in last.items() if k != "step"},
                       tuple((r["step"], r["val_loss"]) for r in history if "val_loss" in r),
                       tuple((r["step"], r["ce"]) for r in history if "ce" in r))


def train(cfg: Config, workdir: str | pathlib.Path, resume: bool = False,
          progress: bool = True) -> TrainResult | None:
    """Train ``cfg`` in ``workdir``; returns the last logged step and the run's curves (a resumed
    run with no step left to take returns those logged before; None when there are none).

    Keeps float32 master weights whatever ``model.param_dtype`` says; ``model.dtype`` sets the
    compute dtype. With ``resume`` it continues from the latest complete checkpoint (saved on any
    mesh: it is read straight into this run's shardings); without, ``train.init_from`` starts it
    from existing parameters (``train/init_from.py``). The mesh comes from ``cfg.mesh`` over
    every device of every process (``jax.distributed`` must be initialised first for several);
    each process loads its own slice of every batch.
    """
    mesh = mesh_lib.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _train(cfg, workdir, resume, progress, mesh)


def _train(cfg: Config, workdir, resume: bool, progress: bool, mesh: jax.sharding.Mesh) -> TrainResult | None:
    if cfg.model.fp8_weights:
        raise errors.ConfigError("model.fp8_weights holds weights in FP8 for serving; training keeps float32 "
                                 "master weights: set model.fp8_weights = false (a checkpoint converted with "
                                 "--keep-fp8 trains after converting it again without)")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype="float32"))
    t = cfg.train
    workdir = pathlib.Path(workdir)
    mesh_lib.check_run(cfg, mesh)  # before anything is written
    if resume and not (workdir / CHECKPOINTS_DIR).is_dir():  # before anything is created there
        raise nothing_to_resume(workdir)
    source = check_init_from(cfg) if t.init_from and not resume else None  # before anything is written
    n_proc = jax.process_count()
    training = data.load_training_data(cfg)  # refuses data the model's tokenizer did not write
    # each source as training reads it, packed once here for the epoch count and the log
    rows = [data.row_source(s.tokens, t.seq_len, seed=t.seed, long_examples=cfg.data.long_examples)
            for s in training.sources]
    if t.epochs:
        cfg = _steps_for_epochs(cfg, rows)
        t = cfg.train
    dataset = data.mixture_batches([(s.tokens, s.weight) for s in training.sources], t.batch_size // n_proc,
                                   t.seq_len, seed=t.seed, process_index=jax.process_index(), process_count=n_proc,
                                   num_epochs=t.epochs or None, long_examples=cfg.data.long_examples)
    packing = _packing_metrics(training, rows)
    if jax.process_index() == 0:
        check_workdir_writable(workdir)
    # one run per workdir: a second one (a requeued job beside the running one) would replace its
    # checkpoints and cut its metrics; the first process holds the lock for all of them
    with output_lock(workdir, "a training run", enabled=jax.process_index() == 0):
        return _run(cfg, workdir, resume, progress, mesh, source, training, dataset, packing)


def _run(cfg: Config, workdir: pathlib.Path, resume: bool, progress: bool, mesh: jax.sharding.Mesh, source,
         training: data.TrainingData, dataset, packing: dict) -> TrainResult | None:
    """The run itself, in a checked and locked workdir: state, steps, logs, checkpoints."""
    t, n_proc = cfg.train, jax.process_count()
    ckpt = Checkpointer(workdir, cfg)
    start = ckpt.check_compatible(resume) or 0
    if start and t.init_from and jax.process_index() == 0:
        tqdm.write(f"--resume: continuing from this run's own checkpoints; train.init_from ({t.init_from}) is "
                   "ignored")
    if jax.process_index() == 0:
        write_config(workdir, cfg)
    iterator = iter(dataset)

    optimizer = make_optimizer(t)
    tuning = make_tuning(cfg)
    shardings = state_shardings(cfg, optimizer, mesh, tuning)
    peft_out = _lora_start(cfg, tuning, workdir) if shardings.adapter else None
    if parse_trainable(t.trainable)[0] == "esft":
        peft_out = workdir / ADAPTER_DIR
    if source is None:
        state = init_sharded_state(cfg, optimizer, jax.random.key(t.seed), shardings, tuning)
    else:
        state = init_from_state(source, cfg, optimizer, shardings, jax.random.key(t.seed), tuning)
        if jax.process_index() == 0:
            tqdm.write(f"train.init_from: starting from the parameters of {source.description} (step 0, a fresh "
                       "optimizer state)")
    if start:
        start, state = ckpt.restore_latest(state, iterator)
    schedule = learning_rate(t)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = jax.NamedSharding(mesh, jax.P())
    train_step = jax.jit(make_train_step(cfg, optimizer, tuning), in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, replicated))
    eval_step = jitted_eval_step(cfg, mesh=mesh)
    merged = jax.jit(functools.partial(model_params, tuning), out_shardings=shardings.params)
    # what validation runs: LoRA's adapter merged into the params
    evaluated = lambda state: merged(state.params, state.adapter) if state.adapter else state.params
    logger = _Logger(workdir, start)
    bar = tqdm(total=t.steps, initial=start, disable=not progress, dynamic_ncols=True, desc="train")
    last, last_step = {}, None
    tick, tokens_since = time.perf_counter(), 0
    watchdog = _StepWatchdog(t.step_timeout if n_proc > 1 else 0, lambda step: (
        f"process {jax.process_index()} of {n_proc}: step {step} has not finished after {t.step_timeout:g} s "
        "(train.step_timeout): another process has probably stopped (hung, or killed without the job ending). "
        f"Stop every process and rerun them all with --resume; the last complete checkpoint is step "
        f"{ckpt.manager.latest_step()}"))
    try:
        with _StopSignals() as stop:
            for step in range(start + 1, t.steps + 1):
                if step > start + 1:  # the first step of a run compiles: it may take any time
                    watchdog.arm(step)  # a peer that stops answering shows as a step that never ends
                batch = jax.tree.map(lambda rows: jax.make_array_from_process_local_data(batch_sharding, rows),
                                     next(iterator))
                try:
                    state, m = train_step(state, batch)
                    finite = bool(m.finite)
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                        raise errors.TrainingError(f"a batch of {t.batch_size} x {t.seq_len} tokens does not fit in "
                                                   "memory; lower train.batch_size or raise train.grad_accum") from e
                    if n_proc > 1:
                        raise errors.TrainingError(
                            f"step {step} failed in a collective with the other processes ({str(e).splitlines()[0]}): "
                            f"another process of this {n_proc}-process run has probably died. Restart all of them "
                            f"with --resume; the last complete checkpoint is step {ckpt.manager.latest_step()}") from e
                    raise
                tokens_since += jax.tree.leaves(batch)[0].shape[0] * t.seq_len
                if not finite and t.on_nan == "skip":
                    tqdm.write(f"step {step}: non-finite loss or gradient, step skipped (train.on_nan = 'skip')")
                elif not finite:
                    ckpt.wait()
                    raise errors.TrainingError(
                        f"non-finite loss or gradient at step {step} (loss {float(m.loss)}, grad norm "
                        f"{float(m.grad_norm)}); the step was not applied and the last checkpoint "
                        f"(step {ckpt.manager.latest_step()}) is intact. Lower train.lr, check the data, or set "
                        "train.on_nan = 'skip'.")
                if step % t.log_every == 0 or step % t.eval_every == 0 or step == t.steps:
                    now = time.perf_counter()
                    last = _step_metrics(m, float(schedule(step - 1)), tokens_since / (now - tick), cfg) | packing
                    load = None
                    if step % t.eval_every == 0 or step == t.steps:
                        last.update(_validate(evaluated(state), cfg, training, eval_step))
                        load = np.asarray(m.aux.expert_load)
                    logger.log(step, last, load, _experts_histograms(m, cfg))
                    last_step = step
                    bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    tick, tokens_since = time.perf_counter(), 0  # evaluation and logging are not training time
                signum = stop.requested()
                if step % t.checkpoint_every == 0 or step == t.steps or signum:
                    ckpt.save(step, state, iterator)
                bar.update(1)
                if signum and step < t.steps:
                    ckpt.wait()
                    raise errors.TrainingInterrupted(
                        f"stopped by {signal.Signals(signum).name} after step {step}, with a checkpoint of it in "
                        f"{workdir / 'checkpoints'}; continue with the same command plus --resume", signum)
                watchdog.disarm()
    except Exception as e:  # a disk that fills up (or turns read-only) under the logs rather than a checkpoint
        error = None if isinstance(e, errors.DsmoeError) else ckpt.storage_error(e, "its logs", workdir)
        if error is None:
            raise
        raise error from e
    finally:
        watchdog.disarm()
        bar.close()
        ckpt.wait()
        ckpt.close()
        logger.close()
    if peft_out is not None:
        _write_adapter(state, cfg, peft_out)
    if last_step is None or not logger.history:  # nothing new, or a process that does not log
        return _result(logger.history) if last_step is None else TrainResult(last_step, last["loss"],
                                                                            last.get("val_loss"), last)
    return _result(logger.history)._replace(metrics=last)
