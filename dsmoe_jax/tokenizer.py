"""Tokenizers: UTF-8 bytes, or an HF ``tokenizer.json`` through the ``tokenizers`` library; the
identity a prepared dataset records of its tokenizer; and the check that a tokenizer's ids fit a
model's vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from dsmoe_jax.atomic import atomic_directory
from dsmoe_jax.config import Config
from dsmoe_jax.errors import DataError

TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer(Protocol):
    """What the project asks of a tokenizer (``ByteTokenizer``, ``HFTokenizer``)."""

    bos_id: int | None  # put before each document (None: nothing)
    eos_id: int | None  # after each document; generation stops at it
    vocab_size: int

    def encode(self, text: str) -> Sequence[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then ``bos`` = 256 and ``eos`` = 257."""

    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """An HF ``tokenizer.json`` through the ``tokenizers`` library.

    BOS and EOS are the ``bos_token`` / ``eos_token`` of the ``tokenizer_config.json`` beside it
    (as ``transformers`` reads them), unless given; without that file a document gets neither.
    """

    def __init__(self, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        self.path = path
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for every parse error
            raise DataError(f"{path} is not a valid tokenizer.json ({e}): use one saved by the tokenizers or "
                            "transformers library (it comes with the model's files), or data.tokenizer='byte'"
                            ) from None
        self.vocab_size = self._tok.get_vocab_size()
        special = _special_tokens(path.with_name(TOKENIZER_CONFIG))
        self.bos_id = bos_id if bos_id is not None else self._id(special.get("bos_token"), path)
        self.eos_id = eos_id if eos_id is not None else self._id(special.get("eos_token"), path)

    def _id(self, token: str | None, path: pathlib.Path) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"{path.with_name(TOKENIZER_CONFIG)} names the special token {token!r}, which "
                            f"{path.name} does not have")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def _special_tokens(path: pathlib.Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` of a ``tokenizer_config.json`` (a string, or a dict with
    ``content``); empty without the file."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def tokenizer_identity(tokenizer) -> dict:
    """What a prepared dataset records of its tokenizer, and training compares: the sha256 of the
    ``tokenizer.json`` (of a fixed string for the byte tokenizer), vocabulary size, BOS and EOS."""
    if isinstance(tokenizer, HFTokenizer):
        digest = hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()
    else:
        digest = hashlib.sha256(b"dsmoe-jax byte tokenizer: UTF-8 bytes, bos 256, eos 257").hexdigest()
    return {"sha256": digest, "vocab_size": int(tokenizer.vocab_size), "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


BPE_SPECIALS = ("<bos>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike) -> pathlib.Path:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on ``texts`` (every byte is a
    token, so any text encodes) and write it to the new directory ``out``: ``tokenizer.json`` and
    the ``tokenizer_config.json`` naming ``<bos>`` and ``<eos>``, as ``HFTokenizer`` reads them.
    ``out`` appears only when complete. Returns the ``tokenizer.json``."""
    from tokenizers import Tokenizer as HFTokenizerModel
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(BPE_SPECIALS):
        raise DataError(f"a byte-level BPE tokenizer needs at least {len(alphabet) + len(BPE_SPECIALS)} tokens (the "
                        f"{len(alphabet)} bytes and {', '.join(BPE_SPECIALS)}), not {vocab_size}")
    tok = HFTokenizerModel(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    with atomic_directory(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(dict(zip(("bos_token", "eos_token"), BPE_SPECIALS))))
    return pathlib.Path(out) / "tokenizer.json"


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a ``tokenizer.json`` (or of a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = pathlib.Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer: no tokenizer.json at {spec!r}; use 'byte' or a path to a tokenizer.json")
    return HFTokenizer(path)


def check_tokenizer(tokenizer, cfg: Config, checkpoint: str | None = None) -> None:
    """Refuse a tokenizer with ids the model has no embedding for. ``checkpoint``: the directory
    of the trained model it is for (evaluation, generation), where the fix is the tokenizer the
    model was trained with; without it the model is a new one, which may grow its vocabulary."""
    n, V = tokenizer.vocab_size, cfg.model.vocab_size
    if n <= V:
        return
    if checkpoint is None:
        raise DataError(f"the tokenizer {cfg.data.tokenizer!r} has {n} tokens but model.vocab_size is {V}; raise "
                        f"model.vocab_size to at least {n}, or set data.tokenizer to a smaller tokenizer")
    fix = (f"copy the tokenizer.json the model was trained with into {checkpoint} (or set data.tokenizer in "
           f"{checkpoint}/config.json to its path)")
    if cfg.data.tokenizer == "byte":
        raise DataError(f"{checkpoint} has no tokenizer.json and its config names the byte tokenizer ({n} tokens), "
                        f"but its model.vocab_size is {V}, so the model was trained with another tokenizer; {fix}")
    raise DataError(f"the tokenizer {cfg.data.tokenizer!r} has {n} tokens but the checkpoint's model.vocab_size is "
                    f"{V}, so it is not the tokenizer the model was trained with; {fix}")
