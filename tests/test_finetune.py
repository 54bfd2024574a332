"""Fine-tuning end to end: chat data prepared, packed, trained for epochs with the masked loss,
validated on the held-out examples, resumed exactly; document masking of pretraining data. The
packing itself, against transformers and float64 references, is tests/test_packing.py's."""

import json
import signal

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import data, load_config, prepare
from dsmoe_jax.chat import render_chat
from dsmoe_jax.errors import DataError, TrainingInterrupted
from dsmoe_jax.evaluation import evaluate, token_losses
from dsmoe_jax.packing import PackedRows
from dsmoe_jax.tokenizer import ByteTokenizer
from dsmoe_jax.train.loop import train

SMALL = ["model.n_layers=2", "train.seq_len=96", "train.batch_size=4", "train.warmup_steps=0",
         "train.schedule='constant'", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000"]


def _conversation(i: int) -> dict:
    a, b = i % 37, (7 * i) % 41
    if i % 3 == 0:
        return {"prompt": f"Add {a} and {b}.", "completion": f"{a + b}"}
    turns = [{"role": "user", "content": f"What is {a} plus {b}?"},
             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if i % 3 == 2:
        turns = [{"role": "system", "content": "Answer briefly."}, *turns,
                 {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"{2 * (a + b)}."}]
    return {"messages": turns}


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory):
    """A prepared chat dataset (byte tokenizer): 120 conversations, every 20th held out."""
    root = tmp_path_factory.mktemp("chat")
    (root / "chat.jsonl").write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(120)))
    prepare.prepare([str(root / "chat.jsonl")], root / "data", prepare.Options(format="chat"), workers=1,
                    progress=False)
    return root / "data"


def _cfg(dataset, *more):
    return load_config("tiny", SMALL + [f"data.path='{dataset}'", *more])


def _metrics(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_a_chat_dataset_is_read_as_packed_examples_with_their_masks(chat_dataset):
    cfg = _cfg(chat_dataset)
    train_split, held_out, tok = data.load_tokens(cfg)
    assert len(train_split) + len(held_out) == 120 and len(held_out) == 6, "every 20th conversation held out"
    convo = _conversation(0)  # record 0 is a training example, the first one
    want = render_chat([{"role": "user", "content": convo["prompt"]},
                        {"role": "assistant", "content": convo["completion"]}], ByteTokenizer())
    first = slice(int(train_split.starts[0]), int(train_split.starts[1]))
    np.testing.assert_array_equal(np.asarray(train_split.tokens[first]), want.ids, "tokens as render_chat gives")
    np.testing.assert_array_equal(np.asarray(train_split.mask[first]), want.loss_mask, "the loss mask beside them")
    rows = data.row_source(train_split, cfg.train.seq_len, seed=0)
    assert isinstance(rows, PackedRows) and rows.efficiency > 0.8, rows.efficiency


def test_validation_is_the_masked_loss_of_each_held_out_example_alone(chat_dataset):
    """``evaluate`` on packed held-out examples equals, by hand, the answer tokens' mean
    cross-entropy with each example run alone through ``forward``."""
    cfg = _cfg(chat_dataset, "train.seq_len=128")
    _, held_out, _ = data.load_tokens(cfg)
    assert data.row_source(held_out, 128).truncated == 0, "every example fits a row: none is cut"
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(1))
    # each example alone in a row of its own, right-padded: causal attention leaves its logits as alone
    n = len(held_out)
    ids, keep = np.zeros((n, 129), np.int32), np.zeros((n, 128), bool)
    for i in range(n):
        a, b = int(held_out.starts[i]), int(held_out.starts[i + 1])
        ids[i, :b - a] = held_out.tokens[a:b]
        keep[i, :b - a - 1] = np.asarray(held_out.mask[a:b])[1:] > 0
    nll = jax.jit(lambda params, ids: token_losses(dsmoe_jax.forward(params, ids[:, :-1], cfg.model)[0],
                                                    ids[:, 1:]))(params, ids)
    total, count = float(np.asarray(nll)[keep].sum()), int(keep.sum())
    result = evaluate(params, cfg, held_out, max_tokens=0)
    assert result.tokens == count, "only answer tokens are counted"
    np.testing.assert_allclose(result.loss, total / count, rtol=1e-5, err_msg="masked validation loss")
    assert result.stderr > 0


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_epochs_set_the_steps_reshuffle_and_a_stopped_run_resumes_exactly(chat_dataset, tmp_path, monkeypatch):
    """``train.epochs`` = 2 derives the steps from the packed rows; epoch 2 reads the rows in
    another order; a run stopped mid-epoch (SIGTERM: a checkpoint of that step, as kill -9 leaves
    the last one) and resumed logs the same losses as the uninterrupted run, bitwise."""
    from test_loop import _on_call

    cfg = _cfg(chat_dataset, "train.epochs=2", "train.lr=3e-3", "train.batch_size=8")
    rows = data.row_source(data.load_tokens(cfg)[0], cfg.train.seq_len, seed=cfg.train.seed, epochs=2)
    steps = 2 * rows.rows_per_epoch // cfg.train.batch_size
    first, second = ([tuple(rows[e * rows.rows_per_epoch + k].tokens[:8]) for k in range(rows.rows_per_epoch)]
                     for e in (0, 1))
    assert first != second and sorted(first) == sorted(second), "the same rows, reshuffled"

    _on_call(monkeypatch, 10**9, signum=signal.SIGTERM)
    last = train(cfg, tmp_path / "whole", progress=False)
    assert last.step == steps and last.val_loss is not None, last
    whole = _metrics(tmp_path / "whole")
    assert whole[steps]["loss"] < whole[1]["loss"] - 0.5, "the answers are learnt"
    assert 0.8 < whole[1]["packing_efficiency"] <= 1, whole[1]
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["train"]["steps"] == steps

    stop_at = rows.rows_per_epoch // cfg.train.batch_size + 1  # inside the second epoch
    _on_call(monkeypatch, stop_at, signum=signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "stopped", progress=False)
    _on_call(monkeypatch, 10**9, signum=signal.SIGTERM)
    train(cfg, tmp_path / "stopped", resume=True, progress=False)
    stopped = _metrics(tmp_path / "stopped")
    assert [stopped[s]["loss"] for s in range(1, steps + 1)] == [whole[s]["loss"] for s in range(1, steps + 1)]


def test_epochs_of_a_mixture_are_refused_before_anything_is_written(chat_dataset, tmp_path):
    cfg = load_config("tiny", SMALL + ["train.epochs=1", f"data.mix=[{{name='a', path='{chat_dataset}'}}, "
                                                         f"{{name='b', path='{chat_dataset}'}}]"])
    with pytest.raises(DataError, match=r"train.epochs counts passes over one finite dataset.*data.mix"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "nothing written"


def test_document_mask_keeps_attention_and_the_loss_inside_documents(tmp_path):
    """Pretraining windows of a prepared text dataset with ``data.document_mask``: each
    document a segment, the prediction of the next document's first token not counted."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"document {i}: " + "abc " * (5 + i % 7))
    prepare.prepare([str(docs)], tmp_path / "data", workers=1, progress=False)
    cfg = load_config("tiny", SMALL + [f"data.path='{tmp_path / 'data'}'", "data.document_mask=true",
                                       "train.seq_len=64", "train.steps=3"])
    train_split = data.load_tokens(cfg)[0]
    rows = data.row_source(train_split, 64)
    row = rows[1]
    starts = set(int(s) - 64 for s in train_split.starts if 64 <= s < 64 + 65)
    boundaries = {i for i in range(1, 65) if row.segment_ids[i] != row.segment_ids[i - 1]}
    assert boundaries == starts, f"segments change exactly where documents start: {boundaries} vs {starts}"
    assert len(rows) == len(data.WindowSource(train_split.tokens, 64)), "the same windows as without the mask"
    last = train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(last.loss)
    with pytest.raises(DataError, match="data.document_mask needs the document boundaries"):
        data.load_tokens(load_config("tiny", ["data.document_mask=true"]))


def test_rows_too_short_for_the_templates_fixed_text_are_refused(chat_dataset, tmp_path):
    """The byte tokenizer's format spends 21 tokens on an empty question and answer (BOS,
    "User: ", "\\n\\n", "Assistant: ", EOS): rows of 21 could never hold an answer."""
    cfg = _cfg(chat_dataset, "train.seq_len=20")
    with pytest.raises(DataError, match=r"train.seq_len \+ 1 = 21 tokens .* the chat template's fixed text \(21 "
                                        r"tokens for an empty question and answer\).*raise train.seq_len"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "nothing written"
