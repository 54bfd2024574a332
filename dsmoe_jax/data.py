"""The token sequences a run reads and the batches it trains on.

The default corpus needs no download: it is the Python standard library's own source and its
documentation topics (``pydoc_data``), present in every CPython installation. It is tokenized
once and cached on disk as a flat ``uint16``/``uint32`` token array, split deterministically into
train and validation by document. ``data.path`` may instead point at a UTF-8 text file, a
directory of text files, or a pre-tokenized ``.npy`` token array; text with too few documents for
that split (a single file) is split by windows, its end going to validation. It may also be a
dataset directory written by ``dsmoe-jax prepare-data`` (read through ``shards.py``), and
``data.mix`` names several of them with weights, mixed by grain (``mixture_batches``).
Tokenizers live in ``tokenizer.py``.

Training and evaluation read the same fixed-length windows (``WindowSource``). Batches come
from a grain ``MapDataset`` over them: shuffled per epoch with the run's seed, batched, and
sliced per process for multi-host runs; its iterator state is saved in every checkpoint so a
resumed run sees exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import pathlib
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import grain
import numpy as np

from dsmoe_jax import errors, runtime
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.chat import render_chat
from dsmoe_jax.config import Config, DataSource
from dsmoe_jax.packing import DocumentWindows, PackedRows
from dsmoe_jax.shards import Examples, TokenShards, is_prepared, load_examples, load_prepared
from dsmoe_jax.shards import read_manifest as _read_manifest  # as itself, data.read_manifest is a moved name
from dsmoe_jax.tokenizer import Tokenizer, check_tokenizer, load_tokenizer, token_dtype, tokenizer_identity

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".toml", ".html", ".c", ".h")
VAL_EVERY = 20  # every 20th document goes to validation
CORPUS_MAX_BYTES = 8 * 2**20  # the embedded corpus: about 8 MiB of documents, in sorted order
TokenSequence = np.ndarray | TokenShards  # a flat token sequence: in memory, memory-mapped, or a prepared split
# what a split of a dataset is read as: a token sequence (windows), or examples (a chat dataset's,
# packed; or a text dataset's documents with data.document_mask)
SplitData = TokenSequence | Examples
ENDLESS_EPOCHS = 10**6  # the epochs a packed source offers when train.steps, not train.epochs, ends the run
# names that moved out in 0.2 to the module that now holds them; until 0.3 they still resolve here
_MOVED = {**{name: "tokenizer" for name in ("ByteTokenizer", "HFTokenizer", "TOKENIZER_CONFIG")},
          **{name: "shards" for name in ("MANIFEST", "SETTINGS", "SHARDS_DIR", "FORMAT", "SPLITS", "read_manifest",
                                         "check_prepared_tokenizer")}}


def __getattr__(name: str):
    if name == "DataError":  # importable from here before 0.3; errors.py holds it
        return errors.deprecated_error(__name__, name)
    if name not in _MOVED:
        raise AttributeError(f"module 'dsmoe_jax.data' has no attribute {name!r}")
    module = importlib.import_module(f"dsmoe_jax.{_MOVED[name]}")
    warnings.warn(f"dsmoe_jax.data.{name} moved to dsmoe_jax.{_MOVED[name]}.{name}; the old name stops working in "
                  "0.3", DeprecationWarning, stacklevel=2)
    return getattr(module, name)


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
        raise errors.DataError(f"{setting} {str(path)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    docs = [(str(p), _read_text(p)) for p in files]
    if not any(text.strip() for _, text in docs):
        raise errors.DataError(f"{setting} {str(path)!r} holds only empty text files; point it at files with text in "
                               "them")
    return docs


def _read_text(path: pathlib.Path) -> str:
    """A data file's text; a binary file (not UTF-8, or with NUL bytes) is refused, not read as
    replacement characters that would train the model on noise."""
    fix = ("data.path takes UTF-8 text files, a directory of them or a .npy token array; re-encode it as UTF-8 "
           "(iconv -t UTF-8) or leave it out")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}; a binary "
                               f"file?): {fix}") from None
    if "\0" in text:
        raise errors.DataError(f"{path} holds NUL bytes, so it is a binary file or UTF-16 text, not UTF-8 text: {fix}")
    return text


def document_tokens(docs: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' tokens one after another, each document as [bos] + text + [eos]."""
    dtype = token_dtype(tokenizer.vocab_size)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    parts = [np.concatenate([np.asarray(bos, dtype), np.asarray(tokenizer.encode(text), dtype),
                             np.asarray(eos, dtype)]) for _, text in docs]
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def split_documents(docs: Sequence[tuple[str, str]]) -> tuple[list, list]:
    """(training, held-out) documents: every ``VAL_EVERY``-th document (in the given order) is held out."""
    held = [i % VAL_EVERY == VAL_EVERY - 1 for i in range(len(docs))]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation token arrays (``document_tokens``) of ``split_documents``."""
    train, held_out = split_documents(docs)
    return document_tokens(train, tokenizer), document_tokens(held_out, tokenizer)


def join_splits(first: SplitData, second: SplitData) -> SplitData:
    """Two splits read as one (``dsmoe-jax eval --data`` evaluates a dataset whole)."""
    if not isinstance(first, Examples):
        return np.concatenate([np.asarray(first), np.asarray(second)])
    join = lambda a, b: None if a is None else TokenShards(a.arrays + b.arrays, a.dtype)
    return Examples(join(first.tokens, second.tokens), join(first.mask, second.mask),
                    np.concatenate([first.starts, second.starts[1:] + first.starts[-1]]))


def _check_token_array(tokens: np.ndarray, path: pathlib.Path, cfg: Config, checkpoint: str | None) -> None:
    """A ``.npy`` token file must be a flat integer array of ids in [0, model.vocab_size): the
    embedding lookup would read any other id as a clamped or wrapped one, silently."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise errors.DataError(f"{path} holds {tokens.dtype} values, but token ids are integers; save them with an "
                               "integer dtype, e.g. np.save(path, ids.astype(np.int32)) (floats are refused, not "
                               "rounded)")
    if tokens.ndim != 1:
        raise errors.DataError(f"{path} holds an array of shape {tokens.shape}, but a token file is one flat sequence "
                               "of ids (documents one after another); save ids.reshape(-1)")
    if not tokens.size:
        return
    lo, hi, V = int(tokens.min()), int(tokens.max()), cfg.model.vocab_size
    retokenize = (f"tokenize the data with the tokenizer the model in {checkpoint} was trained with" if checkpoint
                  else "tokenize the data with data.tokenizer")
    if lo < 0:
        raise errors.DataError(f"{path} holds token id {lo} < 0, but ids lie in [0, {V}); {retokenize}")
    if hi >= V:
        raise errors.DataError(f"{path} holds token id {hi} >= model.vocab_size {V}; {retokenize}"
                               + ("" if checkpoint else ", or raise model.vocab_size"))


def load_tokens(cfg: Config, checkpoint: str | None = None,
                setting: str = "data.path") -> tuple[SplitData, SplitData, Tokenizer]:
    """(train tokens, validation tokens, tokenizer) for ``cfg.data``, tokenized once and cached;
    a prepared chat dataset (and a prepared text dataset with ``data.document_mask``) gives its
    splits as ``Examples``, which training packs (``row_source``).
    ``checkpoint``: the trained model's directory, when the tokens are for it (evaluation):
    a mismatch then asks for its tokenizer rather than a larger vocabulary. ``setting``: how
    errors name the path (``data.path``, or the ``data.mix`` / ``data.val`` entry it came from)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tokenizer, cfg, checkpoint)
    if cfg.data.path is None and cfg.data.mix:
        raise errors.DataError(f"data.mix trains on several datasets ({', '.join(s.name for s in cfg.data.mix)}): set "
                               "data.path to the one to read here")
    if cfg.data.path is None and cfg.data.document_mask:
        raise errors.DataError("data.document_mask needs the document boundaries of a prepared dataset; the embedded "
                               "corpus has none: set data.path to a `dsmoe-jax prepare-data` output, or "
                               "data.document_mask = false")
    if cfg.data.path is not None:
        path = pathlib.Path(cfg.data.path)
        if not path.exists():
            raise errors.DataError(f"{setting} {cfg.data.path!r} does not exist; point it at a text file, a directory "
                                   "of text files, a .npy token array or a prepare-data output"
                                   + (", or unset it for the embedded corpus" if setting == "data.path" else ""))
        if is_prepared(path):
            if cfg.data.document_mask or _read_manifest(path).record_format == "chat":
                return (*load_examples(path, tokenizer, cfg.data.tokenizer), tokenizer)
            return (*load_prepared(path, tokenizer, cfg.data.tokenizer), tokenizer)
        if cfg.data.document_mask:
            raise errors.DataError("data.document_mask needs the document boundaries of a prepared dataset, which "
                                   f"{setting} {cfg.data.path!r} is not; prepare it with `dsmoe-jax prepare-data`, or "
                                   "set data.document_mask = false")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
            _check_token_array(tokens, path, cfg, checkpoint)
            # memory-mapped views: nothing is loaded
            return (*_split_by_windows(tokens, tokens[:0], cfg, setting), tokenizer)
        docs = _user_documents(path, setting)
    else:
        docs = embedded_documents()
    # the tokenizer's identity (its file's hash), not its path: a tokenizer.json rewritten in place
    # must not read tokens cached with the old one
    key = hashlib.sha256(json.dumps([tokenizer_identity(tokenizer), sys.version_info[:2], [n for n, _ in docs],
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
        raise errors.DataError(f"{setting} {cfg.data.path!r} gives {len(tokens)} tokens, too few for one training and "
                               f"one validation window of train.seq_len + 1 = {window} tokens each; add text or lower "
                               "train.seq_len")
    return tokens[:-n_val], tokens[-n_val:]


class WindowSource:
    """Random access to non-overlapping windows of ``seq_len + 1`` tokens (inputs and targets)."""

    def __init__(self, tokens: TokenSequence, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise errors.DataError(f"{len(tokens)} tokens cannot fill one window of {seq_len + 1}; lower train.seq_len "
                                   "or add data")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)


def is_packed(split: SplitData) -> bool:
    """Whether ``split`` is read as examples packed into rows (a chat dataset's, with a loss mask)."""
    return isinstance(split, Examples) and split.mask is not None


def row_source(split: SplitData, seq_len: int, *, seed: int | None = None, epochs: int = 1,
               long_examples: str = "truncate", where: str = "the data"):
    """Random access to the rows of ``seq_len + 1`` tokens a split is read as: windows of a token
    sequence (``WindowSource``: plain arrays), a text dataset's documents as segments of those
    windows (``packing.DocumentWindows``), or a chat dataset's examples packed into rows,
    ``epochs`` times, each epoch reshuffled with ``seed`` (``packing.PackedRows``; ``seed`` None:
    one fixed packing, for validation). The last two give ``packing.Packed`` rows."""
    if not isinstance(split, Examples):
        return WindowSource(split, seq_len)
    if split.mask is None:
        return DocumentWindows(split, seq_len)
    return PackedRows(split, seq_len, seed=seed, epochs=epochs, long_examples=long_examples, where=where)


def batches(tokens: SplitData, batch_size: int, seq_len: int, *, seed: int, shuffle: bool = True,
            num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
            long_examples: str = "truncate"):
    """A grain dataset of ``[batch_size, seq_len + 1]`` int32 windows (``Packed`` rows for
    ``Examples``, see ``row_source``) for this process.

    Windows are shuffled per epoch with ``seed`` (packed rows by ``PackedRows`` itself, which
    repacks every epoch); each process takes every ``process_count``-th row, so processes read
    disjoint parts; ``batch_size`` is the per-process batch. ``num_epochs`` None repeats without end.
    """
    packed = is_packed(tokens)
    epochs = (num_epochs or ENDLESS_EPOCHS) if packed else 1
    source = row_source(tokens, seq_len, seed=seed if shuffle else None, epochs=epochs, long_examples=long_examples)
    if len(source) < process_count * batch_size:
        raise errors.DataError(f"{len(source)} {'rows' if packed else 'windows'} of {seq_len + 1} tokens cannot fill "
                               f"one batch of {batch_size} per process x {process_count} processes; lower "
                               "train.batch_size or train.seq_len, or add data")
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=seed) if shuffle and not packed else ds
    ds = ds[process_index::process_count]
    ds = ds if packed else ds.repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=True)


class Source(NamedTuple):
    """One dataset a run trains on: its training tokens, its held-out split and its weight in
    the mixture. ``name`` is the ``[[data.mix]]`` entry's, None for ``data.path`` or the
    embedded corpus."""

    name: str | None
    tokens: SplitData
    held_out: SplitData
    weight: float = 1.0


class TrainingData(NamedTuple):
    """What a training run reads: the ``sources`` it trains on (one per ``[[data.mix]]`` entry,
    or the single unnamed one), the ``data.val`` sets evaluated beside them, by name, and the
    tokenizer they were all checked against."""

    sources: list[Source]
    val_sets: dict[str, SplitData]
    tokenizer: Tokenizer


def load_training_data(cfg: Config) -> TrainingData:
    """The training sources and validation sets of ``cfg.data``, every dataset checked against
    ``data.tokenizer`` and ``model.vocab_size`` before training starts."""
    d = cfg.data
    if d.path is not None and d.mix:
        raise errors.DataError("data.path and data.mix both name the training data; set one (a single dataset: "
                               "data.path; several with weights: [[data.mix]] tables)")

    def one(source: DataSource, table: str):
        single = dataclasses.replace(cfg, data=dataclasses.replace(d, path=source.path, mix=(), val=()))
        return load_tokens(single, setting=f"the path of [[{table}]] {source.name!r}")

    if d.mix:
        sources = []
        for entry in d.mix:
            tokens, held_out, tokenizer = one(entry, "data.mix")
            sources.append(Source(entry.name, tokens, held_out, entry.weight))
    else:
        tokens, held_out, tokenizer = load_tokens(cfg)
        sources = [Source(None, tokens, held_out)]
    val_sets = {entry.name: one(entry, "data.val")[1] for entry in d.val}
    window = cfg.train.seq_len + 1
    held = [(f"validation set {s.name!r}" if s.name else "the validation split", s.held_out) for s in sources]
    for where, split in held + [(f"validation set {name!r}", t) for name, t in val_sets.items()]:
        packed = is_packed(split)  # then one example is enough
        tokens = split.tokens if isinstance(split, Examples) else split
        if len(tokens) < (1 if packed else window):
            raise errors.DataError(f"{where} has {len(tokens)} held-out tokens, fewer than one window of train.seq_len "
                                   f"+ 1 = {window}; prepare that data with a held-out split (prepare-data --val-every "
                                   "N, e.g. 20; 1 holds out everything, for a validation-only set) or lower "
                                   "train.seq_len")
    if any(is_packed(s.tokens) for s in sources):
        _check_room_for_answers(cfg, tokenizer)
    return TrainingData(sources, val_sets, tokenizer)


def _check_room_for_answers(cfg: Config, tokenizer: Tokenizer) -> None:
    """Refuse rows too short for the chat template's fixed text (an empty question and answer):
    every example would be cut before its answer, and nothing would be trained."""
    fixed = len(render_chat([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenizer).ids)
    if cfg.train.seq_len + 1 <= fixed:
        raise errors.DataError(f"train.seq_len + 1 = {cfg.train.seq_len + 1} tokens per packed row cannot hold the "
                               f"chat template's fixed text ({fixed} tokens for an empty question and answer), let "
                               "alone an answer; raise train.seq_len")


def mixture_batches(sources: Sequence[tuple[SplitData, float]], batch_size: int, seq_len: int, *, seed: int,
                    process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                    long_examples: str = "truncate"):
    """A grain dataset of ``[batch_size, seq_len + 1]`` int32 windows (or ``Packed`` rows, see
    ``row_source``) drawn from several splits in proportion to their weights; one source is
    exactly ``batches`` (and only one may set ``num_epochs``: a mixture draws without end).

    Each source's rows are shuffled (its own seed) and repeated without end; grain's
    ``MapDataset.mix`` interleaves them by the weights (a fixed, deterministic pattern), and each
    process then takes every ``process_count``-th mixed row, so processes read disjoint rows
    and global batch k holds the same rows whatever the process count. It stays a
    ``MapDataset``: its iterator state is one index, checkpointed like ``batches``'.
    """
    if len(sources) == 1:
        return batches(sources[0][0], batch_size, seq_len, seed=seed, process_index=process_index,
                       process_count=process_count, num_epochs=num_epochs, long_examples=long_examples)
    if num_epochs is not None:
        raise errors.DataError("train.epochs counts passes over one finite dataset, but data.mix draws from "
                               f"{len(sources)} datasets without end; set train.steps (and train.epochs = 0), or train "
                               "on one dataset")
    parts, kinds = [], set()
    for i, (split, _) in enumerate(sources):
        source = row_source(split, seq_len, seed=seed + i, epochs=ENDLESS_EPOCHS, long_examples=long_examples)
        kinds.add(isinstance(source, (PackedRows, DocumentWindows)))
        part = grain.MapDataset.source(source)
        parts.append(part if isinstance(source, PackedRows) else part.shuffle(seed=seed + i).repeat(None))
    if len(kinds) > 1:
        raise errors.DataError("data.mix joins datasets read as plain windows with datasets of examples or documents "
                               "(chat data, data.document_mask): their batches differ; prepare them alike (e.g. set "
                               "data.document_mask = true with every dataset prepared by prepare-data)")
    ds = grain.MapDataset.mix(parts, [float(w) for _, w in sources])
    return ds[process_index::process_count].batch(batch_size, drop_remainder=True)
