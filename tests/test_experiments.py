"""The paper's experiments: arms sized as the paper requires, and the machinery end to end at toy
scale (every number and plot, resuming without retraining)."""

import dataclasses
import errno
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import cli, data, loading
from dsmoe_jax.checkpoint import write_config
from dsmoe_jax.costs import count_params, flops_per_token
from dsmoe_jax.errors import CheckpointError
from dsmoe_jax.experiments import (
    ARMS,
    SCALES,
    STUDIES,
    VARIANTS,
    ExperimentError,
    arm_config,
    arms,
    measures,
    plan,
    read_results,
    report,
    run_study,
    runner,
    specs,
    variant,
)
from dsmoe_jax.experiments.finetune import RECIPES
from dsmoe_jax.experiments.records import FinetuneResults, RunResult
from dsmoe_jax.train.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]

# In units of one dense FFN (F wide) per layer: (all expert parameters, activated expert parameters)
PAPER_SIZES = {"dense": (1, 1), "hash": (16, 1), "switch": (16, 1), "gshard": (16, 2), "deepseekmoe": (16, 2),
               "gshard_x1.5": (24, 3), "dense_x16": (16, 16), "shared_isolation": (16, 2), "fine_x2": (16, 2),
               "shared_2": (16, 2), "shared_4": (16, 2)}


@pytest.mark.parametrize("scale", list(SCALES))
def test_arms_have_the_papers_total_and_activated_expert_parameters(scale):
    sc = SCALES[scale]
    ffn = 3 * sc.d_model * sc.ffn * sc.n_layers  # one dense SwiGLU FFN per layer
    dense_total, _ = count_params(arm_config(ARMS["dense"], sc, 0))
    rest = dense_total - ffn  # attention, norms, embeddings: the same in every arm
    for name, (total_ffns, active_ffns) in PAPER_SIZES.items():
        cfg = arm_config(ARMS[name], sc, 0)
        moe = cfg.model.moe if cfg.model.n_moe_layers else None
        router = sc.n_layers * sc.d_model * moe.n_routed_experts if moe and moe.routing == "softmax" else 0
        total, activated = count_params(cfg)
        assert total - rest - router == total_ffns * ffn, f"{name}: total expert parameters at {scale}"
        assert activated - rest - router == active_ffns * ffn, f"{name}: activated expert parameters at {scale}"


def test_the_command_offers_every_scale():
    assert cli.main(["experiment", "architectures", "--scale", "cpu-long", "--dry-run"]) == 0
    assert set(SCALES) == {"toy", "cpu", "cpu-long", "paper"}


def test_every_study_names_known_arms_and_every_arm_builds():
    for study in STUDIES.values():
        assert set(study.arms) <= set(ARMS), study.name
    for arm in ARMS.values():
        for scale in SCALES.values():
            arm_config(arm, scale, 0)


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_plans_at_every_scale_as_a_dry_run(name, scale, capsys):
    """The one registry: every study the command offers runs as a dry run at every scale, its
    default variants being those that apply there (4x the batch needs steps divisible by 4); the
    fine-tuning study at the scales it has a recipe for, and a named refusal at the others."""
    if STUDIES[name].finetune and scale not in RECIPES:
        assert cli.main(["experiment", name, "--scale", scale, "--dry-run"]) == 2
        assert f"not {scale!r}" in capsys.readouterr().err
        return
    assert cli.main(["experiment", name, "--scale", scale, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(arm in out for arm in STUDIES[name].arms), out
    if name == "sensitivity":
        assert ("deepseekmoe@batch_64" in out) == (SCALES[scale].steps % 4 == 0), out


def test_paper_scale_dry_run_plans_every_arm(capsys):
    assert cli.main(["experiment", "architectures", "--scale", "paper", "--dry-run", "--mesh", "fsdp=8,expert=8"]) == 0
    out = capsys.readouterr().out
    assert "1 shared + 63 routed (F/4), top-7" in out and "FLOPs per step" in out
    assert "cannot run on this mesh: moe.n_routed_experts=63 does not split" in out, "63 experts on 8 devices"
    assert out.count("FLOPs per step") == 6, "every arm but DeepSeekMoE's 63 experts plans on expert=8"


@pytest.mark.parametrize(("argv", "message"), [
    (["nope"], "unknown experiment 'nope'"),
    (["sensitivity", "--variants", "depth_9"], "unknown variant 'depth_9'"),
    (["sensitivity", "--variants", "base+norm_topk"], "base is the setting unchanged .* name 'norm_topk'"),
    (["sensitivity", "--variants", "norm_topk+norm_topk"], "names norm_topk twice"),
    (["sensitivity", "--variants", "norm_topk+lr_1e-3,lr_1e-3+norm_topk"], "norm_topk\\+lr_1e-3 is named twice"),
    (["sensitivity", "--variants", "lr_1e-3+lr_4e-3"], "lr_1e-3 and lr_4e-3 set the same value differently"),
    (["sensitivity", "--variants", "routed_scale+norm_topk"], "both set the gates' scale; choose one"),
    (["sensitivity", "--scale", "toy", "--variants", "batch_64"], "steps divisible by 4; scale toy trains 6"),
    (["architectures", "--variants", "norm_topk"], "--variants is for the sensitivity and probes studies"),
    (["ablation", "--arms", "switch"], "--arms is for the sensitivity and probes studies"),
    (["sensitivity", "--arms", "switch,switch"], "names switch twice"),
])
def test_a_dry_run_refuses_what_a_run_refuses_with_one_exit_code(argv, message, capsys):
    """Every choice is checked before anything trains, in a dry run too, and every refusal of the
    experiment command line is one kind of error: one exit code."""
    code = cli.main(["experiment", *argv, "--dry-run"])
    assert re.search(message, capsys.readouterr().err), message
    assert code == cli.main(["experiment", "nope", "--dry-run"]) != 0, "the same code as an unknown experiment"


def test_a_combination_is_named_in_the_registrys_order():
    assert variant("lr_1e-3+norm_topk").name == "norm_topk+lr_1e-3", "one name, one set of runs"
    both = arm_config(*variant("norm_topk+lr_1e-3").apply(ARMS["deepseekmoe"], SCALES["cpu-long"]), 0)
    assert both.model.moe.norm_topk_prob and both.train.lr == 1e-3, "both changes apply"
    assert both.train.steps == SCALES["cpu-long"].steps, "the scale's own budget is kept"
    scaled = arm_config(*variant("routed_scale+lr_1e-3").apply(ARMS["gshard"], SCALES["cpu"]), 0)
    assert (scaled.model.moe.routed_scaling_factor, scaled.train.lr) == (8.0, 1e-3), "16 experts, top-2: x8"


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    """One workdir for the toy runs below, so later studies reuse the arms trained earlier."""
    return tmp_path_factory.mktemp("experiments")


@pytest.mark.slow  # about 65 s: run with -m slow
def test_toy_study_end_to_end_and_resume_without_retraining(toy_workdir, monkeypatch):
    results = run_study("specialisation", "toy", seeds=[0, 1], workdir=toy_workdir, progress=False)
    out = toy_workdir / "specialisation"
    saved = read_results(out / "results.json")
    assert saved == results, "results.json reads back as the results returned"
    assert saved.schema_version == 2 and [a.arm for a in saved.arms] == ["deepseekmoe", "gshard", "gshard_x1.5"]
    for arm in saved.arms:
        assert len(arm.val_loss) == 2 and all(v > 0 for v in arm.val_loss)
        assert arm.eval_tokens > 0 and all(se > 0 for se in arm.val_loss_stderr)
        assert arm.seed_std > 0, "two seeds train two different models"
        for seed_runs in arm.trained:
            (p,) = seed_runs
            assert p.versions["jax"] == jax.__version__ and p.wall_s > 0 and not p.resumed and p.date, p
            assert p.commit is None or len(p.commit) == 40, p
    s = saved.measures["specialisation"]
    assert list(s["disable_top"]["deepseekmoe"]) == ["0/63", "1/63", "2/63", "3/63", "4/63"]
    assert list(s["disable_top"]["gshard_x1.5"]) == ["0/16", "1/16"]
    assert list(s["top_k"]) == ["3", "4", "5", "6", "7"] and len(s["gshard_top2"]) == 2
    assert s["top_k"]["7"] == s["no_shared"]["standard"], "top-7 is the model as trained"
    assert {"val_loss.png", "train_loss.png", "val_curve.png", "specialisation.png"} <= {p.name for p in out.iterdir()}
    curve = saved.arm("gshard").val_curve
    assert curve.tokens == tuple(128 * step for step in range(1, 7)), curve
    logged = [[json.loads(line) for line in (toy_workdir / "runs" / "gshard" / f"seed{s}" / "metrics.jsonl")
               .read_text().splitlines()] for s in (0, 1)]
    by_step = [np.mean([rows[step - 1]["val_loss"] for rows in logged]) for step in range(1, 7)]
    assert curve.mean == pytest.approx(by_step), "the seeds' logged validations, averaged step by step"
    pairs = {(c.a, c.b): c for c in saved.comparisons}
    assert set(pairs) == {("deepseekmoe", "gshard"), ("deepseekmoe", "gshard_x1.5"), ("gshard", "gshard_x1.5")}
    c = pairs[("deepseekmoe", "gshard")]
    assert c.per_seed == pytest.approx([x - y for x, y in zip(saved.arm("deepseekmoe").val_loss,
                                                              saved.arm("gshard").val_loss)])
    assert c.ci95[0] < c.mean < c.ci95[1] and all(se > 0 for se in c.window_se), c
    assert all(se > 0 for se in c.window_se_by_document), "windows clustered by their held-out document"
    assert c.p_holm >= c.p_value, "Holm never lowers a p-value"
    assert "| DeepSeekMoE - GShard | val_loss |" in (out / "results.md").read_text()

    # a second run reuses the trained arms: nothing is trained again, and their provenance stays
    monkeypatch.setattr(arms, "train", lambda *a, **k: pytest.fail("a finished arm was retrained"))
    again = run_study("specialisation", "toy", seeds=[0, 1], workdir=toy_workdir, progress=False)
    assert again.arms == results.arms


@pytest.mark.slow  # about 25 s: run with -m slow
def test_balance_study_reports_load_statistics(toy_workdir):
    results = run_study("balance", "toy", seeds=[0], workdir=toy_workdir, progress=False)
    b = results.measures["balance"]
    assert b.keys() == {"balance_off", "deepseekmoe", "balance_10x", "balance_device"}
    for stats in b.values():
        assert stats["max_over_mean"] >= 1.0 and 0 < stats["entropy"] <= 1.0
        assert len(stats["load"]) == SCALES["toy"].n_layers and len(stats["load"][0]) == 63
        assert sum(stats["load"][0]) > 0
    assert (toy_workdir / "balance" / "expert_load.png").is_file()


def test_dynamic_arms_are_their_top_k_arms_with_top_p_routing():
    for name, base in (("gshard_top_p", "gshard"), ("deepseekmoe_top_p", "deepseekmoe")):
        cfg, ref = arm_config(ARMS[name], SCALES["cpu"], 0), arm_config(ARMS[base], SCALES["cpu"], 0)
        moe = cfg.model.moe
        assert (moe.routing, moe.top_p, moe.max_experts, moe.dynamic_loss_weight) == (
            "top_p", ARMS[name].top_p, 0, specs.DYNAMIC_LOSS_WEIGHT), f"{name}: the paper's rule and beta, no cap"
        assert count_params(cfg)[0] == count_params(ref)[0], f"{name}: the same parameters as {base}"
        routing = ("routing", "top_p", "top_k", "dynamic_loss_weight")
        same = lambda c: {k: v for k, v in dataclasses.asdict(c.model.moe).items() if k not in routing}
        assert same(cfg) == same(ref), f"{name}: only the routing differs from {base}"
    assert STUDIES["dynamic"].pairs(STUDIES["dynamic"].arms) == [("gshard_top_p", "gshard"),
                                                                 ("deepseekmoe_top_p", "deepseekmoe")]


def test_experts_per_token_are_measured_by_layer_and_kind_of_text_on_a_top_p_arm(tmp_path):
    arm, scale = ARMS["gshard_top_p"], SCALES["toy"]
    directory = arms.run_dir(tmp_path, arm, 0)
    final = arms.train_arm(arm, scale, 0, directory, progress=False)
    run = measures.experts_arm(directory, scale)
    cfg = arm_config(arm, scale, 0)
    E = cfg.model.moe.n_routed_experts
    assert run["loss"]["all"] == pytest.approx(final.val_loss, rel=1e-6), "the whole split, as final.json evaluates it"
    params = dsmoe_jax.load_checkpoint(directory)[0]
    code = measures.validation_by_kind(cfg)["code"]
    want = dsmoe_jax.evaluate(params, cfg, code, scale.eval_tokens).active_experts
    assert run["experts_per_layer"]["code"] == list(want), "the code split's experts per layer"
    for kind, layers in run["experts_per_layer"].items():
        assert len(layers) == cfg.model.n_moe_layers and all(1 <= x <= E for x in layers), f"{kind}: {layers}"
        assert run["experts"][kind] == pytest.approx(np.mean(layers)), kind
    assert run["flops_per_token"]["max"] == flops_per_token(cfg, cfg.train.seq_len)
    assert run["flops_per_token"]["expected"] == flops_per_token(cfg, cfg.train.seq_len, run["experts"]["all"])
    assert run["flops_per_token"]["expected"] < run["flops_per_token"]["max"], "fewer than all 16 experts per token"


@pytest.mark.slow  # about 30 s: run with -m slow
def test_dynamic_study_measures_experts_per_token_by_layer_and_kind_of_text(tmp_path):
    results = run_study("dynamic", "toy", seeds=[0], workdir=tmp_path, progress=False)
    measured = results.measures["experts"]["base"]
    for name in results.arms:
        cfg = arm_config(ARMS[name.arm], SCALES["toy"], 0)
        (run,) = measured[name.arm]
        moe = cfg.model.moe
        assert set(run["experts"]) == set(run["loss"]) == {"all", "code", "documentation"}, run
        for kind, layers in run["experts_per_layer"].items():
            assert len(layers) == cfg.model.n_moe_layers, f"{name.arm}: one mean per MoE layer"
            if moe.routing == "top_p":
                assert all(1 <= x <= moe.n_routed_experts for x in layers), f"{name.arm} on {kind}: {layers}"
            else:
                assert layers == [moe.top_k] * len(layers), f"{name.arm}: top-k takes exactly K on {kind}"
        expected, most = run["flops_per_token"]["expected"], run["flops_per_token"]["max"]
        assert most == flops_per_token(cfg, cfg.train.seq_len), name.arm
        assert expected == (flops_per_token(cfg, cfg.train.seq_len, run["experts"]["all"]) if moe.routing == "top_p"
                            else most), f"{name.arm}: FLOPs at the measured mean"
        assert run["loss"]["all"] == pytest.approx(name.val_loss[0], rel=1e-6), "the whole split, as final.json"
    compared = {(c.a, c.b, c.metric) for c in results.comparisons}
    assert compared == {(a, b, m) for a, b in STUDIES["dynamic"].compared
                        for m in ("val_loss", "loss/code", "loss/documentation", "experts/all")}
    table = (tmp_path / "dynamic" / "results.md").read_text()
    assert "| GShard, top-p |" in table and "code - documentation" in table, table


class Stopped(Exception):
    pass


def test_an_interrupted_arm_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    arm, scale = ARMS["switch"], SCALES["toy"]
    directory = arms.run_dir(tmp_path, arm, 0)
    real_save = Checkpointer.save

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        if step == 3:
            raise Stopped  # as if the run were stopped right after its first checkpoint

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Stopped):
        arms.train_arm(arm, scale, 0, directory, progress=False)
    monkeypatch.undo()
    assert not (directory / arms.FINAL).exists()
    with pytest.raises(ExperimentError, match="pass --resume"):
        arms.train_arm(arm, scale, 0, directory)
    record = arms.train_arm(arm, scale, 0, directory, resume=True, progress=False)
    assert record.resumed and record.steps == scale.steps
    assert [p.resumed for p in record.trained] == [False, True], "each invocation's provenance, as it trained"
    assert record.invocations == 2 and record.wall_s == pytest.approx(sum(p.wall_s for p in record.trained)), \
        "a resumed arm's wall time adds up its invocations"
    assert RunResult.read(directory / arms.FINAL) == record, "final.json round-trips the record"
    steps = [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, scale.steps + 1)), f"continued after step 3, not from the start: {steps}"
    assert [t for t, _ in record.val_curve] == [128 * s for s in range(1, 7)], "the curve of both invocations"


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_run_validates_curve_points_times_the_last_at_its_last_step(scale):
    for v in VARIANTS.values():
        if not v.applies_to(SCALES[scale]):
            continue
        t = arm_config(*v.apply(ARMS["gshard"], SCALES[scale], tokenizer="byte"), 0).train
        validated = [s for s in range(1, t.steps + 1) if s % t.eval_every == 0 or s == t.steps]  # as train/loop.py
        assert len(validated) == min(specs.CURVE_POINTS, t.steps) and validated[-1] == t.steps, (v.name, validated)


def test_a_saved_run_counts_as_its_arm_whatever_its_evaluation_settings(tmp_path):
    """Runs trained with other validation settings (one evaluation, other log spacing) stay valid;
    a run of another learning rate does not."""
    arm, scale = ARMS["gshard"], SCALES["toy"]
    cfg = arm_config(arm, scale, 0)
    earlier = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=scale.steps, log_every=5,
                                                                 eval_tokens=4096))
    write_config(tmp_path, earlier)
    RunResult(2.0, 0.01, 2048, scale.tokens, scale.steps, 1.0).write(tmp_path / arms.FINAL)
    assert arms.train_arm(arm, scale, 0, tmp_path).val_loss == 2.0, "the finished run is reused"
    write_config(tmp_path, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-2)))
    with pytest.raises(ExperimentError, match="another config"):
        arms.train_arm(arm, scale, 0, tmp_path)


def test_a_final_json_of_the_first_runs_still_reads(tmp_path):
    """final.json of runs recorded before windows, curves and provenance were: the fields it has."""
    (tmp_path / "final.json").write_text(json.dumps({"val_loss": 2.0, "val_loss_stderr": 0.01, "eval_tokens": 10,
                                                     "train_tokens": 20, "steps": 3, "wall_s": 1.5,
                                                     "a_field_since_removed": 1}))
    record = RunResult.read(tmp_path / "final.json")
    assert (record.val_loss, record.val_curve, record.trained, record.invocations) == (2.0, (), (), 1), record


def _record(val_loss: float, windows: tuple[float, ...] = (), documents: tuple[int, ...] = ()) -> RunResult:
    return RunResult(val_loss, 0.01, 1024, 4096, 8, 1.0, val_window_losses=windows, val_window_documents=documents)


def test_window_errors_by_hand():
    """A - B per window: 0.1, -0.1, 0.3, 0.1: mean 0.1, std 0.1633 -> SE 0.0816 over 4 windows; by
    document (windows 0, 1 in document 0; 2, 3 in document 1): residual sums -0.2, +0.2 ->
    sqrt(2/1 * 0.08) / 4 = 0.1."""
    a = _record(2.1, (2.1, 1.9, 2.3, 2.1), (0, 0, 1, 1))
    b = _record(2.0, (2.0, 2.0, 2.0, 2.0), (0, 0, 1, 1))
    plain, clustered = runner.window_errors(a, b)
    assert plain == pytest.approx(0.16330 / 2, abs=1e-5) and clustered == pytest.approx(0.1), (plain, clustered)
    assert runner.window_errors(_record(2.0), _record(2.5)) == (None, None), "runs without window losses"


def test_an_arms_validation_curve_is_the_mean_over_seeds_where_every_seed_logged():
    curve = lambda *points: RunResult(2.0, 0.01, 1024, 300, 3, 1.0, val_curve=points)
    mean = runner.mean_curve([curve((100, 3.0), (200, 2.5), (300, 2.1)), curve((100, 3.2), (300, 2.3))])
    assert mean.tokens == (100, 300) and mean.mean == pytest.approx([3.1, 2.2]), mean
    assert runner.mean_curve([curve(), curve((100, 3.0))]).tokens == (), "a run without a curve: none"


def test_gap_curve_pairs_seeds_at_the_validations_every_run_logged():
    """Seed 0 logged at 100, 200, 300 tokens, seed 1 missed 200: each point is paired over the seeds
    that have it; at 300, A - B = 0.1 and 0.3: mean 0.2, std 0.1414, t(0.975, 1) = 12.706 -> +- 1.2706."""
    curve = lambda *points: RunResult(2.0, 0.01, 1024, 300, 3, 1.0, val_curve=points)
    a = [curve((100, 3.0), (200, 2.5), (300, 2.1)), curve((100, 3.2), (300, 2.3))]
    b = [curve((100, 3.1), (200, 2.6), (300, 2.0)), curve((100, 3.1), (300, 2.0))]
    c = runner.gap_curve(a, b)
    assert c.tokens == (100, 200, 300) and c.seeds == (2, 1, 2), c
    assert c.mean == pytest.approx([0.0, -0.1, 0.2]), c
    assert c.ci95[2] == pytest.approx([0.2 - 1.2706, 0.2 + 1.2706], abs=1e-3) and c.ci95[1] is None, c
    assert runner.gap_curve([curve()], [curve()]).tokens == ()
    assert report._early_gaps(c, 3000, 2) == "+0.2000, -", "1/10 of 3000 is 300 (logged by both seeds); 1500 is not"
    assert report._early_gaps(c, 1000, 2) == "+0.0000, -", "100 tokens is 1/10 of 1000; 500 lies nowhere near a point"
    assert report._early_gaps(c, 400, 2) == "-, -", "200 (half of 400) was logged by one seed only"


@pytest.mark.parametrize("path", sorted((REPO / "docs" / "experiments").rglob("results.json")), ids=str)
def test_every_committed_result_reads_and_renders(path):
    results = read_results(path)
    assert (results.runs if isinstance(results, FinetuneResults) else results.arms or results.measures), path
    for c in results.comparisons:
        assert c.per_seed and (len(c.per_seed) < 2 or c.ci95[0] <= c.mean <= c.ci95[1]), c
        assert c.p_holm is None or c.p_holm >= c.p_value, c
    table = report.markdown(results)
    assert table.startswith(f"### {results.study}") and "Holm" in table, table[:200]


def test_holm_over_the_committed_cpu_sensitivity_table_leaves_no_setting():
    """EXPERIMENTS.md's family-wise view: over the 12 cpu settings, DeepSeekMoE - GShard is negative in
    every one, and none survives Holm's correction at 5% on its own."""
    results = read_results(REPO / "docs" / "experiments" / "cpu" / "sensitivity" / "results.json")
    assert len(results.comparisons) == 12 and all(c.mean < 0 for c in results.comparisons)
    assert min(c.p_holm for c in results.comparisons) > 0.05


def test_sensitivity_trains_both_arms_per_variant_and_pairs_them(tmp_path):
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--seeds", "0,1", "--variants", "norm_topk",
                     "--workdir", str(tmp_path), "--quiet"]) == 0
    results = read_results(tmp_path / "sensitivity" / "results.json")
    (c,) = results.comparisons
    deep, gshard = results.arm("deepseekmoe", "norm_topk"), results.arm("gshard", "norm_topk")
    assert c.per_seed == pytest.approx([d - g for d, g in zip(deep.val_loss, gshard.val_loss)])
    assert all(se > 0 for se in c.window_se) and c.ci95[0] <= c.mean <= c.ci95[1], c
    assert (tmp_path / "runs" / "deepseekmoe@norm_topk" / "seed1" / "final.json").is_file(), "stored apart"
    assert "| norm_topk | DeepSeekMoE - GShard |" in (tmp_path / "sensitivity" / "results.md").read_text()
    # the gap against tokens: every step of the toy run is a validation (6 steps of 4 x 32 tokens)
    logged = {a: [{r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "runs" / f"{a}@norm_topk" / f"seed{s}"
                                                                      / "metrics.jsonl").read_text().splitlines())}
                  for s in (0, 1)] for a in ("gshard", "deepseekmoe")}
    assert c.curve.tokens == tuple(128 * step for step in range(1, 7)), c.curve
    expected = [np.mean([d[step] - g[step] for d, g in zip(logged["deepseekmoe"], logged["gshard"])])
                for step in range(1, 7)]
    assert c.curve.mean == pytest.approx(expected), "paired by seed from each run's logged validations"
    assert (tmp_path / "sensitivity" / "gap_vs_tokens.png").stat().st_size > 1000
    assert results.variants[0].settings == {"moe.norm_topk_prob": True}, results.variants


def _bpe_300(monkeypatch) -> list[str]:
    """A 300-token BPE variant; returns the list the texts its tokenizer is trained on go into."""
    monkeypatch.setitem(specs.VARIANTS, "bpe_300", specs.Variant("bpe_300", "a small BPE", vocab_size=300))
    seen = []
    real = runner.train_bpe
    monkeypatch.setattr(runner, "train_bpe", lambda texts, *args: (seen.extend(texts), real(seen, *args))[1])
    return seen


def test_a_bpe_variant_trains_its_tokenizer_on_the_training_split_only(tmp_path, monkeypatch):
    seen = _bpe_300(monkeypatch)
    v = variant("bpe_300")
    path = runner.variant_tokenizer(v, tmp_path)
    docs = data.embedded_documents()
    held_out = {text for _, text in docs[data.VAL_EVERY - 1::data.VAL_EVERY]}
    assert len(seen) == len(docs) - len(held_out) and not held_out & set(seen), "never the held-out documents"
    assert path == str(tmp_path / "tokenizers" / "bpe-300" / "tokenizer.json")
    cfg = arm_config(*v.apply(ARMS["deepseekmoe"], SCALES["toy"], path), 0)
    assert (cfg.data.tokenizer, cfg.model.vocab_size) == (path, 300), "the arms read it"
    assert runner.variant_tokenizer(v, tmp_path) == path and len(seen) == len(docs) - len(held_out), \
        "trained once, then reused"


@pytest.mark.slow  # about 25 s: run with -m slow
def test_a_bpe_variant_trains_and_pairs_its_arms(tmp_path, monkeypatch):
    _bpe_300(monkeypatch)
    results = run_study("sensitivity", "toy", [0], ["bpe_300"], workdir=tmp_path, progress=False)
    cfg = loading.load_model(tmp_path / "runs" / "deepseekmoe@bpe_300" / "seed0").cfg
    assert cfg.data.tokenizer == str(tmp_path / "tokenizers" / "bpe-300" / "tokenizer.json")
    assert cfg.model.vocab_size == 300 and results.comparisons[0].per_seed


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_probes_train_what_is_missing_split_validation_by_kind_and_pair_the_arms(tmp_path, monkeypatch):
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--seeds", "0,1", "--variants", "base",
                     "--arms", "switch", "--workdir", str(tmp_path), "--quiet"]) == 0
    trained = read_results(tmp_path / "sensitivity" / "results.json")
    assert [a.arm for a in trained.arms] == ["gshard", "deepseekmoe", "switch"], trained.arms
    switch, gshard = trained.arm("switch"), trained.arm("gshard")
    versus = {(c.a, c.b): c for c in trained.comparisons}
    assert versus[("switch", "gshard")].per_seed == pytest.approx(
        [s - g for s, g in zip(switch.val_loss, gshard.val_loss)]), "Switch paired with GShard by seed"
    # the probes read the same runs (no training); with a seed not trained yet, they train it
    monkeypatch.setattr(arms, "train", lambda *a, **k: pytest.fail("a trained arm was retrained"))
    assert cli.main(["experiment", "probes", "--scale", "toy", "--seeds", "0,1", "--workdir", str(tmp_path),
                     "--arms", "switch", "--quiet"]) == 0
    results = read_results(tmp_path / "probes" / "results.json")
    probes = results.measures["probes"]["base"]
    assert len(probes["switch"]) == 2 and all(r["load"]["max_over_mean"][0] >= 1.0 for r in probes["switch"])
    assert "| switch |" in (tmp_path / "probes" / "results.md").read_text(), "every probed arm's load is reported"
    cfg = arm_config(ARMS["gshard"], SCALES["toy"], 0)
    kinds = measures.validation_by_kind(cfg)
    assert sum(map(len, kinds.values())) == len(loading.validation_tokens(cfg)), "the kinds make up the split"
    for c in results.comparisons:
        if c.metric == "val_loss":
            continue
        kind = c.metric.split("/")[1]
        by_hand = [x["loss"][kind] - y["loss"][kind] for x, y in zip(probes[c.a], probes[c.b])]
        assert c.per_seed == pytest.approx(by_hand) and c.ci95[0] <= c.mean <= c.ci95[1], c
    assert {c.metric for c in results.comparisons} == {"val_loss", "loss/code", "loss/documentation"}
    first = probes["gshard"][0]
    assert set(first["loss"]) == {"code", "documentation"} and all(v > 0 for v in first["stderr"].values())
    assert len(first["load"]["max_over_mean"]) == cfg.model.n_moe_layers, first["load"]
    for arm, runs in probes.items():  # the top K of E softmax probabilities sum to between K/E and 1
        K_over_E = ARMS[arm].top_k / ARMS[arm].routed
        assert all(K_over_E - 1e-6 <= g <= 1 + 1e-6 for r in runs for g in r["gate_sum"]), (arm, runs[0]["gate_sum"])
    monkeypatch.undo()
    with pytest.raises(ExperimentError, match="pass --resume"):  # an unfinished run: the probes honour --resume
        (arms.run_dir(tmp_path, ARMS["gshard"], 2) / "checkpoints" / "3").mkdir(parents=True)
        run_study("probes", "toy", [2], workdir=tmp_path, progress=False)


def test_routing_by_token_is_one_for_hash_routing_and_less_for_a_learned_router():
    cfg = arm_config(ARMS["hash"], SCALES["toy"], 0)
    tokens = np.random.default_rng(0).integers(0, 64, 4 * 33)  # 4 windows of the toy seq_len 32 + 1
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    for layer in measures.routing_by_token(params, cfg, tokens, 0):
        assert layer["table_accuracy"] == 1.0 and layer["normalised_mutual_information"] == pytest.approx(1.0), layer
        assert layer["constant_accuracy"] < 0.5, "hash routing spreads the ids over the experts"
    # a learned router with weights large enough for attention to mix the context into its input,
    # over four token ids seen 32 times each (the plug-in estimates need many tokens per id)
    wide = dataclasses.replace(ARMS["gshard"], change=specs.setting(model={"init_std": 0.3}))
    learned = arm_config(wide, SCALES["toy"], 0)
    params = dsmoe_jax.init_params(learned.model, jax.random.key(0))
    for layer in measures.routing_by_token(params, learned, tokens % 4, 0):
        assert layer["normalised_mutual_information"] < 0.9, f"the context, not the id alone, routes: {layer}"


def test_sensitivity_variants_change_what_they_say_and_keep_the_token_budget():
    cpu = SCALES["cpu"]
    for name, change in VARIANTS.items():
        for arm in ("gshard", "deepseekmoe"):
            changed, scale = change.apply(ARMS[arm], cpu, tokenizer="bpe/tokenizer.json")
            arm_config(changed, scale, 0)  # every variant builds
            assert scale.tokens == cpu.tokens, f"{name}: every variant trains on the same number of tokens"
            assert (changed.name == arm) == (name == "base"), "each variant's runs are stored apart"
    norm = arm_config(*VARIANTS["norm_topk"].apply(ARMS["deepseekmoe"], cpu), 0)
    deep = arm_config(*VARIANTS["depth_4"].apply(ARMS["deepseekmoe"], cpu), 0)
    wide = arm_config(*VARIANTS["ffn_512"].apply(ARMS["deepseekmoe"], cpu), 0)
    assert norm.model.moe.norm_topk_prob and deep.model.n_layers == 4 and wide.model.moe.expert_d_ff == 128
    big = arm_config(*VARIANTS["batch_64"].apply(ARMS["gshard"], cpu), 0)
    assert (big.train.batch_size, big.train.steps, big.train.warmup_steps) == (64, 75, 8), "4x the batch"
    longer = arm_config(*VARIANTS["batch_64"].apply(ARMS["gshard"], SCALES["cpu-long"]), 0)
    assert (longer.train.batch_size, longer.train.steps) == (64, 750), "the same change at cpu-long's budget"


@pytest.mark.parametrize("arm", ["gshard", "deepseekmoe"])
def test_routed_scale_makes_the_gates_sum_to_about_one_at_initialisation(arm):
    """At initialisation the router is nearly uniform: top-K of E softmax gates sum to a little over
    K/E (GShard 2/16, DeepSeekMoE 7/63: the largest K are chosen); scaled by E/K (the same weights)
    they sum to a little over 1."""
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 256)
    sums = {}
    for name in ("base", "routed_scale"):
        cfg = arm_config(*VARIANTS[name].apply(ARMS[arm], SCALES["cpu"]), 0).model
        aux = dsmoe_jax.forward(dsmoe_jax.init_params(cfg, jax.random.key(0)), tokens, cfg)[1]
        sums[name] = np.asarray(aux.gate_sum)
    K_over_E = ARMS[arm].top_k / ARMS[arm].routed
    np.testing.assert_allclose(sums["base"], K_over_E, rtol=0.2, err_msg="nearly uniform softmax gates")
    np.testing.assert_allclose(sums["routed_scale"][0], sums["base"][0] / K_over_E, rtol=1e-5,
                               err_msg="the first MoE layer sees the same input: its gates scaled by E/K")
    np.testing.assert_allclose(sums["routed_scale"], sums["base"] / K_over_E, rtol=1e-3,
                               err_msg="later layers see inputs the scaled gates changed a little")


def test_a_study_is_refused_before_training_anything(tmp_path):
    with pytest.raises(ExperimentError, match="variant batch_64: .*steps divisible by 4; scale toy trains 6"):
        run_study("sensitivity", "toy", [0], ["norm_topk", "batch_64"], workdir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "refused before training anything"
    assert plan("sensitivity", "toy").variants and "batch_64" not in [v.name for v in plan("sensitivity", "toy")
                                                                          .variants]


def test_without_the_experiments_extra_the_command_names_it():
    """scipy missing (as in an install without the [experiments] extra): one line naming the extra."""
    code = ("import sys; sys.modules['scipy'] = None\n"
            "from dsmoe_jax import cli\nraise SystemExit(cli.main(['experiment', 'ablation', '--dry-run']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "pip install 'dsmoe-jax[experiments]'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_a_run_that_fails_on_a_read_only_workdir_reports_its_own_error(tmp_path, monkeypatch):
    """Training fails for the disk; recording the invocation fails the same way: the training's
    error is the one raised, not a chain ending in the record's OSError."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def fail(*args, **kwargs):
        raise CheckpointError("checkpoints: Read-only file system")

    monkeypatch.setattr(arms, "train", fail)
    monkeypatch.setattr(arms, "atomic_file", read_only)
    directory = arms.run_dir(tmp_path, ARMS["switch"], 0)
    directory.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="Read-only") as e:
        arms.train_arm(ARMS["switch"], SCALES["toy"], 0, directory, progress=False)
    assert e.value.__context__ is None, "nothing raised while handling it"
