"""Tokens for training and evaluation: tokenizers, the embedded default corpus, grain pipelines.

The default corpus needs no download: it is the Python standard library's own source and its
documentation topics (``pydoc_data``), present in every CPython installation. It is tokenized
once and cached on disk as a flat ``uint16``/``uint32`` token array, split deterministically into
train and validation by document. ``data.path`` may instead point at a UTF-8 text file, a
directory of text files, or a pre-tokenized ``.npy`` token array; text with too few documents for
that split (a single file) is split by windows, its end going to validation.

Batches come from a grain ``MapDataset`` over fixed-length windows of the token array:
shuffled per epoch with the run's seed, batched, and sliced per process for multi-host runs;
its iterator state is saved in every checkpoint so a resumed run sees exactly the next batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from dsmoe_jax import runtime
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.config import Config, DsmoeError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".toml", ".html", ".c", ".h")
VAL_EVERY = 20  # every 20th document goes to validation
TOKENIZER_CONFIG = "tokenizer_config.json"
CORPUS_MAX_BYTES = 8 * 2**20  # the embedded corpus: about 8 MiB of documents, in sorted order


class DataError(DsmoeError, ValueError):
    """Data that cannot be read or does not fit the model."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then ``bos`` = 256 and ``eos`` = 257."""

    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8)

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


def load_tokenizer(spec: str):
    """``"byte"`` or the path of a ``tokenizer.json`` (or of a directory holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = pathlib.Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer: no tokenizer.json at {spec!r}; use 'byte' or a path to a tokenizer.json")
    return HFTokenizer(path)


@functools.lru_cache(maxsize=1)
def embedded_documents() -> list[tuple[str, str]]:
    """(name, text) of the standard library's documentation topics and source files."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    total = sum(len(t) for _, t in docs)
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in skip for part in rel.parts[:-1]) or total > CORPUS_MAX_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append((f"stdlib:{rel.as_posix()}", text))
        total += len(text)
    return docs


def _user_documents(path: pathlib.Path) -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"data.path {str(path)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    docs = [(str(p), _read_text(p)) for p in files]
    if not any(text.strip() for _, text in docs):
        raise DataError(f"data.path {str(path)!r} holds only empty text files; point it at files with text in them")
    return docs


def _read_text(path: pathlib.Path) -> str:
    """A data file's text; a binary file (not UTF-8, or with NUL bytes) is refused, not read as
    replacement characters that would train the model on noise."""
    fix = ("data.path takes UTF-8 text files, a directory of them or a .npy token array; re-encode it as UTF-8 "
           "(iconv -t UTF-8) or leave it out")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}; a binary "
                        f"file?): {fix}") from None
    if "\0" in text:
        raise DataError(f"{path} holds NUL bytes, so it is a binary file or UTF-16 text, not UTF-8 text: {fix}")
    return text


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token arrays: each document as [bos] + text + [eos]; every
    ``VAL_EVERY``-th document (in the given order) goes to validation."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts: tuple[list, list] = ([], [])
    for i, (_, text) in enumerate(docs):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        ids = np.concatenate([np.asarray(bos, dtype), np.asarray(tokenizer.encode(text), dtype), np.asarray(eos, dtype)])
        parts[int(i % VAL_EVERY == VAL_EVERY - 1)].append(ids)
    return tuple(np.concatenate(p) if p else np.zeros((0,), dtype) for p in parts)


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


def _check_token_array(tokens: np.ndarray, path: pathlib.Path, cfg: Config, checkpoint: str | None) -> None:
    """A ``.npy`` token file must be a flat integer array of ids in [0, model.vocab_size): the
    embedding lookup would read any other id as a clamped or wrapped one, silently."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path} holds {tokens.dtype} values, but token ids are integers; save them with an integer "
                        "dtype, e.g. np.save(path, ids.astype(np.int32)) (floats are refused, not rounded)")
    if tokens.ndim != 1:
        raise DataError(f"{path} holds an array of shape {tokens.shape}, but a token file is one flat sequence of "
                        "ids (documents one after another); save ids.reshape(-1)")
    if not tokens.size:
        return
    lo, hi, V = int(tokens.min()), int(tokens.max()), cfg.model.vocab_size
    retokenize = (f"tokenize the data with the tokenizer the model in {checkpoint} was trained with" if checkpoint
                  else "tokenize the data with data.tokenizer")
    if lo < 0:
        raise DataError(f"{path} holds token id {lo} < 0, but ids lie in [0, {V}); {retokenize}")
    if hi >= V:
        raise DataError(f"{path} holds token id {hi} >= model.vocab_size {V}; {retokenize}"
                        + ("" if checkpoint else ", or raise model.vocab_size"))


def load_tokens(cfg: Config, checkpoint: str | None = None) -> tuple[np.ndarray, np.ndarray, object]:
    """(train tokens, validation tokens, tokenizer) for ``cfg.data``, tokenized once and cached.
    ``checkpoint``: the trained model's directory, when the tokens are for it (evaluation):
    a mismatch then asks for its tokenizer rather than a larger vocabulary."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, checkpoint)
    if cfg.data.path is not None:
        path = pathlib.Path(cfg.data.path)
        if not path.exists():
            raise DataError(f"data.path {cfg.data.path!r} does not exist; point it at a text file, a directory "
                            "of text files or a .npy token array, or unset it for the embedded corpus")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            _check_token_array(tokens, path, cfg, checkpoint)
            # memory-mapped views: nothing is loaded
            return (*_split_by_windows(tokens, tokens[:0], cfg), tokenizer)
        docs = _user_documents(path)
    else:
        docs = embedded_documents()
    key = hashlib.sha256(json.dumps([cfg.data.tokenizer, sys.version_info[:2], [n for n, _ in docs],
                                     [len(t) for _, t in docs]]).encode()).hexdigest()[:16]
    cached = [runtime.cache_dir() / f"tokens-{key}-{split}.npy" for split in ("train", "val")]
    if not all(p.is_file() for p in cached):
        for p, array in zip(cached, tokenize_documents(docs, tokenizer)):
            with atomic_file(p, "wb") as f:
                np.save(f, array)
    train, val = (np.load(p, mmap_mode="r") for p in cached)
    if cfg.data.path is not None and len(val) < cfg.train.seq_len + 1:
        train, val = _split_by_windows(train, val, cfg)
    return train, val, tokenizer


def _split_by_windows(train: np.ndarray, val: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Too few documents to split by document (fewer than ``VAL_EVERY``, or validation documents
    shorter than one window, e.g. a single text file): validation is the end of the text instead,
    about one part in ``VAL_EVERY`` and at least one window of ``train.seq_len + 1``."""
    tokens = np.concatenate([train, val]) if len(val) else train
    window = cfg.train.seq_len + 1
    n_val = max(len(tokens) // VAL_EVERY, window)
    if len(tokens) - n_val < window:
        raise DataError(f"data.path {cfg.data.path!r} gives {len(tokens)} tokens, too few for one training and one "
                        f"validation window of train.seq_len + 1 = {window} tokens each; add text or lower "
                        "train.seq_len")
    return tokens[:-n_val], tokens[-n_val:]


class WindowSource:
    """Random access to non-overlapping windows of ``seq_len + 1`` tokens (inputs and targets)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}; lower train.seq_len "
                            "or add data")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, process_index: int = 0, process_count: int = 1):
    """A grain dataset of ``[batch_size, seq_len + 1]`` int32 windows for this process.

    Windows are shuffled per epoch with ``seed``; each process takes every ``process_count``-th
    window, so processes read disjoint parts; ``batch_size`` is the per-process batch.
    """
    source = WindowSource(tokens, seq_len)
    if len(source) < process_count * batch_size:
        raise DataError(f"{len(source)} windows of {seq_len + 1} tokens cannot fill one batch of "
                        f"{batch_size} per process x {process_count} processes; lower train.batch_size or "
                        "train.seq_len, or add data")
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=seed) if shuffle else ds
    ds = ds[process_index::process_count]
    ds = ds.repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=True)
