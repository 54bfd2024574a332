"""Held-out loss: the one definition used by training, ``dsmoe-jax eval`` and the experiments.

Validation reads fixed-length windows of ``train.seq_len + 1`` tokens of the validation split.
``train.eval_tokens`` (default 65,536) caps how many tokens are read: the windows are then
spread evenly over the whole split (window ``i * n_windows // n`` for ``i < n``), a sample of
every part of it rather than its first documents; 0 reads the whole split. The same windows
are read every time, so two evaluations of one checkpoint agree exactly, wherever they run.

The loss is the mean next-token cross-entropy over all tokens read. Its standard error is taken
over windows (``std(window means) / sqrt(windows)``): neighbouring tokens are correlated, whole
windows much less so. A chat dataset's held-out examples are packed into rows the same way
training packs them (one fixed packing) and read like windows; only the answer tokens count,
so the loss is a ratio of sums over rows and its standard error the ratio estimator's
(``sqrt(sum_i (s_i - L c_i)^2 / (n (n - 1))) / mean(c)`` for row sums s_i of c_i tokens), which
for rows of equal counts is the formula above.

Shape legend: B windows in a batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax import mesh as mesh_lib
from dsmoe_jax.config import Config
from dsmoe_jax.data import SplitData, row_source
from dsmoe_jax.model import forward
from dsmoe_jax.moe import RouteOptions
from dsmoe_jax.packing import Packed, row_tokens, row_weights


class Evaluation(NamedTuple):
    loss: float  # mean next-token cross-entropy over every token read
    stderr: float  # standard error of ``loss`` over windows (0 for a single window)
    tokens: int  # predicted tokens read
    windows: int
    window_losses: tuple[float, ...] = ()  # each window's mean, in the order read: pairs two models' losses
    active_experts: tuple[float, ...] = ()  # per MoE layer: routed experts a counted position activated, mean

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a large number rather than inf."""
    return math.exp(min(loss, 50.0))


def cross_entropy(logits_BSV: jax.Array, targets_BS: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in float32 over the unmasked positions."""
    nll_BS = token_losses(logits_BSV, targets_BS)
    if mask_BS is None:
        return jnp.mean(nll_BS)
    return jnp.sum(nll_BS * mask_BS) / jnp.maximum(jnp.sum(mask_BS), 1)


def token_losses(logits_BSV: jax.Array, targets_BS: jax.Array) -> jax.Array:
    """Cross-entropy of every position, float32 ``[B, S]``."""
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BS[..., None], axis=-1)[..., 0]


def make_eval_step(cfg: Config, route: RouteOptions | None = None):
    """``(params, rows) -> (cross-entropy summed over each row's counted targets [B], their count
    [B], the routed experts the counted positions activated, summed per MoE layer [B, L])`` for
    windows ``[B, S+1]`` or ``Packed`` rows (no balance loss); ``route`` changes the routing at
    evaluation (``moe.RouteOptions``)."""
    recording = dataclasses.replace(route or RouteOptions(), record=True)
    E = cfg.model.moe.n_routed_experts if cfg.model.moe is not None else 0

    def step(params, batch):
        tokens_BS1, segments_BS = row_tokens(batch)
        B, S = tokens_BS1[:, :-1].shape
        logits, aux = forward(params, tokens_BS1[:, :-1], cfg.model, route=recording, segment_ids=segments_BS)
        counted_BS = row_weights(batch)
        nll_BS = jnp.where(counted_BS > 0, token_losses(logits, tokens_BS1[:, 1:]), 0.0)
        if aux.expert_choices is None:  # no MoE layer
            active_BL = jnp.zeros((B, 0), jnp.float32)
        else:  # an empty slot of top-p routing holds id E
            active_LBS = jnp.sum(aux.expert_choices < E, axis=-1).reshape(-1, B, S).astype(jnp.float32)
            active_BL = jnp.einsum("lbs,bs->bl", active_LBS, (counted_BS > 0).astype(jnp.float32))
        return jnp.sum(nll_BS, axis=-1), jnp.sum(counted_BS, axis=-1), active_BL

    return step


@functools.lru_cache(maxsize=64)
def jitted_eval_step(cfg: Config, route: RouteOptions | None = None, mesh=None):
    """``make_eval_step`` jitted once per (config, route options, mesh): training's evaluations,
    the final one, seeds and probes share it. On a mesh the per-window losses come back
    replicated, so every process can read them."""
    out = None if mesh is None else jax.NamedSharding(mesh, jax.P())
    return jax.jit(make_eval_step(cfg, route), out_shardings=out)


def validation_windows(tokens: SplitData, seq_len: int, max_tokens: int) -> np.ndarray:
    """The indices of the windows of ``seq_len + 1`` tokens (``data.row_source``'s, as training
    reads them) that validation reads: all of them, or, when ``max_tokens`` > 0 caps them, that
    many spread evenly over the split."""
    total = len(row_source(tokens, seq_len))
    n = total if max_tokens <= 0 else max(1, min(total, max_tokens // seq_len))
    return np.arange(n) * total // n


def window_batches(tokens: SplitData, seq_len: int, index: np.ndarray, batch: int):
    """Yield ``(windows [batch, seq_len + 1] int32, real)`` (``Packed`` rows for examples) over
    the windows at ``index``, in order; the last batch is padded to full size by repeating its
    final window (one compiled shape), and ``real`` counts the windows that are not padding."""
    source = row_source(tokens, seq_len)
    for start in range(0, len(index), batch):
        chosen = index[start:start + batch]
        padded = np.pad(chosen, (0, batch - len(chosen)), mode="edge")
        rows = [source[i] for i in padded]
        yield (Packed(*map(np.stack, zip(*rows))) if isinstance(rows[0], Packed) else np.stack(rows)), len(chosen)


def evaluate(params, cfg: Config, tokens: SplitData, max_tokens: int | None = None, eval_step=None,
             route: RouteOptions | None = None) -> Evaluation:
    """Validation loss of ``params`` on ``tokens`` (see the module docstring); ``max_tokens``
    defaults to ``cfg.train.eval_tokens`` (0: every window). Runs on the context mesh, if any."""
    seq = cfg.train.seq_len
    max_tokens = cfg.train.eval_tokens if max_tokens is None else max_tokens
    index = validation_windows(tokens, seq, max_tokens)
    mesh = jax.sharding.get_mesh()
    eval_step = eval_step or jitted_eval_step(cfg, route, None if mesh.empty else mesh)
    batch = cfg.train.batch_size
    if not mesh.empty:  # every process reads the same batch; each places its own shards
        sharding = mesh_lib.batch_sharding(mesh)
        place = lambda rows: jax.tree.map(lambda b: jax.make_array_from_callback(b.shape, sharding, lambda i: b[i]),
                                          rows)
        batch = max(batch // mesh_lib.batch_shards(mesh), 1) * mesh_lib.batch_shards(mesh)
    else:
        place = lambda rows: jax.tree.map(jnp.asarray, rows)
    sums, counts, active = [], [], []
    for windows, real in window_batches(tokens, seq, index, batch):
        summed, counted, active_BL = eval_step(params, place(windows))
        sums.append(np.asarray(summed, np.float64)[:real])
        counts.append(np.asarray(counted, np.float64)[:real])
        active.append(np.asarray(active_BL, np.float64)[:real])
    sum_W, count_W = np.concatenate(sums), np.concatenate(counts)
    loss, stderr = ratio_mean(sum_W, count_W)
    per_layer = np.concatenate(active).sum(0) / max(count_W.sum(), 1.0)
    return Evaluation(loss, stderr, int(count_W.sum()), len(sum_W),
                      tuple(float(x) for x in sum_W / np.maximum(count_W, 1)), tuple(float(x) for x in per_layer))


def ratio_mean(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """The loss over every token, ``sum(sums) / sum(counts)``, and the ratio estimator's standard
    error over the rows (windows, examples) that ``sums`` and ``counts`` hold (module docstring)."""
    n = len(sums)
    loss = float(sums.sum() / max(counts.sum(), 1.0))
    if n < 2:
        return loss, 0.0
    spread = np.sum((sums - loss * counts) ** 2) / (n * (n - 1))
    return loss, float(math.sqrt(spread) / max(counts.mean(), 1e-12))
