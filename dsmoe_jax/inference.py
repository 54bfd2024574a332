"""Functional inference with a preallocated KV cache: prefill, decode_step, generate.

Shape legend: B batch, S prompt length, T cache slots, N new tokens, V vocabulary.

Everything is a pure function of (params, inputs) with ``cfg`` static, so it runs inside a
user's own ``jit``/``vmap``. Arguments come in one order throughout the public API: params,
then arrays, then ``cfg`` (as in ``forward``), so ``functools.partial(fn, cfg=cfg)`` jits.
Batched prompts of different lengths are left-padded (see
``pad_prompts``): every row then writes the same cache slot at each step, and padding slots are
masked out of attention. Positions count real tokens only, so a padded prompt continues exactly
as it would alone. MoE blocks route the decoded tokens through the grouped backend, so a decode
step runs only the experts its tokens chose.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.model import InputError, KVCache, cache_dims, check_tokens, forward_cached, forward_cached_mtp


def _old_argument_order_deprecated(fn):
    """Until version 0.3 also accept the 0.1 order ``fn(params, cfg, arrays...)``, with a
    DeprecationWarning, by moving ``cfg`` to its new place."""
    names = list(inspect.signature(fn).parameters)
    cfg_index = names.index("cfg") - 1  # among the arguments after params

    @functools.wraps(fn)
    def wrapper(params, *args, **kwargs):
        if args and isinstance(args[0], (Config, ModelConfig)) and "cfg" not in kwargs:
            warnings.warn(f"{fn.__name__}(params, cfg, ...) is deprecated and will stop working in 0.3; "
                          f"call {fn.__name__}({', '.join(names[:cfg_index + 2])}, ...)", DeprecationWarning,
                          stacklevel=2)
            cfg, args = args[0], list(args[1:])
            if len(args) >= cfg_index:
                args.insert(cfg_index, cfg)
            else:
                kwargs["cfg"] = cfg
        return fn(params, *args, **kwargs)

    return wrapper


def _int(x) -> int | None:
    """``x`` as a Python int when it is one (a Python, numpy or concrete jax integer), else None."""
    try:
        return None if isinstance(x, bool) else operator.index(x)
    except TypeError:
        return None


def _number(x) -> float | None:
    """``x`` as a float when it is a real number (traced values are not), else None."""
    if isinstance(x, (bool, jax.core.Tracer)):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _check_sampling(temperature, top_k, top_p, vocab_size: int, where: str) -> None:
    """Refuse sampling settings that would sample garbage: a negative or NaN temperature, a
    top_k outside the vocabulary, a top_p outside (0, 1] (which keeps no token: id 0 forever).
    They are static, so this runs at trace time, under ``jit`` too; traced values are skipped."""
    t = _number(temperature)
    if not isinstance(temperature, jax.core.Tracer) and (t is None or not math.isfinite(t) or t < 0):
        raise InputError(f"{where}: temperature must be a finite number >= 0 (0 = greedy decoding), got "
                         f"{temperature!r}; pass e.g. 0.8, or 0 for greedy")
    if top_k is not None and not isinstance(top_k, jax.core.Tracer):
        k = _int(top_k)
        if k is None or not 0 <= k <= vocab_size:
            raise InputError(f"{where}: top_k must be an integer from 0 to the vocabulary size {vocab_size}, got "
                             f"{top_k!r}; pass e.g. 50, or None (or 0) to sample from every token")
    if top_p is not None and not isinstance(top_p, jax.core.Tracer):
        p = _number(top_p)
        if p is None or not 0 < p <= 1:  # NaN fails both comparisons
            raise InputError(f"{where}: top_p must be in (0, 1], the probability mass sampled from, got {top_p!r}; "
                             "pass e.g. 0.9, or None to sample from every token")


def _check_generation(cfg: ModelConfig, prompt_len: int, max_new_tokens, temperature, top_k, top_p, eos,
                      where: str) -> None:
    """The static settings of ``generate`` and ``stream``, before anything runs."""
    _check_sampling(temperature, top_k, top_p, cfg.vocab_size, where)
    n = _int(max_new_tokens)
    if n is None or n < 1:
        raise InputError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_len < 1:
        raise InputError(f"{where}: the prompt is empty; give at least one token (e.g. the tokenizer's BOS id)")
    if prompt_len + n > cfg.max_seq_len:
        room = cfg.max_seq_len - prompt_len
        fix = (f"lower max_new_tokens to at most {room}, or shorten the prompt" if room >= 1
               else f"shorten the prompt to at most {cfg.max_seq_len - 1} tokens")
        raise InputError(f"{where}: the prompt's {prompt_len} tokens plus max_new_tokens={n} make {prompt_len + n}, "
                         f"more than model.max_seq_len {cfg.max_seq_len}; {fix}")
    if eos is not None and not isinstance(eos, jax.core.Tracer):
        e = _int(eos)
        if e is None or not 0 <= e < cfg.vocab_size:
            raise InputError(f"{where}: eos {eos!r} is not a token id of the model (ids are 0 to "
                             f"{cfg.vocab_size - 1}); pass the end-of-sequence id of the model's tokenizer, or None")


def init_cache(cfg: Config | ModelConfig, batch: int, max_len: int, dtype=None, *, mtp: bool = False) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt included);
    ``max_len`` may not exceed ``model.max_seq_len``. ``mtp``: the one-layer cache of the first
    multi-token-prediction depth (``model.forward_cached_mtp``) instead of the model's."""
    cfg = model_config(cfg)
    if max_len > cfg.max_seq_len:
        raise InputError(f"init_cache: max_len {max_len} exceeds model.max_seq_len {cfg.max_seq_len}, the longest "
                         f"sequence the model takes; lower max_len to at most {cfg.max_seq_len}")
    return _empty_cache(cfg, batch, max_len, dtype, 1 if mtp else cfg.n_layers)


def _empty_cache(cfg: ModelConfig, batch: int, slots: int, dtype, layers: int) -> KVCache:
    """``init_cache`` without the length check: speculative decoding leaves rejected drafts'
    slots empty, so it may need more slots than positions."""
    heads, k_width, v_width = cache_dims(cfg)
    zeros = lambda width: (jnp.zeros((batch, slots, heads, width), dtype or jnp.dtype(cfg.dtype)),) * layers
    return KVCache(zeros(k_width), zeros(v_width), jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Left-pad token lists into ``ids [B, S]`` and ``mask [B, S]`` (1 = real token)."""
    S = max(len(p) for p in prompts)
    ids = [[pad_id] * (S - len(p)) + list(p) for p in prompts]
    mask = [[0] * (S - len(p)) + [1] * len(p) for p in prompts]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def prompt_positions(mask_BS: jax.Array) -> jax.Array:
    """Positions that count only real tokens: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask_BS, axis=1) - 1, 0)


@_old_argument_order_deprecated
def prefill(params: dict, tokens: jax.Array, cache: KVCache, cfg: Config | ModelConfig,
            attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Run (left-padded) prompts ``[B, S]`` through the model, filling ``cache`` from its first
    slot (what it held before is forgotten); returns the logits ``[B, S, V]`` of every prompt
    position and the cache. To extend cached sequences instead, use ``forward_cached``.
    ``tokens`` are checked as in ``forward``: their ids only outside ``jit``."""
    check_tokens(tokens, model_config(cfg), "prefill")
    S, T = tokens.shape[1], cache.valid_BT.shape[1]
    if S > T:
        raise InputError(f"prefill: {S} prompt tokens do not fit the cache's {T} slots; make the cache with "
                         f"init_cache(cfg, batch, max_len) for max_len >= {S} plus the tokens to generate")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    return forward_cached(params, tokens, cache, cfg, attention_mask, prompt_positions(attention_mask), fresh=True)


@_old_argument_order_deprecated
def decode_step(params: dict, token_B: jax.Array, positions_B: jax.Array, cache: KVCache,
                cfg: Config | ModelConfig) -> tuple[jax.Array, KVCache]:
    """One token per sequence at ``positions_B``: its logits ``[B, V]`` and the cache."""
    ones = jnp.ones((token_B.shape[0], 1), jnp.int32)
    logits, cache = forward_cached(params, token_B[:, None], cache, cfg, ones, positions_B[:, None])
    return logits[:, 0], cache


def sample(logits_BV: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Greedy when ``temperature`` is 0; otherwise sample from the tempered distribution,
    restricted to the ``top_k`` most likely tokens (None or 0: all) and to the smallest set with
    mass ``top_p`` (None: all). Refuses settings outside those ranges (``InputError``)."""
    _check_sampling(temperature, top_k, top_p, logits_BV.shape[-1], "sample")
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        # the smallest logit still inside the nucleus: tokens before it hold less than top_p
        cutoff = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@_old_argument_order_deprecated
def generate(params: dict, prompt_ids: jax.Array, cfg: Config | ModelConfig, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos: int | None = None, prompt_mask: jax.Array | None = None, check_ids: bool = False,
             speculative: str | None = None) -> jax.Array:
    """Continue left-padded prompts ``[B, S]`` by ``max_new_tokens`` tokens: ``[B, N]``.

    A row that emits ``eos`` repeats it from then on; the loop ends early once every row has.
    Jit with ``cfg``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``eos`` and
    ``speculative`` static. ``speculative="mtp"`` decodes greedily (``temperature`` 0) with the
    model's multi-token-prediction module drafting a token that each step verifies (see
    ``generate_speculative``, which also reports how many drafts were accepted).

    Refuses (``InputError``) before running anything: sampling settings out of range (see
    ``sample``), ``max_new_tokens < 1``, an ``eos`` outside the vocabulary, a prompt longer than
    ``model.max_seq_len - max_new_tokens``, and non-integer or non-2-D ``prompt_ids``; these are
    static, so they are checked under ``jit`` too. The prompt's ids are checked to lie in
    ``[0, vocab_size)`` outside ``jit``, and under it with ``check_ids=True`` inside
    ``checkify.checkify`` (see ``model.check_tokens``); unchecked, an out-of-range id silently
    reads a clamped or wrapped embedding.
    """
    if speculative is not None:
        if speculative != "mtp":
            raise InputError(f"generate: speculative={speculative!r} is not a drafting method; pass 'mtp' (the "
                             "model's multi-token-prediction module drafts) or None")
        if _number(temperature) != 0:
            raise InputError(f"generate: speculative='mtp' decodes greedily, but temperature={temperature!r}; pass "
                             "temperature=0 (sampled speculative decoding is not implemented)")
        return generate_speculative(params, prompt_ids, cfg, max_new_tokens, eos, prompt_mask, check_ids)[0]
    cfg_m = model_config(cfg)
    check_tokens(prompt_ids, cfg_m, "generate", check_ids)
    B, S = prompt_ids.shape
    _check_generation(cfg_m, S, max_new_tokens, temperature, top_k, top_p, eos, "generate")
    mask = jnp.ones((B, S), jnp.int32) if prompt_mask is None else prompt_mask.astype(jnp.int32)
    cache = init_cache(cfg, B, S + max_new_tokens)
    logits, cache = prefill(params, prompt_ids, cache, cfg, mask)
    rng, first_rng = jax.random.split(rng)
    token_B = sample(logits[:, -1], first_rng, temperature, top_k, top_p)
    out_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
    done_B = token_B == eos if eos is not None else jnp.zeros((B,), bool)
    position_B = jnp.sum(mask, axis=1)  # the first generated token's position

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, out_BN, cache, done_B, position_B, rng = carry
        logits_BV, cache = decode_step(params, out_BN[:, i - 1], position_B, cache, cfg)
        rng, step_rng = jax.random.split(rng)
        token_B = sample(logits_BV, step_rng, temperature, top_k, top_p)
        if eos is not None:
            token_B = jnp.where(done_B, eos, token_B)
            done_B = done_B | (token_B == eos)
        return i + 1, out_BN.at[:, i].set(token_B), cache, done_B, position_B + 1, rng

    i, out_BN, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_BN, cache, done_B, position_B, rng))
    if eos is not None:  # rows stopped early: fill the slots the loop did not reach
        out_BN = jnp.where(jnp.arange(max_new_tokens)[None, :] < i, out_BN, eos)
    return out_BN


class SpeculativeStats(NamedTuple):
    """How self-speculative decoding went (``generate_speculative``); arrays, so it leaves ``jit``."""

    steps: jax.Array  # int32: decoding steps after the prompt's, each one pass of the model
    drafted_B: jax.Array  # int32 [B]: drafts each row checked
    accepted_B: jax.Array  # int32 [B]: of those, drafts the model agreed with (each a token gained)
    tokens_B: jax.Array  # int32 [B]: tokens each row generated (up to and including eos)

    @property
    def acceptance(self) -> float:
        """The fraction of drafts accepted, over every row."""
        return float(jnp.sum(self.accepted_B) / jnp.maximum(jnp.sum(self.drafted_B), 1))

    @property
    def tokens_per_step(self) -> float:
        """Tokens per pass of the model, the prompt's pass included (greedy decoding's is 1)."""
        return float(jnp.max(self.tokens_B) / (self.steps + 1))


def generate_speculative(params: dict, prompt_ids: jax.Array, cfg: Config | ModelConfig, max_new_tokens: int,
                         eos: int | None = None, prompt_mask: jax.Array | None = None,
                         check_ids: bool = False) -> tuple[jax.Array, SpeculativeStats]:
    """Greedy decoding with the model's first multi-token-prediction depth as the draft model
    (self-speculative decoding, as the DeepSeek-V3 report describes): ``[B, N]`` tokens, the
    same as ``generate(..., temperature=0)``'s, and ``SpeculativeStats``.

    Each step feeds the model two tokens: the last one it chose and the MTP module's guess of
    the one after. The model's choice after the first is always kept; when it equals the guess,
    its choice after the guess is kept too (two tokens from one pass). In the same pass the MTP
    depth reads the new hidden states and proposes the next guess. A rejected guess's cache slot
    is masked out; when every row's guess failed the next step overwrites it. Needs
    ``model.mtp_depth`` >= 1 and the MTP weights. Jit with ``cfg``, ``max_new_tokens`` and ``eos``
    static; the checks are those of ``generate``.
    """
    cfg_m = model_config(cfg)
    check_tokens(prompt_ids, cfg_m, "generate_speculative", check_ids)
    B, S = prompt_ids.shape
    N = max_new_tokens
    _check_generation(cfg_m, S, N, 0, None, None, eos, "generate_speculative")
    mask = jnp.ones((B, S), jnp.int32) if prompt_mask is None else prompt_mask.astype(jnp.int32)
    # slots: a step writes two and keeps at most two; with one row a rejected draft's slot is reused
    slots = S + (N + 1 if B == 1 else 2 * N)
    cache, mtp_cache = (_empty_cache(cfg_m, B, slots, None, layers) for layers in (cfg_m.n_layers, 1))
    logits, draft, cache, mtp_cache = forward_cached_mtp(params, prompt_ids, cache, mtp_cache, cfg,
                                                         mask, prompt_positions(mask), fresh=True)
    greedy = lambda logits_BV: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    token_B, guess_B = greedy(logits[:, -1]), greedy(draft[:, -1])
    zeros_B = jnp.zeros((B,), jnp.int32)
    stats = SpeculativeStats(jnp.int32(0), zeros_B, zeros_B, jnp.ones((B,), jnp.int32))
    out_BN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(token_B)
    done_B = token_B == eos if eos is not None else jnp.zeros((B,), bool)
    position_B = jnp.sum(mask, axis=1)  # of token_B

    def live(stats, done_B):
        return ~done_B & (stats.tokens_B < N)

    def cond(carry):
        return jnp.any(live(carry[0], carry[1]))

    def body(carry):
        stats, done_B, out_BN, token_B, guess_B, position_B, cache, mtp_cache = carry
        active_B = live(stats, done_B)
        index = cache.index
        logits, draft, cache, mtp_cache = forward_cached_mtp(
            params, jnp.stack([token_B, guess_B], 1), cache, mtp_cache, cfg, jnp.ones((B, 2), jnp.int32),
            jnp.stack([position_B, position_B + 1], 1))
        chosen_B2, guesses_B2 = greedy(logits), greedy(draft)
        first_B = chosen_B2[:, 0]  # the model's token after token_B: always kept
        stops_B = first_B == eos if eos is not None else jnp.zeros((B,), bool)
        accepted_B = active_B & (first_B == guess_B) & ~stops_B
        rows = jnp.arange(B)
        n_B = stats.tokens_B
        out_BN = out_BN.at[rows, jnp.where(active_B, n_B, N)].set(first_B, mode="drop")
        out_BN = out_BN.at[rows, jnp.where(accepted_B, n_B + 1, N)].set(chosen_B2[:, 1], mode="drop")
        if eos is not None:
            second_stops_B = accepted_B & (chosen_B2[:, 1] == eos)
            done_B = done_B | (active_B & stops_B) | second_stops_B
        gained_B = active_B.astype(jnp.int32) + accepted_B
        stats = SpeculativeStats(stats.steps + 1, stats.drafted_B + active_B, stats.accepted_B + accepted_B,
                                 jnp.minimum(n_B + gained_B, N))
        # the guess's slot holds a real token only where it was accepted; when no row accepted,
        # the next step writes over it
        advance = 1 + jnp.any(accepted_B).astype(jnp.int32)
        keep = lambda c: c._replace(valid_BT=jax.lax.dynamic_update_slice_in_dim(
            c.valid_BT, accepted_B[:, None], index + 1, 1), index=index + advance)
        token_B = jnp.where(accepted_B, chosen_B2[:, 1], first_B)
        guess_B = jnp.where(accepted_B, guesses_B2[:, 1], guesses_B2[:, 0])
        return stats, done_B, out_BN, token_B, guess_B, position_B + gained_B, keep(cache), keep(mtp_cache)

    carry = (stats, done_B, out_BN, token_B, guess_B, position_B, cache, mtp_cache)
    stats, done_B, out_BN, *_ = jax.lax.while_loop(cond, body, carry)
    if eos is not None:  # rows that stopped: eos from then on, as generate writes them
        out_BN = jnp.where(jnp.arange(N)[None, :] < stats.tokens_B[:, None], out_BN, eos)
    return out_BN, stats


@_old_argument_order_deprecated
def stream(params: dict, prompt_ids: Sequence[int], cfg: Config | ModelConfig, max_new_tokens: int,
           rng: jax.Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos: int | None = None) -> Iterator[int]:
    """Yield one prompt's new tokens as they are decoded (a host loop: for printing as they come;
    ``generate`` is the all-on-device version). Stops after ``eos``, which is not yielded.

    Checks everything ``generate`` does, the prompt's ids included, when called (not at the
    first ``next``)."""
    cfg = model_config(cfg)
    _check_generation(cfg, len(prompt_ids), max_new_tokens, temperature, top_k, top_p, eos, "stream")
    check_tokens(np.asarray(prompt_ids)[None], cfg, "stream")
    return _stream(params, prompt_ids, cfg, max_new_tokens, rng, temperature, top_k, top_p, eos)


def _stream(params, prompt_ids, cfg, max_new_tokens, rng, temperature, top_k, top_p, eos) -> Iterator[int]:
    """``stream``'s loop, a generator apart from it: a generator's checks would wait for ``next``."""
    prefill_fn = jax.jit(functools.partial(prefill, cfg=cfg))
    decode_fn = jax.jit(functools.partial(decode_step, cfg=cfg))
    sample_fn = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))
    cache = init_cache(cfg, 1, len(prompt_ids) + max_new_tokens)
    logits, cache = prefill_fn(params, tokens=jnp.asarray([prompt_ids], jnp.int32), cache=cache)
    logits_BV = logits[:, -1]
    for i in range(max_new_tokens):
        rng, step_rng = jax.random.split(rng)
        token_B = sample_fn(logits_BV, step_rng, temperature, top_k, top_p)
        if int(token_B[0]) == eos:
            return
        yield int(token_B[0])
        position_B = jnp.asarray([len(prompt_ids) + i])
        logits_BV, cache = decode_fn(params, token_B=token_B, positions_B=position_B, cache=cache)
