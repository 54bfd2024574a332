"""Tokens for training and evaluation: tokenizers, the embedded default corpus, grain pipelines.

The default corpus needs no download: it is the Python standard library's own source and its
documentation topics (``pydoc_data``), present in every CPython installation. It is tokenized
once and cached on disk as a flat ``uint16``/``uint32`` token array, split deterministically into
train and validation by document. ``data.path`` may instead point at a UTF-8 text file, a
directory of text files, or a pre-tokenized ``.npy`` token array; text with too few documents for
that split (a single file) is split by windows, its end going to validation. It may also be a
dataset directory written by ``dsmoe-jax prepare-data`` (``prepare.py`` writes it, this module
reads it: memory-mapped token shards seen as one flat sequence per split, ``TokenShards``), and
``data.mix`` names several of them with weights, mixed by grain (``mixture_batches``).

Batches come from a grain ``MapDataset`` over fixed-length windows of the token array:
shuffled per epoch with the run's seed, batched, and sliced per process for multi-host runs;
its iterator state is saved in every checkpoint so a resumed run sees exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

import grain
import numpy as np

from dsmoe_jax import runtime
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.config import Config, DataSource
from dsmoe_jax.errors import DataError  # noqa: F401 - raised here, and importable from here

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".toml", ".html", ".c", ".h")
VAL_EVERY = 20  # every 20th document goes to validation
TOKENIZER_CONFIG = "tokenizer_config.json"
CORPUS_MAX_BYTES = 8 * 2**20  # the embedded corpus: about 8 MiB of documents, in sorted order
# A prepared dataset directory (prepare.py): the manifest is written last, so it marks a complete one.
MANIFEST = "manifest.json"
SETTINGS = "settings.json"  # written first: what an unfinished prepare-data run is preparing
SHARDS_DIR = "shards"
FORMAT = "dsmoe-jax token shards v1"
SPLITS = ("train", "val")




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


def _user_documents(path: pathlib.Path, setting: str = "data.path") -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{setting} {str(path)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    docs = [(str(p), _read_text(p)) for p in files]
    if not any(text.strip() for _, text in docs):
        raise DataError(f"{setting} {str(path)!r} holds only empty text files; point it at files with text in them")
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
    dtype = token_dtype(tokenizer.vocab_size)
    parts: tuple[list, list] = ([], [])
    for i, (_, text) in enumerate(docs):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        ids = np.concatenate([np.asarray(bos, dtype), np.asarray(tokenizer.encode(text), dtype),
                              np.asarray(eos, dtype)])
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


class TokenShards:
    """One split of a prepared dataset: its shards' memory-mapped token arrays read as one flat
    sequence (``len``, slices, ``np.asarray``), so a window may cross from one shard into the next
    and nothing is loaded until it is read."""

    def __init__(self, arrays: Sequence[np.ndarray], dtype: np.dtype):
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # [n_shards + 1]: where each begins
        self.shape = (int(self.starts[-1]),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(f"token {key} of {len(self)}")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.arrays[shard][i - self.starts[shard]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards takes an index or a contiguous slice")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros((0,), self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop, side="left")) - 1
        pieces = [self.arrays[k][max(start - self.starts[k], 0):stop - self.starts[k]] for k in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.arrays) if self.arrays else np.zeros((0,), self.dtype)
        return out if dtype is None else out.astype(dtype)


def is_prepared(path: pathlib.Path) -> bool:
    """Whether ``path`` is a ``prepare-data`` output directory, complete or not."""
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / SETTINGS).is_file())


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete prepared dataset directory."""
    path = pathlib.Path(path)
    if not (path / MANIFEST).is_file():
        raise DataError(f"{path} is an unfinished prepare-data output (no {MANIFEST}); run the same "
                        "`dsmoe-jax prepare-data` command again to finish it (finished shards are kept)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path / MANIFEST} is not valid JSON ({e}): damaged; prepare the data again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path / MANIFEST} is not a {FORMAT!r} manifest (format {manifest.get('format')!r}); "
                        "prepare the data again with this version of dsmoe-jax")
    return manifest


def check_prepared_tokenizer(manifest: dict, path: pathlib.Path, tokenizer, spec: str) -> None:
    """Refuse a dataset tokenized by another tokenizer than ``data.tokenizer``: the ids would
    mean other text, silently (an equal vocabulary size proves nothing)."""
    saved, ours = manifest["tokenizer"], tokenizer_identity(tokenizer)
    keys = ("sha256", "vocab_size", "bos_id", "eos_id")
    if any(saved.get(k) != ours[k] for k in keys):
        differ = ", ".join(f"{k} {saved.get(k)!r} vs {ours[k]!r}" for k in keys if saved.get(k) != ours[k])
        raise DataError(f"{path} was tokenized with the tokenizer {saved.get('name')!r}, not with data.tokenizer "
                        f"{spec!r} ({differ}); set data.tokenizer to the tokenizer the data was prepared with, or "
                        f"prepare it again with --tokenizer {spec}")


def load_prepared(path: str | os.PathLike, tokenizer, spec: str) -> tuple[TokenShards, TokenShards]:
    """(train, validation) token sequences of a prepared dataset, memory-mapped, after checking
    that it was tokenized by ``tokenizer`` (``spec``: the ``data.tokenizer`` that named it)."""
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    check_prepared_tokenizer(manifest, path, tokenizer, spec)
    dtype = np.dtype(manifest["dtype"])
    out = []
    for split in SPLITS:
        arrays = []
        for shard in manifest["shards"]:
            file = path / SHARDS_DIR / shard["name"] / f"{split}.npy"
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{file} cannot be read ({e}): the dataset is damaged; prepare it again") from None
            if array.dtype != dtype or len(array) != shard[split]["tokens"]:
                raise DataError(f"{file} holds {len(array)} {array.dtype} tokens, but {path / MANIFEST} says "
                                f"{shard[split]['tokens']} {dtype}: the dataset is damaged; prepare it again")
            arrays.append(array)
        out.append(TokenShards(arrays, dtype))
    return out[0], out[1]


def load_tokens(cfg: Config, checkpoint: str | None = None,
                setting: str = "data.path") -> tuple[np.ndarray, np.ndarray, object]:
    """(train tokens, validation tokens, tokenizer) for ``cfg.data``, tokenized once and cached.
    ``checkpoint``: the trained model's directory, when the tokens are for it (evaluation):
    a mismatch then asks for its tokenizer rather than a larger vocabulary. ``setting``: how
    errors name the path (``data.path``, or the ``data.mix`` / ``data.val`` entry it came from)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, checkpoint)
    if cfg.data.path is None and cfg.data.mix:
        raise DataError(f"data.mix trains on several datasets ({', '.join(s.name for s in cfg.data.mix)}): set "
                        "data.path to the one to read here")
    if cfg.data.path is not None:
        path = pathlib.Path(cfg.data.path)
        if not path.exists():
            raise DataError(f"{setting} {cfg.data.path!r} does not exist; point it at a text file, a directory "
                            "of text files, a .npy token array or a prepare-data output"
                            + (", or unset it for the embedded corpus" if setting == "data.path" else ""))
        if is_prepared(path):
            return (*load_prepared(path, tokenizer, cfg.data.tokenizer), tokenizer)
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            _check_token_array(tokens, path, cfg, checkpoint)
            # memory-mapped views: nothing is loaded
            return (*_split_by_windows(tokens, tokens[:0], cfg, setting), tokenizer)
        docs = _user_documents(path, setting)
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
        train, val = _split_by_windows(train, val, cfg, setting)
    return train, val, tokenizer


def _split_by_windows(train: np.ndarray, val: np.ndarray, cfg: Config,
                      setting: str = "data.path") -> tuple[np.ndarray, np.ndarray]:
    """Too few documents to split by document (fewer than ``VAL_EVERY``, or validation documents
    shorter than one window, e.g. a single text file): validation is the end of the text instead,
    about one part in ``VAL_EVERY`` and at least one window of ``train.seq_len + 1``."""
    tokens = np.concatenate([train, val]) if len(val) else train
    window = cfg.train.seq_len + 1
    n_val = max(len(tokens) // VAL_EVERY, window)
    if len(tokens) - n_val < window:
        raise DataError(f"{setting} {cfg.data.path!r} gives {len(tokens)} tokens, too few for one training and one "
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


class TrainingData(NamedTuple):
    """What a training run reads. ``train``: ``(name, tokens, weight)`` per source, one unnamed
    source for ``data.path`` or the embedded corpus, else one per ``data.mix`` entry. ``val``:
    validation tokens by name: ``""`` for the held-out split of a single source, each mixture
    source's held-out split under its name, and each ``data.val`` set under its name."""

    train: list[tuple[str, object, float]]
    val: dict[str, object]
    tokenizer: object


def load_training_data(cfg: Config) -> TrainingData:
    """The training sources and validation sets of ``cfg.data``, every dataset checked against
    ``data.tokenizer`` and ``model.vocab_size`` before training starts."""
    d = cfg.data
    if d.path is not None and d.mix:
        raise DataError("data.path and data.mix both name the training data; set one (a single dataset: data.path; "
                        "several with weights: [[data.mix]] tables)")

    def one(source: DataSource, table: str):
        single = dataclasses.replace(cfg, data=dataclasses.replace(d, path=source.path, mix=(), val=()))
        return load_tokens(single, setting=f"the path of [[{table}]] {source.name!r}")

    train, val = [], {}
    if d.mix:
        for source in d.mix:
            tokens, held_out, tokenizer = one(source, "data.mix")
            train.append((source.name, tokens, source.weight))
            val[source.name] = held_out
    else:
        tokens, held_out, tokenizer = load_tokens(cfg)
        train.append(("", tokens, 1.0))
        val[""] = held_out
    for source in d.val:
        val[source.name] = one(source, "data.val")[1]
    window = cfg.train.seq_len + 1
    for name, tokens in val.items():
        if len(tokens) < window:
            where = f"validation set {name!r}" if name else "the validation split"
            raise DataError(f"{where} has {len(tokens)} held-out tokens, fewer than one window of train.seq_len + 1 = "
                            f"{window}; prepare that data with a held-out split (prepare-data --val-every N, e.g. "
                            "20; 1 holds out everything, for a validation-only set) or lower train.seq_len")
    return TrainingData(train, val, tokenizer)


def mixture_batches(sources: Sequence[tuple[object, float]], batch_size: int, seq_len: int, *, seed: int,
                    process_index: int = 0, process_count: int = 1):
    """A grain dataset of ``[batch_size, seq_len + 1]`` int32 windows drawn from several token
    sequences in proportion to their weights; one source is exactly ``batches``.

    Each source's windows are shuffled (its own seed) and repeated without end; grain's
    ``MapDataset.mix`` interleaves them by the weights (a fixed, deterministic pattern), and each
    process then takes every ``process_count``-th mixed window, so processes read disjoint windows
    and global batch k holds the same windows whatever the process count. It stays a
    ``MapDataset``: its iterator state is one index, checkpointed like ``batches``'.
    """
    if len(sources) == 1:
        return batches(sources[0][0], batch_size, seq_len, seed=seed, process_index=process_index,
                       process_count=process_count)
    parts = []
    for i, (tokens, _) in enumerate(sources):
        source = WindowSource(tokens, seq_len)
        parts.append(grain.MapDataset.source(source).shuffle(seed=seed + i).repeat(None))
    ds = grain.MapDataset.mix(parts, [float(w) for _, w in sources])
    return ds[process_index::process_count].batch(batch_size, drop_remainder=True)
