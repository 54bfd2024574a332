"""Tokenizers: bytes, an HF tokenizer.json with its special tokens, and the errors for bad files."""

import json

import pytest

from dsmoe_jax.errors import DataError
from dsmoe_jax.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
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
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("hello world again") == [3, 4, 2]
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (None, None, 5), "no tokenizer_config.json"
    assert loaded.decode([3, 4]) == "hello world"
    # BOS/EOS come from tokenizer_config.json, as a string or as transformers' AddedToken dict
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "</s>", "special": True}, "eos_token": "<s>"}))
    loaded = load_tokenizer(str(tmp_path))
    assert (loaded.bos_id, loaded.eos_id) == (1, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(DataError, match="names the special token '<bos>'"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing"))


def test_an_invalid_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordLev')
    with pytest.raises(DataError, match=f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer.json "
                                             r"\(.*\): use one saved by the tokenizers or transformers library"):
        load_tokenizer(str(tmp_path))


def test_the_names_that_moved_out_of_data_still_resolve_with_a_warning():
    from dsmoe_jax import data, shards, tokenizer

    with pytest.warns(DeprecationWarning, match="dsmoe_jax.data.ByteTokenizer moved to dsmoe_jax.tokenizer"):
        assert data.ByteTokenizer is tokenizer.ByteTokenizer
    with pytest.warns(DeprecationWarning, match="moved to dsmoe_jax.shards.read_manifest"):
        assert data.read_manifest is shards.read_manifest
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        data.nothing  # noqa: B018


def test_a_trained_byte_level_bpe_encodes_any_text_and_names_its_specials(tmp_path):
    from dsmoe_jax.errors import OutputExistsError
    from dsmoe_jax.tokenizer import train_bpe

    texts = ["def parse(self, text):\n    return text.split()\n" * 20, "The cat sat on the mat. " * 40]
    path = train_bpe(texts, 300, tmp_path / "bpe")
    tok = load_tokenizer(str(path.parent))
    assert 258 < tok.vocab_size <= 300 and (tok.bos_id, tok.eos_id) == (0, 1), (tok.vocab_size, tok.bos_id, tok.eos_id)
    for text in ("def parse(self, text):", "héllo wörld ☃ 漢字"):  # unseen characters: bytes
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("def parse(self, text):")) < len(b"def parse(self, text):"), "merges learned"
    with pytest.raises(DataError, match="needs at least 258 tokens"):
        train_bpe(texts, 100, tmp_path / "small")
    with pytest.raises(OutputExistsError):
        train_bpe(texts, 300, tmp_path / "bpe")
