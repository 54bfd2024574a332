"""lm-evaluation-harness: our model class against lm-eval's own Hugging Face backend on the same
weights (a tiny converted checkpoint, and transformers' Qwen2Moe with the mapping of
helpers.qwen2moe_oracle), offline, on the local tasks of tests/data/lm_eval_tasks.

lm-eval comes with the test extra; without it these tests fail (they do not skip)."""

import json
import pathlib
import sys

import numpy as np
import pytest

from dsmoe_jax import cli, convert, errors, harness
from dsmoe_jax.convert.hf_files import plan_shards, write_safetensors
from helpers import TINY_HF, qwen2moe_oracle, random_hf_checkpoint

TASKS = pathlib.Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
# Byte-level tokens (ids 0-255 are the bytes) plus BOS 256 and EOS 257; 64 positions, so some of
# the tasks' requests are left-truncated and the longest document takes several rolling windows.
HF_CFG = {**TINY_HF, "vocab_size": 258, "bos_token_id": 256, "eos_token_id": 257, "max_position_embeddings": 64}


def _byte_tokenizer(directory: pathlib.Path) -> None:
    """A byte-level BPE tokenizer.json without merges whose post-processor adds BOS (as
    DeepSeek's does), and the tokenizer_config.json naming BOS and EOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # GPT-2's byte -> unicode table: printable bytes stand for themselves, the rest from 256 on
    char = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    tok = Tokenizer(models.BPE({char[b]: b for b in range(256)} | {"<|begin|>": 256, "<|end|>": 257}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|begin|>", special=True), AddedToken("<|end|>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 256)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>"}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(ours, theirs)``: the same random weights as a converted dsmoe-jax checkpoint and as a
    transformers Qwen2MoeForCausalLM directory, each with the byte tokenizer."""
    root = tmp_path_factory.mktemp("harness")
    tensors = random_hf_checkpoint(convert.config_from_hf(HF_CFG), seed=7)
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CFG))
    write_safetensors(iter(tensors.items()), plan_shards(((n, a.shape, a.dtype) for n, a in tensors.items()), 10**9),
                      hf)
    _byte_tokenizer(hf)
    convert.hf_to_jax(hf, root / "ours", progress=False)
    theirs = root / "qwen2moe"
    model = qwen2moe_oracle(tensors, HF_CFG)
    model.config.bos_token_id, model.config.eos_token_id = 256, 257
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 256, 257
    model.save_pretrained(theirs)
    _byte_tokenizer(theirs)
    return root / "ours", theirs


def _evaluate(model: str, model_args: dict, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # batch 16: the 33 choices, 9 rolling windows and 10 prompts take 2 + 1 compiled programs
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=16,
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                   bootstrap_iters=0, log_samples=True)


def _responses(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _loglikelihoods(results: dict, task: str) -> tuple[np.ndarray, list]:
    """Every request's log-likelihood (each choice of each document, or each document), and its
    is_greedy flag (None for rolling ones)."""
    pairs = [r if isinstance(r, (tuple, list)) else (r, None) for resps in _responses(results, task) for r in resps]
    return np.array([p[0] for p in pairs], float), [p[1] for p in pairs]


@pytest.fixture(scope="module")
def lm(checkpoints):
    """Our model class on the converted checkpoint, found through lm-eval's registry."""
    from lm_eval.api.registry import get_model

    harness.lm_class()  # registers it as "dsmoe-jax"
    return get_model("dsmoe-jax").create_from_arg_string(f"checkpoint={checkpoints[0]}", {"batch_size": 16})


def test_our_model_class_matches_lm_evals_hf_backend_on_the_same_weights(checkpoints, lm):
    _, theirs_dir = checkpoints
    # programs generate compiled before, for other tests' models in this process (test_cli's eval --tasks)
    generate_programs = harness._generate._cache_size()
    ours = _evaluate(lm, {}, ["dsmoe_mc", "dsmoe_gen", "dsmoe_rolling"])
    hf_args = {"pretrained": str(theirs_dir), "device": "cpu", "dtype": "float32"}
    theirs = _evaluate("hf", {**hf_args, "add_bos_token": True}, ["dsmoe_mc", "dsmoe_gen"])
    # Rolling windows are conditioned on BOS as the prefix token; hf with a BOS-adding tokenizer would
    # put a second BOS after it (see harness.py), so its documents are encoded without one here.
    theirs_rolling = _evaluate("hf", {**hf_args, "add_bos_token": False}, ["dsmoe_rolling"])

    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["dsmoe_mc"][metric] == theirs["results"]["dsmoe_mc"][metric], metric
    for task, reference, requests in (("dsmoe_mc", theirs, 33), ("dsmoe_rolling", theirs_rolling, 4)):
        (ll, greedy), (ref_ll, ref_greedy) = _loglikelihoods(ours, task), _loglikelihoods(reference, task)
        assert len(ll) == len(ref_ll) == requests, task
        # a rolling document sums a few hundred float32 terms (about -1000): 1e-4 plus 1e-6 of it
        np.testing.assert_allclose(ll, ref_ll, atol=1e-4, rtol=1e-6 if task == "dsmoe_rolling" else 0, err_msg=task)
        assert greedy == ref_greedy, task
    assert _responses(ours, "dsmoe_gen") == _responses(theirs, "dsmoe_gen"), "greedy generations differ"
    assert ours["results"]["dsmoe_gen"]["exact_match,none"] == theirs["results"]["dsmoe_gen"]["exact_match,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"]["dsmoe_rolling"][metric],
                                   theirs_rolling["results"]["dsmoe_rolling"][metric], rtol=1e-5, err_msg=metric)

    # bucketed shapes: a handful of compiled programs, not one per request
    assert harness._score_fn(convert.config_from_hf(HF_CFG))._cache_size() <= 2
    assert harness._generate._cache_size() - generate_programs == 1, "one generate program for every request"


class _Request:
    """What the model class reads of lm-eval's ``Instance``: its ``args``."""

    def __init__(self, *args):
        self.args = args


def test_stop_sequences_cut_the_text_and_greedy_flags_follow_the_argmax(lm):
    context = "Question: What do bees make?\nAnswer:"
    # nine more long contexts: the batch shape the first test compiled
    contexts = [context] + ["Question: " + "w" * 60 + f"{i}?\nAnswer:" for i in range(9)]
    run = lambda until: lm.generate_until([_Request(c, {"until": until, "max_gen_toks": 12}) for c in contexts], True)
    full = run([])[0]
    stop = full[4:6]
    cut = run([stop])[0]
    assert cut == full.split(stop)[0] and len(cut) < len(full)

    ids = lm.tok_encode(context)
    assert ids[0] == 256 and lm.tok_encode(context, add_special_tokens=False) == ids[1:]
    # every next token: the log-probabilities form a distribution, and only its argmax is greedy
    logp, greedy = map(np.array, zip(*lm.score([(ids, [t]) for t in range(HF_CFG["vocab_size"])])))
    assert abs(np.logaddexp.reduce(logp)) < 1e-4
    assert np.flatnonzero(greedy).tolist() == [int(np.argmax(logp))]


def test_the_cli_runs_tasks_from_an_include_path(checkpoints, capsys, tmp_path):
    ours_dir, _ = checkpoints
    out = tmp_path / "results.json"
    assert cli.main(["eval", "--checkpoint", str(ours_dir), "--tasks", "dsmoe_mc,dsmoe_rolling", "--limit", "3",
                     "--batch-size", "16", "--include-path", str(TASKS), "--no-builtin-tasks",
                     "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dsmoe_mc" in table and "acc" in table and "bits_per_byte" in table
    assert set(json.loads(out.read_text())["results"]) == {"dsmoe_mc", "dsmoe_rolling"}

    assert cli.main(["eval", "--checkpoint", str(ours_dir), "--tasks", "no_such_task", "--include-path",
                     str(TASKS), "--no-builtin-tasks"]) == errors.HarnessError.exit_code
    assert "unknown lm-eval tasks ['no_such_task']" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(ours_dir), "--tasks", "dsmoe_mc", "--include-path",
                     str(tmp_path / "no_tasks_here"), "--no-builtin-tasks"]) == errors.HarnessError.exit_code
    err = capsys.readouterr().err
    assert f"--include-path '{tmp_path / 'no_tasks_here'}' does not exist" in err and "unknown" not in err, err


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it then raises ImportError
    with pytest.raises(errors.HarnessError, match=r'pip install -e "\.\[eval\]"'):
        harness.require_lm_eval()


def test_buckets_are_powers_of_two_within_the_cap():
    assert [harness.bucket(n, 64, 16) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert [harness.bucket(n, 48, 16) for n in (40, 48)] == [48, 48]
    assert [harness.bucket(n, 6) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]
