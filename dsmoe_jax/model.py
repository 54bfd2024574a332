"""The DeepSeekMoE decoder as a Flax NNX module, and the functional API around it.

Shape legend: B batch, S sequence, D model width, V vocabulary, E routed experts; T key slots (a
cache's, or the sequence's own tokens), or in the LM head the B * S tokens flattened.

The decoder: token embedding, the blocks (``block.py``), a final RMSNorm, an untied LM head, and
the multi-token-prediction depths when ``model.mtp_depth`` asks for them (``mtp.py``).
Params cross the API as plain nested dicts; ``nnx.merge`` rebuilds the modules inside
``forward``, so everything jits, vmaps and shards. Three ways through the model, by what they
read and return: ``forward`` (whole sequences: logits and ``Aux``), ``forward_mtp`` (the same and
the MTP depths' predictions: training) and ``forward_cached`` (tokens continuing a KV cache; with
``mtp_cache``, the first MTP depth's draft too: decoding).

Two params layouts, chosen by ``model.scan_layers``:
  unrolled  ``layers/{i}/...``: one subtree per block, run one after another (the HF layout);
  scanned   ``dense_layers/...`` and ``moe_layers/...``: each group's blocks stacked on a leading
            ``layers`` axis and run by one ``lax.scan``, so the compiled program holds one
            block per group whatever the depth. Same seed, same parameters: ``init_params``
            stacks the unrolled ones. ``match_layout`` converts params between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import checkify

from dsmoe_jax import mtp
from dsmoe_jax.block import Block, KVCache, cache_keys, own_keys
from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.errors import ConfigError, InputError  # noqa: F401 - raised here, and importable from here
from dsmoe_jax.layers import RMSNorm, param
from dsmoe_jax.moe import MoE, MoEStats, RouteOptions


def _concat_stats(parts: list) -> MoEStats | None:
    """MoE statistics stacked on a leading axis, joined along it (None when there are none)."""
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if parts else None


class Aux(NamedTuple):
    """What ``forward`` reports besides the logits (a pytree: it passes through jit and scan)."""

    balance_loss: jax.Array  # expert, device level and top-p's entropy, summed over MoE layers: add it to the loss
    expert_balance_loss: jax.Array  # summed over MoE layers
    device_balance_loss: jax.Array  # summed over MoE layers
    expert_load: jax.Array  # [MoE layers, E] tokens routed to each expert
    drop_fraction: jax.Array  # [MoE layers] assignments dropped by the capacity limit
    gate_sum: jax.Array  # [MoE layers] a token's routed gates summed, mean over real tokens
    dynamic_loss: jax.Array  # top-p routing's entropy loss (weighted), summed over MoE layers
    active_experts: jax.Array  # [MoE layers] routed experts a real token activates, mean
    active_histogram: jax.Array  # [MoE layers, K + 1] real tokens activating 0..K routed experts
    # [MoE layers, B * S, K] each token's chosen experts, best first: only with RouteOptions(record=True)
    expert_choices: jax.Array | None = None
    expert_gates: jax.Array | None = None  # [MoE layers, B * S, K] float32: their gates (record=True)

    @classmethod
    def from_layers(cls, stacked: MoEStats | None) -> Aux:
        """Balance losses summed over MoE layers; load and drop fraction per MoE layer, from
        the statistics of every MoE layer stacked on a leading axis (None: no MoE layer)."""
        if stacked is None:
            zero = jnp.zeros((), jnp.float32)
            none = jnp.zeros((0,), jnp.float32)
            return cls(zero, zero, zero, jnp.zeros((0, 0), jnp.float32), none, none, zero, none,
                       jnp.zeros((0, 0), jnp.float32))
        expert, device = stacked.expert_balance_loss.sum(), stacked.device_balance_loss.sum()
        dynamic = stacked.dynamic_loss.sum()
        return cls(expert + device + dynamic, expert, device, stacked.expert_load, stacked.drop_fraction,
                   stacked.gate_sum, dynamic, stacked.active_experts, stacked.active_histogram, stacked.expert_TK,
                   stacked.gate_TK)


STACKED_GROUPS = ("dense_layers", "moe_layers")  # the params keys of the scanned layout


def layer_groups(cfg: ModelConfig) -> dict[str, range]:
    """The scanned layout's groups of blocks: their params key and block indices (non-empty only)."""
    # every dense block before every MoE block (the config refuses scan_layers otherwise)
    groups = dict(zip(STACKED_GROUPS, (range(cfg.n_dense_layers), range(cfg.n_dense_layers, cfg.n_layers))))
    return {name: blocks for name, blocks in groups.items() if blocks}


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose every parameter is those of ``blocks`` stacked on a leading ``layers`` axis."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    stack = lambda *vs: vs[0].replace(jax.tree.map(lambda *a: jnp.stack(a), *(v[...] for v in vs)),
                                      axes=("layers", *vs[0].get_metadata()["axes"]))  # FP8 weights are pytrees
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_var))


class Decoder(nnx.Module):
    """Token embedding, the blocks, a final RMSNorm and an untied LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        V, D, dt = cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.embed_VD = param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, dt)
        blocks = [Block(cfg, i in cfg.moe_layers, rngs=rngs) for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            for name, indices in layer_groups(cfg).items():
                setattr(self, name, _stack_blocks([blocks[i] for i in indices]))
        else:
            self.layers = nnx.List(blocks)
        self.final_norm = RMSNorm(D, cfg.norm_eps, dt)
        self.lm_head_DV = param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, dt)
        if cfg.mtp_depth:  # no params key at all without it: checkpoints of other models stay as they are
            self.mtp = nnx.List([mtp.MTPBlock(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = cfg.remat
        self.groups = tuple(layer_groups(cfg)) if cfg.scan_layers else None

    def _blocks(self):
        """Every block in order; in the scanned layout each is a slice of its group's stack."""
        if self.groups is None:
            yield from self.layers
            return
        for name in self.groups:
            graphdef, state = nnx.split(getattr(self, name))
            for i in range(jax.tree.leaves(state)[0].shape[0]):
                yield nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def moe_ffns(self) -> list[MoE]:
        """The MoE layers in the order of ``Aux.expert_load``'s rows: the blocks', then the MTP
        depths'. In the scanned layout a group is one module, its parameters stacked on a
        leading axis that holds one row per block."""
        blocks = list(self.layers) if self.groups is None else [getattr(self, name) for name in self.groups]
        blocks += [depth.block for depth in getattr(self, "mtp", ())]  # no attribute without MTP depths
        return [block.ffn for block in blocks if isinstance(block.ffn, MoE)]

    def __call__(self, tokens_BS, positions_BS, valid_BS, cache: KVCache | None = None,
                 route: RouteOptions | None = None, fresh: bool = False, segment_ids_BS=None):
        """Logits, aux statistics and the updated cache (None without one); ``fresh``: fill the
        cache from its first slot, whatever it held; ``segment_ids_BS``: packed examples (no cache)."""
        h_BSD, layer_stats, cache = self.hidden(tokens_BS, positions_BS, valid_BS, cache, route, fresh,
                                                segment_ids_BS)
        return self.logits(h_BSD), Aux.from_layers(layer_stats), cache

    def embed(self, tokens_BS):
        with jax.named_scope("embed"):
            return self.embed_VD[...][tokens_BS].astype(self.dtype)

    def logits(self, h_BSD):
        """float32 logits of final (normalised) hidden states."""
        B, S, D = h_BSD.shape
        with jax.named_scope("lm_head"):
            logits_TV = jnp.einsum("td,dv->tv", h_BSD.reshape(B * S, D), self.lm_head_DV[...].astype(self.dtype),
                                   preferred_element_type=jnp.float32)
        return logits_TV.reshape(B, S, -1)

    def hidden(self, tokens_BS, positions_BS, valid_BS, cache: KVCache | None = None,
               route: RouteOptions | None = None, fresh: bool = False, segment_ids_BS=None):
        """The final normalised hidden states, the MoE layers' stats (stacked, or None) and the
        updated cache."""
        S = tokens_BS.shape[1]
        index, valid_keys_BT = (0, own_keys(valid_BS, segment_ids_BS)) if cache is None else \
            cache_keys(cache, valid_BS, fresh)
        x_BSD = self.embed(tokens_BS)
        run = lambda blk, *args: blk(*args, route=route)  # route is static: a closure, not an argument
        if self.remat and cache is None:  # rematerialise: the backward pass recomputes each block
            run = nnx.remat(run)
        layer_stats, keys, values = [], [], []
        if self.groups is not None and cache is None:
            x_BSD, layer_stats = self._scan(run, x_BSD, positions_BS, valid_BS, tokens_BS, segment_ids_BS)
        else:
            for i, block in enumerate(self._blocks()):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x_BSD, stats, (k, v) = run(block, x_BSD, positions_BS, valid_BS, tokens_BS, valid_keys_BT, kv, index,
                                           segment_ids_BS)
                keys.append(k)
                values.append(v)
                if stats is not None:
                    layer_stats.append(jax.tree.map(lambda a: a[None], stats))
        if cache is not None:
            cache = KVCache(tuple(keys), tuple(values), valid_keys_BT, jnp.asarray(index + S, jnp.int32))
        return self.final_norm(x_BSD), _concat_stats(layer_stats), cache

    def _scan(self, run, x_BSD, positions_BS, valid_BS, tokens_BS, segment_ids_BS=None):
        """Each group of stacked blocks as one ``lax.scan``; the MoE statistics come out stacked."""
        layer_stats = []
        for name in self.groups:
            graphdef, state = nnx.split(getattr(self, name))

            def body(x_BSD, layer_state, graphdef=graphdef):
                x_BSD, stats, _ = run(nnx.merge(graphdef, layer_state), x_BSD, positions_BS, valid_BS, tokens_BS,
                                      own_keys(valid_BS, segment_ids_BS), None, 0, segment_ids_BS)
                return x_BSD, stats

            x_BSD, stats = jax.lax.scan(body, x_BSD, state)
            if stats is not None:
                layer_stats.append(stats)
        return x_BSD, layer_stats


# ---- functional API -------------------------------------------------------------------------




def check_tokens(tokens, cfg: ModelConfig, where: str, check_ids: bool = False) -> None:
    """Refuse token ids the model would misread: ``tokens`` must be an integer array ``[B, S]``
    with ``S <= model.max_seq_len`` and every id in ``[0, model.vocab_size)``.

    The embedding lookup never fails: an id past the vocabulary reads the last row and a
    negative one wraps around, so a bad id gives plausible logits. Dtype, rank and length are
    static and always checked. The ids are checked when concrete; under ``jit`` they are
    tracers, checked only with ``check_ids``, through ``jax.experimental.checkify`` (the jitted
    function must then be wrapped in ``checkify.checkify``, whose error carries the message)."""
    dtype, shape = getattr(tokens, "dtype", None), getattr(tokens, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = dtype if dtype is not None else type(tokens).__name__
        raise InputError(f"{where}: token ids must be an integer array, got {got}; pass "
                         "jnp.asarray(ids, jnp.int32) (floats are refused, not rounded)")
    if len(shape) != 2:
        raise InputError(f"{where}: tokens must have shape [batch, seq], got {tuple(shape)}"
                         + ("; add a batch axis with tokens[None]" if len(shape) == 1 else "; reshape them"))
    if shape[1] > cfg.max_seq_len:
        raise InputError(f"{where}: {shape[1]} tokens per sequence exceed model.max_seq_len {cfg.max_seq_len}; "
                         f"shorten the sequences to at most {cfg.max_seq_len} tokens")
    if isinstance(tokens, jax.core.Tracer):
        if check_ids and tokens.size:
            outside = (tokens < 0) | (tokens >= cfg.vocab_size)
            checkify.check(~jnp.any(outside), f"{where}: token id {{id}} is outside the vocabulary: ids must lie in "
                           f"[0, {cfg.vocab_size}) (model.vocab_size); encode text with the tokenizer the model was "
                           "trained with", id=tokens.reshape(-1)[jnp.argmax(outside.reshape(-1))])
        return
    if not tokens.size:
        return
    with jax.ensure_compile_time_eval():  # concrete ids closed over by a traced function, too
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    if lo < 0 or hi >= cfg.vocab_size:
        raise InputError(f"{where}: token id {lo if lo < 0 else hi} is outside the vocabulary: ids must lie in "
                         f"[0, {cfg.vocab_size}) (model.vocab_size); encode text with the tokenizer the model "
                         "was trained with")


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig):
    """The graph definition and the parameter shapes of ``cfg``'s model (nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return graphdef, state


def param_shapes(cfg: Config | ModelConfig) -> dict:
    """The params pytree of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves."""
    return nnx.to_pure_dict(_abstract(model_config(cfg))[1])


def param_axes(cfg: Config | ModelConfig) -> dict:
    """The params pytree with each leaf's logical axes (a tuple of names) in place of the array."""
    state = _abstract(model_config(cfg))[1]
    is_var = lambda x: isinstance(x, nnx.Variable)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=is_var))


def init_params(cfg: Config | ModelConfig, key: jax.Array) -> dict:
    """Random parameters (normal, std ``init_std``; norms at one) as a nested dict of arrays."""
    cfg = model_config(cfg)
    return params_of(Decoder(cfg, rngs=nnx.Rngs(params=key)))


def as_module(params: dict, cfg: Config | ModelConfig) -> Decoder:
    """The Decoder module holding ``params`` (jax or numpy arrays), after checking every name
    and shape against ``cfg``: for code that works on the model's modules, not its params keys."""
    cfg = model_config(cfg)
    _check_params(params, cfg)
    return nnx.merge(_abstract(cfg)[0], jax.tree.map(jnp.asarray, params))


def params_of(decoder: Decoder) -> dict:
    """The params of ``decoder`` as a plain nested dict: the inverse of ``as_module``."""
    return nnx.to_pure_dict(nnx.state(decoder, nnx.Param))


def _layout(params: dict) -> str:
    return "unrolled" if "layers" in params else "scanned"


def match_layout(params: dict, cfg: Config | ModelConfig) -> dict:
    """``params`` of ``cfg``'s model, given in either layout (see the module docstring), in the
    layout ``model.scan_layers`` names: stacked or sliced per block as needed."""
    cfg = model_config(cfg)
    want = "scanned" if cfg.scan_layers else "unrolled"
    if _layout(params) == want:
        return params
    groups = layer_groups(cfg)
    out = {k: v for k, v in params.items() if k not in ("layers", *groups)}
    if want == "scanned":
        for name, blocks in groups.items():
            out[name] = jax.tree.map(lambda *a: jnp.stack(a), *[params["layers"][i] for i in blocks])
    else:
        out["layers"] = {i: jax.tree.map(lambda a, j=j: a[j], params[name])
                         for name, blocks in groups.items() for j, i in enumerate(blocks)}
    return out


def unrolled(cfg: Config | ModelConfig) -> ModelConfig:
    """``cfg``'s model in the unrolled layout (one params subtree per block)."""
    return dataclasses.replace(model_config(cfg), scan_layers=False)


def _check_params(params: dict, cfg: ModelConfig) -> None:
    want = "scanned" if cfg.scan_layers else "unrolled"
    if _layout(params) != want:
        raise ValueError(f"params are in the {_layout(params)} layout but the config has model.scan_layers = "
                         f"{cfg.scan_layers}: convert them with dsmoe_jax.match_layout(params, cfg)")
    expected = param_shapes(cfg)
    if jax.tree.structure(params) != jax.tree.structure(expected):
        got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
        want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)}
        raise ValueError(
            f"params do not match the config: missing {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}"
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        if a.shape != b.shape:
            raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {a.shape}, the config needs {b.shape}")


def segment_positions(segment_ids_BS: jax.Array) -> jax.Array:
    """RoPE positions of packed examples: each run of equal segment ids counts from 0."""
    S = segment_ids_BS.shape[1]
    slots_BS = jnp.broadcast_to(jnp.arange(S), segment_ids_BS.shape)
    starts_BS = jnp.concatenate([jnp.ones_like(segment_ids_BS[:, :1], bool),
                                 segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]], axis=1)
    return slots_BS - jax.lax.cummax(jnp.where(starts_BS, slots_BS, 0), axis=1)


def _positions_and_mask(tokens, attention_mask, positions, segment_ids):
    """The defaults of ``forward``'s optional arrays: all tokens real at positions 0..S-1, or,
    with ``segment_ids``, the tokens of segment 0 padding and each example's positions from 0."""
    B, S = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((B, S), jnp.int32) if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(S), (B, S)) if segment_ids is None else segment_positions(segment_ids)
    return attention_mask, positions


def forward(params: dict, tokens: jax.Array, cfg: Config | ModelConfig, *,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            route: RouteOptions | None = None, check_ids: bool = False, segment_ids: jax.Array | None = None):
    """Logits ``[B, S, V]`` (float32) and ``Aux`` for integer ``tokens [B, S]``.

    ``attention_mask [B, S]`` (1 = real token, 0 = padding) hides padding keys and keeps
    padding out of the balance statistics; ``positions [B, S]`` default to ``arange(S)``.
    ``segment_ids [B, S]`` (int, 0 = padding) packs several examples into a row: attention never
    crosses from one example to another, positions restart at each example (unless given),
    and the sequence-wise balance statistics (``moe.seq_aux``) are taken per example; each
    position's logits then equal those of its example run alone.
    ``aux.balance_loss`` (expert + device level, summed over MoE layers) is what training adds
    to the loss; ``aux.expert_load [moe layers, E]`` counts the tokens routed to each expert.
    ``route`` (``moe.RouteOptions``) changes a trained model's routing, to probe its experts.
    Jit with ``cfg`` and ``route`` static.

    Refuses (``InputError``) tokens that are not integers, not 2-D or longer than
    ``model.max_seq_len``, and, outside ``jit``, ids outside ``[0, vocab_size)``. Under ``jit``
    the ids are checked only with ``check_ids=True`` inside ``checkify.checkify`` (see
    ``check_tokens``); otherwise an out-of-range id silently reads a clamped or wrapped embedding.
    """
    cfg = model_config(cfg)
    check_tokens(tokens, cfg, "forward", check_ids)
    attention_mask, positions = _positions_and_mask(tokens, attention_mask, positions, segment_ids)
    logits, aux, _ = as_module(params, cfg)(tokens, positions, attention_mask, route=route, segment_ids_BS=segment_ids)
    return logits, aux


def forward_mtp(params: dict, tokens: jax.Array, cfg: Config | ModelConfig, *,
                segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux, tuple]:
    """``forward`` with multi-token prediction (``model.mtp_depth`` > 0), for training: the logits
    ``[B, S, V]``, ``Aux`` over the model's MoE layers and then the MoE blocks of the MTP depths,
    and each depth k's logits ``[B, S - k, V]``, which predict ``tokens[:, k + 1:]`` followed by
    the k + 1 tokens after the window (the training window supplies them). ``segment_ids``: packed
    examples, as in ``forward``."""
    cfg = model_config(cfg)
    if not cfg.mtp_depth:
        raise ConfigError("forward_mtp needs model.mtp_depth >= 1 (the number of multi-token-prediction depths)")
    check_tokens(tokens, cfg, "forward_mtp")
    if tokens.shape[1] <= cfg.mtp_depth:
        raise InputError(f"forward_mtp: {tokens.shape[1]} tokens per sequence leave nothing for multi-token "
                         f"prediction {cfg.mtp_depth} tokens ahead; pass sequences longer than model.mtp_depth")
    valid, positions = _positions_and_mask(tokens, None, None, segment_ids)
    decoder = as_module(params, cfg)
    h_BSD, stats, _ = decoder.hidden(tokens, positions, valid, segment_ids_BS=segment_ids)
    ahead, mtp_stats = mtp.predict_ahead(decoder.mtp, decoder.embed, decoder.logits, h_BSD, tokens, positions, valid,
                                         segment_ids_BS=segment_ids)
    stats = _concat_stats([s for s in (stats, mtp_stats) if s is not None])
    return decoder.logits(h_BSD), Aux.from_layers(stats), ahead


def forward_cached(params: dict, tokens: jax.Array, cache: KVCache, cfg: Config | ModelConfig,
                   attention_mask: jax.Array, positions: jax.Array, *, fresh: bool = False,
                   mtp_cache: KVCache | None = None
                   ) -> tuple[jax.Array, KVCache] | tuple[jax.Array, jax.Array, KVCache, KVCache]:
    """Like ``forward`` for ``tokens`` that continue the sequences in ``cache``: their keys and
    values are written at ``cache.index`` and they attend to everything cached before them.
    ``fresh=True`` (static) starts the sequences over instead: they are written from the first
    slot and the cache's previous content is forgotten. ``tokens`` are checked as in ``forward``
    (ids only outside ``jit``). Returns the logits ``[B, S, V]`` and the cache.

    With ``mtp_cache`` (the first MTP depth's one-layer cache, slots aligned with ``cache``'s)
    the same pass also drafts, for self-speculative decoding (``mtp.draft``): it returns (logits,
    the draft's logits ``[B, S, V]`` of the token after each position's greedy next one, cache,
    mtp cache). That needs ``model.mtp_depth`` >= 1 and the depth's weights."""
    cfg = model_config(cfg)
    if mtp_cache is not None and not cfg.mtp_depth:
        raise ConfigError("speculative decoding with the MTP module needs model.mtp_depth >= 1 and its weights "
                          "(a DeepSeek-V3 checkpoint converted without --drop-mtp, or a model trained with it)")
    check_tokens(tokens, cfg, "forward_cached")
    decoder = as_module(params, cfg)
    h_BSD, _, cache = decoder.hidden(tokens, positions, attention_mask, cache, fresh=fresh)
    logits_BSV = decoder.logits(h_BSD)
    if mtp_cache is None:
        return logits_BSV, cache
    draft_BSV, mtp_cache = mtp.draft(decoder.mtp[0], decoder.embed, decoder.logits, h_BSD, logits_BSV, positions,
                                     attention_mask, mtp_cache, fresh)
    return logits_BSV, draft_BSV, cache, mtp_cache


def forward_cached_mtp(params: dict, tokens: jax.Array, cache: KVCache, mtp_cache: KVCache,
                       cfg: Config | ModelConfig, attention_mask: jax.Array, positions: jax.Array, *,
                       fresh: bool = False) -> tuple[jax.Array, jax.Array, KVCache, KVCache]:
    """Deprecated, until 0.4: ``forward_cached(..., mtp_cache=mtp_cache)``, which it calls."""
    warnings.warn("model.forward_cached_mtp(params, tokens, cache, mtp_cache, cfg, attention_mask, positions) is "
                  "deprecated and will stop working in 0.4; call model.forward_cached(params, tokens, cache, cfg, "
                  "attention_mask, positions, mtp_cache=mtp_cache)", DeprecationWarning, stacklevel=2)
    return forward_cached(params, tokens, cache, cfg, attention_mask, positions, fresh=fresh, mtp_cache=mtp_cache)


# Names that moved out of this module (CHANGELOG, Unreleased): still importable from here, with a
# DeprecationWarning, until 0.4. Looked up by name when asked for: ``costs`` imports this module,
# so an import statement here would be a cycle; ``import dsmoe_jax`` has loaded it by then anyway.
_MOVED = {name: "dsmoe_jax.costs" for name in ("count_params", "flops_per_token", "cache_dims",
                                                "cache_bytes_per_token")}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"dsmoe_jax.model.{name} moved to {_MOVED[name]}.{name}; the old name will stop working in 0.4",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
