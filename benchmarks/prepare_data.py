"""prepare-data throughput (MB/s of text), and the training loader's tokens/s against the train step's.

Writes a synthetic JSON Lines corpus (seeded random words, documents of 200-4,000 characters),
prepares it with the byte tokenizer and with a byte-level BPE ``tokenizer.json`` trained here
(8,192 tokens), with 1 and with every core's worker, and reports MB/s of text. Then it reads a
two-source ``data.mixture_batches`` over the prepared shards at the tiny config's batch shape
(what training reads, memory-mapped) and times it against the tiny config's jitted train step:
the loader must be many times faster, so it never holds a step up.

    python benchmarks/prepare_data.py --mb 32
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import dsmoe_jax
from dsmoe_jax import data, prepare, shards
from dsmoe_jax.tokenizer import ByteTokenizer
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step


def corpus(path: pathlib.Path, megabytes: float) -> int:
    """A JSON Lines file of about ``megabytes`` of text; returns its text bytes."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("etaoinshrdlucmfwypvbgkqjxz"), rng.integers(2, 9))) for _ in range(5000)]
    total = 0
    with open(path, "w") as f:
        while total < megabytes * 1e6:
            text = " ".join(rng.choice(words, rng.integers(40, 700)))
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
    return total


def bpe(path: pathlib.Path, sample: pathlib.Path) -> pathlib.Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lines = [json.loads(line)["text"] for line, _ in zip(open(sample), range(2000))]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "</s>"]))
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def prepare_rate(src: pathlib.Path, out: pathlib.Path, tokenizer: str, workers: int,
                 text_bytes: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    m = prepare.prepare([str(src)], out, prepare.Options(tokenizer=tokenizer, shard_tokens=2**22), workers=workers,
                        progress=False)
    return text_bytes / 1e6 / (time.perf_counter() - t0), m


def loader_rate(out: pathlib.Path, batch: int, seq: int, n: int) -> float:
    train, _ = shards.load_prepared(out, ByteTokenizer(), "byte")
    sources = [(train, 3.0), (train, 1.0)]  # two sources (shuffled apart), memory-mapped as in training
    it = iter(data.mixture_batches(sources, batch, seq, seed=0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch * seq / (time.perf_counter() - t0)


def step_rate(batch: int, seq: int, n: int) -> float:
    cfg = dsmoe_jax.load_config("tiny", [f"train.batch_size={batch}", f"train.seq_len={seq}"])
    opt = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(0)), opt)
    step = jax.jit(make_train_step(cfg, opt))
    windows = jnp.asarray(np.random.default_rng(0).integers(0, 258, (batch, seq + 1), dtype=np.int32))
    state, m = step(state, windows)
    float(m.loss)  # compiled and run once
    t0 = time.perf_counter()
    for _ in range(n):
        state, m = step(state, windows)
    float(m.loss)
    return n * batch * seq / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=32, help="megabytes of synthetic text")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        text_bytes = corpus(tmp / "corpus.jsonl", args.mb)
        tok = bpe(tmp / "bpe", tmp / "corpus.jsonl")
        print(f"| tokenizer | workers | MB/s of text | tokens | ({text_bytes / 1e6:.1f} MB of JSON Lines, "
              f"{cores} cores)")
        print("|---|---|---|---|")
        for name, spec in (("byte", "byte"), ("BPE 8192", str(tok))):
            for workers in sorted({1, cores}):
                rate, m = prepare_rate(tmp / "corpus.jsonl", tmp / f"out-{name}-{workers}".replace(" ", ""), spec,
                                       workers, text_bytes)
                tokens = m.train.tokens + m.val.tokens
                print(f"| {name} | {workers} | {rate:.1f} | {tokens:,} |")
        batch, seq = 16, 128  # the tiny config's
        loader = loader_rate(tmp / "out-byte-1", batch, seq, 2000)
        stepping = step_rate(batch, seq, args.steps)
        print(f"\nloader (2-source mixture, {batch}x{seq} windows): {loader:,.0f} tokens/s; tiny train step: "
              f"{stepping:,.0f} tokens/s; loader / step = {loader / stepping:.0f}x")


if __name__ == "__main__":
    main()
