"""Packing examples into fixed-length rows, as the paper's chat SFT does ("packed as densely as
possible"), and the row format that carries them through training and evaluation.

A row holds ``seq_len + 1`` tokens, like a pretraining window: its first ``seq_len`` are inputs,
its last ``seq_len`` targets. Packed, it holds whole examples one after another, then padding:

    tokens       [bos a b c eos][bos d e eos][pad pad]
    segment_ids  [ 1  1 1 1  1 ][ 2  2 2  2 ][ 0   0 ]       0 = padding
    loss_mask    [ 0  0 0 1  1 ][ 0  0 1  1 ][ 0   0 ]       1 = this token is trained on

Input i predicts token i + 1 only when both lie in the same example and the loss mask keeps
the target (``target_weights``), so no example ever predicts, or attends to, another; the
model restarts positions and attention at each segment (``model.forward(segment_ids=...)``).

Bins are filled best-fit-decreasing: examples by length, longest first, each into the fullest
row it still fits, which leaves little padding whatever the length mix. Each epoch permutes the
examples with its own seed before the (stable) sort, so equal-length examples change rows from
epoch to epoch, then shuffles the rows; both depend only on (seed, epoch), so any row of any
epoch can be read at any time, which is what makes a resumed run continue bitwise.

Shape legend: B rows in a batch, R = S + 1 tokens per row, n examples.
"""

from __future__ import annotations

import bisect
import collections
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from dsmoe_jax.errors import DataError
from dsmoe_jax.shards import Examples


class Packed(NamedTuple):
    """Rows of packed examples (a pytree: batches of them pass through ``jit`` as they are)."""

    tokens: np.ndarray  # [..., R] int32
    segment_ids: np.ndarray  # [..., R] int32: example number within the row from 1; 0 = padding
    loss_mask: np.ndarray  # [..., R] int32: 1 where the token is a target the loss counts


def pack_bins(lengths: np.ndarray, capacity: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Best-fit-decreasing: the example indices of each row, every row's lengths summing to at
    most ``capacity`` (each length must be at most ``capacity``). ``order`` breaks ties between
    equal lengths (default: index order)."""
    order = np.arange(len(lengths)) if order is None else order
    ranked = order[np.argsort(-np.asarray(lengths)[order], kind="stable")]
    rows: list[list[int]] = []
    # free space -> rows with exactly that much room, and the sorted distinct free amounts
    room: dict[int, list[int]] = collections.defaultdict(list)
    free: list[int] = []
    for index in ranked:
        need = int(lengths[index])
        at = bisect.bisect_left(free, need)
        if at == len(free):  # fits nowhere: a new row
            rows.append([])
            row, left = len(rows) - 1, capacity
        else:
            left = free[at]
            row = room[left].pop()
            if not room[left]:
                del free[at]
        rows[row].append(int(index))
        left -= need
        if not room[left]:
            bisect.insort(free, left)
        room[left].append(row)
    return rows


def efficiency(lengths: np.ndarray, capacity: int) -> float:
    """Real tokens over row tokens when ``lengths`` (each cut to ``capacity``) are packed."""
    lengths = np.minimum(np.asarray(lengths), capacity)
    rows = len(pack_bins(lengths, capacity))
    return float(lengths.sum() / max(rows * capacity, 1))


class PackedRows:
    """Random access to the packed rows of ``examples`` over ``epochs`` epochs: item i is row
    ``i % rows_per_epoch`` (after the epoch's shuffle) of epoch ``i // rows_per_epoch``.
    ``seed`` None packs without shuffling (validation: the same rows every time).

    An example longer than a row is cut to its first ``seq_len + 1`` tokens and counted in
    ``truncated``, or refused with ``long_examples = "error"``."""

    def __init__(self, examples: Examples, seq_len: int, *, seed: int | None = None, epochs: int = 1,
                 long_examples: str = "truncate", where: str = "the data"):
        self.examples, self.capacity, self.seed = examples, seq_len + 1, seed
        lengths = examples.lengths()
        if not len(lengths):
            raise DataError(f"{where} holds no examples")
        long = lengths > self.capacity
        if long.any() and long_examples == "error":
            first = int(np.argmax(long))
            raise DataError(f"{where}: example {first} has {int(lengths[first])} tokens, more than a row of "
                            f"train.seq_len + 1 = {self.capacity}; raise train.seq_len, or set "
                            "data.long_examples = 'truncate' to cut such examples")
        self.truncated = int(long.sum())
        self.lengths = np.minimum(lengths, self.capacity)
        self._packed: dict[int, tuple] = {}  # the last epochs packed: a batch may straddle two
        self.rows_per_epoch = len(self._epoch(0)[0])  # the same every epoch: one length multiset
        self.epochs = epochs

    def _epoch(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """(the rows of ``epoch``, the order they are read in)."""
        if epoch not in self._packed:
            if self.seed is None:
                rows = pack_bins(self.lengths, self.capacity)
                read = np.arange(len(rows))
            else:
                rng = np.random.default_rng([self.seed, epoch])
                rows = pack_bins(self.lengths, self.capacity, order=rng.permutation(len(self.lengths)))
                read = rng.permutation(len(rows))
            self._packed = {e: v for e, v in self._packed.items() if e == epoch - 1}
            self._packed[epoch] = rows, read
        return self._packed[epoch]

    def __len__(self) -> int:
        return self.rows_per_epoch * self.epochs

    @property
    def real_tokens_per_epoch(self) -> int:
        return int(self.lengths.sum())

    @property
    def efficiency(self) -> float:
        """Real tokens over row tokens: how densely the examples are packed."""
        return self.real_tokens_per_epoch / (self.rows_per_epoch * self.capacity)

    def __getitem__(self, i: int) -> Packed:
        epoch, k = divmod(int(i), self.rows_per_epoch)
        rows, read = self._epoch(epoch)
        tokens, segments, mask = (np.zeros(self.capacity, np.int32) for _ in range(3))
        at = 0
        for number, index in enumerate(rows[read[k]], 1):
            n = int(self.lengths[index])
            first = int(self.examples.starts[index])
            tokens[at:at + n] = self.examples.tokens[first:first + n]
            segments[at:at + n] = number
            mask[at:at + n] = 1 if self.examples.mask is None else self.examples.mask[first:first + n]
            at += n
        return Packed(tokens, segments, mask)


class DocumentWindows:
    """Pretraining windows (``data.WindowSource``'s, at the same offsets) with each document a
    segment of its own (``data.document_mask``): attention and the loss stay inside documents."""

    def __init__(self, examples: Examples, seq_len: int):
        self.examples, self.seq_len = examples, seq_len
        self.n = (len(examples.tokens) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{len(examples.tokens)} tokens cannot fill one window of {seq_len + 1}; lower "
                            "train.seq_len or add data")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Packed:
        start = int(i) * self.seq_len
        tokens = np.asarray(self.examples.tokens[start:start + self.seq_len + 1], np.int32)
        # number the documents the window touches from 1, in order
        document = np.searchsorted(self.examples.starts, np.arange(start, start + len(tokens)), side="right")
        segments = (document - document[0] + 1).astype(np.int32)
        return Packed(tokens, segments, np.ones_like(tokens))


def target_weights(batch: Packed, ahead: int = 1):
    """``[B, R - ahead]``: 1.0 where input i's prediction of token i + ``ahead`` counts (both in
    one example, the target kept by the loss mask), else 0. ``ahead`` 1 is next-token
    prediction; multi-token prediction's depth k predicts ``k + 1`` ahead."""
    seg = batch.segment_ids
    same = (seg[:, :-ahead] == seg[:, ahead:]) & (seg[:, ahead:] > 0)
    return (same & (batch.loss_mask[:, ahead:] > 0)).astype(jnp.float32)


def row_tokens(batch) -> tuple:
    """A batch's token rows ``[B, R]`` and its inputs' segment ids ``[B, R - 1]``, for windows
    ``[B, R]`` (segment ids None: one sequence per row) or ``Packed`` rows."""
    if isinstance(batch, Packed):
        return batch.tokens, batch.segment_ids[:, :-1]
    return batch, None


def row_weights(batch, ahead: int = 1):
    """``target_weights`` of ``Packed`` rows; of plain windows every prediction counts."""
    if isinstance(batch, Packed):
        return target_weights(batch, ahead)
    return jnp.ones((batch.shape[0], batch.shape[1] - ahead), jnp.float32)
