"""The fine-tuning study (``dsmoe-jax experiment finetune``): the ESFT paper's claims (Wang et al.
2024, arXiv 2407.01906) at the scale of this machine.

The study's arms (DeepSeekMoE and GShard) are pretrained as every study trains them
(``arms.train_arm``: the same runs, reused), then each base is fine-tuned at its own seed on each
task of ``tasks.TASKS`` by each method of ``METHODS``: every parameter, ESFT's selections (the
paper's gate and token scores at its thresholds, and a fixed quarter of each layer's routed
parameters, equal on both bases), LoRA, or nothing (the frozen base). Each fine-tuned model is
measured on

- the task's held-out answers: the loss over their tokens (and, for a task with one right answer,
  the exact match: every answer token, and the EOS after it, the argmax given the ones before,
  which is what greedy decoding produces);
- forgetting: its loss on the pretraining validation windows of its base minus the base's;
- what it trains: parameters, their share of the model, Adam's moments (8 bytes a parameter, as
  ``plan`` counts them), and the training's wall time.

Methods are compared with full fine-tuning by seed (``records.Comparison``, Holm over the table),
and ESFT's gap to full fine-tuning at the equal budget between the two bases (the paper's
argument that ESFT works because experts are fine-grained).

A workdir holds the bases under ``runs/`` (shared with the other studies), the tasks' data under
``finetune/tasks/``, each (base, task, seed)'s expert scores under ``finetune/<base>/<task>/seed<k>/
esft/`` and each fine-tuned run beside them under ``<method>/``, with ``final.json`` once measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.chat import render_chat
from dsmoe_jax.config import Config, updated
from dsmoe_jax.costs import count_params
from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.evaluation import evaluate, ratio_mean, token_losses
from dsmoe_jax.experiments import arms, report
from dsmoe_jax.experiments.records import (
    Comparison,
    FinetuneResults,
    FinetuneRun,
    Provenance,
    RunResult,
    environment,
    with_holm,
    write_json,
)
from dsmoe_jax.experiments.specs import ARMS, Scale, arm_config
from dsmoe_jax.experiments.tasks import TASKS, Task
from dsmoe_jax.loading import load_model, validation_tokens
from dsmoe_jax.model import forward
from dsmoe_jax.peft import esft
from dsmoe_jax.peft.adapter import ADAPTER_DIR, apply_adapter
from dsmoe_jax.peft.tuning import count, make_tuning
from dsmoe_jax.tokenizer import load_tokenizer

ANSWER_LOSS, EXACT, FORGETTING = "answer_loss", "exact_match", "forgetting"
BUDGET = 0.25  # esft_budget: this share of each layer's routed-expert parameters (4 of 16 experts, 16 of 63)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How every method fine-tunes at one scale: the SFT recipe (constant rate, no warmup) for a
    fixed number of steps; LoRA at its own rate (the ESFT paper's LoRA rate is above its full
    and ESFT one, too)."""

    steps: int
    batch_size: int
    seq_len: int  # rows of packed examples; an example longer than seq_len + 1 tokens is cut to it
    lr: float
    lora_lr: float
    lora_rank: int
    score_tokens: int  # training tokens of the task that ESFT's relevance is scored on


RECIPES = {
    "toy": Recipe(steps=3, batch_size=4, seq_len=128, lr=5e-4, lora_lr=2e-3, lora_rank=4, score_tokens=2048),
    # the bases' own window (128): the instruction task's questions and the opening of their answers
    "cpu": Recipe(steps=150, batch_size=16, seq_len=128, lr=5e-4, lora_lr=2e-3, lora_rank=8, score_tokens=65536),
}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    esft: str | None = None  # which selection: "gate" | "token" (the paper's top-p) | "budget" (BUDGET)
    lora: bool = False
    trains: bool = True


METHODS = {m.name: m for m in (
    Method("frozen", "frozen base", trains=False),
    Method("full", "full fine-tuning"),
    Method("esft_gate", f"ESFT-Gate (top-p {esft.DEFAULT_TOP_P['gate']})", esft="gate"),
    Method("esft_token", f"ESFT-Token (top-p {esft.DEFAULT_TOP_P['token']})", esft="token"),
    Method("esft_budget", f"ESFT-Token, {BUDGET:.0%} of routed params", esft="budget"),
    Method("lora", "LoRA (attention + routed experts)", lora=True),
)}


def recipe(scale: Scale) -> Recipe:
    if scale.name not in RECIPES:
        raise ExperimentError(f"the finetune study has a recipe at scales {', '.join(RECIPES)}, not {scale.name!r}")
    return RECIPES[scale.name]


def method_config(base: Config, method: Method, r: Recipe, task_data: pathlib.Path, base_dir: pathlib.Path,
                  expert_cfg: pathlib.Path | None = None) -> Config:
    """The base's config fine-tuning ``method`` on ``task_data`` from the weights in ``base_dir``."""
    train = {"steps": r.steps, "batch_size": r.batch_size, "seq_len": r.seq_len, "schedule": "constant",
             "warmup_steps": 0, "lr": r.lora_lr if method.lora else r.lr, "init_from": str(base_dir),
             "checkpoint_every": r.steps, "eval_every": r.steps, "eval_tokens": 8192,
             "log_every": max(r.steps // 30, 1)}
    if method.esft:
        train["trainable"] = f"esft:{expert_cfg}"
    if method.lora:
        train["lora"] = {"rank": r.lora_rank, "alpha": 2 * r.lora_rank, "targets": ["attention", "routed_experts"]}
    return updated(base, model={"max_seq_len": max(base.model.max_seq_len, r.seq_len)}, train=train,
                   data={"path": str(task_data), "long_examples": "truncate", "document_mask": False})


# ---- measuring -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answers:
    loss: float
    stderr: float
    tokens: int
    examples: int
    exact_match: float


@functools.lru_cache(maxsize=4)
def _logits_step(cfg: Config):
    return jax.jit(lambda params, ids, real: forward(params, ids, cfg, attention_mask=real)[0])


def answer_scores(params, cfg: Config, conversations: Sequence[dict], batch_size: int = 32) -> Answers:
    """The loss over the answer tokens of ``conversations`` (each cut to ``train.seq_len + 1``
    tokens, as training cuts them) and the share of examples whose every answer token is the
    model's argmax given those before it (greedy decoding's exact match)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    width = cfg.train.seq_len + 1
    n = len(conversations)
    ids, weights, real = (np.zeros((n, width), np.int32) for _ in range(3))
    for i, c in enumerate(conversations):
        rendered = render_chat(c["messages"], tokenizer, require_assistant=True)
        k = min(len(rendered.ids), width)
        ids[i, :k], weights[i, :k], real[i, :k] = rendered.ids[:k], rendered.loss_mask[:k], 1
    step = _logits_step(cfg)
    sums, counts, exact = [], [], []
    for start in range(0, n, batch_size):
        chosen = np.pad(np.arange(start, min(start + batch_size, n)), (0, max(start + batch_size - n, 0)), "edge")
        logits = step(params, jnp.asarray(ids[chosen, :-1]), jnp.asarray(real[chosen, :-1]))
        real_rows = min(batch_size, n - start)
        for out, x in zip((sums, counts, exact), answer_stats(logits, ids[chosen, 1:], weights[chosen, 1:])):
            out.append(x[:real_rows])
    sum_N, count_N, exact_N = np.concatenate(sums), np.concatenate(counts), np.concatenate(exact)
    loss, stderr = ratio_mean(sum_N, count_N)
    answered = count_N > 0
    return Answers(loss, stderr, int(count_N.sum()), int(answered.sum()), float(exact_N[answered].mean()))


def answer_stats(logits_BSV, targets_BS: np.ndarray, weights_BS: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: the summed loss over the weighted targets, their count, and whether each of them
    is the argmax of its logits."""
    nll_BS = np.asarray(token_losses(jnp.asarray(logits_BSV), jnp.asarray(targets_BS)), np.float64)
    wrong_BS = (np.asarray(jnp.argmax(logits_BSV, -1)) != targets_BS) & (weights_BS > 0)
    return (nll_BS * weights_BS).sum(1), weights_BS.sum(1), ~wrong_BS.any(1)


def tuned_params(directory: pathlib.Path) -> dict:
    """The model a fine-tuning run made: its params, with the LoRA adapter it wrote merged in."""
    loaded = load_model(directory)
    adapter = directory / ADAPTER_DIR
    return apply_adapter(loaded.params, loaded.cfg, adapter) if adapter.is_dir() else loaded.params


def _measure(params, cfg: Config, base_cfg: Config, base: RunResult, task: Task, task_dir: pathlib.Path,
             scale: Scale, key: tuple[str, str, str, int], trained_params: int, experts: dict,
             trained: tuple[Provenance, ...] = ()) -> FinetuneRun:
    answers = answer_scores(params, cfg, task.heldout(task_dir))
    if trained:
        val_loss = evaluate(params, base_cfg, validation_tokens(base_cfg), max_tokens=scale.eval_tokens).loss
    else:  # the frozen base: its own evaluation on the same windows
        val_loss = base.val_loss
    return FinetuneRun(*key, answers.loss, answers.stderr, answers.tokens, answers.examples,
                       answers.exact_match if task.checkable else None, val_loss, val_loss - base.val_loss,
                       trained_params, count_params(cfg)[0], 8 * trained_params, experts,
                       sum(p.wall_s for p in trained), trained)


def _expert_configs(base_dir: pathlib.Path, task_data: pathlib.Path, out: pathlib.Path, r: Recipe,
                    cfg: Config) -> dict[str, pathlib.Path]:
    """ESFT's three selections from the base's relevance on the task (scored once):
    ``{"gate" | "token" | "budget": expert_cfg.json}``."""
    paths = {s: out / f"expert_cfg.{s}.json" for s in ("gate", "token", "budget")}
    if all(p.is_file() for p in paths.values()):
        return paths
    esft.score_task(base_dir, str(task_data), out, tokens=r.score_tokens, score="token", seq_len=r.seq_len)
    scores = json.loads((out / "scores.json").read_text())
    layers, E = scores["layers"], cfg.model.moe.n_routed_experts
    esft.select(np.asarray(scores["gate"]), esft.DEFAULT_TOP_P["gate"], layers).write(paths["gate"])
    esft.select(np.asarray(scores["token"]), esft.DEFAULT_TOP_P["token"], layers).write(paths["token"])
    esft.select_count(np.asarray(scores["token"]), max(round(BUDGET * E), 1), layers).write(paths["budget"])
    return paths


def finetune_run(method: Method, cfg: Config, directory: pathlib.Path, resume: bool, progress: bool,
                 measure) -> FinetuneRun:
    """Train one method (or read its finished record) and measure the model it made."""
    final = directory / arms.FINAL
    if final.is_file():
        return FinetuneRun.read(final)
    if method.trains:
        _, trained, _ = arms.train_recorded(cfg, directory, resume, progress, "fine-tuning run")
        params = tuned_params(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        trained, params = (), load_model(cfg.train.init_from).params
    run = measure(params, trained_params=count(make_tuning(cfg), params) if method.trains else 0, trained=trained)
    write_json(final, run)
    return run


def run(p, root: pathlib.Path, resume: bool = False, progress: bool = True) -> FinetuneResults:
    """Pretrain (or reuse) each base at each seed, fine-tune it by every method on every task,
    measure, compare with full fine-tuning, write ``finetune/results.{json,md}`` and the plot."""
    r = recipe(p.scale)
    tick = time.perf_counter()
    out = root / "finetune"
    task_dirs = {name: t.write(out / "tasks" / name, progress=False) for name, t in TASKS.items()}
    runs = []
    for seed in p.seeds:  # seed by seed: every pair of a seed finishes together
        for base_name in p.arms:
            arm = ARMS[base_name]
            base_dir = arms.run_dir(root, arm, seed)
            if progress:
                print(f"base {arm.label}, seed {seed}", flush=True)
            base = arms.train_arm(arm, p.scale, seed, base_dir, resume, progress)
            base_cfg = arm_config(arm, p.scale, seed)
            for task_name, task in TASKS.items():
                here = out / base_name / task_name / f"seed{seed}"
                selections = _expert_configs(base_dir, task_dirs[task_name], here / "esft", r, base_cfg)
                for method in METHODS.values():
                    if progress:
                        print(f"  {task_name}: {method.label}", flush=True)
                    expert_cfg = selections[method.esft] if method.esft else None
                    cfg = method_config(base_cfg, method, r, task_dirs[task_name], base_dir, expert_cfg)
                    experts = ({layer: len(ids) for layer, ids in json.loads(expert_cfg.read_text())["experts"].items()}
                               if expert_cfg else {})
                    measure = functools.partial(_measure, cfg=cfg, base_cfg=base_cfg, base=base, task=task,
                                                task_dir=task_dirs[task_name].parent, scale=p.scale,
                                                key=(base_name, task_name, method.name, seed), experts=experts)
                    runs.append(finetune_run(method, cfg, here / method.name, resume, progress, measure))
    labels = {**{m.name: m.label for m in METHODS.values()}, **{t.name: t.title for t in TASKS.values()}}
    results = FinetuneResults("finetune", p.scale.name, p.seeds, p.arms, tuple(TASKS), tuple(METHODS),
                              dataclasses.asdict(r), tuple(runs), (), time.perf_counter() - tick, environment(),
                              labels, tuple(t.name for t in TASKS.values() if t.checkable))
    results = dataclasses.replace(results, comparisons=comparisons(results))
    results.write(out / "results.json")
    report.finetune_plot(results, out / "finetune.png")
    table = report.finetune_markdown(results)
    (out / "results.md").write_text(table)
    if progress:
        print(table)
    return results


def comparisons(results: FinetuneResults) -> tuple[Comparison, ...]:
    """Every method against full fine-tuning (answer loss, exact match, forgetting) per base and
    task, and ESFT's gap to full fine-tuning at the equal budget, DeepSeekMoE minus GShard;
    paired by seed, Holm over all of them."""
    out = []
    metrics = lambda task: (ANSWER_LOSS, EXACT, FORGETTING) if task in results.checkable else (ANSWER_LOSS, FORGETTING)
    for base in results.bases:
        for task in results.tasks:
            full = {m: results.values(base, task, "full", m) for m in metrics(task)}
            for method in results.methods:
                if method == "full":
                    continue
                for m in metrics(task):
                    diffs = [a - b for a, b in zip(results.values(base, task, method, m), full[m])]
                    out.append(Comparison.of(f"{base}/{task}", m, method, "full", results.seeds, diffs))
    if {"deepseekmoe", "gshard"} <= set(results.bases):
        for task in results.tasks:
            gap = lambda base: [a - b for a, b in zip(results.values(base, task, "esft_budget", ANSWER_LOSS),
                                                      results.values(base, task, "full", ANSWER_LOSS))]
            diffs = [a - b for a, b in zip(gap("deepseekmoe"), gap("gshard"))]
            out.append(Comparison.of(task, "esft_budget - full answer_loss", "deepseekmoe", "gshard", results.seeds,
                                     diffs))
    return with_holm(out)
