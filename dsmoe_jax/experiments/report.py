"""A study's results as Markdown tables and PNG plots (matplotlib, no display needed), read from
its typed results (``records.StudyResults``), of any schema version."""

from __future__ import annotations

import pathlib

import numpy as np

from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.experiments.records import (
    LOSS,
    ArmResult,
    Comparison,
    FinetuneResults,
    GapCurve,
    RunResult,
    StudyResults,
)
from dsmoe_jax.experiments.stats import EXTRA, paired


def _pm(mean: float, spread: float) -> str:
    return f"{mean:.4f} ± {spread:.4f}"


def _mean_std(values) -> str:
    return _pm(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def _interval(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "one seed"


def _p(p: float | None) -> str:
    return "" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown(results: StudyResults | FinetuneResults) -> str:
    """The arms table, the comparisons (with Holm's family-wise view), then the study's measures."""
    if isinstance(results, FinetuneResults):
        return finetune_markdown(results)
    seeds = results.seeds
    tokens = f"{results.tokens_per_arm:,} training tokens per arm; " if results.tokens_per_arm else ""
    evaluated = [a.eval_tokens for a in results.arms if a.eval_tokens]
    wall = f"wall time {results.wall_s / 60:.1f} min (this invocation; runs trained earlier are reused)." \
        if results.wall_s is not None else ""
    lines = [f"### {results.study} ({results.scale} scale): {results.title}", "",
             f"{len(seeds)} seed(s) {', '.join(map(str, seeds))}; {tokens}"
             + (f"validation on {evaluated[0]:,} held-out tokens; " if evaluated else "") + wall, ""]
    if results.arms:
        lines += [*_arm_lines(results), ""]
    if results.comparisons:
        lines += [*_comparison_lines(results), ""]
    changed = [v for v in results.variants if v.name != "base" or v.reason]
    if _varied(results) and changed:
        lines += ["Variants:", *(f"- {v.name}: {v.reason}" for v in changed), ""]
    if "specialisation" in results.measures:
        lines += [*_specialisation_lines(results.measures["specialisation"]), ""]
    if "balance" in results.measures:
        lines += [*_balance_lines(results.measures["balance"], results), ""]
    if "probes" in results.measures:
        lines += [*_probe_lines(results.measures["probes"]), ""]
    if "experts" in results.measures:
        lines += [*_experts_lines(results.measures["experts"], results), ""]
    return "\n".join(lines).rstrip() + "\n"


def _varied(results: StudyResults) -> bool:
    """Whether the study ran in settings other than the scale's own (then tables name them)."""
    return any(v.name != "base" for v in results.variants) or len({a.variant for a in results.arms}) > 1


def _arm_lines(results: StudyResults) -> list[str]:
    several = _varied(results)
    lines = ["| arm | FFN | params total | activated | val loss (mean ± seed std) | per seed | eval SE | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in results.arms:
        name = f"{arm.label} ({arm.variant})" if several else arm.label
        params = (f"{arm.params_total / 1e6:.2f}M | {arm.params_activated / 1e6:.2f}M"
                  if arm.params_total is not None else " | ")
        se = f"{max(arm.val_loss_stderr):.4f}" if arm.val_loss_stderr else ""
        paper = f"{arm.paper_val_loss:.3f}" if arm.paper_val_loss is not None else ""
        lines.append(f"| {name} | {arm.structure} | {params} | {_pm(arm.mean, arm.seed_std)} | "
                     f"{', '.join(f'{v:.4f}' for v in arm.val_loss)} | {se} | {paper} |")
    return lines


def _comparison_lines(results: StudyResults) -> list[str]:
    """Each comparison A - B, paired by seed: per seed, mean, 95% t-interval, p and Holm's p over
    the table, the paired standard error over the shared windows (independent, and clustered by
    document), and the gap at 1/10 and 1/2 of the run."""
    labels = {a.arm: a.label for a in results.arms}
    label = lambda name: labels.get(name, name)
    several = _varied(results)
    surviving = sum(c.p_holm is not None and c.p_holm < 0.05 for c in results.comparisons)
    tested = sum(c.p_holm is not None for c in results.comparisons)
    lines = ["Paired by seed (same batches, same validation windows); negative: A has the lower loss. Holm's p "
             f"adjusts over the {tested} comparisons of this table: {surviving} below 0.05.", "",
             "| " + ("variant | " if several else "") + "A - B | metric | per seed | mean | 95% t-interval | p | "
             "Holm p | window SE (independent / by document) | gap at 1/10, 1/2 of the run |",
             "|" + "---|" * (10 if several else 9)]
    for c in results.comparisons:
        se = _window_se(c)
        early = _early_gaps(c.curve, results.tokens_per_arm or _tokens(results, c), len(c.seeds)) if c.curve else ""
        lines.append("| " + (f"{c.variant} | " if several else "")
                     + f"{label(c.a)} - {label(c.b)} | {c.metric} | {', '.join(f'{d:+.4f}' for d in c.per_seed)} | "
                     f"{c.mean:+.4f} | {_interval(c.ci95)} | {_p(c.p_value)} | {_p(c.p_holm)} | {se} | {early} |")
    return lines


def _tokens(results: StudyResults, c: Comparison) -> int:
    info = [v.tokens_per_arm for v in results.variants if v.name == c.variant and v.tokens_per_arm]
    return info[0] if info else 0


def _window_se(c: Comparison) -> str:
    plain = [s for s in c.window_se if s is not None]
    clustered = [s for s in c.window_se_by_document if s is not None]
    if not plain:
        return ""
    return f"{np.mean(plain):.4f}" + (f" / {np.mean(clustered):.4f}" if clustered else "")


def _complete(curve: GapCurve, seeds: int) -> list[tuple[int, float, tuple | None]]:
    """The curve's (tokens, mean, interval) points that every seed's pair logged."""
    return [(t, m, ci) for t, m, ci, n in zip(curve.tokens, curve.mean, curve.ci95, curve.seeds) if n == seeds]


def _early_gaps(curve: GapCurve, tokens: int, seeds: int) -> str:
    """The curve's mean gap at the validations nearest 1/10 and 1/2 of ``tokens`` that every seed
    logged ("-" where none lies within 5% of the run's tokens of that point)."""
    if not tokens:
        return ""
    found = []
    for fraction in (0.1, 0.5):
        target = fraction * tokens
        near = [(abs(t - target), m) for t, m, _ in _complete(curve, seeds) if abs(t - target) <= 0.05 * tokens]
        found.append(f"{min(near)[1]:+.4f}" if near else "-")
    return ", ".join(found)


def _probe_lines(probes: dict) -> list[str]:
    """Per variant, every arm's expert load and how much the token id decides its routing."""
    lines = []
    for name, arms in probes.items():
        lines += [f"**{name}**: per MoE layer, first to last; means over seeds.", "",
                  "| arm | load max/mean | load entropy (1 = even) | routed gates' sum per token "
                  "| token id -> first expert: table accuracy | always the top expert "
                  "| I(expert; token id) / H(expert) |", "|---|---|---|---|---|---|---|"]
        for arm, runs in arms.items():
            per_layer = lambda get: ", ".join(f"{x:.2f}" for x in np.mean([get(r) for r in runs], axis=0))
            routing = lambda key: per_layer(lambda r: [layer[key] for layer in r["routing_by_token"]])
            gates = per_layer(lambda r: r["gate_sum"]) if all("gate_sum" in r for r in runs) else ""
            lines.append(f"| {arm} | {per_layer(lambda r: r['load']['max_over_mean'])} | "
                         f"{per_layer(lambda r: r['load']['entropy'])} | {gates} | {routing('table_accuracy')} | "
                         f"{routing('constant_accuracy')} | {routing('normalised_mutual_information')} |")
        lines.append("")
    return lines


def _experts_lines(measured: dict, results: StudyResults) -> list[str]:
    """Per arm: routed experts per position per MoE layer (first to last) and by kind of text, the
    first - last layer and code - documentation differences paired by seed (95% t-intervals), and
    forward FLOPs per token."""
    labels = {a.arm: a.label for a in results.arms}
    lines = []
    for name, arms in measured.items():
        lines += [f"**{name}**: routed experts a position activates (mean over seeds); the differences paired by "
                  "seed (95% t-intervals); forward FLOPs per token at the measured mean and at the most a token can "
                  "take.", "",
                  "| arm | per MoE layer (all text) | first - last layer | mean | code | documentation | code - "
                  "documentation | MFLOPs/token expected | max |", "|---|---|---|---|---|---|---|---|---|"]
        for arm, runs in arms.items():
            layers = ", ".join(f"{x:.2f}" for x in np.mean([r["experts_per_layer"]["all"] for r in runs], axis=0))
            mean = lambda kind: float(np.mean([r["experts"][kind] for r in runs]))
            first_last = [r["experts_per_layer"]["all"][0] - r["experts_per_layer"]["all"][-1] for r in runs]
            by_layer = _paired_text(first_last)
            by_kind = _paired_text([r["experts"]["code"] - r["experts"]["documentation"] for r in runs])
            flops = lambda key: float(np.mean([r["flops_per_token"][key] for r in runs])) / 1e6
            lines.append(f"| {labels.get(arm, arm)} | {layers} | {by_layer} | {mean('all'):.2f} | {mean('code'):.2f} | "
                         f"{mean('documentation'):.2f} | {by_kind} | {flops('expected'):.2f} | {flops('max'):.2f} |")
        lines.append("")
    return lines


def _paired_text(diffs: list[float]) -> str:
    """Per-seed differences as their mean and 95% t-interval; "0" where every one is zero (a
    fixed number of experts)."""
    if not any(diffs):
        return "0"
    d = paired(diffs)
    return f"{d.mean:+.3f} {_interval(d.ci95)}"


def _specialisation_lines(s: dict) -> list[str]:
    lines = ["Disabling each token's top routed experts (loss, mean ± seed std):", "",
             "| model | disabled | ratio | val loss |", "|---|---|---|---|"]
    for model, probes in s["disable_top"].items():
        for key, p in probes.items():
            lines.append(f"| {model} | {key} | {p['ratio']:.4f} | {_mean_std(p['losses'])} |")
    lines += ["", "| DeepSeekMoE probe | val loss |", "|---|---|"]
    lines += [f"| {label} | {_mean_std(v)} |" for label, v in s["no_shared"].items()]
    lines += [f"| top-{k} routed | {_mean_std(v)} |" for k, v in s["top_k"].items()]
    lines.append(f"| GShard (its own top-2) | {_mean_std(s['gshard_top2'])} |")
    return lines


def _balance_lines(b: dict, results: StudyResults) -> list[str]:
    labels = {a.arm: a.label for a in results.arms}
    lines = ["Expert load on validation tokens (mean over layers and seeds):", "",
             "| arm | max / mean expert load | load entropy (1 = even) | max / mean device-group load |",
             "|---|---|---|---|"]
    for name, stats in b.items():
        lines.append(f"| {labels.get(name, name)} | {stats['max_over_mean']:.2f} | {stats['entropy']:.3f} | "
                     f"{stats['device_max_over_mean']:.2f} |")
    return lines


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # the experiments' dependencies are an extra
        raise ExperimentError(f"the experiments' plots need matplotlib, which this install lacks: {EXTRA}") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(results: StudyResults, records: dict[tuple[str, str], list[RunResult]], out: pathlib.Path) -> list[str]:
    """Write the study's PNG plots into ``out`` (``records``: each (variant, arm)'s runs by
    seed); returns their file names. A plot with nothing to show is not written."""
    plt = _pyplot()
    names = [_loss_bars(plt, results, out)]
    if any(r[0].train_curve for r in records.values()):
        names.append(_training_curves(plt, results, records, out))
    if any(arm.val_curve.tokens for arm in results.arms):
        names.append(_validation_curves(plt, results, out))
    gaps = [c for c in results.comparisons if c.metric == LOSS and c.curve and _complete(c.curve, len(c.seeds))]
    if gaps:
        names.append(_gap_curves(plt, results, gaps, out))
    if "specialisation" in results.measures:
        names.append(_specialisation_plot(plt, results.measures["specialisation"], out))
    if "balance" in results.measures:
        labels = {a.arm: a.label for a in results.arms}
        names.append(_balance_plot(plt, results.measures["balance"], labels, out))
    return names


def _save(plt, fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _name(arm: ArmResult, several: bool) -> str:
    return f"{arm.label} ({arm.variant})" if several else arm.label


def _loss_bars(plt, results: StudyResults, out: pathlib.Path) -> str:
    arms, several = results.arms, _varied(results)
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(arms), 4))
    x = np.arange(len(arms))
    for i, arm in enumerate(arms):
        ax.scatter([i] * len(arm.val_loss), arm.val_loss, color="0.4", s=12, zorder=3)
    ax.errorbar(x, [a.mean for a in arms], yerr=[a.seed_std for a in arms], fmt="o", color="C0", capsize=4,
                label=f"ours, mean ± seed std ({len(results.seeds)} seeds)")
    ax.set_xticks(x, [_name(a, several) for a in arms], rotation=20, ha="right")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{results.study} ({results.scale} scale)")
    paper = [(i, a.paper_val_loss) for i, a in enumerate(arms) if a.paper_val_loss is not None]
    if paper:
        twin = ax.twinx()
        twin.plot(*zip(*paper), "s", color="C3", label="paper (Pile loss, 2B)")
        twin.set_ylabel("paper's Pile loss", color="C3")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    return _save(plt, fig, out / "val_loss.png")


def _training_curves(plt, results: StudyResults, records: dict, out: pathlib.Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    several = _varied(results)
    for arm in results.arms:
        curve = records[(arm.variant, arm.arm)][0].train_curve
        if curve:
            steps, ce = zip(*curve)
            ax.plot(steps, ce, label=_name(arm, several), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy")
    ax.set_title(f"training curves, seed {results.seeds[0]}")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "train_loss.png")


def _validation_curves(plt, results: StudyResults, out: pathlib.Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    several = _varied(results)
    for arm in results.arms:
        ax.plot(np.asarray(arm.val_curve.tokens) / 1e6, arm.val_curve.mean, "o-", markersize=3,
                label=_name(arm, several))
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("validation loss (curve_tokens)")
    ax.set_title(f"validation during training, mean over {len(results.seeds)} seeds")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "val_curve.png")


def _gap_curves(plt, results: StudyResults, gaps: list[Comparison], out: pathlib.Path) -> str:
    """Each comparison's A - B against training tokens seen, its 95% t-interval over seeds as a band."""
    fig, ax = plt.subplots(figsize=(7, 4))
    several = _varied(results)
    for c in gaps:
        tokens, means, intervals = zip(*_complete(c.curve, len(c.seeds)))
        name = f"{c.a} - {c.b}" + (f" ({c.variant})" if several else "")
        line, = ax.plot(np.asarray(tokens) / 1e6, means, "o-", markersize=3, label=name)
        bands = [(t / 1e6, *ci) for t, ci in zip(tokens, intervals) if ci is not None]
        if bands:
            t, low, high = zip(*bands)
            ax.fill_between(t, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("validation loss difference")
    ax.set_title(f"{results.study} ({results.scale} scale): the gaps as training goes, 95% bands")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "gap_vs_tokens.png")


def _specialisation_plot(plt, s: dict, out: pathlib.Path) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model, probes in s["disable_top"].items():
        ratio = [p["ratio"] for p in probes.values()]
        losses = [np.mean(p["losses"]) for p in probes.values()]
        a.plot(ratio, losses, "o-", label=model)
    a.set_xlabel("ratio of disabled top routed experts")
    a.set_ylabel("validation loss")
    a.set_title("expert redundancy")
    a.legend()
    ks = [int(k) for k in s["top_k"]]
    b.plot(ks, [np.mean(v) for v in s["top_k"].values()], "o-", label="DeepSeekMoE, top-k routed")
    b.axhline(np.mean(s["gshard_top2"]), color="C3", linestyle="--", label="GShard (top-2)")
    b.set_xlabel("activated routed experts")
    b.set_ylabel("validation loss")
    b.set_title("fewer activated experts")
    b.legend()
    return _save(plt, fig, out / "specialisation.png")


def _balance_plot(plt, b: dict, labels: dict, out: pathlib.Path) -> str:
    fig, axes = plt.subplots(len(b), 1, figsize=(10, 1.2 + 1.5 * len(b)), squeeze=False, constrained_layout=True)
    for ax, (name, stats) in zip(axes[:, 0], b.items()):
        load = np.asarray(stats["load"], float)
        rel = load / load.mean(-1, keepdims=True)
        image = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_title(f"{labels.get(name, name)}: max/mean {stats['max_over_mean']:.2f}", fontsize=9)
        ax.set_ylabel("layer")
    axes[-1, 0].set_xlabel("routed expert")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / mean load")
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    return "expert_load.png"


# ---- the fine-tuning study ---------------------------------------------------------------------------


def finetune_markdown(results: FinetuneResults) -> str:
    """Per base and task, each method's trained share, optimizer state, held-out answer loss,
    exact match and forgetting (mean ± seed std); then every comparison with Holm's p."""
    seeds, labels = results.seeds, results.labels
    lines = [f"### finetune ({results.scale} scale): full fine-tuning, ESFT, LoRA and the frozen base", "",
             f"{len(seeds)} seed(s) {', '.join(map(str, seeds))}; {results.recipe['steps']} steps of "
             f"{results.recipe['batch_size']} x {results.recipe['seq_len']} tokens; wall time "
             f"{results.wall_s / 60:.1f} min (this invocation; runs trained earlier are reused).", ""]
    for base in results.bases:
        for task in results.tasks:
            lines += [f"#### {base} on {task}: {labels[task]}", "",
                      "| method | trained params | share | Adam state | experts per MoE layer | answer loss | "
                      "exact match | forgetting | wall s |", "|---|---|---|---|---|---|---|---|---|"]
            for method in results.methods:
                v = lambda field: results.values(base, task, method, field)
                experts = sorted({n for e in v("experts") for n in e.values()})
                exact = _mean_std(v("exact_match")) if task in results.checkable else ""
                lines.append(f"| {labels[method]} | {np.mean(v('trained_params')):,.0f} | "
                             f"{np.mean(v('trained_params')) / v('total_params')[0]:.1%} | "
                             f"{np.mean(v('optimizer_bytes')) / 2**20:.2f} MiB | "
                             f"{', '.join(map(str, experts)) if experts else ''} | {_mean_std(v('answer_loss'))} | "
                             f"{exact} | {_mean_std(v('forgetting'))} | {np.mean(v('wall_s')):.0f} |")
            lines.append("")
    lines += ["Paired by seed (a seed's base, fine-tuning batches and held-out examples are shared); negative: "
              "A lower. Holm's p is over this whole table.", "",
              "| where | metric | A - B | per seed | mean | 95% CI | p | Holm p |", "|---|---|---|---|---|---|---|---|"]
    for c in results.comparisons:
        per_seed = ", ".join(f"{x:+.4f}" for x in c.per_seed)
        lines.append(f"| {c.variant} | {c.metric} | {c.a} - {c.b} | {per_seed} | {c.mean:+.4f} | "
                     f"{_interval(c.ci95)} | {_p(c.p_value)} | {_p(c.p_holm)} |")
    return "\n".join(lines) + "\n"


def finetune_plot(results: FinetuneResults, path: pathlib.Path) -> str:
    """Answer loss (top) and forgetting (bottom) against the share of parameters trained, one
    column per task, one marker per method and base (mean over seeds, seed std as bars)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(results.tasks), figsize=(5.5 * len(results.tasks), 7), squeeze=False)
    markers = dict(zip(results.bases, "os^v"))
    for column, task in enumerate(results.tasks):
        for row, field in enumerate(("answer_loss", "forgetting")):
            ax = axes[row][column]
            for i, method in enumerate(results.methods):
                for base in results.bases:
                    share = max(np.mean(results.values(base, task, method, "trained_params"))
                                / results.values(base, task, method, "total_params")[0], 1e-4)
                    values = results.values(base, task, method, field)
                    ax.errorbar([share], [np.mean(values)], yerr=[np.std(values, ddof=1) if len(values) > 1 else 0],
                                fmt=markers[base], color=f"C{i}", capsize=3,
                                label=f"{results.labels[method]} ({base})")
            ax.set_xscale("log")
            ax.set_xlabel("share of parameters trained (frozen drawn at 1e-4)")
            ax.set_ylabel("held-out answer loss" if field == "answer_loss" else "pretraining val loss change")
            ax.set_title(f"{task}: {'answer loss' if field == 'answer_loss' else 'forgetting'}")
    axes[1][0].legend(fontsize=7, loc="upper left")  # the empty corner: little trained, little forgotten
    return _save(plt, fig, path)
