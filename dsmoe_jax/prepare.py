"""``dsmoe-jax prepare-data``: text files in, a dataset directory of token shards out.

    dsmoe-jax prepare-data corpus/*.jsonl.zst books/ --out data/web --tokenizer path/tokenizer.json

Inputs are ``.txt`` files (one document each), JSON Lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``: one document per line, its text in ``text_field``) and Parquet files (one document
per row, the ``text_field`` column), given as files, directories or globs. A record is a line, a
row or a ``.txt`` file; records are numbered in input order, and every ``val_every``-th one is a
held-out (validation) document.

With ``format="chat"`` (``--format chat``) the inputs are JSON Lines of conversations for supervised
fine-tuning: each line holds ``messages`` (``[{"role", "content"}, ...]``) or ``prompt`` and
``completion`` strings, and becomes one example, rendered by ``chat.render_chat`` in the tokenizer's
chat format (its template writes BOS and EOS), with a loss mask beside the tokens (1 = a token of an
answer, a training target). Reruns are byte-identical unless the template writes today's date.

The format: flat memory-mapped ``.npy`` token arrays, one per split per shard, with a document
offsets array beside each. Training reads fixed-length windows at arbitrary token offsets,
across document (and shard) boundaries: over a flat array that is one slice of a memory map,
where a per-document record format (ArrayRecord) would have to find, read and join the records a
window spans. ``.npy`` needs nothing but numpy to read, and a shard is small enough to write in
one piece, so it is written whole and renamed into place.

    OUT/settings.json              written first: inputs (size, sha256), tokenizer, options
    OUT/shards/00000/train.npy     [train tokens] uint16 (uint32 when the vocabulary exceeds 65,536)
    OUT/shards/00000/train_docs.npy  [train documents + 1] int64: where each document starts, then the end
    OUT/shards/00000/val.npy, val_docs.npy   the same for the held-out documents
    OUT/shards/00000/train_mask.npy, val_mask.npy  chat only: [tokens] uint8, 1 where the token is a target
    OUT/shards/00000/shard.json    its record range, token and document counts, skipped records
    OUT/manifest.json              written last, so its presence means complete: settings + every shard

Determinism: a shard is cut after the document that brings it to ``shard_tokens`` tokens, in
record order, so its contents depend on the input and the options only, never on the worker
count or timing (workers tokenize chunks of records; the results are taken back in order).
Preparing the same input twice gives byte-identical files. Every shard directory is renamed into
place when complete, so an interrupted run, run again, keeps its finished shards and starts at
the first record after them.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from dsmoe_jax.atomic import atomic_directory, atomic_file
from dsmoe_jax.chat import render_chat, render_prompt_completion
from dsmoe_jax.errors import DataError
from dsmoe_jax.lock import LOCK_FILE, output_lock
from dsmoe_jax.shards import FORMAT, MANIFEST, SETTINGS, SHARDS_DIR, SPLITS, Manifest, read_manifest
from dsmoe_jax.tokenizer import load_tokenizer, token_dtype, tokenizer_identity

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")  # what --format chat reads
FORMATS = ("text", "chat")
CHUNK_BYTES = 2**20  # text per task sent to a worker: large enough to hide the IPC, small enough to balance
SKIPPED_EXAMPLES = 10  # skipped records named in the manifest


@dataclasses.dataclass(frozen=True)
class Options:
    """How to prepare: everything but the inputs and the output directory."""

    tokenizer: str = "byte"  # "byte" or a path to an HF tokenizer.json (or its directory)
    text_field: str = "text"  # the JSON key / Parquet column holding a document's text
    val_every: int = 20  # every val_every-th record is held out; 0: none; 1: all (a validation-only set)
    shard_tokens: int = 2**26  # a shard ends after the document that reaches this many tokens
    on_error: str = "raise"  # a bad record: "raise" (stop, naming it) or "skip" (count it in the manifest)
    format: str = "text"  # "text": documents; "chat": conversations, one example each, with a loss mask

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.on_error not in ("raise", "skip"):
            raise DataError(f"--on-error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.val_every < 0 or self.shard_tokens < 1:
            raise DataError(f"--val-every must be >= 0 and --shard-tokens >= 1, got {self.val_every} and "
                            f"{self.shard_tokens}")
        if not self.text_field:
            raise DataError("--text-field must not be empty")


def _kind(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(specs: Sequence[str]) -> list[pathlib.Path]:
    """The input files of ``specs`` (files, directories searched recursively, globs), each in
    sorted order within its spec, specs in the given order, without repeats."""
    files: list[pathlib.Path] = []
    for spec in specs:
        path = pathlib.Path(spec)
        if path.is_file():
            if _kind(path) is None:
                raise DataError(f"{path}: not an input prepare-data reads (its name must end in "
                                f"{', '.join(SUFFIXES)})")
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise DataError(f"{path} holds no {', '.join(SUFFIXES)} files")
        else:
            found = sorted(pathlib.Path(p) for p in glob.glob(spec, recursive=True)
                           if pathlib.Path(p).is_file() and _kind(pathlib.Path(p)))
            if not found:
                raise DataError(f"{spec}: no such file or directory, and no {', '.join(SUFFIXES)} files match it "
                                "as a glob")
        files += [p for p in found if p not in files]
    return files


def _sha256(path: pathlib.Path, bar: tqdm) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(2**22):
                digest.update(block)
                bar.update(len(block))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def settings(files: Sequence[pathlib.Path], options: Options, tokenizer, progress: bool = False) -> dict:
    """What is being prepared: a resumed run must find the same, or it would mix two datasets."""
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="hash inputs",
              disable=not progress, dynamic_ncols=True) as bar:
        sources = [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p, bar)} for p in files]
    out = {
        "format": FORMAT,
        "tokenizer": {"name": options.tokenizer, **tokenizer_identity(tokenizer)},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "text_field": options.text_field,
        "val_every": options.val_every,
        "shard_tokens": options.shard_tokens,
        "on_error": options.on_error,
        "sources": sources,
    }
    if options.format != "text":  # only then: a text dataset's settings stay those of earlier versions
        out["record_format"] = options.format
    return out


# ---- reading records (main process) ------------------------------------------------------
# A chunk is a list of records (record index, kind, file, line/row, payload): the payload is raw
# bytes for .txt and JSON lines (decoded and parsed by the workers, in parallel), a str or None
# for Parquet values.


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` file, frame after frame, raising ``EOFError`` at the
    end when the last frame is cut short: zstandard's own stream reader ends quietly there, so a
    truncated file would read as a shorter whole one (gzip raises, and so does this)."""

    def __init__(self, raw, zstandard):
        self._raw, self._zstandard = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # input went into the current frame and it has not ended
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            while chunk:
                if self._frame.eof:  # the previous frame ended: the rest starts a new one
                    self._frame = self._zstandard.ZstdDecompressor().decompressobj()
                self._pending += self._frame.decompress(chunk)
                self._in_frame = not self._frame.eof
                chunk = self._frame.unused_data if self._frame.eof else b""
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_lines(path: pathlib.Path, kind: str) -> io.BufferedIOBase:
    raw = open(path, "rb")
    if kind == ".jsonl.gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package: pip install zstandard "
                            "(or pip install 'dsmoe-jax[data]')") from None
        return io.BufferedReader(_ZstdFrames(raw, zstandard))
    return raw


def _records(path: pathlib.Path, kind: str, text_field: str) -> Iterator[tuple[int, object]]:
    """``(line or row, payload)`` of each record of one file; an unreadable file is a DataError."""
    number = 0
    try:
        if kind == ".txt":
            yield 1, path.read_bytes()
        elif kind == ".parquet":
            yield from _parquet_rows(path, text_field)
        else:
            with _open_lines(path, kind) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():  # blank lines (a trailing newline, spacing) are no records
                        yield number, line
    except DataError:
        raise
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - gzip, zstandard and pyarrow each raise their own types
        at = f" after line {number}" if number else ""
        raise DataError(f"cannot read {path}{at}: {type(e).__name__}: {e} (a damaged, truncated or mislabelled "
                        "file?)") from None


def _parquet_rows(path: pathlib.Path, text_field: str) -> Iterator[tuple[int, str | None]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow (or pip install "
                        "'dsmoe-jax[data]')") from None
    table = pq.ParquetFile(path)
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); pass "
                        "--text-field NAME")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text; pass the --text-field of the "
                        "text column")
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=8192):
        for value in batch.column(0).to_pylist():
            yield row, value
            row += 1


def _chunks(files: Sequence[pathlib.Path], text_field: str, first_record: int, counter: list[int]) -> Iterator[list]:
    """Chunks of records in input order from record ``first_record`` on (earlier ones are in
    finished shards); ``counter[0]`` counts every record seen, skipped or not."""
    items, size = [], 0
    for path in files:
        kind, name = _kind(path), str(path)  # one str per file: pickled once per chunk, not per record
        for locator, payload in _records(path, kind, text_field):
            index = counter[0]
            counter[0] += 1
            if index < first_record:
                continue
            items.append((index, kind, name, locator, payload))
            size += len(payload) if payload is not None else 0
            if size >= CHUNK_BYTES:
                yield items
                items, size = [], 0
    if items:
        yield items


# ---- tokenizing (workers) ----------------------------------------------------------------

_worker: dict = {}


def _init_worker(tokenizer_spec: str, text_field: str, on_error: str, record_format: str) -> None:
    _worker.update(tokenizer=load_tokenizer(tokenizer_spec), text_field=text_field, on_error=on_error,
                   format=record_format)


def _utf8_error(data: bytes, e: UnicodeDecodeError, what: str) -> str:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"{what} is not UTF-8 (byte {data[e.start]:#04x} at line {line}, column {column}); re-encode it as "
            "UTF-8 (iconv -t UTF-8), or pass --on-error skip to leave such records out")


def _json_line(where: str, payload: bytes):
    """The JSON value of one line; DataError naming ``where`` when it is not UTF-8 or not JSON."""
    try:
        line = payload.decode("utf-8").rstrip("\r\n")  # so an error's column is on this line
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: the line is not UTF-8 (byte {payload[e.start]:#04x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8, or pass --on-error skip to leave such lines out") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix the line, or pass --on-error "
                        "skip to leave such lines out") from None


def _conversation(path: str, locator: int, payload: bytes, tokenizer):
    """A chat record's example (``chat.RenderedChat``); DataError naming the file and line when it
    is not a conversation with an answer, or the chat template fails on it."""
    where = f"{path} line {locator}"
    record = _json_line(where, payload)
    try:
        if isinstance(record, dict) and "messages" in record:
            return render_chat(record["messages"], tokenizer, require_assistant=True)
        if isinstance(record, dict) and "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f"'prompt' and 'completion' must be strings (they hold {type(prompt).__name__} and "
                                f"{type(completion).__name__})")
            return render_prompt_completion(prompt, completion, tokenizer)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    raise DataError(f"{where}: not a chat record (the line has {keys}); --format chat reads lines with 'messages' "
                    "([{'role', 'content'}, ...]) or with 'prompt' and 'completion'")


def _text(kind: str, path: str, locator: int, payload, field: str) -> str:
    """A record's text; DataError naming the file and line or row when it has none."""
    if kind == ".txt":
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(_utf8_error(payload, e, path)) from None
        if "\0" in text:
            raise DataError(f"{path} holds NUL bytes, so it is a binary file or UTF-16 text, not UTF-8 text")
        return text
    if kind == ".parquet":
        if payload is None:
            raise DataError(f"{path} row {locator}: {field!r} is null; fill it, or pass --on-error skip")
        return payload
    where = f"{path} line {locator}"
    record = _json_line(where, payload)
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise DataError(f"{where}: no text field {field!r} (the line has {keys}); pass --text-field NAME, or "
                        "--on-error skip to leave such lines out")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: the text field {field!r} holds {type(text).__name__}, not a string")
    return text


def _tokenize_chunk(chunk: list) -> tuple[list[tuple[int, np.ndarray | None, np.ndarray | None]],
                                           list[tuple[int, str]], int]:
    """``(documents, skipped, text bytes)`` of one chunk: ``(record index, token ids, loss mask)`` of
    each document with text (``[bos] + text + [eos]``, no mask: every token counts; ids ``None``
    for an empty one; a chat record's rendered example and its mask), ``(record index, why)`` of
    each bad record when skipping them."""
    if _worker["format"] == "chat":
        return _render_chunk(chunk)
    tok, field = _worker["tokenizer"], _worker["text_field"]
    dtype = token_dtype(tok.vocab_size)
    texts, indices, skipped = [], [], []
    for index, kind, path, locator, payload in chunk:
        try:
            texts.append(_text(kind, path, locator, payload, field))
            indices.append(index)
        except DataError as e:
            if _worker["on_error"] != "skip":
                raise
            skipped.append((index, str(e).split("; ")[0]))
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    docs = []
    for index, text, ids in zip(indices, texts, tok.encode_batch(texts)):
        docs.append((index, np.concatenate([np.asarray(bos, dtype), np.asarray(ids, dtype), np.asarray(eos, dtype)])
                     if text else None, None))
    return docs, skipped, sum(len(t.encode("utf-8")) for t in texts)


def _render_chunk(chunk: list) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], list[tuple[int, str]], int]:
    """``_tokenize_chunk`` of chat records: each one example, its ids and loss mask."""
    tok = _worker["tokenizer"]
    dtype = token_dtype(tok.vocab_size)
    docs, skipped = [], []
    for index, _, path, locator, payload in chunk:
        try:
            example = _conversation(path, locator, payload, tok)
        except DataError as e:
            if _worker["on_error"] != "skip":
                raise
            skipped.append((index, str(e).split("; ")[0]))
            continue
        docs.append((index, example.ids.astype(dtype), example.loss_mask))
    return docs, skipped, sum(len(item[4]) for item in chunk)


# ---- shards ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    """A shard being filled: the documents of records ``[first, next_record)`` (of a chat dataset:
    its examples, with their loss masks)."""

    number: int
    first: int
    next_record: int
    chat: bool = False
    docs: dict = dataclasses.field(default_factory=lambda: {s: [] for s in SPLITS})
    masks: dict = dataclasses.field(default_factory=lambda: {s: [] for s in SPLITS})  # chat only
    tokens: int = 0
    skipped: list = dataclasses.field(default_factory=list)

    def write(self, out: pathlib.Path, dtype: np.dtype) -> dict:
        """Write the shard directory, complete or not at all; returns its ``shard.json``."""
        meta = {"name": f"{self.number:05d}", "records": [self.first, self.next_record],
                "skipped": len(self.skipped), "skipped_examples": [m for _, m in self.skipped[:SKIPPED_EXAMPLES]]}
        with atomic_directory(out / SHARDS_DIR / meta["name"]) as tmp:
            for split in SPLITS:
                docs = self.docs[split]
                offsets = np.cumsum([0] + [len(d) for d in docs], dtype=np.int64)  # [documents + 1]
                tokens = np.concatenate(docs) if docs else np.zeros((0,), dtype)
                with open(tmp / f"{split}.npy", "wb") as f:
                    np.save(f, tokens.astype(dtype, copy=False))
                with open(tmp / f"{split}_docs.npy", "wb") as f:
                    np.save(f, offsets)
                meta[split] = {"tokens": int(offsets[-1]), "documents": len(docs)}
                if self.chat:
                    masks = self.masks[split]
                    mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros((0,), np.uint8)
                    with open(tmp / f"{split}_mask.npy", "wb") as f:
                        np.save(f, mask)
                    meta[split].update(answer_tokens=int(mask.sum(dtype=np.int64)),
                                       longest=int(np.diff(offsets).max(initial=0)))
            (tmp / "shard.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta


def _finished_shards(out: pathlib.Path) -> list[dict]:
    """``shard.json`` of the shards a previous run finished, in order (the contiguous prefix)."""
    done = []
    while (meta := out / SHARDS_DIR / f"{len(done):05d}" / "shard.json").is_file():
        done.append(json.loads(meta.read_text()))
    return done


def _pool(workers: int, options: Options):
    # forkserver, not fork: the caller may hold threads (JAX's, the tokenizers library's) that a
    # forked child would inherit mid-flight; the server imports this module once for all workers.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    return ctx.Pool(workers, _init_worker, (options.tokenizer, options.text_field, options.on_error, options.format))


def _in_order(chunks: Iterator[list], workers: int, options: Options) -> Iterator[tuple]:
    """``_tokenize_chunk`` of every chunk, in order; at most ``2 * workers`` chunks in flight, so
    memory stays bounded however large the input (``Pool.imap`` would read all of it ahead)."""
    if workers <= 1:
        _init_worker(options.tokenizer, options.text_field, options.on_error, options.format)
        yield from map(_tokenize_chunk, chunks)
        return
    with _pool(workers, options) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_workers(options: Options) -> int:
    """One tokenizing process per core; one for the byte tokenizer, whose tokenizing is a copy:
    starting workers and sending them text costs more than it saves (BENCHMARKS.md)."""
    return 1 if options.tokenizer == "byte" else os.cpu_count() or 1


def prepare(inputs: Sequence[str], out: str | os.PathLike, options: Options = Options(), workers: int | None = None,
            progress: bool = True) -> Manifest:
    """Tokenize ``inputs`` into the dataset directory ``out`` (see the module docstring) and
    return its manifest. Run again after an interruption, it keeps the finished shards; on a
    complete ``out`` with the same inputs and options it only returns the manifest."""
    out = pathlib.Path(out)
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(options.tokenizer)
    chat = options.format == "chat"
    if chat:
        _check_chat(files, tokenizer)
    wanted = settings(files, options, tokenizer, progress)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a directory")
    with output_lock(out, "prepare-data"):  # two runs into one --out would interleave their shards
        return _prepare(files, out, options, wanted, workers, progress)


def _prepare(files: Sequence[pathlib.Path], out: pathlib.Path, options: Options, wanted: dict, workers: int | None,
             progress: bool) -> Manifest:
    """``prepare`` in a locked ``out``: resume or start, tokenize, write the shards and the manifest."""
    chat = options.format == "chat"
    if (out / SETTINGS).is_file():
        # other settings with no finished shard (e.g. after an input error, since fixed): start afresh
        if json.loads((out / SETTINGS).read_text()) != wanted and _finished_shards(out):
            raise DataError(f"{out} holds a dataset prepared from other inputs or options (its {SETTINGS} differs); "
                            "choose a new --out, or remove it to prepare again")
        if (out / MANIFEST).is_file():
            return read_manifest(out)
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise DataError(f"--out {out} is not empty and is not a prepare-data output; choose a new directory")
    with atomic_file(out / SETTINGS) as f:
        f.write(json.dumps(wanted, indent=1) + "\n")

    dtype = np.dtype(wanted["dtype"])
    shards = _finished_shards(out)
    first = shards[-1]["records"][1] if shards else 0
    if shards and progress:
        print(f"resuming {out}: {len(shards)} shards already finished, starting at record {first}")
    counter = [0]
    shard = _Shard(len(shards), first, first, chat)
    bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=not progress, dynamic_ncols=True)
    tokens_done, start = 0, time.perf_counter()
    try:
        for docs, skipped, text_bytes in _in_order(_chunks(files, options.text_field, first, counter),
                                                   workers or default_workers(options), options):
            events = sorted([(i, "doc", (ids, mask)) for i, ids, mask in docs] +
                            [(i, "skip", why) for i, why in skipped], key=lambda e: e[0])
            for index, what, value in events:
                shard.next_record = index + 1
                if what == "skip":
                    shard.skipped.append((index, value))
                    continue
                ids, mask = value
                if ids is None:  # an empty document
                    continue
                split = "val" if options.val_every and index % options.val_every == options.val_every - 1 else "train"
                shard.docs[split].append(ids)
                if chat:
                    shard.masks[split].append(mask)
                shard.tokens += len(ids)
                tokens_done += len(ids)
                if shard.tokens >= options.shard_tokens:
                    shards.append(shard.write(out, dtype))
                    shard = _Shard(shard.number + 1, index + 1, index + 1, chat)
            bar.update(text_bytes)
            bar.set_postfix(tokens_per_s=f"{tokens_done / max(time.perf_counter() - start, 1e-9):,.0f}")
    finally:
        bar.close()
    shard.next_record = max(shard.next_record, counter[0])  # records skipped at the end are this shard's
    if shard.next_record > shard.first or not shards:
        shards.append(shard.write(out, dtype))
    manifest = _manifest(wanted, shards)
    if not manifest["totals"]["train"]["tokens"] + manifest["totals"]["val"]["tokens"]:
        raise DataError(f"{', '.join(map(str, files))}: no text in {manifest['totals']['records']} records")
    with atomic_file(out / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
    return Manifest.from_json(manifest, out / MANIFEST)


def _check_chat(files: Sequence[pathlib.Path], tokenizer) -> None:
    """Refuse, before anything is read, inputs that hold no conversations and a tokenizer whose chat
    format cannot render one (no template, a broken one): errors of every record, not of one."""
    for path in files:
        if _kind(path) not in CHAT_SUFFIXES:
            raise DataError(f"{path}: --format chat reads conversations from JSON Lines ({', '.join(CHAT_SUFFIXES)}), "
                            "one per line; leave this file out, or prepare it with --format text")
    render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenizer)


def _manifest(wanted: dict, shards: list[dict]) -> dict:
    totals = {split: {k: sum(s[split][k] for s in shards) for k in ("tokens", "documents")} for split in SPLITS}
    if wanted.get("record_format") == "chat":
        for split in SPLITS:
            totals[split]["answer_tokens"] = sum(s[split]["answer_tokens"] for s in shards)
            totals[split]["longest"] = max(s[split]["longest"] for s in shards)
    totals["records"] = shards[-1]["records"][1]
    totals["skipped"] = sum(s["skipped"] for s in shards)
    examples = [m for s in shards for m in s["skipped_examples"]][:SKIPPED_EXAMPLES]
    return {**wanted, "totals": totals, "skipped_examples": examples, "shards": shards}
