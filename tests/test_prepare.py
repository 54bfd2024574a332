"""prepare-data: formats, the held-out split, determinism, resuming, and errors that name the record."""

import dataclasses
import gzip
import json
import pathlib
import re

import numpy as np
import pytest

from dsmoe_jax import chat, data, errors, load_config, prepare, shards
from dsmoe_jax.cli import main
from dsmoe_jax.tokenizer import ByteTokenizer, load_tokenizer

SMALL = prepare.Options(shard_tokens=300)  # several shards from a few kB of text


def _texts(n=60):
    return [f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(n)]


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _documents(out: pathlib.Path, split: str, array: str = "") -> list[np.ndarray]:
    """Every document of ``split``, in order, cut at its shards' document offsets: its tokens, or
    with ``array="_mask"`` its loss mask."""
    docs = []
    for shard in shards.read_manifest(out).shards:
        values = np.load(out / "shards" / shard.name / f"{split}{array}.npy")
        offsets = np.load(out / "shards" / shard.name / f"{split}_docs.npy")
        docs += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def _byte_doc(text):
    return np.concatenate([[256], np.frombuffer(text.encode(), np.uint8), [257]])


def test_jsonl_to_shards_with_a_held_out_split_by_document(tmp_path):
    texts = _texts()
    m = prepare.prepare([str(_jsonl(tmp_path / "a.jsonl", texts))], tmp_path / "out", SMALL, workers=1, progress=False)
    assert len(m.shards) > 3 and m.dtype == np.uint16
    assert m.tokenizer["name"] == "byte" and m.tokenizer["vocab_size"] == 258
    assert m.sources[0]["sha256"] and m.sources[0]["bytes"] == (tmp_path / "a.jsonl").stat().st_size
    train, val = _documents(tmp_path / "out", "train"), _documents(tmp_path / "out", "val")
    held_out = [i for i in range(len(texts)) if i % 20 == 19]
    assert [d.tolist() for d in val] == [_byte_doc(texts[i]).tolist() for i in held_out], "records 19, 39, 59"
    assert [d.tolist() for d in train] == [_byte_doc(t).tolist() for i, t in enumerate(texts) if i not in held_out]
    assert m.val.documents == 3 and m.records == 60
    assert sum(s.train.tokens for s in m.shards) == m.train.tokens
    # the reading side sees each split as one flat sequence across shards
    tr, va = shards.load_prepared(tmp_path / "out", ByteTokenizer(), "byte")
    np.testing.assert_array_equal(np.asarray(tr), np.concatenate(train))
    np.testing.assert_array_equal(tr[250:700], np.concatenate(train)[250:700])
    assert len(va) == sum(len(d) for d in val)


def test_every_format_gives_the_same_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = _texts(25)
    body = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body, mtime=0))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    pq.write_table(pa.table({"body": texts, "n": list(range(25))}), tmp_path / "a.parquet")
    options = prepare.Options(text_field="body", val_every=5)
    results = {}
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        prepare.prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), options, workers=1, progress=False)
        results[name] = [d.tolist() for d in _documents(tmp_path / name.replace(".", "_"), "train")]
    assert results["a.jsonl.gz"] == results["a.jsonl.zst"] == results["a.parquet"]
    assert results["a.parquet"][0] == _byte_doc(texts[0]).tolist() and len(results["a.parquet"]) == 20
    # .txt files: one document each; a directory is searched, a glob expanded, in sorted order
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[:3]):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    prepare.prepare([str(tmp_path / "txt")], tmp_path / "txt_out", prepare.Options(val_every=0), workers=1,
                    progress=False)
    assert [d.tolist() for d in _documents(tmp_path / "txt_out", "train")] == [_byte_doc(t).tolist() for t in texts[:3]]
    assert prepare.expand_inputs([str(tmp_path / "txt" / "*.txt"), str(tmp_path / "txt")]) == \
        [tmp_path / "txt" / f"{i}.txt" for i in range(3)], "globs, directories, no repeats"


def test_an_hf_tokenizer_is_recorded_and_a_mismatch_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "the": 3, "quick": 4, "brown": 5, "fox": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    src = _jsonl(tmp_path / "a.jsonl", ["the quick fox"] * 40)
    m = prepare.prepare([str(src)], tmp_path / "out", prepare.Options(tokenizer=str(tmp_path / "tok")), workers=1,
                        progress=False)
    assert (m.tokenizer["vocab_size"], m.tokenizer["bos_id"], m.tokenizer["eos_id"]) == (7, 0, 1)
    assert _documents(tmp_path / "out", "train")[0].tolist() == [0, 3, 4, 6, 1]
    # training with another tokenizer is refused before anything runs
    cfg = load_config("tiny", [f"data.path='{tmp_path / 'out'}'"])
    with pytest.raises(errors.DataError, match=r"out was tokenized with the tokenizer '.*tok', not with data.tokenizer "
                                             r"'byte' \(sha256 .*vocab_size 7 vs 258.*set data.tokenizer"):
        data.load_training_data(cfg)
    train, _, _ = data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'out'}'",
                                                        f"data.tokenizer='{tmp_path / 'tok'}'"]))
    assert train[:5].tolist() == [0, 3, 4, 6, 1]


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", _texts(400))
    prepare.prepare([str(src)], tmp_path / "one", SMALL, workers=1, progress=False)
    prepare.prepare([str(src)], tmp_path / "two", SMALL, workers=2, progress=False)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")}
    prepare.prepare([str(src)], tmp_path / "one", SMALL, workers=1, progress=False)  # complete: nothing to do
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")}


def test_an_interrupted_run_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "a.jsonl", _texts(200))
    prepare.prepare([str(src)], tmp_path / "whole", SMALL, workers=1, progress=False)
    real, written = prepare._Shard.write, []

    def write_then_die(self, out, dtype):
        if len(written) == 3:
            raise KeyboardInterrupt  # as Ctrl-C while the fourth shard is being filled
        written.append(self.number)
        return real(self, out, dtype)

    monkeypatch.setattr(prepare._Shard, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(src)], tmp_path / "broken", SMALL, workers=1, progress=False)
    monkeypatch.setattr(prepare._Shard, "write", real)
    shards = tmp_path / "broken" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["00000", "00001", "00002"]
    assert not (tmp_path / "broken" / "manifest.json").exists()
    with pytest.raises(errors.DataError, match="unfinished prepare-data output.*run the same"):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'broken'}'"]))
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*")}
    prepare.prepare([str(src)], tmp_path / "broken", SMALL, workers=1, progress=False)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == s for p, s in stamps.items()), "finished shards kept"
    assert _files(tmp_path / "broken") == _files(tmp_path / "whole")
    # resuming with other inputs or options would mix two datasets
    with pytest.raises(errors.DataError, match="prepared from other inputs or options"):
        prepare.prepare([str(src)], tmp_path / "whole", prepare.Options(shard_tokens=301), workers=1, progress=False)


@pytest.mark.parametrize("line, message", [
    (b'{"txt": "hello"}', r"a.jsonl line 3: no text field 'text' \(the line has txt\); pass --text-field NAME"),
    (b'{"text": "hello"', r"a.jsonl line 3: invalid JSON \(Expecting ',' delimiter at column 17\)"),
    (b'{"text": "caf\xe9"}', r"a.jsonl line 3: the line is not UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": 42}', r"a.jsonl line 3: the text field 'text' holds int, not a string"),
])
def test_a_bad_record_is_named_or_skipped_and_counted(tmp_path, line, message):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "one"}\n\n' + line + b'\n{"text": "two"}\n')
    with pytest.raises(errors.DataError, match=message):
        prepare.prepare([str(tmp_path / "a.jsonl")], tmp_path / "out", workers=1, progress=False)
    m = prepare.prepare([str(tmp_path / "a.jsonl")], tmp_path / "skip", prepare.Options(on_error="skip", val_every=0),
                        workers=1, progress=False)
    assert m.skipped == 1 and m.train.documents == 2
    assert m.skipped_examples[0].startswith(f"{tmp_path / 'a.jsonl'} line 3: ")


def test_a_truncated_zst_is_refused_and_a_whole_one_read_frame_after_frame(tmp_path):
    import zstandard

    texts = _texts(40)
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(
        "".join(json.dumps({"text": t}) + "\n" for t in part).encode()) for part in (texts[:20], texts[20:])]
    (tmp_path / "whole.jsonl.zst").write_bytes(b"".join(frames))
    m = prepare.prepare([str(tmp_path / "whole.jsonl.zst")], tmp_path / "whole", workers=1, progress=False)
    assert m.records == 40, "both frames are read"
    skip = prepare.Options(on_error="skip")
    for cut in (len(frames[1]) // 2, len(frames[1]) - 3):  # inside the last frame; just before its end
        name = f"cut{cut}.jsonl.zst"
        (tmp_path / name).write_bytes(frames[0] + frames[1][:cut])
        with pytest.raises(errors.DataError, match=rf"cannot read .*{name} after line \d+: EOFError: the file ends "
                                                 r"inside a zstd frame: it is truncated"):
            prepare.prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), skip, workers=1,
                            progress=False)
        assert not (tmp_path / name.replace(".", "_") / "manifest.json").exists(), "no manifest for a partial read"


def test_unreadable_inputs_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(errors.DataError, match="nothing.jsonl: no such file or directory, and no .* files match"):
        prepare.prepare([str(tmp_path / "nothing.jsonl")], tmp_path / "out", progress=False)
    whole = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(errors.DataError, match=r"cannot read .*cut.jsonl.gz after line \d+: EOFError.*truncated"):
        prepare.prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "out", workers=1, progress=False)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(errors.DataError, match=r"cannot read .*fake.parquet: ArrowInvalid"):
        prepare.prepare([str(tmp_path / "fake.parquet")], tmp_path / "out", workers=1, progress=False)
    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "t.parquet")
    with pytest.raises(errors.DataError, match=r"t.parquet has no column 'text' \(columns: content\)"):
        prepare.prepare([str(tmp_path / "t.parquet")], tmp_path / "out", workers=1, progress=False)
    with pytest.raises(errors.DataError, match=r"t.parquet row 1: 'content' is null"):
        prepare.prepare([str(tmp_path / "t.parquet")], tmp_path / "out", prepare.Options(text_field="content"),
                        workers=1, progress=False)
    (tmp_path / "latin1.txt").write_bytes("first line\ncafé".encode("latin-1"))
    with pytest.raises(errors.DataError, match=r"latin1.txt is not UTF-8 \(byte 0xe9 at line 2, column 4\)"):
        prepare.prepare([str(tmp_path / "latin1.txt")], tmp_path / "out", workers=1, progress=False)


def test_the_command_line(tmp_path, capsys):
    src = _jsonl(tmp_path / "a.jsonl", _texts(40))
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    printed = re.fullmatch(r"wrote (.+): (\d+) shards of (\w+) tokens; train ([\d,]+) tokens in ([\d,]+) documents, "
                           r"validation ([\d,]+) in ([\d,]+)\n", capsys.readouterr().out)
    m = shards.read_manifest(tmp_path / "out")
    assert printed and printed.groups() == (str(tmp_path / "out"), str(len(m.shards)), "uint16", f"{m.train.tokens:,}",
                                            f"{m.train.documents:,}", f"{m.val.tokens:,}", f"{m.val.documents:,}")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["totals"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.DataError, match="manifest.json lacks or garbles 'totals': the dataset is damaged"):
        shards.read_manifest(tmp_path / "out")
    assert main(["prepare-data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--quiet"]) == \
        errors.DataError.exit_code
    assert "missing: no such file or directory" in capsys.readouterr().err


# ---- --format chat -----------------------------------------------------------------------

CHAT = prepare.Options(format="chat", shard_tokens=400, val_every=3)


def _conversations(n=30) -> list[dict]:
    """Chat records: multi-turn conversations with a system prompt, and prompt/completion pairs."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}."})
        else:
            out.append({"messages": [{"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": f"Count to {i % 5 + 1}."},
                                     {"role": "assistant", "content": " ".join(map(str, range(1, i % 5 + 2)))},
                                     {"role": "user", "content": "Thanks"},
                                     {"role": "assistant", "content": "You're welcome, " + "é" * (i % 3)}],
                        "id": i})
    return out


def _chat_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _rendered(record, tokenizer):
    if "messages" in record:
        return chat.render_chat(record["messages"], tokenizer)
    return chat.render_prompt_completion(record["prompt"], record["completion"], tokenizer)


def test_chat_records_become_examples_with_the_loss_masks_of_render_chat(tmp_path):
    records = _conversations()
    m = prepare.prepare([str(_chat_jsonl(tmp_path / "a.jsonl", records))], tmp_path / "out", CHAT, workers=1,
                        progress=False)
    assert m.record_format == "chat" and len(m.shards) > 2 and m.records == 30
    expected = [_rendered(r, ByteTokenizer()) for r in records]
    held_out = [i for i in range(30) if i % 3 == 2]
    for split, indices in (("val", held_out), ("train", [i for i in range(30) if i not in held_out])):
        docs, masks = _documents(tmp_path / "out", split), _documents(tmp_path / "out", split, "_mask")
        assert [d.tolist() for d in docs] == [expected[i].ids.tolist() for i in indices], f"{split}: one example each"
        assert [k.tolist() for k in masks] == [expected[i].loss_mask.tolist() for i in indices], f"{split} masks"
        totals = getattr(m, split)
        assert totals.documents == len(indices) and totals.answer_tokens == sum(int(k.sum()) for k in masks)
        assert totals.longest == max(len(d) for d in docs)
        assert all(np.load(p).dtype == np.uint8 for p in (tmp_path / "out" / "shards").glob(f"*/{split}_mask.npy"))
    # the reading side: examples across shards, their boundaries and masks
    train, val = shards.load_examples(tmp_path / "out", ByteTokenizer(), "byte")
    assert len(val) == len(held_out) and val.starts[0] == 0 and val.starts[-1] == len(val.tokens) == m.val.tokens
    for examples, indices in ((val, held_out), (train, [i for i in range(30) if i not in held_out])):
        assert examples.lengths().tolist() == [len(expected[i].ids) for i in indices]
        for k, i in enumerate(indices):
            a, b = examples.starts[k], examples.starts[k + 1]
            assert examples.tokens[a:b].tolist() == expected[i].ids.tolist(), f"example {k} (record {i})"
            assert examples.mask[a:b].tolist() == expected[i].loss_mask.tolist(), f"example {k}'s mask"
    # a text dataset reads as examples too: its documents, every token a target
    text_train, _ = shards.load_examples(_prepared_text(tmp_path), ByteTokenizer(), "byte")
    assert text_train.mask is None and len(text_train) == 57
    assert not (tmp_path / "text" / "shards" / "00000" / "train_mask.npy").exists(), "text datasets write no mask"


def _prepared_text(tmp_path) -> pathlib.Path:
    prepare.prepare([str(_jsonl(tmp_path / "t.jsonl", _texts()))], tmp_path / "text", SMALL, workers=1, progress=False)
    return tmp_path / "text"


def test_chat_output_is_byte_identical_and_resumes(tmp_path):
    src = _chat_jsonl(tmp_path / "a.jsonl", _conversations(60))
    prepare.prepare([str(src)], tmp_path / "one", CHAT, workers=1, progress=False)
    prepare.prepare([str(src)], tmp_path / "two", CHAT, workers=2, progress=False)
    assert _files(tmp_path / "one") == _files(tmp_path / "two"), "the same bytes whatever the worker count"
    whole = _files(tmp_path / "one")
    # an interrupted run: the manifest and the last shard never written; run again, it finishes the same
    (tmp_path / "one" / "manifest.json").unlink()
    last = max((tmp_path / "one" / "shards").iterdir())
    for f in last.iterdir():
        f.unlink()
    last.rmdir()
    prepare.prepare([str(src)], tmp_path / "one", CHAT, workers=1, progress=False)
    assert _files(tmp_path / "one") == whole
    with pytest.raises(errors.DataError, match="prepared from other inputs or options"):
        prepare.prepare([str(src)], tmp_path / "one", dataclasses.replace(CHAT, format="text"), workers=1,
                        progress=False)


@pytest.mark.parametrize("line, message", [
    (b'{"messages": [{"role": "user", "content": "Hi"}]}',
     r"a.jsonl line 3: the conversation has no assistant message, so nothing to train on"),
    (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]}',
     r"a.jsonl line 3: message 1 has the role 'bot'; the roles are system, user, assistant"),
    (b'{"prompt": "Hi", "completion": 3}', r"a.jsonl line 3: 'prompt' and 'completion' must be strings"),
    (b'{"text": "Hi"}', r"a.jsonl line 3: not a chat record \(the line has text\); --format chat reads lines with"),
    (b'{"messages": "Hi"}', r"a.jsonl line 3: a conversation is a non-empty list"),
])
def test_a_bad_chat_record_is_named_or_skipped_and_counted(tmp_path, line, message):
    good = json.dumps({"prompt": "Hi", "completion": "Hello"}).encode()
    (tmp_path / "a.jsonl").write_bytes(good + b"\n\n" + line + b"\n" + good + b"\n")
    options = dataclasses.replace(CHAT, val_every=0)
    with pytest.raises(errors.DataError, match=message):
        prepare.prepare([str(tmp_path / "a.jsonl")], tmp_path / "out", options, workers=1, progress=False)
    m = prepare.prepare([str(tmp_path / "a.jsonl")], tmp_path / "skip", dataclasses.replace(options, on_error="skip"),
                        workers=1, progress=False)
    assert m.skipped == 1 and m.train.documents == 2
    assert m.skipped_examples[0].startswith(f"{tmp_path / 'a.jsonl'} line 3: ")


def _chat_tokenizer(root: pathlib.Path, template: str | None) -> pathlib.Path:
    """A byte-level BPE tokenizer.json with DeepSeek's BOS and EOS and ``template`` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["User: What is 2 + 2?\n\nAssistant: 4."] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    root.mkdir()
    tok.save(str(root / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, **({"chat_template": template} if template else {})}
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return root / "tokenizer.json"


def test_a_chat_template_renders_the_records_and_its_failures_are_named(tmp_path):
    template = (pathlib.Path(__file__).parent / "data" / "chat_templates" / "DeepSeek-V3.jinja").read_text()
    # DeepSeek-V3's template with a check of its own: a system message after the first message fails
    template = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
                "{{ raise_exception('System messages must come first') }}{% endif %}{% endfor %}" + template)
    path = _chat_tokenizer(tmp_path / "tok", template)
    records = _conversations(6)
    records[3] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late."},
                               {"role": "assistant", "content": "Hello"}]}
    src = _chat_jsonl(tmp_path / "a.jsonl", records)
    options = dataclasses.replace(CHAT, tokenizer=str(path), val_every=0)
    with pytest.raises(errors.DataError, match=r"a.jsonl line 4: the chat template in .*tokenizer_config.json fails on "
                                             r"this conversation: TemplateError: System messages must come first"):
        prepare.prepare([str(src)], tmp_path / "out", options, workers=1, progress=False)
    m = prepare.prepare([str(src)], tmp_path / "skip", dataclasses.replace(options, on_error="skip"), workers=1,
                        progress=False)
    assert m.skipped == 1 and m.train.documents == 5
    tok = load_tokenizer(str(path))
    train, _ = shards.load_examples(tmp_path / "skip", tok, str(path))
    kept = [r for i, r in enumerate(records) if i != 3]
    for k, record in enumerate(kept):
        a, b = train.starts[k], train.starts[k + 1]
        assert train.tokens[a:b].tolist() == _rendered(record, tok).ids.tolist(), "ids as render_chat, no extra BOS"
        assert train.mask[a:b].tolist() == _rendered(record, tok).loss_mask.tolist()
    # inputs that hold no conversations, and a tokenizer without a template, are refused before any record is read
    (tmp_path / "doc.txt").write_text("plain text")
    with pytest.raises(errors.DataError, match=r"doc.txt: --format chat reads conversations from JSON Lines"):
        prepare.prepare([str(src), str(tmp_path / "doc.txt")], tmp_path / "txt", CHAT, workers=1, progress=False)
    bare = _chat_tokenizer(tmp_path / "bare", None)
    with pytest.raises(errors.DataError, match=r"has no chat template: no 'chat_template' in .*bare/tokenizer_config"):
        skip_all = dataclasses.replace(CHAT, tokenizer=str(bare), on_error="skip")
        prepare.prepare([str(src)], tmp_path / "bare_out", skip_all, workers=1, progress=False)
    assert not (tmp_path / "bare_out").exists()


def test_the_command_line_prepares_chat_and_reports_its_examples(tmp_path, capsys):
    src = _chat_jsonl(tmp_path / "a.jsonl", _conversations(20))
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "out"), "--format", "chat", "--workers", "1",
                 "--quiet"]) == 0
    m = shards.read_manifest(tmp_path / "out")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'out'}: {len(m.shards)} shards") and len(lines) == 3
    assert lines[2].startswith("packed into rows of train.seq_len + 1 = 4096 tokens: "), lines[2]
    assert lines[1] == (f"chat examples: train {m.train.documents} with {m.train.answer_tokens:,} answer tokens "
                        f"(the loss mask), validation {m.val.documents} with {m.val.answer_tokens:,}; the longest "
                        f"{max(m.train.longest, m.val.longest):,} tokens")
    assert m.train.documents == 19 and m.val.documents == 1 and 0 < m.train.answer_tokens < m.train.tokens
