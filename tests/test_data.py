"""The embedded corpus, user data, prepared sources, windows and the grain pipeline."""

import json
import re

import numpy as np
import pytest

from dsmoe_jax import data, errors, load_config
from dsmoe_jax.evaluation import validation_windows
from dsmoe_jax.shards import TokenShards


def test_embedded_corpus_is_deterministic_and_split():
    cfg = load_config("tiny")
    train, val, tok = data.load_tokens(cfg)
    train2, val2, _ = data.load_tokens(cfg)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(train) > 2_000_000, f"the embedded corpus should be megabytes of text, got {len(train)} tokens"
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1, "about one document in twenty is validation"
    assert train[0] == tok.bos_id and int(train.max()) < cfg.model.vocab_size
    assert "assert" in tok.decode(train[:400]), "starts with the pydoc topics"


def test_user_text_files_and_token_arrays(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(40):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document {i} " * 50)
    cfg = load_config("tiny", [f"data.path='{tmp_path / 'docs'}'"])
    train, val, _ = data.load_tokens(cfg)
    assert len(val) == 2 * (1 + len("document 19 " * 50) + 1), "documents 19 and 39 are validation"
    np.save(tmp_path / "tokens.npy", np.arange(1000) % 300)
    train, val, _ = data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'tokens.npy'}'"]))
    assert len(train) + len(val) == 1000 and len(val) == 129, "the last 1/20, but at least one window of 129"
    np.save(tmp_path / "long.npy", np.arange(20_000) % 300)
    train, val, _ = data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'long.npy'}'"]))
    assert len(val) == 1000 and np.array_equal(val, np.arange(19_000, 20_000) % 300), "the last 1/20"


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(errors.DataError, match="does not exist"):
        data.load_tokens(load_config("tiny", ["data.path='/nonexistent/corpus'"]))
    np.save(tmp_path / "big.npy", np.array([1, 2, 9999]))
    with pytest.raises(errors.DataError, match="token id 9999 >= model.vocab_size 512"):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'big.npy'}'"]))
    with pytest.raises(errors.DataError, match="raise model.vocab_size"):
        data.load_tokens(load_config("tiny", ["model.vocab_size=100"]))
    with pytest.raises(errors.DataError, match="cannot fill one batch"):
        data.batches(np.arange(100), batch_size=8, seq_len=16, seed=0)


def test_batches_are_shuffled_windows_split_across_processes():
    tokens = np.arange(10 * 8 + 1)  # ten windows of 8 (+1 target)
    ds = data.batches(tokens, batch_size=2, seq_len=8, seed=3, num_epochs=1)
    windows = np.concatenate([ds[i] for i in range(len(ds))])
    assert windows.shape == (10, 9) and windows.dtype == np.int32
    assert sorted(windows[:, 0] // 8) == list(range(10)), "every window exactly once per epoch"
    assert list(windows[:, 0] // 8) != list(range(10)), "shuffled"
    np.testing.assert_array_equal(windows[:, 1:], windows[:, :-1] + 1)
    parts = [data.batches(tokens, 1, 8, seed=3, num_epochs=1, process_index=i, process_count=2) for i in (0, 1)]
    starts = [{int(p[i][0, 0]) for i in range(len(p))} for p in parts]
    assert not starts[0] & starts[1] and len(starts[0] | starts[1]) == 10, "processes read disjoint windows"


def test_iterator_state_resumes_at_the_next_batch():
    ds = data.batches(np.arange(2000), batch_size=4, seq_len=16, seed=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = next(it)
    it2 = iter(ds)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2), expected)


@pytest.mark.parametrize("array, message", [
    (np.array([1.0, 2.0, 3.5]), r"holds float64 values, but token ids are integers; save them with an integer dtype"),
    (np.arange(12).reshape(3, 4), r"holds an array of shape \(3, 4\), but a token file is one flat sequence of ids.*"
                                  r"save ids.reshape\(-1\)"),
    (np.array([1, -1, 3]), r"holds token id -1 < 0, but ids lie in \[0, 512\); tokenize the data with data.tokenizer"),
    (np.array([1, 512, 3]), r"holds token id 512 >= model.vocab_size 512; tokenize the data with data.tokenizer, or "
                            "raise model.vocab_size"),
])
def test_npy_token_files_must_be_flat_integer_ids_in_the_vocabulary(tmp_path, array, message):
    """The embedding lookup clamps or wraps a bad id: such a file would train and evaluate silently."""
    np.save(tmp_path / "tokens.npy", array)
    with pytest.raises(errors.DataError, match=re.escape(str(tmp_path / "tokens.npy")) + " " + message):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'tokens.npy'}'"]))


def test_a_too_large_tokenizer_asks_a_trained_model_for_its_own_tokenizer(tmp_path):
    """Training a new model may raise model.vocab_size; a trained checkpoint needs its tokenizer."""
    cfg = load_config("tiny", ["model.vocab_size=100"])
    with pytest.raises(errors.DataError, match=r"the tokenizer 'byte' has 258 tokens but model.vocab_size is 100; "
                                             "raise model.vocab_size to at least 258"):
        data.load_tokens(cfg)
    with pytest.raises(errors.DataError, match=r"ckpt has no tokenizer.json and its config names the byte tokenizer "
                                             r"\(258 tokens\), but its model.vocab_size is 100.*copy the "
                                             "tokenizer.json the model was trained with into ckpt") as error:
        data.load_tokens(cfg, checkpoint="ckpt")
    assert "raise model.vocab_size" not in str(error.value)
    np.save(tmp_path / "tokens.npy", np.array([1, 300]))
    cfg = load_config("tiny", ["model.vocab_size=300", f"data.path='{tmp_path / 'tokens.npy'}'"])
    with pytest.raises(errors.DataError, match=r"holds token id 300 >= model.vocab_size 300; tokenize the data with "
                                             "the tokenizer the model in ckpt was trained with$"):
        data.load_tokens(cfg, checkpoint="ckpt")


@pytest.mark.parametrize("name, content, message", [
    ("weights.bin", np.arange(300, dtype=np.float32).tobytes(),
     r"weights.bin is not UTF-8 text \(byte 0x80 at offset 6; a binary file\?\): data.path takes UTF-8 text files"),
    ("utf16.txt", "text".encode("utf-16-le"), "utf16.txt holds NUL bytes, so it is a binary file or UTF-16 text"),
    ("empty.txt", b"\n\n", "holds only empty text files; point it at files with text in them"),
])
def test_binary_or_empty_text_is_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(errors.DataError, match=message):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / name}'"]))
    (tmp_path / "corpus").mkdir()  # one bad file in a directory of good ones is named too
    (tmp_path / "corpus" / "good.txt").write_text("some text " * 10)
    (tmp_path / "corpus" / (name if name.endswith(".txt") else "latin1.txt")).write_bytes(
        content if name.endswith(".txt") else "café".encode("latin-1"))
    if name != "empty.txt":
        with pytest.raises(errors.DataError, match="is not UTF-8 text|holds NUL bytes"):
            data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'corpus'}'"]))


def test_a_single_text_file_is_split_by_windows(tmp_path):
    """One file is one document: validation is the end of its text, at least one window."""
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(300))
    (tmp_path / "book.txt").write_text(text)
    cfg = load_config("tiny", [f"data.path='{tmp_path / 'book.txt'}'"])  # seq_len 128
    train, val, tok = data.load_tokens(cfg)
    whole = np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]])
    np.testing.assert_array_equal(np.concatenate([train, val]), whole)
    assert len(val) == len(whole) // data.VAL_EVERY >= cfg.train.seq_len + 1
    assert len(validation_windows(val, cfg.train.seq_len, 0)) >= 1
    assert len(data.batches(train, cfg.train.batch_size, cfg.train.seq_len, seed=0)) > 0
    (tmp_path / "note.txt").write_text("too short")
    with pytest.raises(errors.DataError, match=r"gives 11 tokens, too few for one training and one validation window "
                                             r"of train.seq_len \+ 1 = 129 tokens each; add text or lower"):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'note.txt'}'"]))


def _prepared(tmp_path, name, texts, val_every=20):
    from dsmoe_jax import prepare

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare.prepare([str(src)], tmp_path / name, prepare.Options(val_every=val_every), workers=1, progress=False)
    return tmp_path / name


def test_a_mixture_follows_its_weights_and_resumes_exactly():
    a, b = 2 * np.arange(5000), 2 * np.arange(700) + 1  # a window's source: the parity of its tokens
    ds = data.mixture_batches([(a, 3.0), (b, 1.0)], batch_size=4, seq_len=16, seed=0)
    windows = np.concatenate([ds[i] for i in range(100)])
    from_b = windows[windows[:, 0] % 2 == 1]
    assert abs(len(from_b) / len(windows) - 0.25) < 0.02, "one window in four from the source of weight 1"
    assert len(from_b) > len(data.WindowSource(b, 16)) == len({tuple(w) for w in from_b}), \
        "the small source is repeated, every window of it once per epoch: it never runs out"
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(resumed), batch)
    # each process reads its own slice, and global batch k is the same whatever the process count
    tokens = [np.arange(i * 10_000, (i + 1) * 10_000) for i in range(2)]
    one = data.mixture_batches([(tokens[0], 1.0), (tokens[1], 2.0)], 4, 16, seed=0)
    two = [data.mixture_batches([(tokens[0], 1.0), (tokens[1], 2.0)], 2, 16, seed=0, process_index=p,
                                process_count=2) for p in (0, 1)]
    for k in range(5):
        assert {tuple(w) for w in one[k]} == {tuple(w) for p in two for w in p[k]}


def test_training_data_from_prepared_sources_and_named_validation_sets(tmp_path):
    web = _prepared(tmp_path, "web", [f"web page {i} " * 30 for i in range(80)])
    code = _prepared(tmp_path, "code", [f"def f{i}(): return {i}\n" * 10 for i in range(80)])
    held = _prepared(tmp_path, "held", [f"held out {i} " * 30 for i in range(10)], val_every=1)
    mix = f"data.mix=[{{name='web', path='{web}', weight=3}}, {{name='code', path='{code}'}}]"
    cfg = load_config("tiny", [mix, f"data.val=[{{name='held', path='{held}'}}]"])
    d = data.load_training_data(cfg)
    assert [(s.name, s.weight) for s in d.sources] == [("web", 3.0), ("code", 1.0)]
    assert list(d.val_sets) == ["held"] and len(d.val_sets["held"]) == 10 * (2 + len("held out 0 " * 30))
    assert all(isinstance(a, TokenShards) for s in d.sources for a in (s.tokens, s.held_out)), "memory-mapped"
    single = data.load_training_data(load_config("tiny", [f"data.path='{web}'"]))
    assert [(s.name, s.weight) for s in single.sources] == [(None, 1.0)] and not single.val_sets
    with pytest.raises(errors.DataError, match="data.path and data.mix both name the training data"):
        data.load_training_data(load_config("tiny", [mix, f"data.path='{web}'"]))
    with pytest.raises(errors.DataError, match="data.mix trains on several datasets \\(web, code\\)"):
        data.load_tokens(cfg)
    no_val = _prepared(tmp_path, "no_val", ["text " * 100] * 10, val_every=0)
    with pytest.raises(errors.DataError, match=r"validation set 'nv' has 0 held-out tokens.*--val-every"):
        data.load_training_data(load_config("tiny", [f"data.val=[{{name='nv', path='{no_val}'}}]"]))
    gone = tmp_path / "gone"
    for table in ("data.mix", "data.val"):  # named by its table and name, not as data.path
        with pytest.raises(errors.DataError, match=rf"^the path of \[\[{table}\]\] 'lost' '{gone}' does not exist"):
            data.load_training_data(load_config("tiny", [f"{table}=[{{name='lost', path='{gone}'}}]"]))


def test_data_mix_and_val_tables_are_checked_and_round_trip(tmp_path):
    from dsmoe_jax.config import config_from_dict
    from dsmoe_jax.errors import ConfigError

    (tmp_path / "run.toml").write_text('[model]\nvocab_size = 258\nd_model = 32\nn_layers = 1\nn_heads = 2\n'
                                       'd_ff = 64\nfirst_k_dense = 1\n\n[[data.mix]]\nname = "web"\npath = "d/web"\n'
                                       'weight = 3\n\n[[data.mix]]\nname = "code"\npath = "d/code"\n\n'
                                       '[[data.val]]\nname = "books"\npath = "d/books"\n')
    cfg = load_config(tmp_path / "run.toml")
    assert [(s.name, s.weight) for s in cfg.data.mix] == [("web", 3.0), ("code", 1.0)]
    assert cfg.data.val[0].path == "d/books"
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, "config.json round trip"
    hash(cfg)  # configs key jit caches
    for override, message in [
        ("data.mix=[{name='a b', path='x'}]", r"name 'a b' must be letters, digits"),
        ("data.mix=[{name='a', path='x', weight=0}]", r"'a': weight must be a finite number > 0"),
        ("data.mix=[{name='a', path='x', wieght=2}]", r"unknown key data.mix\[0\].wieght; valid keys .*: name, path, "
                                                      "weight"),
        ("data.mix=[{name='a', path='x'}, {name='a', path='y'}]", "names must be unique.*repeated: a"),
        ("data.val=[{name='a', path='x', weight=2}]", "data.val sets are only evaluated, so they take no weight"),
        ("data.mix=['x']", r"data.mix\[0\] must be a table"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [override])


def test_the_token_cache_follows_the_tokenizer_file_not_its_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello world " * 400)
    cfg = load_config("tiny", [f"data.path='{tmp_path / 'text'}'", f"data.tokenizer='{tmp_path / 'tok'}'",
                               "train.seq_len=16"])
    (tmp_path / "tok").mkdir()
    seen = []
    for hello, world in ((3, 4), (4, 3)):  # the same path, rewritten with other ids
        tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": hello, "world": world, "x": 1, "y": 2},
                                         unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / "tok" / "tokenizer.json"))
        train, val, _ = data.load_tokens(cfg)
        seen.append(np.concatenate([train, val])[:4].tolist())
    assert seen == [[3, 4, 3, 4], [4, 3, 4, 3]], f"tokens cached with the old tokenizer were read: {seen}"
