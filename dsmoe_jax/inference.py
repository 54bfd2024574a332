"""Functional inference with a preallocated KV cache: prefill, decode_step, sampling, and one
decoding engine behind ``generate``, ``generate_speculative`` and ``stream``.

Shape legend: B batch, S prompt length, T cache slots, N new tokens, V vocabulary, K tokens fed to
one pass of the model while decoding (the last one, and a draft's guess of the next).

Everything is a pure function of (params, inputs) with ``cfg`` static, so it runs inside a
user's own ``jit``/``vmap``. Arguments come in one order throughout the public API: params,
then arrays, then ``cfg`` (as in ``forward``), so ``functools.partial(fn, cfg=cfg)`` jits.
Batched prompts of different lengths are left-padded (see
``pad_prompts``): every row then writes the same cache slot at each step, and padding slots are
masked out of attention. Positions count real tokens only, so a padded prompt continues exactly
as it would alone. MoE blocks route the decoded tokens through the grouped backend, so a decode
step runs only the experts its tokens chose.

The engine: a set-up (the checks, the caches, the prompt's pass and the first new token), then
passes of the model, one step each, until every row has its tokens or has stopped at ``eos``.
Its option is the draft: none samples one token a pass; ``"mtp"`` has the model's first
multi-token-prediction depth guess the next token, which the pass verifies (greedy only).
``generate`` and ``generate_speculative`` run it inside one ``while_loop``; ``stream`` runs
the same set-up and steps from a host loop.
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

from dsmoe_jax.block import KVCache
from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.costs import cache_dims
from dsmoe_jax.errors import InputError
from dsmoe_jax.model import check_tokens, forward_cached


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
    multi-token-prediction depth (``model.forward_cached``'s ``mtp_cache``) instead of the model's."""
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


# ---- decoding: one engine, the draft its option ------------------------------------------------

DRAFTS = ("mtp",)  # the drafting methods: "mtp", the model's first multi-token-prediction depth


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


class _Settings(NamedTuple):
    """A decoding run's static settings; hashable, so ``jit`` takes them as one static argument."""

    cfg: ModelConfig
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos: int | None
    draft: str | None  # None: one token per pass of the model; one of DRAFTS: a drafted one more


class _Decoding(NamedTuple):
    """What one pass of the model reads and leaves: the decoding loop's carry."""

    out_BN: jax.Array  # int32: a row's first stats.tokens_B slots hold its tokens so far
    stats: SpeculativeStats  # with no draft, none drafted nor accepted
    done_B: jax.Array  # bool: the row has emitted eos
    token_B: jax.Array  # int32: the row's last token, fed to the next pass (eos once done)
    guess_B: jax.Array | None  # int32: the draft's guess of the token after token_B (None: no draft)
    position_B: jax.Array  # int32: token_B's position
    cache: KVCache
    mtp_cache: KVCache | None  # the first MTP depth's one-layer cache (the "mtp" draft)
    rng: jax.Array | None  # None when greedy: nothing is drawn


def _settings(prompt_ids, cfg: Config | ModelConfig, max_new_tokens, temperature, top_k, top_p, eos,
              draft: str | None, check_ids: bool, where: str) -> _Settings:
    """Every check of a run that can be made before anything runs, then its settings."""
    if draft is not None and draft not in DRAFTS:
        raise InputError(f"{where}: speculative={draft!r} is not a drafting method; pass 'mtp' (the model's "
                         "multi-token-prediction module drafts) or None")
    if draft is not None and _number(temperature) != 0:
        raise InputError(f"{where}: speculative={draft!r} decodes greedily, but temperature={temperature!r}; pass "
                         "temperature=0 (sampled speculative decoding is not implemented)")
    cfg = model_config(cfg)
    check_tokens(prompt_ids, cfg, where, check_ids)
    _check_generation(cfg, prompt_ids.shape[1], max_new_tokens, temperature, top_k, top_p, eos, where)
    return _Settings(cfg, max_new_tokens, temperature, top_k, top_p, eos, draft)


def _greedy(logits: jax.Array) -> jax.Array:
    """The most likely token along the last axis (the vocabulary), as int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _split(rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """(the key to carry on, a key for this draw); a greedy run has none to split."""
    return (None, None) if rng is None else tuple(jax.random.split(rng))


def _forward(params, tokens_BK, cache, mtp_cache, cfg, mask_BK, positions_BK, fresh=False):
    """``forward_cached``, drafting when there is a draft cache: (logits, the draft's logits or
    None, cache, draft cache or None), one shape for both."""
    if mtp_cache is None:
        logits_BKV, cache = forward_cached(params, tokens_BK, cache, cfg, mask_BK, positions_BK, fresh=fresh)
        return logits_BKV, None, cache, None
    return forward_cached(params, tokens_BK, cache, cfg, mask_BK, positions_BK, fresh=fresh, mtp_cache=mtp_cache)


def _start(params: dict, prompt_BS: jax.Array, mask_BS: jax.Array, rng: jax.Array | None, s: _Settings) -> _Decoding:
    """Every run's set-up: the caches, the prompt's pass (prefill; with a draft, its first guess
    too) and the first new token, which that pass gives."""
    cfg, N = s.cfg, s.max_new_tokens
    B, S = prompt_BS.shape
    if s.draft is None:
        cache, mtp_cache = _empty_cache(cfg, B, S + N, None, cfg.n_layers), None
    else:
        # a pass writes two slots and keeps at most two; a lone row reuses a rejected guess's slot
        slots = S + (N + 1 if B == 1 else 2 * N)
        cache, mtp_cache = (_empty_cache(cfg, B, slots, None, layers) for layers in (cfg.n_layers, 1))
    logits_BSV, draft_BSV, cache, mtp_cache = _forward(params, prompt_BS, cache, mtp_cache, cfg, mask_BS,
                                                       prompt_positions(mask_BS), fresh=True)
    rng, first_rng = _split(rng)
    token_B = sample(logits_BSV[:, -1], first_rng, s.temperature, s.top_k, s.top_p)
    zeros_B = jnp.zeros((B,), jnp.int32)
    return _Decoding(
        out_BN=jnp.zeros((B, N), jnp.int32).at[:, 0].set(token_B),
        stats=SpeculativeStats(jnp.int32(0), zeros_B, zeros_B, jnp.ones((B,), jnp.int32)),
        done_B=token_B == s.eos if s.eos is not None else jnp.zeros((B,), bool),
        token_B=token_B,
        guess_B=None if draft_BSV is None else _greedy(draft_BSV[:, -1]),
        position_B=jnp.sum(mask_BS, axis=1),  # the first new token's: positions count real tokens
        cache=cache, mtp_cache=mtp_cache, rng=rng)


def _live(d: _Decoding, max_new_tokens: int) -> jax.Array:
    """The rows still decoding: not stopped by eos, and short of their tokens."""
    return ~d.done_B & (d.stats.tokens_B < max_new_tokens)


def _step(params: dict, d: _Decoding, s: _Settings) -> _Decoding:
    """One pass of the model. Each row feeds its last token and, with a draft, the draft's guess
    of the one after; the model's token after the last is always kept, and where the guess is
    that token, the model's token after the guess too: two tokens from one pass. The same pass
    has the draft read the new hidden states and guess again. A rejected guess's cache slot is
    masked out; when every row's guess failed, the next pass overwrites it."""
    cfg, N, eos = s.cfg, s.max_new_tokens, s.eos
    B = d.token_B.shape[0]
    live_B = _live(d, N)
    fed_BK = d.token_B[:, None] if d.guess_B is None else jnp.stack([d.token_B, d.guess_B], axis=1)
    K = fed_BK.shape[1]
    index = d.cache.index
    positions_BK = d.position_B[:, None] + jnp.arange(K)
    logits_BKV, draft_BKV, cache, mtp_cache = _forward(params, fed_BK, d.cache, d.mtp_cache, cfg,
                                                       jnp.ones((B, K), jnp.int32), positions_BK)
    rng, step_rng = _split(d.rng)
    first_B = sample(logits_BKV[:, 0], step_rng, s.temperature, s.top_k, s.top_p)
    stops_B = first_B == eos if eos is not None else jnp.zeros((B,), bool)
    rows_B, n_B = jnp.arange(B), d.stats.tokens_B
    out_BN = d.out_BN.at[rows_B, jnp.where(live_B, n_B, N)].set(first_B, mode="drop")
    done_B = d.done_B | (live_B & stops_B)
    token_B, guess_B, accepted_B, drafted_B = first_B, None, jnp.zeros((B,), bool), d.stats.drafted_B
    if d.guess_B is not None:
        accepted_B = live_B & (first_B == d.guess_B) & ~stops_B
        second_B, guesses_BK = _greedy(logits_BKV[:, 1]), _greedy(draft_BKV)
        out_BN = out_BN.at[rows_B, jnp.where(accepted_B, n_B + 1, N)].set(second_B, mode="drop")
        if eos is not None:
            done_B = done_B | (accepted_B & (second_B == eos))
        token_B = jnp.where(accepted_B, second_B, first_B)
        guess_B = jnp.where(accepted_B, guesses_BK[:, 1], guesses_BK[:, 0])
        drafted_B = drafted_B + live_B
        advance = 1 + jnp.any(accepted_B).astype(jnp.int32)
        keep = lambda c: c._replace(valid_BT=jax.lax.dynamic_update_slice_in_dim(
            c.valid_BT, accepted_B[:, None], index + 1, 1), index=index + advance)
        cache, mtp_cache = keep(cache), keep(mtp_cache)
    if eos is not None:  # a stopped row goes on feeding eos, as its output reads from then on
        token_B = jnp.where(done_B, eos, token_B)
    gained_B = live_B.astype(jnp.int32) + accepted_B
    stats = SpeculativeStats(d.stats.steps + 1, drafted_B, d.stats.accepted_B + accepted_B,
                             jnp.minimum(n_B + gained_B, N))
    # a row no longer live moves on one position a pass, as if it went on emitting eos
    position_B = d.position_B + jnp.maximum(gained_B, 1)
    return _Decoding(out_BN, stats, done_B, token_B, guess_B, position_B, cache, mtp_cache, rng)


def _finish(d: _Decoding, s: _Settings) -> tuple[jax.Array, SpeculativeStats]:
    """The tokens ``[B, N]`` (a row that stopped: eos from then on) and the stats."""
    if s.eos is None:
        return d.out_BN, d.stats
    written_BN = jnp.arange(s.max_new_tokens)[None, :] < d.stats.tokens_B[:, None]
    return jnp.where(written_BN, d.out_BN, s.eos), d.stats


def _decode(params: dict, prompt_BS: jax.Array, mask_BS: jax.Array | None, rng: jax.Array | None,
            s: _Settings) -> tuple[jax.Array, SpeculativeStats]:
    """The decoding engine, all on device: the set-up, then passes of the model until every row
    has its tokens or has stopped."""
    mask_BS = jnp.ones(prompt_BS.shape, jnp.int32) if mask_BS is None else mask_BS.astype(jnp.int32)
    d = _start(params, prompt_BS, mask_BS, rng, s)
    d = jax.lax.while_loop(lambda d: jnp.any(_live(d, s.max_new_tokens)), lambda d: _step(params, d, s), d)
    return _finish(d, s)


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
    s = _settings(prompt_ids, cfg, max_new_tokens, temperature, top_k, top_p, eos, speculative, check_ids,
                  "generate")
    return _decode(params, prompt_ids, prompt_mask, rng, s)[0]


def generate_speculative(params: dict, prompt_ids: jax.Array, cfg: Config | ModelConfig, max_new_tokens: int,
                         eos: int | None = None, prompt_mask: jax.Array | None = None,
                         check_ids: bool = False) -> tuple[jax.Array, SpeculativeStats]:
    """Greedy decoding with the model's first multi-token-prediction depth as the draft model
    (self-speculative decoding, as the DeepSeek-V3 report describes): ``[B, N]`` tokens, the
    same as ``generate(..., temperature=0)``'s, and ``SpeculativeStats``.

    Each step feeds the model two tokens: the last one it chose and the MTP module's guess of
    the one after. The model's choice after the first is always kept; when it equals the guess,
    its choice after the guess is kept too (two tokens from one pass). In the same pass the MTP
    depth reads the new hidden states and proposes the next guess. Needs ``model.mtp_depth`` >= 1
    and the MTP weights. Jit with ``cfg``, ``max_new_tokens`` and ``eos`` static; the checks are
    those of ``generate``.
    """
    s = _settings(prompt_ids, cfg, max_new_tokens, 0, None, None, eos, "mtp", check_ids, "generate_speculative")
    return _decode(params, prompt_ids, prompt_mask, None, s)


@_old_argument_order_deprecated
def stream(params: dict, prompt_ids: Sequence[int], cfg: Config | ModelConfig, max_new_tokens: int,
           rng: jax.Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos: int | None = None) -> Iterator[int]:
    """Yield one prompt's new tokens as they are decoded (a host loop: for printing as they come;
    ``generate`` is the all-on-device version, and gives the same tokens for the same ``rng``).
    Stops after ``eos``, which is not yielded.

    Checks everything ``generate`` does, the prompt's ids included, when called (not at the
    first ``next``)."""
    cfg = model_config(cfg)
    _check_generation(cfg, len(prompt_ids), max_new_tokens, temperature, top_k, top_p, eos, "stream")
    prompt_BS = np.asarray(prompt_ids)[None]  # B = 1
    check_tokens(prompt_BS, cfg, "stream")
    s = _Settings(cfg, max_new_tokens, temperature, top_k, top_p, eos, None)
    return _stream(params, jnp.asarray(prompt_BS, jnp.int32), rng, s)


# The engine's set-up and pass, each compiled once per model and settings, for host loops.
_start_jitted = jax.jit(_start, static_argnames="s")
_step_jitted = jax.jit(_step, static_argnames="s")


def _stream(params: dict, prompt_BS: jax.Array, rng: jax.Array, s: _Settings) -> Iterator[int]:
    """``stream``'s loop, a generator apart from it (a generator's checks would wait for ``next``):
    the engine's set-up, then one pass at a time, each pass's tokens yielded as they come."""
    d = _start_jitted(params, prompt_BS, jnp.ones_like(prompt_BS), rng, s)
    shown = 0
    while True:
        written = int(d.stats.tokens_B[0])
        for token in np.asarray(d.out_BN)[0, shown:written].tolist():
            if token == s.eos:
                return
            yield token
        if written >= s.max_new_tokens:
            return
        shown = written
        d = _step_jitted(params, d, s)
