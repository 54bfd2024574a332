"""Tokenizers, the embedded corpus, user data and the grain pipeline."""

import json

import numpy as np
import pytest

from dsmoe_jax import data, load_config


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "héllo, wörld\n"
    ids = tok.encode(text)
    assert list(ids[:2]) == [104, 195], "UTF-8 bytes"
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text, "specials are dropped when decoding"


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = data.load_tokenizer(str(tmp_path))
    assert loaded.encode("hello world again") == [3, 4, 2]
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (None, None, 5), "no tokenizer_config.json"
    assert loaded.decode([3, 4]) == "hello world"
    # BOS/EOS come from tokenizer_config.json, as a string or as transformers' AddedToken dict
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>", "special": True}, "eos_token": "<s>"}))
    loaded = data.load_tokenizer(str(tmp_path))
    assert (loaded.bos_id, loaded.eos_id) == (1, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(data.DataError, match="names the special token '<bos>'"):
        data.load_tokenizer(str(tmp_path))
    with pytest.raises(data.DataError, match="no tokenizer.json"):
        data.load_tokenizer(str(tmp_path / "missing"))


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
    assert len(train) + len(val) == 1000 and len(val) == 50


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_tokens(load_config("tiny", ["data.path='/nonexistent/corpus'"]))
    np.save(tmp_path / "big.npy", np.array([1, 2, 9999]))
    with pytest.raises(data.DataError, match="token id 9999 >= model.vocab_size 512"):
        data.load_tokens(load_config("tiny", [f"data.path='{tmp_path / 'big.npy'}'"]))
    with pytest.raises(data.DataError, match="raise model.vocab_size"):
        data.load_tokens(load_config("tiny", ["model.vocab_size=100"]))
    with pytest.raises(data.DataError, match="cannot fill one batch"):
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
