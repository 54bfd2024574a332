"""The paper's experiments: arms sized as the paper requires, and the machinery end to end at toy
scale (every number and plot, resuming without retraining)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import cli, data, loading
from dsmoe_jax.checkpoint import write_config
from dsmoe_jax.config import ConfigError
from dsmoe_jax.experiments import (
    ARMS,
    EXPERIMENTS,
    SCALES,
    VARIANTS,
    ExperimentError,
    arm_config,
    measures,
    report,
    run_experiment,
    run_probes,
    run_sensitivity,
    runner,
    specs,
    variant,
)
from dsmoe_jax.model import count_params
from dsmoe_jax.train.checkpoint import Checkpointer

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


def test_every_experiment_names_known_arms_and_every_arm_builds():
    for experiment in EXPERIMENTS.values():
        assert set(experiment.arms) <= set(ARMS), experiment.name
    for arm in ARMS.values():
        for scale in SCALES.values():
            arm_config(arm, scale, 0)


def test_paper_scale_dry_run_plans_every_arm(capsys):
    assert cli.main(["experiment", "architectures", "--scale", "paper", "--dry-run", "--mesh", "fsdp=8,expert=8"]) == 0
    out = capsys.readouterr().out
    assert "1 shared + 63 routed (F/4), top-7" in out and "FLOPs per step" in out
    assert "cannot run on this mesh: moe.n_routed_experts=63 does not split" in out, "63 experts on 8 devices"
    assert out.count("FLOPs per step") == 6, "every arm but DeepSeekMoE's 63 experts plans on expert=8"
    assert cli.main(["experiment", "nope", "--dry-run"]) == 1
    assert "unknown experiment 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    """One workdir for the toy runs below, so later experiments reuse the arms trained earlier."""
    return tmp_path_factory.mktemp("experiments")


@pytest.mark.slow  # about 65 s: run with -m slow
def test_toy_experiment_end_to_end_and_resume_without_retraining(toy_workdir, monkeypatch):
    results = run_experiment("specialisation", "toy", seeds=[0, 1], workdir=toy_workdir, progress=False)
    out = toy_workdir / "specialisation"
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"].keys() == {"deepseekmoe", "gshard", "gshard_x1.5"}
    for arm in saved["arms"].values():
        assert len(arm["val_loss"]) == 2 and all(v > 0 for v in arm["val_loss"])
        assert arm["eval_tokens"] > 0 and all(se > 0 for se in arm["val_loss_stderr"])
        assert arm["val_loss_seed_std"] > 0, "two seeds train two different models"
    s = saved["specialisation"]
    assert list(s["disable_top"]["deepseekmoe"]) == ["0/63", "1/63", "2/63", "3/63", "4/63"]
    assert list(s["disable_top"]["gshard_x1.5"]) == ["0/16", "1/16"]
    assert list(s["top_k"]) == ["3", "4", "5", "6", "7"] and len(s["gshard_top2"]) == 2
    assert s["top_k"]["7"] == s["no_shared"]["standard"], "top-7 is the model as trained"
    assert {"val_loss.png", "train_loss.png", "val_curve.png", "specialisation.png"} <= {p.name for p in out.iterdir()}
    curve = saved["arms"]["gshard"]["val_curve"]
    assert curve["tokens"] == [128 * step for step in range(1, 7)], curve
    logged = [[json.loads(line) for line in (toy_workdir / "runs" / "gshard" / f"seed{s}" / "metrics.jsonl")
               .read_text().splitlines()] for s in (0, 1)]
    by_step = [np.mean([rows[step - 1]["val_loss"] for rows in logged]) for step in range(1, 7)]
    assert curve["mean"] == pytest.approx(by_step), "the seeds' logged validations, averaged step by step"
    assert "DeepSeekMoE" in (out / "results.md").read_text() and results["scale"] == "toy"
    pairs = {(c["a"], c["b"]): c for c in saved["comparisons"]}
    assert set(pairs) == {("deepseekmoe", "gshard"), ("deepseekmoe", "gshard_x1.5"), ("gshard", "gshard_x1.5")}
    c = pairs[("deepseekmoe", "gshard")]
    arms = saved["arms"]
    assert c["per_seed"] == pytest.approx([x - y for x, y in zip(arms["deepseekmoe"]["val_loss"],
                                                                arms["gshard"]["val_loss"])])
    assert c["ci95"][0] < c["mean"] < c["ci95"][1] and all(se > 0 for se in c["window_se"]), c
    assert "| DeepSeekMoE - GShard |" in (out / "results.md").read_text()
    env = saved["environment"]
    assert env["jax"] and env["peak_rss_bytes"] > 2**20 and (env["commit"] is None or len(env["commit"]) == 40), env

    # a second run reuses the trained arms: nothing is trained again
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("a finished arm was retrained"))
    again = run_experiment("specialisation", "toy", seeds=[0, 1], workdir=toy_workdir, progress=False)
    assert again["arms"]["gshard"]["val_loss"] == results["arms"]["gshard"]["val_loss"]


@pytest.mark.slow  # about 25 s: run with -m slow
def test_balance_experiment_reports_load_statistics(toy_workdir):
    results = run_experiment("balance", "toy", seeds=[0], workdir=toy_workdir, progress=False)
    b = results["balance"]
    assert b.keys() == {"balance_off", "deepseekmoe", "balance_10x", "balance_device"}
    for stats in b.values():
        assert stats["max_over_mean"] >= 1.0 and 0 < stats["entropy"] <= 1.0
        assert len(stats["load"]) == SCALES["toy"].n_layers and len(stats["load"][0]) == 63
        assert sum(stats["load"][0]) > 0
    assert (toy_workdir / "balance" / "expert_load.png").is_file()


class Stopped(Exception):
    pass


def test_an_interrupted_arm_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    arm, scale = ARMS["switch"], SCALES["toy"]
    directory = runner.run_dir(tmp_path, arm, 0)
    real_save = Checkpointer.save

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        if step == 3:
            raise Stopped  # as if the run were stopped right after its first checkpoint

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Stopped):
        runner.train_arm(arm, scale, 0, directory, progress=False)
    monkeypatch.undo()
    assert not (directory / runner.FINAL).exists()
    with pytest.raises(ExperimentError, match="pass --resume"):
        runner.train_arm(arm, scale, 0, directory)
    record = runner.train_arm(arm, scale, 0, directory, resume=True, progress=False)
    assert record.resumed and record.steps == scale.steps
    walls = json.loads((directory / runner.WALLS).read_text())
    assert record.invocations == len(walls) == 2 and record.wall_s == pytest.approx(sum(walls)), \
        "a resumed arm's wall time adds up its invocations"
    assert runner.RunRecord.read(directory / runner.FINAL) == record, "final.json round-trips the record"
    steps = [json.loads(line)["step"] for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, scale.steps + 1)), f"continued after step 3, not from the start: {steps}"


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_run_validates_curve_points_times_the_last_at_its_last_step(scale):
    for v in VARIANTS.values():
        t = arm_config(ARMS["gshard"], dataclasses.replace(SCALES[scale], **v.scale), 0).train
        validated = [s for s in range(1, t.steps + 1) if s % t.eval_every == 0 or s == t.steps]  # as train/loop.py
        assert len(validated) == min(specs.CURVE_POINTS, t.steps) and validated[-1] == t.steps, (v.name, validated)


def test_a_saved_run_counts_as_its_arm_whatever_its_evaluation_settings(tmp_path):
    """Runs trained before validation curves (one evaluation, other log spacing) stay valid; a run of
    another learning rate does not."""
    arm, scale = ARMS["gshard"], SCALES["toy"]
    cfg = arm_config(arm, scale, 0)
    earlier = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=scale.steps, log_every=5,
                                                                 eval_tokens=4096))
    write_config(tmp_path, earlier)
    runner.RunRecord(2.0, 0.01, 2048, scale.tokens, scale.steps, 1.0).write(tmp_path / runner.FINAL)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": scale.steps, "loss": 2.1, "val_loss": 2.05}) + "\n")
    record = runner.train_arm(arm, scale, 0, tmp_path)
    assert record.val_loss == 2.0, "the finished run is reused"
    assert record.val_curve == (), "its one validation read other windows than the curves' and pairs with none"
    write_config(tmp_path, dataclasses.replace(earlier, train=dataclasses.replace(earlier.train,
                                                                                  eval_tokens=scale.curve_tokens)))
    assert runner.train_arm(arm, scale, 0, tmp_path).val_curve == ((scale.tokens, 2.05),), "read from its log"
    write_config(tmp_path, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-2)))
    with pytest.raises(ExperimentError, match="another config"):
        runner.train_arm(arm, scale, 0, tmp_path)


def _record(val_loss: float, windows: tuple[float, ...] = ()) -> runner.RunRecord:
    return runner.RunRecord(val_loss, 0.01, 1024, 4096, 8, 1.0, val_window_losses=windows)


def test_paired_comparison_by_hand():
    """Three seeds, A - B = 0.1, 0.2, 0.3: mean 0.2, std 0.1, t(0.975, 2) = 4.3027 -> +- 0.2484; the
    windows' paired SE is the std of the per-window differences over sqrt(windows)."""
    a = [_record(v, (v + 0.1, v - 0.1, v)) for v in (2.1, 2.2, 2.3)]
    b = [_record(2.0, (2.1, 1.9, 2.0))] * 3
    c = runner.compare("a", a, "b", b, seeds=[0, 1, 2])
    assert c["per_seed"] == pytest.approx([0.1, 0.2, 0.3]) and c["mean"] == pytest.approx(0.2)
    assert c["seed_std"] == pytest.approx(0.1)
    assert c["ci95"] == pytest.approx([0.2 - 0.24841, 0.2 + 0.24841], abs=1e-5)
    assert c["window_se"] == pytest.approx([0.0, 0.0, 0.0]), "A = B + a constant on every window: no spread"
    old = runner.compare("a", [_record(2.0)], "b", [_record(2.5)], seeds=[0])
    assert old["ci95"] is None and old["seed_std"] is None and old["window_se"] == [None], \
        "one seed has no interval; runs without window losses have no paired SE"


def test_an_arms_validation_curve_is_the_mean_over_seeds_where_every_seed_logged():
    curve = lambda *points: runner.RunRecord(2.0, 0.01, 1024, 300, 3, 1.0, val_curve=points)
    mean = runner._mean_curve([curve((100, 3.0), (200, 2.5), (300, 2.1)), curve((100, 3.2), (300, 2.3))])
    assert mean["tokens"] == [100, 300] and mean["mean"] == pytest.approx([3.1, 2.2]), mean
    assert runner._mean_curve([curve(), curve((100, 3.0))]) == {"tokens": [], "mean": []}, "an old run: no curve"


def test_gap_curve_pairs_seeds_at_the_validations_every_run_logged():
    """Seed 0 logged at 100, 200, 300 tokens, seed 1 missed 200: each point is paired over the seeds
    that have it; at 300, A - B = 0.1 and 0.3: mean 0.2, std 0.1414, t(0.975, 1) = 12.706 -> +- 1.2706."""
    curve = lambda *points: runner.RunRecord(2.0, 0.01, 1024, 300, 3, 1.0, val_curve=points)
    a = [curve((100, 3.0), (200, 2.5), (300, 2.1)), curve((100, 3.2), (300, 2.3))]
    b = [curve((100, 3.1), (200, 2.6), (300, 2.0)), curve((100, 3.1), (300, 2.0))]
    c = runner.gap_curve(a, b)
    assert c["tokens"] == [100, 200, 300] and c["seeds"] == [2, 1, 2], c
    assert c["mean"] == pytest.approx([0.0, -0.1, 0.2]), c
    assert c["ci95"][2] == pytest.approx([0.2 - 1.2706, 0.2 + 1.2706], abs=1e-3) and c["ci95"][1] is None, c
    assert runner.gap_curve([curve()], [curve()]) == {"tokens": [], "mean": [], "ci95": [], "seeds": []}
    assert report._early_gaps(c, 3000, 2) == "+0.2000, -", "1/10 of 3000 is 300 (logged by both seeds); 1500 is not"
    assert report._early_gaps(c, 1000, 2) == "+0.0000, -", "100 tokens is 1/10 of 1000; 500 lies nowhere near a point"
    assert report._early_gaps(c, 400, 2) == "-, -", "200 (half of 400) was logged by one seed only"


def test_sensitivity_trains_both_arms_per_variant_and_pairs_them(tmp_path, capsys):
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--seeds", "0,1", "--variants", "norm_topk",
                     "--workdir", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "sensitivity" / "results.json").read_text())
    v = results["variants"]["norm_topk"]
    c, losses = v["deepseekmoe_minus_gshard"], v["val_loss"]
    assert c["per_seed"] == pytest.approx([d - g for d, g in zip(losses["deepseekmoe"], losses["gshard"])])
    assert all(se > 0 for se in c["window_se"]) and c["ci95"][0] <= c["mean"] <= c["ci95"][1], c
    assert (tmp_path / "runs" / "deepseekmoe@norm_topk" / "seed1" / "final.json").is_file(), "stored apart"
    assert "| norm_topk |" in (tmp_path / "sensitivity" / "results.md").read_text()
    # the gap against tokens: every step of the toy run is a validation (6 steps of 4 x 32 tokens)
    logged = {a: [{r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / "runs" / f"{a}@norm_topk" / f"seed{s}"
                                                                      / "metrics.jsonl").read_text().splitlines())}
                  for s in (0, 1)] for a in ("gshard", "deepseekmoe")}
    assert c["curve"]["tokens"] == [128 * step for step in range(1, 7)], c["curve"]
    expected = [np.mean([d[step] - g[step] for d, g in zip(logged["deepseekmoe"], logged["gshard"])])
                for step in range(1, 7)]
    assert c["curve"]["mean"] == pytest.approx(expected), "paired by seed from each run's logged validations"
    assert (tmp_path / "sensitivity" / "gap_vs_tokens.png").stat().st_size > 1000
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--variants", "depth_9", "--workdir",
                     str(tmp_path)]) == 2
    assert "unknown variant 'depth_9'" in capsys.readouterr().err


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
    results = run_sensitivity("toy", [0], ["bpe_300"], tmp_path, progress=False)
    cfg = loading.load_model(tmp_path / "runs" / "deepseekmoe@bpe_300" / "seed0").cfg
    assert cfg.data.tokenizer == str(tmp_path / "tokenizers" / "bpe-300" / "tokenizer.json")
    assert cfg.model.vocab_size == 300 and results["variants"]["bpe_300"]["deepseekmoe_minus_gshard"]["per_seed"]


def test_probes_split_validation_by_kind_and_pair_the_arms(tmp_path, capsys):
    with pytest.raises(ExperimentError, match="holds no trained arm; train it first: dsmoe-jax experiment sensitivity "
                                              "--scale toy --variants base --seeds 0,1"):
        run_probes("toy", [0, 1], workdir=tmp_path, progress=False)
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--seeds", "0,1", "--variants", "base",
                     "--arms", "switch,gshard", "--workdir", str(tmp_path)]) == 2
    assert "name gshard and deepseekmoe (the pair compared)" in capsys.readouterr().err
    assert cli.main(["experiment", "sensitivity", "--scale", "toy", "--seeds", "0,1", "--variants", "base",
                     "--arms", "switch,gshard,deepseekmoe", "--workdir", str(tmp_path), "--quiet"]) == 0
    trained = json.loads((tmp_path / "sensitivity" / "results.json").read_text())["variants"]["base"]["val_loss"]
    assert list(trained) == ["switch", "gshard", "deepseekmoe"] and len(trained["switch"]) == 2, trained
    assert "- base: switch " in (tmp_path / "sensitivity" / "results.md").read_text()
    versus = json.loads((tmp_path / "sensitivity" / "results.json").read_text())["variants"]["base"]
    assert versus["others_minus_gshard"]["switch"]["per_seed"] == pytest.approx(
        [s - g for s, g in zip(trained["switch"], trained["gshard"])]), "Switch paired with GShard by seed"
    assert cli.main(["experiment", "probes", "--scale", "toy", "--seeds", "0,1", "--workdir", str(tmp_path),
                     "--arms", "gshard,deepseekmoe,switch", "--quiet"]) == 0
    results = json.loads((tmp_path / "probes" / "results.json").read_text())
    base = results["variants"]["base"]
    switch = base["arms"]["switch"]
    assert len(switch) == 2 and all(r["load"]["max_over_mean"][0] >= 1.0 for r in switch), switch
    assert "| switch |" in (tmp_path / "probes" / "results.md").read_text(), "every probed arm's load is reported"
    cfg = arm_config(ARMS["gshard"], SCALES["toy"], 0)
    kinds = measures.validation_by_kind(cfg)
    assert sum(map(len, kinds.values())) == len(loading.validation_tokens(cfg)), "the kinds make up the split"
    for kind, gap in base["deepseekmoe_minus_gshard"].items():
        arms = base["arms"]
        by_hand = [d["loss"][kind] - g["loss"][kind] for d, g in zip(arms["deepseekmoe"], arms["gshard"])]
        assert gap["per_seed"] == pytest.approx(by_hand) and gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1], gap
    gshard = base["arms"]["gshard"][0]
    assert set(gshard["loss"]) == {"code", "documentation"} and all(v > 0 for v in gshard["stderr"].values())
    assert len(gshard["load"]["max_over_mean"]) == cfg.model.n_moe_layers, gshard["load"]
    for arm, runs in base["arms"].items():  # the top K of E softmax probabilities sum to between K/E and 1
        K_over_E = ARMS[arm].top_k / ARMS[arm].routed
        assert all(K_over_E - 1e-6 <= g <= 1 + 1e-6 for r in runs for g in r["gate_sum"]), (arm, runs[0]["gate_sum"])
    assert "| documentation |" in (tmp_path / "probes" / "results.md").read_text()


def test_routing_by_token_is_one_for_hash_routing_and_less_for_a_learned_router():
    cfg = arm_config(ARMS["hash"], SCALES["toy"], 0)
    tokens = np.random.default_rng(0).integers(0, 64, 4 * 33)  # 4 windows of the toy seq_len 32 + 1
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    for layer in measures.routing_by_token(params, cfg, tokens, 0):
        assert layer["table_accuracy"] == 1.0 and layer["normalised_mutual_information"] == pytest.approx(1.0), layer
        assert layer["constant_accuracy"] < 0.5, "hash routing spreads the ids over the experts"
    # a learned router with weights large enough for attention to mix the context into its input,
    # over four token ids seen 32 times each (the plug-in estimates need many tokens per id)
    learned = arm_config(dataclasses.replace(ARMS["gshard"], settings=("model.init_std=0.3",)), SCALES["toy"], 0)
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
    assert (big.train.batch_size, big.train.steps) == (64, 75), "4x the batch, a quarter of the steps"


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


def test_sensitivity_combines_variants_with_plus_and_refuses_conflicts_and_other_budgets(tmp_path):
    both = arm_config(*variant("norm_topk+lr_1e-3").apply(ARMS["deepseekmoe"], SCALES["cpu-long"]), 0)
    assert both.model.moe.norm_topk_prob and both.train.lr == 1e-3, "both changes apply"
    assert both.train.steps == SCALES["cpu-long"].steps, "the scale's own budget is kept"
    with pytest.raises(ConfigError, match="lr_4e-3 sets lr=0.004 but an earlier part set lr=0.001"):
        variant("lr_1e-3+lr_4e-3")
    with pytest.raises(ConfigError, match="unknown variant 'base'"):
        variant("base+norm_topk")
    with pytest.raises(ConfigError, match="Choose one of norm_topk and routed_scale"):
        variant("routed_scale+norm_topk")
    scaled = arm_config(*variant("routed_scale+lr_1e-3").apply(ARMS["gshard"], SCALES["cpu"]), 0)
    assert (scaled.model.moe.routed_scaling_factor, scaled.train.lr) == (8.0, 1e-3), "16 experts, top-2: x8"
    with pytest.raises(ExperimentError, match="batch_64 trains on 614,400 tokens at scale cpu-long, not .* 6,144,000"):
        run_sensitivity("cpu-long", [0], ["norm_topk", "batch_64"], tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "refused before training anything"
