"""The prepared-dataset format: ``dsmoe-jax prepare-data`` (``prepare.py``) writes it, training
reads it here. A directory holds ``settings.json`` (written first: what an unfinished run is
preparing), ``shards/<name>/{train,val}.npy`` and ``manifest.json``, written last, so it marks a
complete dataset; each split's shards are memory-mapped and read as one flat token sequence
(``TokenShards``), or as examples (``Examples``: the documents, or a chat dataset's conversations
with the loss mask of ``{train,val}_mask.npy``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dsmoe_jax.errors import DataError
from dsmoe_jax.tokenizer import Tokenizer, tokenizer_identity

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARDS_DIR = "shards"
FORMAT = "dsmoe-jax token shards v1"
SPLITS = ("train", "val")


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


class Split(NamedTuple):
    tokens: int
    documents: int  # of a chat dataset: its examples (conversations)
    answer_tokens: int | None = None  # chat only: tokens with loss mask 1
    longest: int | None = None  # chat only: the longest example's tokens


class Shard(NamedTuple):
    name: str  # its folder under shards/
    train: Split
    val: Split


class Manifest(NamedTuple):
    """``manifest.json`` of a complete prepared dataset, typed (the file itself stays JSON)."""

    dtype: np.dtype
    tokenizer: dict  # name, sha256, vocab_size, bos_id, eos_id (``tokenizer.tokenizer_identity``)
    shards: list[Shard]
    train: Split  # totals over the shards
    val: Split
    records: int  # input records read, skipped ones included
    skipped: int
    skipped_examples: list[str]  # the first few skipped records, named with the reason
    sources: list[dict]  # each input file: path, bytes, sha256
    record_format: str = "text"  # "text" (documents) or "chat" (conversations, with loss masks)

    @classmethod
    def from_json(cls, m: dict, where: str | os.PathLike) -> Manifest:
        """The record of a parsed manifest; a missing or malformed field is a damaged dataset."""
        optional = lambda value: None if value is None else int(value)
        split = lambda d: Split(int(d["tokens"]), int(d["documents"]), optional(d.get("answer_tokens")),
                                optional(d.get("longest")))
        try:
            totals = m["totals"]
            return cls(np.dtype(m["dtype"]), dict(m["tokenizer"]),
                       [Shard(s["name"], split(s["train"]), split(s["val"])) for s in m["shards"]],
                       split(totals["train"]), split(totals["val"]), int(totals["records"]), int(totals["skipped"]),
                       list(m["skipped_examples"]), list(m["sources"]), str(m.get("record_format", "text")))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where} lacks or garbles {e}: the dataset is damaged; prepare it again") from None


def is_prepared(path: pathlib.Path) -> bool:
    """Whether ``path`` is a ``prepare-data`` output directory, complete or not."""
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / SETTINGS).is_file())


def read_manifest(path: str | os.PathLike) -> Manifest:
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
    return Manifest.from_json(manifest, path / MANIFEST)


def check_prepared_tokenizer(manifest: Manifest, path: pathlib.Path, tokenizer: Tokenizer, spec: str) -> None:
    """Refuse a dataset tokenized by another tokenizer than ``data.tokenizer``: the ids would
    mean other text, silently (an equal vocabulary size proves nothing)."""
    saved, ours = manifest.tokenizer, tokenizer_identity(tokenizer)
    keys = ("sha256", "vocab_size", "bos_id", "eos_id")
    if any(saved.get(k) != ours[k] for k in keys):
        differ = ", ".join(f"{k} {saved.get(k)!r} vs {ours[k]!r}" for k in keys if saved.get(k) != ours[k])
        raise DataError(f"{path} was tokenized with the tokenizer {saved.get('name')!r}, not with data.tokenizer "
                        f"{spec!r} ({differ}); set data.tokenizer to the tokenizer the data was prepared with, or "
                        f"prepare it again with --tokenizer {spec}")


def load_prepared(path: str | os.PathLike, tokenizer: Tokenizer, spec: str) -> tuple[TokenShards, TokenShards]:
    """(train, validation) token sequences of a prepared dataset, memory-mapped, after checking
    that it was tokenized by ``tokenizer`` (``spec``: the ``data.tokenizer`` that named it)."""
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    check_prepared_tokenizer(manifest, path, tokenizer, spec)
    dtype = manifest.dtype
    out = []
    for split in SPLITS:
        arrays = [_load(path, path / SHARDS_DIR / shard.name / f"{split}.npy", dtype, getattr(shard, split).tokens,
                        "tokens") for shard in manifest.shards]
        out.append(TokenShards(arrays, dtype))
    return out[0], out[1]


def _load(path: pathlib.Path, file: pathlib.Path, dtype: np.dtype, expected: int, what: str) -> np.ndarray:
    """One array of a shard, memory-mapped, after checking it against the manifest of ``path``."""
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{file} cannot be read ({e}): the dataset is damaged; prepare it again") from None
    if array.dtype != dtype or len(array) != expected:
        raise DataError(f"{file} holds {len(array)} {array.dtype} {what}, but {path / MANIFEST} says "
                        f"{expected} {dtype}: the dataset is damaged; prepare it again")
    return array


@dataclasses.dataclass(frozen=True)
class Examples:
    """One split of a prepared dataset as examples: a chat dataset's conversations with their loss
    mask, or a text dataset's documents (no mask: every token is a target)."""

    tokens: TokenShards  # [tokens]: the examples one after the other, across shards
    mask: TokenShards | None  # [tokens] uint8: 1 where the token is a training target; None for text
    starts: np.ndarray  # [examples + 1] int64: where each example starts in tokens, then the end

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> np.ndarray:
        """[examples] int64: each example's tokens."""
        return np.diff(self.starts)


def load_examples(path: str | os.PathLike, tokenizer: Tokenizer, spec: str) -> tuple[Examples, Examples]:
    """(train, validation) examples of a prepared dataset, memory-mapped, after the checks of
    ``load_prepared``; a chat dataset's carry their loss mask."""
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    check_prepared_tokenizer(manifest, path, tokenizer, spec)
    chat = manifest.record_format == "chat"
    out = []
    for split in SPLITS:
        tokens, masks, starts, offset = [], [], [np.zeros(1, np.int64)], 0
        for shard in manifest.shards:
            folder, counts = path / SHARDS_DIR / shard.name, getattr(shard, split)
            tokens.append(_load(path, folder / f"{split}.npy", manifest.dtype, counts.tokens, "tokens"))
            docs = np.asarray(_load(path, folder / f"{split}_docs.npy", np.dtype(np.int64), counts.documents + 1,
                                    "document offsets"))
            if docs[0] != 0 or docs[-1] != counts.tokens or np.any(np.diff(docs) < 0):
                raise DataError(f"{folder / f'{split}_docs.npy'} does not cut {counts.tokens} tokens into documents "
                                "(offsets must rise from 0 to the token count): the dataset is damaged; prepare it "
                                "again")
            starts.append(docs[1:] + offset)
            offset += counts.tokens
            if chat:
                masks.append(_load(path, folder / f"{split}_mask.npy", np.dtype(np.uint8), counts.tokens,
                                   "mask entries"))
        out.append(Examples(TokenShards(tokens, manifest.dtype), TokenShards(masks, np.uint8) if chat else None,
                            np.concatenate(starts)))
    return out[0], out[1]
