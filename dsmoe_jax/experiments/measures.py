"""What the specialisation, balance and dynamic-routing experiments measure on trained arms, beyond
their loss.

Specialisation (the paper's section 4.5) probes a trained model by changing its routing at
evaluation time (``moe.RouteOptions``), never its parameters:

- disable top experts: each token's highest-scoring routed experts are removed, a fraction r of
  the routed experts up to 4/64, and it routes top-k among the rest; a model whose experts are
  less redundant loses more;
- no shared expert: the shared experts are switched off and one more routed expert activated;
- fewer activated experts: DeepSeekMoE evaluated with top-3 .. top-7 routed experts, against
  GShard's loss with its own top-2.

Balance: the number of validation tokens routed to each expert of each layer (and the routed
gates' sum per token, the weight the routed experts carry).

Experts: how many routed experts a token activates, per MoE layer, on the whole validation split
and on each kind of text (dynamic routing claims harder inputs and lower layers take more), with
the forward FLOPs per token that this mean implies beside the most a token can cost.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax import data
from dsmoe_jax.costs import flops_per_token
from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.evaluation import evaluate, validation_windows, window_batches
from dsmoe_jax.experiments.specs import Arm, Scale
from dsmoe_jax.loading import load_model, validation_tokens
from dsmoe_jax.model import forward
from dsmoe_jax.moe import RouteOptions
from dsmoe_jax.tokenizer import load_tokenizer

MAX_DISABLED_FRACTION = 4 / 64  # the paper's largest ratio of disabled top routed experts
DEVICE_GROUPS = 7  # the balance experiment's device-level groups (63 routed experts, 9 per group)



@dataclasses.dataclass(frozen=True)
class Trained:
    """A study's trained runs, what its measures read: each (variant, arm)'s run directories in
    the order of ``seeds``."""

    scale: Scale
    seeds: tuple[int, ...]
    arms: dict[tuple[str, str], Arm]  # (variant, arm name) -> the arm as trained in that variant
    directories: dict[tuple[str, str], tuple[pathlib.Path, ...]]

    def runs(self, arm: str, variant: str = "base") -> tuple[pathlib.Path, ...]:
        return self.directories[(variant, arm)]


def _load(directory: pathlib.Path):
    params, cfg, _ = load_model(directory)
    val_tokens = validation_tokens(cfg)
    return params, cfg, val_tokens


def specialisation(trained: Trained) -> dict:
    """The three probes for every seed: losses keyed by probe, model and setting, one per seed."""
    scale = trained.scale
    out: dict = {"disable_top": {}, "no_shared": {}, "top_k": {}}
    for i in range(len(trained.seeds)):
        for name in ("deepseekmoe", "gshard_x1.5"):
            params, cfg, val = _load(trained.runs(name)[i])
            E = cfg.model.moe.n_routed_experts
            for n in range(round(E * MAX_DISABLED_FRACTION) + 1):
                loss = evaluate(params, cfg, val, scale.probe_tokens, route=RouteOptions(exclude_top=n)).loss
                key = f"{n}/{E}"
                out["disable_top"].setdefault(name, {}).setdefault(key, {"ratio": n / E, "losses": []})
                out["disable_top"][name][key]["losses"].append(loss)
            if name == "deepseekmoe":
                K = cfg.model.moe.top_k
                probes = {"standard": RouteOptions(),
                          f"shared off, top-{K + 1} routed": RouteOptions(shared=False, top_k=K + 1)}
                for label, route in probes.items():
                    out["no_shared"].setdefault(label, []).append(evaluate(params, cfg, val, scale.probe_tokens,
                                                                           route=route).loss)
                for k in range(3, K + 1):
                    loss = evaluate(params, cfg, val, scale.probe_tokens, route=RouteOptions(top_k=k)).loss
                    out["top_k"].setdefault(str(k), []).append(loss)
        params, cfg, val = _load(trained.runs("gshard")[i])
        out.setdefault("gshard_top2", []).append(evaluate(params, cfg, val, scale.probe_tokens).loss)
    return out


@functools.lru_cache(maxsize=8)
def _routing_step(cfg):
    def step(params, windows_BS1, real):
        # padding windows (index >= real) are masked out, so they route no tokens
        mask_BS = jnp.broadcast_to((jnp.arange(windows_BS1.shape[0]) < real)[:, None], windows_BS1[:, :-1].shape)
        aux = forward(params, windows_BS1[:, :-1], cfg.model, attention_mask=mask_BS)[1]
        return aux.expert_load, aux.gate_sum * mask_BS.sum()  # gate sums totalled over the real tokens

    return jax.jit(step)


def routing_totals(params, cfg, tokens: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Over the windows validation reads (``evaluation.validation_windows`` and
    ``window_batches``): the tokens routed to each expert ``[MoE layers, E]`` and each MoE layer's
    routed gates summed per token, mean over tokens ``[MoE layers]``."""
    index = validation_windows(tokens, cfg.train.seq_len, max_tokens)
    step = _routing_step(cfg)
    batches = window_batches(tokens, cfg.train.seq_len, index, min(cfg.train.batch_size, len(index)))
    load, gates, seen = 0, 0, 0
    for windows, real in batches:
        batch_load, batch_gates = map(np.asarray, step(params, jnp.asarray(windows), real))
        load, gates, seen = load + batch_load, gates + batch_gates, seen + real * cfg.train.seq_len
    return load, gates / seen



def load_statistics(load_LE: np.ndarray, groups: int | None = DEVICE_GROUPS) -> dict:
    """Per layer: max/mean expert load, normalised entropy of the load (1 = perfectly even), and
    max/mean load of ``groups`` contiguous expert groups (devices; None: not asked)."""
    share_LE = load_LE / load_LE.sum(-1, keepdims=True)
    entropy = -(share_LE * np.log(np.where(share_LE > 0, share_LE, 1))).sum(-1) / math.log(load_LE.shape[-1])
    ratio = lambda a: (a.max(-1) / a.mean(-1)).tolist()
    out = {"max_over_mean": ratio(load_LE), "entropy": entropy.tolist()}
    if groups:
        out["device_max_over_mean"] = ratio(load_LE.reshape(load_LE.shape[0], groups, -1).sum(-1))
    return out


def validation_by_kind(cfg) -> dict[str, np.ndarray]:
    """The embedded corpus's validation split by kind of text, each kind's documents (in their
    order) as one token sequence: ``code`` (the standard library's source) and ``documentation``
    (the pydoc topics). Together they are the validation split, document for document."""
    if cfg.data.path is not None:
        raise ExperimentError(f"the split by kind of text is of the embedded corpus; this run reads {cfg.data.path}")
    tok = load_tokenizer(cfg.data.tokenizer)
    held_out = data.split_documents(data.embedded_documents())[1]
    kinds = {"code": "stdlib:", "documentation": "pydoc:"}
    return {kind: data.document_tokens([(name, text) for name, text in held_out if name.startswith(prefix)], tok)
            for kind, prefix in kinds.items()}


@functools.lru_cache(maxsize=8)
def _choice_step(cfg):
    def step(params, windows_BS1):
        aux = forward(params, windows_BS1[:, :-1], cfg.model, route=RouteOptions(record=True))[1]
        return aux.expert_choices[:, :, 0]  # [MoE layers, B * S]: each token's first choice

    return jax.jit(step)


def routing_by_token(params, cfg, tokens: np.ndarray, max_tokens: int) -> list[dict]:
    """Per MoE layer, how much the first choice of expert is decided by the token id alone, on
    the windows validation reads: the accuracy of the best table from token id to expert, that
    of always naming the most used expert, and the mutual information I(expert; token id) over
    the entropy of the expert (1: the token id decides, as hash routing does; 0: it says nothing)."""
    seq, V = cfg.train.seq_len, cfg.model.vocab_size
    index = validation_windows(tokens, seq, max_tokens)
    step, counts = _choice_step(cfg), None
    for windows, real in window_batches(tokens, seq, index, min(cfg.train.batch_size, len(index))):
        choice_LT = np.asarray(step(params, jnp.asarray(windows)))[:, :real * seq]
        token_T = windows[:real, :-1].reshape(-1)
        if counts is None:
            counts = np.zeros((choice_LT.shape[0], V, cfg.model.moe.n_routed_experts))
        for layer, choice_T in enumerate(choice_LT):
            np.add.at(counts[layer], (token_T, choice_T), 1)
    out = []
    for c_VE in counts:
        n = c_VE.sum()
        p_E, p_V = c_VE.sum(0) / n, c_VE.sum(1) / n
        entropy = lambda p: -np.sum(p * np.log(np.where(p > 0, p, 1)), axis=-1)
        given_V = entropy(c_VE / np.maximum(c_VE.sum(1, keepdims=True), 1))  # H(expert | token id = v)
        h_E = float(entropy(p_E))
        out.append({"table_accuracy": float(c_VE.max(1).sum() / n), "constant_accuracy": float(p_E.max()),
                    "normalised_mutual_information": (h_E - float(p_V @ given_V)) / h_E if h_E > 0 else 1.0})
    return out


def probe_arm(directory: pathlib.Path, scale: Scale) -> dict:
    """Evaluation-only probes of one trained arm: validation loss by kind of text (with its
    standard error over windows), the routed experts' load statistics and how much the token id
    alone decides the routing, per MoE layer."""
    params, cfg, _ = load_model(directory)
    by_kind = {kind: evaluate(params, cfg, tokens, scale.eval_tokens)
               for kind, tokens in validation_by_kind(cfg).items()}
    val = validation_tokens(cfg)
    load, gate_sum = routing_totals(params, cfg, val, scale.probe_tokens)
    return {"loss": {k: r.loss for k, r in by_kind.items()}, "stderr": {k: r.stderr for k, r in by_kind.items()},
            "tokens": {k: r.tokens for k, r in by_kind.items()}, "load": load_statistics(load, groups=None),
            "gate_sum": gate_sum.tolist(), "routing_by_token": routing_by_token(params, cfg, val, scale.probe_tokens)}


def experts_arm(directory: pathlib.Path, scale: Scale) -> dict:
    """Evaluation-only measures of one trained arm: validation loss and routed experts per
    counted position (per MoE layer, and their mean ``experts``) on the whole validation split
    (``all``) and on each kind of text; forward FLOPs per token at the measured mean (``expected``)
    and at the most a token can take (``max``; equal for top-k routing)."""
    params, cfg, _ = load_model(directory)
    texts = {"all": validation_tokens(cfg), **validation_by_kind(cfg)}
    results = {kind: evaluate(params, cfg, tokens, scale.eval_tokens) for kind, tokens in texts.items()}
    per_layer = {kind: list(r.active_experts) for kind, r in results.items()}
    mean = float(np.mean(per_layer["all"]))
    dynamic = cfg.model.moe.routing == "top_p"
    seq = cfg.train.seq_len
    return {"loss": {kind: r.loss for kind, r in results.items()},
            "experts": {kind: float(np.mean(layers)) for kind, layers in per_layer.items()},
            "experts_per_layer": per_layer,
            "flops_per_token": {"expected": flops_per_token(cfg, seq, mean if dynamic else None),
                                "max": flops_per_token(cfg, seq)}}


def balance(trained: Trained) -> dict:
    """Load statistics of every arm and seed, and each arm's load matrix for the first seed."""
    out: dict = {}
    for variant, name in trained.directories:
        stats = []
        for i, directory in enumerate(trained.runs(name, variant)):
            params, cfg, val = _load(directory)
            load = routing_totals(params, cfg, val, trained.scale.probe_tokens)[0]
            stats.append(load_statistics(load))
            if i == 0:
                out.setdefault(name, {})["load"] = load.tolist()
        out[name]["per_seed"] = stats
        out[name]["max_over_mean"] = float(np.mean([np.mean(s["max_over_mean"]) for s in stats]))
        out[name]["entropy"] = float(np.mean([np.mean(s["entropy"]) for s in stats]))
        out[name]["device_max_over_mean"] = float(np.mean([np.mean(s["device_max_over_mean"]) for s in stats]))
    return out


def window_documents(cfg, max_tokens: int) -> tuple[int, ...]:
    """The held-out document each validation window (``evaluation.validation_windows``) starts
    in, for clustering windows by document; empty for data other than the embedded corpus
    (whose document boundaries the token array does not keep)."""
    if cfg.data.path is not None:
        return ()
    tok = load_tokenizer(cfg.data.tokenizer)
    held_out = data.split_documents(data.embedded_documents())[1]
    lengths = [len(data.document_tokens([doc], tok)) for doc in held_out]
    ends = np.cumsum(lengths)
    starts = validation_windows(validation_tokens(cfg), cfg.train.seq_len, max_tokens) * cfg.train.seq_len
    return tuple(int(d) for d in np.searchsorted(ends, starts, side="right"))
