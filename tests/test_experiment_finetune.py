"""The fine-tuning study: its tasks' split, the held-out answer loss against the packed evaluation
of ``dsmoe-jax eval``, exact match against a hand count, the methods' configs and trained
budgets, the comparisons by hand, and a whole (trimmed) study at toy scale, resumed."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax.chat import render_chat
from dsmoe_jax.config import load_config, updated
from dsmoe_jax.data import embedded_documents, load_tokens, split_documents
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.evaluation import evaluate
from dsmoe_jax.experiments import ARMS, SCALES, arm_config, arms, finetune, read_results, report, run_study
from dsmoe_jax.experiments.finetune import METHODS, RECIPES
from dsmoe_jax.experiments.records import FinetuneResults, FinetuneRun
from dsmoe_jax.experiments.tasks import TASKS, capitals
from dsmoe_jax.model import param_shapes
from dsmoe_jax.peft.esft import select_count
from dsmoe_jax.peft.tuning import count, make_tuning
from dsmoe_jax.prepare import Options, prepare
from dsmoe_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def capitals_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "capitals"
    TASKS["capitals"].write(out)
    return out


def test_capitals_holds_out_names_of_held_out_files_only():
    train, held = capitals(*split_documents(embedded_documents()))
    question = lambda c: c["messages"][0]["content"]
    answer = lambda c: c["messages"][1]["content"]
    names = lambda records: {question(c).split("`")[1] for c in records}
    assert len(train) == 2605 and len(held) == 168, (len(train), len(held))
    assert not names(train) & names(held), "a held-out name is never a training question"
    assert all(answer(c) == question(c).split("`")[1].upper() for c in train + held), "the name upper-cased"


def test_answer_loss_equals_the_packed_evaluation_of_dsmoe_jax_eval(capitals_dir, tmp_path):
    """One example per padded row here, examples packed into rows with segment ids there: the
    same tokens predicted from the same context give the same loss."""
    cfg = load_config("tiny", ["train.seq_len=64", "model.max_seq_len=64", "train.batch_size=4"])
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    heldout = TASKS["capitals"].heldout(capitals_dir)
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(c) + "\n" for c in heldout))
    prepare([str(tmp_path / "h.jsonl")], tmp_path / "heldout", Options(format="chat", val_every=1), progress=False)
    packed = evaluate(params, updated(cfg, data={"path": str(tmp_path / "heldout")}),
                      load_tokens(updated(cfg, data={"path": str(tmp_path / "heldout")}))[1], max_tokens=0)
    ours = finetune.answer_scores(params, cfg, heldout, batch_size=16)
    assert ours.tokens == packed.tokens, (ours.tokens, packed.tokens)
    assert ours.loss == pytest.approx(packed.loss, abs=1e-5), (ours.loss, packed.loss)
    tok = load_tokenizer("byte")
    answered = sum(bool(render_chat(c["messages"], tok).loss_mask[1:65].any()) for c in heldout)
    assert ours.examples == answered < len(heldout), "an example cut before its answer counts as none"
    assert ours.exact_match == 0.0, "a random model answers nothing exactly"


def test_exact_match_is_every_answer_token_the_argmax_by_hand():
    """Row 0: every weighted target is the argmax; row 1: one weighted target is not (wrong);
    row 2: the wrong argmax falls on an unweighted position (still exact). Losses by hand."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = logits.argmax(-1)
    weights = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [1, 0, 1, 1, 1]])
    targets[1, 2] = (targets[1, 2] + 1) % 7
    targets[2, 1] = (targets[2, 1] + 1) % 7
    sums, counts, exact = finetune.answer_stats(logits, targets, weights)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums, (nll * weights).sum(1), rtol=1e-5)
    assert counts.tolist() == [3, 3, 4] and exact.tolist() == [True, False, True], (counts, exact)


def test_select_count_takes_the_most_relevant_experts_ties_to_the_lower_id():
    r = np.array([[0.1, 0.3, 0.3, 0.05, 0.25], [0.5, 0.1, 0.1, 0.1, 0.2]])
    chosen = select_count(r, 2, layers=[1, 2]).experts
    assert chosen == {1: (1, 2), 2: (0, 4)}, chosen
    assert select_count(r, 3, layers=[1, 2]).experts[2] == (0, 4, 1), "a tie goes to the lower id"
    with pytest.raises(ConfigError, match="between 1 and the layer's 5 routed experts"):
        select_count(r, 6, layers=[1, 2])


def test_the_equal_budget_trains_as_many_parameters_on_both_bases(tmp_path):
    """A quarter of each layer's routed parameters: 4 of GShard's 16 experts of width F and 16 of
    DeepSeekMoE's 63 of width F/4, 3 D F-sized matrices... the same count by hand."""
    scale, r = SCALES["cpu"], RECIPES["cpu"]
    counts = {}
    for name in ("gshard", "deepseekmoe"):
        base = arm_config(ARMS[name], scale, 0)
        E = base.model.moe.n_routed_experts
        path = tmp_path / f"{name}.json"
        select_count(np.ones((scale.n_layers, E)), round(finetune.BUDGET * E), list(range(scale.n_layers))).write(path)
        cfg = finetune.method_config(base, METHODS["esft_budget"], r, tmp_path, tmp_path, path)
        counts[name] = count(make_tuning(cfg), param_shapes(cfg.model))
    F, D = scale.ffn, scale.d_model
    assert counts["gshard"] == counts["deepseekmoe"] == scale.n_layers * 4 * 3 * D * F, counts


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_is_one_config_of_the_recipe(method, tmp_path):
    base = arm_config(ARMS["deepseekmoe"], SCALES["cpu"], 1)
    m, r = METHODS[method], RECIPES["cpu"]
    cfg = finetune.method_config(base, m, r, tmp_path / "task", tmp_path / "base", tmp_path / "e.json")
    assert cfg.train.init_from == str(tmp_path / "base") and cfg.data.path == str(tmp_path / "task")
    assert (cfg.train.steps, cfg.train.schedule, cfg.train.seed) == (r.steps, "constant", 1)
    assert cfg.train.lr == (r.lora_lr if m.lora else r.lr)
    assert cfg.train.trainable == (f"esft:{tmp_path / 'e.json'}" if m.esft else "all")
    assert cfg.train.lora.rank == (r.lora_rank if m.lora else 0)
    assert cfg.model == dataclasses.replace(base.model, max_seq_len=cfg.model.max_seq_len), "the base's model"


def _run(base, task, method, seed, loss, forgetting=0.0, exact=None):
    return FinetuneRun(base, task, method, seed, loss, 0.01, 100, 10, exact, 2.0 + forgetting, forgetting, 5, 10, 40)


def test_comparisons_by_hand():
    """method - full per seed; the equal-budget gap to full, DeepSeekMoE minus GShard."""
    loss = {("deepseekmoe", "full"): [1.0, 1.2], ("deepseekmoe", "esft_budget"): [1.1, 1.25],
            ("gshard", "full"): [1.0, 1.1], ("gshard", "esft_budget"): [1.3, 1.3]}
    runs = tuple(_run(b, "instructions", m, s, v[i], forgetting=0.1 * i) for (b, m), v in loss.items()
                 for i, s in enumerate((0, 1)))
    results = FinetuneResults("finetune", "cpu", (0, 1), ("deepseekmoe", "gshard"), ("instructions",),
                              ("full", "esft_budget"), {}, runs, (), 1.0)
    got = {(c.variant, c.metric, c.a): c for c in finetune.comparisons(results)}
    assert got[("deepseekmoe/instructions", "answer_loss", "esft_budget")].per_seed == pytest.approx((0.1, 0.05))
    assert got[("gshard/instructions", "forgetting", "esft_budget")].per_seed == pytest.approx((0.0, 0.0))
    gap = got[("instructions", "esft_budget - full answer_loss", "deepseekmoe")]
    assert gap.per_seed == pytest.approx((0.1 - 0.3, 0.05 - 0.2)), gap
    assert all(c.p_holm is None or c.p_holm >= c.p_value for c in got.values())


def test_the_report_renders_every_method_and_comparison(tmp_path):
    methods = ("frozen", "full", "esft_budget")
    runs = tuple(_run(b, t, m, s, 1.0 + 0.1 * i + 0.01 * s, exact=0.5 if t == "capitals" else None)
                 for b in ("deepseekmoe", "gshard") for t in ("instructions", "capitals")
                 for i, m in enumerate(methods) for s in (0, 1))
    labels = {**{m: METHODS[m].label for m in methods}, **{t: TASKS[t].title for t in TASKS}}
    results = FinetuneResults("finetune", "cpu", (0, 1), ("deepseekmoe", "gshard"), ("instructions", "capitals"),
                              methods, dataclasses.asdict(RECIPES["cpu"]), runs, (), 60.0, {}, labels, ("capitals",))
    results = dataclasses.replace(results, comparisons=finetune.comparisons(results))
    table = report.markdown(results)
    assert table.count("| ESFT-Token, 25% of routed params |") == 4, table
    assert table.count("| 0.5000 ± 0.0000 |") == 6, "exact match on the checkable task only"
    assert len(results.comparisons) == 2 * (2 * 2 + 2 * 3) + 2 and table.count("| esft_budget - full |") == 10
    assert report.finetune_plot(results, tmp_path / "f.png") == "f.png" and (tmp_path / "f.png").stat().st_size


@pytest.mark.slow  # about 70 s: run with -m slow
def test_the_study_runs_resumes_and_reports_at_toy_scale(tmp_path, monkeypatch):
    """Both bases, one task, three methods, one seed: every run measured, the table and plot
    written; a second invocation retrains nothing."""
    monkeypatch.setattr(finetune, "TASKS", {"capitals": TASKS["capitals"]})
    monkeypatch.setattr(finetune, "METHODS", {k: METHODS[k] for k in ("frozen", "full", "esft_budget")})
    results = run_study("finetune", "toy", seeds=[0], workdir=tmp_path, progress=False)
    assert len(results.runs) == 6 and all(np.isfinite(r.answer_loss) for r in results.runs)
    frozen = [r for r in results.runs if r.method == "frozen"]
    assert all(r.forgetting == 0 and r.trained_params == 0 for r in frozen)
    full = {r.base: r for r in results.runs if r.method == "full"}
    assert all(r.trained_params == r.total_params for r in full.values()), "full trains every parameter"
    budget = {r.base: r for r in results.runs if r.method == "esft_budget"}
    assert budget["gshard"].trained_params == budget["deepseekmoe"].trained_params, "the equal budget"
    assert budget["deepseekmoe"].experts == {"0": 16}, budget["deepseekmoe"].experts
    out = tmp_path / "finetune"
    assert "ESFT-Token, 25% of routed params" in (out / "results.md").read_text()
    assert (out / "finetune.png").is_file()
    assert read_results(out / "results.json") == results, "results.json round-trips"
    assert report.markdown(results) == (out / "results.md").read_text()
    monkeypatch.setattr(arms, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert run_study("finetune", "toy", seeds=[0], workdir=tmp_path, progress=False).runs == results.runs
