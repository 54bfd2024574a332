"""Running a study: train each (variant, arm, seed) once, resumably (``arms.train_arm``);
evaluate; measure; compare; write ``results.json``, ``results.md`` and the plots. One driver loop
for every study; the fine-tuning study's own (``finetune.run``) starts from this one's runs.

A workdir (default ``runs/experiments/<scale>``) holds every trained run (``arms``) and each
study's outputs under ``<study>/``. Runs are shared: an arm finished for one study is reused by
every other that compares it. An interrupted study continues with ``resume``: finished runs are
kept, an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from dsmoe_jax import data
from dsmoe_jax.costs import count_params
from dsmoe_jax.errors import ConfigError, ExperimentError
from dsmoe_jax.experiments import finetune, measures, report, stats, studies
from dsmoe_jax.experiments.arms import default_workdir, run_dir, train_arm
from dsmoe_jax.experiments.records import (
    LOSS,
    ArmResult,
    Comparison,
    Curve,
    GapCurve,
    RunResult,
    StudyResults,
    VariantInfo,
    environment,
    with_holm,
)
from dsmoe_jax.experiments.specs import ARMS, Scale, Variant, arm_config, arm_settings, variant
from dsmoe_jax.tokenizer import train_bpe

RESULTS = "results.json"


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a study will run: checked in full before anything trains (and by ``--dry-run``)."""

    study: studies.Study
    scale: Scale
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    arms: tuple[str, ...]


def plan(name: str, scale: str = "cpu", seeds: Sequence[int] = (0, 1, 2), variants: Sequence[str] | None = None,
         arms: Sequence[str] | None = None) -> Plan:
    """Every choice of a study checked: its name, scale, seeds, variants (each applies at the
    scale, none repeated) and further arms."""
    s, sc = studies.study(name), studies.scale(scale)
    if not seeds:
        raise ExperimentError("give at least one seed")
    repeated = sorted({x for x in seeds if list(seeds).count(x) > 1})
    if repeated:
        raise ExperimentError(f"seed {repeated[0]} is given twice: each seed is one run, and a repeat would count "
                              "the same run twice in the spread")
    try:
        chosen = [variant(v) for v in s.variant_names(sc, list(variants) if variants else None)]
        for v in chosen:
            v.scale_at(sc)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    names = [v.name for v in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExperimentError(f"variant {twice[0]} is named twice (a combination is named in the registry's order "
                              "whatever order it is given in); each is trained once")
    if s.finetune:
        finetune.recipe(sc)
    return Plan(s, sc, tuple(seeds), tuple(chosen), s.arm_names(list(arms) if arms else None))


def describe(p: Plan) -> list[dict]:
    """Each run's arm, structure, settings and parameter counts, without training (``--dry-run``)."""
    rows = []
    for v in p.variants:
        for name in p.arms:
            arm, sc = v.apply(ARMS[name], p.scale, tokenizer="byte")
            cfg = arm_config(arm, sc, p.seeds[0])
            total, activated = count_params(cfg)
            rows.append({"arm": arm.name, "structure": ARMS[name].structure(), "settings": arm_settings(arm, sc),
                         "params_total": total, "params_activated": activated, "config": cfg})
    return rows


def run_study(name: str, scale: str = "cpu", seeds: Sequence[int] = (0, 1, 2), variants: Sequence[str] | None = None,
              arms: Sequence[str] | None = None, workdir: str | pathlib.Path | None = None, resume: bool = False,
              progress: bool = True) -> StudyResults | finetune.FinetuneResults:
    """Train every (variant, arm, seed) of study ``name`` (``studies.STUDIES``) not trained yet,
    evaluate them on the same held-out windows, run the study's measures, compare the arms by
    seed, and write ``results.json``, ``results.md`` and the plots; returns the results. The
    fine-tuning study goes on from its trained arms (``finetune.run``)."""
    p = plan(name, scale, seeds, variants, arms)
    root = pathlib.Path(workdir) if workdir is not None else default_workdir(p.scale.name)
    if p.study.finetune:
        return finetune.run(p, root, resume, progress)
    tick = time.perf_counter()
    runs = [(v, a, s) for v in p.variants for s in p.seeds for a in p.arms]  # seed by seed: pairs finish together
    records: dict[tuple[str, str], list[RunResult]] = {}
    trained = measures.Trained(p.scale, p.seeds, {}, {})
    for i, (v, a, s) in enumerate(runs, 1):
        arm, sc = v.apply(ARMS[a], p.scale, variant_tokenizer(v, root))
        if progress:
            print(f"[{i}/{len(runs)}] {v.name}: {arm.name} ({arm.structure()}), seed {s}", flush=True)
        directory = run_dir(root, arm, s)
        records.setdefault((v.name, a), []).append(train_arm(arm, sc, s, directory, resume, progress))
        trained.arms[(v.name, a)] = arm
        trained.directories[(v.name, a)] = trained.directories.get((v.name, a), ()) + (directory,)
    per_run = _per_run_measures(p, trained, progress)
    results = StudyResults(
        p.study.name, p.study.title, p.scale.name, p.seeds,
        tuple(_arm_result(p, v, a, records[(v.name, a)]) for v in p.variants for a in p.arms),
        _comparisons(p, records, per_run), tuple(_variant_info(v, p) for v in p.variants),
        {**{m: per_run[m] for m in per_run},
         **{m.name: m.summary(trained) for m in p.study.measures if m.summary}},
        dataclasses.asdict(p.scale), p.scale.tokens, time.perf_counter() - tick, environment())
    out = root / p.study.name
    out.mkdir(parents=True, exist_ok=True)
    results = dataclasses.replace(results, plots=tuple(report.plots(results, records, out)))
    results.write(out / RESULTS)
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    if progress:
        print(table)
    return results


def _per_run_measures(p: Plan, trained: measures.Trained, progress: bool) -> dict:
    """Each per-run measure's output: ``{measure: {variant: {arm: [per seed]}}}``."""
    out: dict = {}
    for m in p.study.measures:
        if m.per_run is None:
            continue
        for (v, a), directories in trained.directories.items():
            for directory in directories:
                if progress:
                    print(f"{m.name}: {directory}", flush=True)
                out.setdefault(m.name, {}).setdefault(v, {}).setdefault(a, []).append(m.per_run(directory, p.scale))
    return out


def _arm_result(p: Plan, v: Variant, name: str, records: list[RunResult]) -> ArmResult:
    arm, sc = v.apply(ARMS[name], p.scale, tokenizer="byte")
    total, activated = count_params(arm_config(arm, sc, 0))
    return ArmResult(name, v.name, ARMS[name].label, ARMS[name].structure(), p.seeds,
                     tuple(r.val_loss for r in records), arm_settings(ARMS[name], p.scale), total, activated,
                     tuple(r.val_loss_stderr for r in records), records[0].eval_tokens, records[0].train_tokens,
                     tuple(r.wall_s for r in records), tuple(r.resumed for r in records), mean_curve(records),
                     p.study.paper.get(name), tuple(r.trained for r in records))


def _variant_info(v: Variant, p: Plan) -> VariantInfo:
    before = dataclasses.asdict(p.scale)
    after = dataclasses.asdict(v.scale_at(p.scale))
    arm, sc = v.apply(ARMS["deepseekmoe"], p.scale, tokenizer="byte")
    settings = {k: x for k, x in arm_settings(arm, sc).items()
                if arm_settings(ARMS["deepseekmoe"], sc).get(k) != x}
    return VariantInfo(v.name, v.reason, {k: x for k, x in after.items() if before[k] != x}, settings,
                       v.vocab_size, sc.tokens)


def mean_curve(records: Sequence[RunResult]) -> Curve:
    """Validation loss against tokens seen, mean over the seeds, at the points every seed logged."""
    curves = [dict(r.val_curve) for r in records]
    tokens = sorted(set.intersection(*map(set, curves))) if curves else []
    return Curve(tuple(tokens), tuple(float(np.mean([c[t] for c in curves])) for t in tokens))


def gap_curve(records_a: Sequence[RunResult], records_b: Sequence[RunResult]) -> GapCurve:
    """A - B against training tokens seen, paired by seed at each validation both runs logged."""
    curves = [(dict(a.val_curve), dict(b.val_curve)) for a, b in zip(records_a, records_b)]
    tokens = sorted({t for a, b in curves for t in set(a) & set(b)})
    diffs = [[a[t] - b[t] for a, b in curves if t in a and t in b] for t in tokens]
    points = [stats.paired(d) for d in diffs]
    return GapCurve(tuple(tokens), tuple(x.mean for x in points), tuple(x.ci95 for x in points),
                    tuple(len(d) for d in diffs))


def window_errors(a: RunResult, b: RunResult) -> tuple[float | None, float | None]:
    """The paired standard error of A - B over the shared validation windows: windows taken as
    independent, and clustered by the document each starts in (None where the runs did not
    record what it needs)."""
    wa, wb = np.asarray(a.val_window_losses), np.asarray(b.val_window_losses)
    if len(wa) < 2 or len(wa) != len(wb):
        return None, None
    d = wa - wb
    plain = float(d.std(ddof=1) / np.sqrt(len(d)))
    documents = a.val_window_documents
    clustered = (stats.clustered_se(d, documents) if len(documents) == len(d) and len(set(documents)) > 1
                 else None)
    return plain, clustered


def _comparisons(p: Plan, records: dict, per_run: dict) -> tuple[Comparison, ...]:
    """Every pair the study compares, on the loss and on each per-run measure's compared
    numbers, paired by seed; Holm's adjustment over all of them."""
    out = []
    for v in p.variants:
        for a, b in p.study.pairs(p.arms):
            ra, rb = records[(v.name, a)], records[(v.name, b)]
            errors = [window_errors(x, y) for x, y in zip(ra, rb)]
            out.append(Comparison.of(v.name, LOSS, a, b, p.seeds, [x.val_loss - y.val_loss for x, y in zip(ra, rb)],
                                     window_se=tuple(e[0] for e in errors),
                                     window_se_by_document=tuple(e[1] for e in errors), curve=gap_curve(ra, rb)))
            for m in p.study.measures:
                for metric in m.compared:
                    section, key = metric.split("/")
                    values = per_run[m.name][v.name]
                    diffs = [x[section][key] - y[section][key] for x, y in zip(values[a], values[b])]
                    out.append(Comparison.of(v.name, metric, a, b, p.seeds, diffs))
    return with_holm(out)
