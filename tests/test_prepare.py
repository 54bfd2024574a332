"""prepare-data: formats, the held-out split, determinism, resuming, and errors that name the record."""

import gzip
import json
import pathlib
import re

import numpy as np
import pytest

from dsmoe_jax import data, load_config, prepare, shards
from dsmoe_jax.cli import main
from dsmoe_jax.tokenizer import ByteTokenizer

SMALL = prepare.Options(shard_tokens=300)  # several shards from a few kB of text


def _texts(n=60):
    return [f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(n)]


def _jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _documents(out: pathlib.Path, split: str) -> list[np.ndarray]:
    """Every document of ``split``, in order, cut at its shards' document offsets."""
    docs = []
    for shard in shards.read_manifest(out).shards:
        tokens = np.load(out / "shards" / shard.name / f"{split}.npy")
        offsets = np.load(out / "shards" / shard.name / f"{split}_docs.npy")
        docs += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
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
    with pytest.raises(data.DataError, match=r"out was tokenized with the tokenizer '.*tok', not with data.tokenizer "
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
    with pytest.raises(data.DataError, match="unfinished prepare-data output.*run the same"):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'broken'}'"]))
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.rglob("*")}
    prepare.prepare([str(src)], tmp_path / "broken", SMALL, workers=1, progress=False)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == s for p, s in stamps.items()), "finished shards kept"
    assert _files(tmp_path / "broken") == _files(tmp_path / "whole")
    # resuming with other inputs or options would mix two datasets
    with pytest.raises(data.DataError, match="prepared from other inputs or options"):
        prepare.prepare([str(src)], tmp_path / "whole", prepare.Options(shard_tokens=301), workers=1, progress=False)


@pytest.mark.parametrize("line, message", [
    (b'{"txt": "hello"}', r"a.jsonl line 3: no text field 'text' \(the line has txt\); pass --text-field NAME"),
    (b'{"text": "hello"', r"a.jsonl line 3: invalid JSON \(Expecting ',' delimiter at column 17\)"),
    (b'{"text": "caf\xe9"}', r"a.jsonl line 3: the line is not UTF-8 \(byte 0xe9 at column 14\)"),
    (b'{"text": 42}', r"a.jsonl line 3: the text field 'text' holds int, not a string"),
])
def test_a_bad_record_is_named_or_skipped_and_counted(tmp_path, line, message):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "one"}\n\n' + line + b'\n{"text": "two"}\n')
    with pytest.raises(data.DataError, match=message):
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
        with pytest.raises(data.DataError, match=rf"cannot read .*{name} after line \d+: EOFError: the file ends "
                                                 r"inside a zstd frame: it is truncated"):
            prepare.prepare([str(tmp_path / name)], tmp_path / name.replace(".", "_"), skip, workers=1,
                            progress=False)
        assert not (tmp_path / name.replace(".", "_") / "manifest.json").exists(), "no manifest for a partial read"


def test_unreadable_inputs_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(data.DataError, match="nothing.jsonl: no such file or directory, and no .* files match"):
        prepare.prepare([str(tmp_path / "nothing.jsonl")], tmp_path / "out", progress=False)
    whole = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(data.DataError, match=r"cannot read .*cut.jsonl.gz after line \d+: EOFError.*truncated"):
        prepare.prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "out", workers=1, progress=False)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match=r"cannot read .*fake.parquet: ArrowInvalid"):
        prepare.prepare([str(tmp_path / "fake.parquet")], tmp_path / "out", workers=1, progress=False)
    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "t.parquet")
    with pytest.raises(data.DataError, match=r"t.parquet has no column 'text' \(columns: content\)"):
        prepare.prepare([str(tmp_path / "t.parquet")], tmp_path / "out", workers=1, progress=False)
    with pytest.raises(data.DataError, match=r"t.parquet row 1: 'content' is null"):
        prepare.prepare([str(tmp_path / "t.parquet")], tmp_path / "out", prepare.Options(text_field="content"),
                        workers=1, progress=False)
    (tmp_path / "latin1.txt").write_bytes("first line\ncafé".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.txt is not UTF-8 \(byte 0xe9 at line 2, column 4\)"):
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
    with pytest.raises(data.DataError, match="manifest.json lacks or garbles 'totals': the dataset is damaged"):
        shards.read_manifest(tmp_path / "out")
    assert main(["prepare-data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "missing: no such file or directory" in capsys.readouterr().err
