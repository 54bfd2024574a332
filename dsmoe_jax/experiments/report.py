"""An experiment's results as a Markdown table and PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def _pm(mean: float, spread: float) -> str:
    return f"{mean:.4f} ± {spread:.4f}"


def markdown(results: dict) -> str:
    """The arms table, then the experiment's measurements, as Markdown."""
    seeds = results["seeds"]
    lines = [
        f"### {results['experiment']} ({results['scale']} scale): {results['title']}",
        "",
        f"{len(seeds)} seed(s) {', '.join(map(str, seeds))}; {results['tokens_per_arm']:,} training tokens per arm; "
        f"validation on {next(iter(results['arms'].values()))['eval_tokens']:,} held-out tokens; "
        f"wall time {results['wall_s'] / 60:.1f} min (this invocation: arms trained earlier are reused).",
        "",
        "| arm | FFN | params total | activated | val loss (mean ± seed std) | per seed | eval SE | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in results["arms"].values():
        paper = f"{arm['paper_val_loss']:.3f}" if arm["paper_val_loss"] is not None else ""
        lines.append(
            f"| {arm['label']} | {arm['structure']} | {arm['params_total'] / 1e6:.2f}M | "
            f"{arm['params_activated'] / 1e6:.2f}M | {_pm(arm['val_loss_mean'], arm['val_loss_seed_std'])} | "
            f"{', '.join(f'{v:.4f}' for v in arm['val_loss'])} | {max(arm['val_loss_stderr']):.4f} | {paper} |")
    if results.get("comparisons"):
        lines += ["", *_comparison_lines(results)]
    if "specialisation" in results:
        lines += ["", *_specialisation_lines(results["specialisation"])]
    if "balance" in results:
        lines += ["", *_balance_lines(results["balance"], results["arms"])]
    return "\n".join(lines) + "\n"


def sensitivity_markdown(results: dict) -> str:
    """One row per variant: DeepSeekMoE - GShard by seed, mean, std, 95% t-interval."""
    lines = [f"### sensitivity ({results['scale']} scale): DeepSeekMoE against GShard, one change at a time", "",
             f"Seeds {', '.join(map(str, results['seeds']))}, paired by seed; negative: DeepSeekMoE has the lower "
             "validation loss.", "",
             "| variant | tokens per arm | GShard | DeepSeekMoE | DeepSeekMoE - GShard per seed | mean "
             "| 95% t-interval | paired SE over windows | gap at 1/10, 1/2 of the run | why |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        c = v["deepseekmoe_minus_gshard"]
        interval = f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c["ci95"] else "one seed"
        ses = [s for s in c["window_se"] if s is not None]
        lines.append(f"| {name} | {v['tokens_per_arm']:,} | {_mean_std(v['val_loss']['gshard'])} | "
                     f"{_mean_std(v['val_loss']['deepseekmoe'])} | {', '.join(f'{d:+.4f}' for d in c['per_seed'])} "
                     f"| {c['mean']:+.4f} | {interval} | {f'{np.mean(ses):.4f}' if ses else ''} | "
                     f"{_early_gaps(c['curve'], v['tokens_per_arm'], len(results['seeds']))} | {v['reason']} |")
    others = [f"- {name}: {arm} {_mean_std(v['val_loss'][arm])}, {arm} - GShard {c['mean']:+.4f} "
              + (f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c["ci95"] else "(one seed)")
              for name, v in results["variants"].items() for arm, c in v.get("others_minus_gshard", {}).items()]
    if others:
        lines += ["", "Other arms trained beside the pair (validation loss, mean ± seed std; paired by seed, 95% "
                  "t-interval):", *others]
    lines += ["", "The gap at 1/10 and 1/2 of the run: mean over seeds at the validation during training nearest "
              "that point, on the scale's curve_tokens (fewer windows than the final evaluation, so the curve's last "
              "point differs a little from the mean column); '-' where a run trained before curves were recorded "
              "has none. `gap_vs_tokens.png` plots every validation all seeds logged."]
    return "\n".join(lines) + "\n"


def _complete(curve: dict, seeds: int) -> list[tuple[int, float, list[float] | None]]:
    """The curve's (tokens, mean, interval) points that every seed's pair logged."""
    return [(t, m, ci) for t, m, ci, n in zip(curve["tokens"], curve["mean"], curve["ci95"], curve["seeds"])
            if n == seeds]


def _early_gaps(curve: dict, tokens: int, seeds: int) -> str:
    """The curve's mean gap at the validations nearest 1/10 and 1/2 of ``tokens`` that every seed
    logged ("-" where none lies within 5% of the run's tokens of that point)."""
    found = []
    for fraction in (0.1, 0.5):
        target = fraction * tokens
        near = [(abs(t - target), m) for t, m, _ in _complete(curve, seeds) if abs(t - target) <= 0.05 * tokens]
        found.append(f"{min(near)[1]:+.4f}" if near else "-")
    return ", ".join(found)


def probes_markdown(results: dict) -> str:
    """The probes' tables: loss by kind of text per arm with the paired gap, and expert load."""
    seeds = len(results["seeds"])
    lines = [f"### probes ({results['scale']} scale, {seeds} seeds): evaluation only, on the trained arms", ""]
    for name, v in results["variants"].items():
        arms, gaps = v["arms"], v["deepseekmoe_minus_gshard"]
        lines += [f"**{name}**", "", "| text | tokens | GShard | DeepSeekMoE | DeepSeekMoE - GShard | 95% interval |",
                  "|---|---|---|---|---|---|"]
        for kind, g in gaps.items():
            mean = lambda arm: _mean_std([r["loss"][kind] for r in arms[arm]])
            interval = f"[{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g["ci95"] else "one seed"
            lines.append(f"| {kind} | {arms['gshard'][0]['tokens'][kind]:,} | {mean('gshard')} | "
                         f"{mean('deepseekmoe')} | {g['mean']:+.4f} | {interval} |")
        lines += ["", "| arm | load max/mean | load entropy (1 = even) | routed gates' sum per token "
                  "| token id -> first expert: table accuracy | always the top expert "
                  "| I(expert; token id) / H(expert) |", "|---|---|---|---|---|---|---|"]
        for arm, runs in arms.items():
            per_layer = lambda get: ", ".join(f"{x:.2f}" for x in np.mean([get(r) for r in runs], axis=0))
            routing = lambda key: per_layer(lambda r: [layer[key] for layer in r["routing_by_token"]])
            gates = per_layer(lambda r: r["gate_sum"]) if all("gate_sum" in r for r in runs) else ""
            lines.append(f"| {arm} | {per_layer(lambda r: r['load']['max_over_mean'])} | "
                         f"{per_layer(lambda r: r['load']['entropy'])} | {gates} | {routing('table_accuracy')} | "
                         f"{routing('constant_accuracy')} | {routing('normalised_mutual_information')} |")
        lines.append("Per MoE layer, first to last; means over seeds.")
        lines.append("")
    return "\n".join(lines)


def _comparison_lines(results: dict) -> list[str]:
    """Each pair of arms, paired by seed: A - B per seed, mean, std, 95% t-interval, and the
    paired standard error over the shared validation windows (mean over seeds)."""
    label = lambda name: results["arms"][name]["label"]
    lines = ["Paired by seed (same batches, same validation windows); negative: A has the lower loss.", "",
             "| A - B | per seed | mean | seed std | 95% t-interval | paired SE over windows |",
             "|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        interval = f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c["ci95"] else "one seed"
        std = f"{c['seed_std']:.4f}" if c["seed_std"] is not None else ""
        ses = [s for s in c["window_se"] if s is not None]
        lines.append(f"| {label(c['a'])} - {label(c['b'])} | {', '.join(f'{d:+.4f}' for d in c['per_seed'])} | "
                     f"{c['mean']:+.4f} | {std} | {interval} | {f'{np.mean(ses):.4f}' if ses else ''} |")
    return lines


def _mean_std(values) -> str:
    return _pm(float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


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


def _balance_lines(b: dict, arms: dict) -> list[str]:
    lines = ["Expert load on validation tokens (mean over layers and seeds):", "",
             "| arm | max / mean expert load | load entropy (1 = even) | max / mean device-group load |",
             "|---|---|---|---|"]
    for name, stats in b.items():
        lines.append(f"| {arms[name]['label']} | {stats['max_over_mean']:.2f} | {stats['entropy']:.3f} | "
                     f"{stats['device_max_over_mean']:.2f} |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(results: dict, out: pathlib.Path, first_seed_runs: dict[str, pathlib.Path]) -> list[str]:
    """Write the experiment's PNG plots into ``out``; returns their file names."""
    plt = _pyplot()
    names = [_loss_bars(plt, results, out), _loss_curves(plt, results, out, first_seed_runs)]
    if any(arm["val_curve"]["tokens"] for arm in results["arms"].values()):
        names.append(_validation_curves(plt, results, out))
    if "specialisation" in results:
        names.append(_specialisation_plot(plt, results["specialisation"], out))
    if "balance" in results:
        names.append(_balance_plot(plt, results["balance"], results["arms"], out))
    return names


def _save(plt, fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _loss_bars(plt, results: dict, out: pathlib.Path) -> str:
    arms = results["arms"]
    labels = [a["label"] for a in arms.values()]
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(arms), 4))
    x = np.arange(len(arms))
    for i, arm in enumerate(arms.values()):
        ax.scatter([i] * len(arm["val_loss"]), arm["val_loss"], color="0.4", s=12, zorder=3)
    ax.errorbar(x, [a["val_loss_mean"] for a in arms.values()], yerr=[a["val_loss_seed_std"] for a in arms.values()],
                fmt="o", color="C0", capsize=4, label=f"ours, mean ± seed std ({len(results['seeds'])} seeds)")
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{results['experiment']} ({results['scale']} scale)")
    paper = [(i, a["paper_val_loss"]) for i, a in enumerate(arms.values()) if a["paper_val_loss"] is not None]
    if paper:
        twin = ax.twinx()
        twin.plot(*zip(*paper), "s", color="C3", label="paper (Pile loss, 2B)")
        twin.set_ylabel("paper's Pile loss", color="C3")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    return _save(plt, fig, out / "val_loss.png")


def _loss_curves(plt, results: dict, out: pathlib.Path, runs: dict[str, pathlib.Path]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, arm in results["arms"].items():
        rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        ce = {r["step"]: r["ce"] for r in rows}  # the loop logs each step once, resumed or not
        steps = sorted(ce)
        ax.plot(steps, [ce[s] for s in steps], label=arm["label"], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy")
    ax.set_title(f"training curves, seed {results['seeds'][0]}")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "train_loss.png")


def _validation_curves(plt, results: dict, out: pathlib.Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in results["arms"].values():
        curve = arm["val_curve"]
        ax.plot(np.asarray(curve["tokens"]) / 1e6, curve["mean"], "o-", markersize=3, label=arm["label"])
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("validation loss (curve_tokens)")
    ax.set_title(f"validation during training, mean over {len(results['seeds'])} seeds")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "val_curve.png")


def gap_curves(results: dict, out: pathlib.Path) -> list[str]:
    """The sensitivity experiment's DeepSeekMoE - GShard against training tokens seen, one line
    per variant with its 95% t-interval over seeds as a band: ``gap_vs_tokens.png`` (none when no
    variant's runs logged a curve)."""
    curves = {name: _complete(v["deepseekmoe_minus_gshard"]["curve"], len(results["seeds"]))
              for name, v in results["variants"].items()}
    if not any(curves.values()):
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if not points:
            continue
        v = results["variants"][name]
        tokens, means, intervals = zip(*points)
        unit = " (per BPE token)" if v.get("vocab_size") else ""
        line, = ax.plot(np.asarray(tokens) / 1e6, means, "o-", markersize=3, label=name + unit)
        bands = [(t / 1e6, *ci) for t, ci in zip(tokens, intervals) if ci is not None]
        if bands:
            t, low, high = zip(*bands)
            ax.fill_between(t, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("DeepSeekMoE - GShard validation loss")
    ax.set_title(f"sensitivity ({results['scale']} scale): the gap as training goes, "
                 f"{len(results['seeds'])} seeds, 95% bands")
    ax.legend(fontsize=8)
    return [_save(plt, fig, out / "gap_vs_tokens.png")]


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


def _balance_plot(plt, b: dict, arms: dict, out: pathlib.Path) -> str:
    fig, axes = plt.subplots(len(b), 1, figsize=(10, 1.2 + 1.5 * len(b)), squeeze=False, constrained_layout=True)
    for ax, (name, stats) in zip(axes[:, 0], b.items()):
        load = np.asarray(stats["load"], float)
        rel = load / load.mean(-1, keepdims=True)
        image = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_title(f"{arms[name]['label']}: max/mean {stats['max_over_mean']:.2f}", fontsize=9)
        ax.set_ylabel("layer")
    axes[-1, 0].set_xlabel("routed expert")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / mean load")
    fig.savefig(out / "expert_load.png", dpi=110)
    plt.close(fig)
    return "expert_load.png"
