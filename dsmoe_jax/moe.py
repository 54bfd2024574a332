"""The DeepSeekMoE FFN (arXiv 2401.06066): routing, balance losses and the layer.

Dispatch and combine live in ``dispatch.py``, the grouped expert MLP in ``grouped.py``, the
expert-parallel exchange in ``expert_parallel.py``; this module decides which experts each
token uses and ties the pieces together.

Shape legend: B batch, S sequence, T tokens (B*S), D model width, E routed experts, K experts
per token (top-k; top-p routing's cap, ``MoEConfig.slots``), F expert hidden width, C sequences
the balance statistics are taken over, X experts excluded per token (``RouteOptions.exclude_top``).

Top-p routing leaves some of a token's K slots empty: an empty slot holds expert id E (past the
last expert) and gate 0, which dispatch treats as a dropped assignment, so it takes no row of any
expert's group and costs no expert FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsmoe_jax import mesh as mesh_lib
from dsmoe_jax.config import ModelConfig, MoEConfig
from dsmoe_jax.dispatch import routed_experts
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.expert_parallel import expert_parallel
from dsmoe_jax.layers import MLP, param


class Routing(NamedTuple):
    gate_TK: jax.Array  # weight of each chosen expert, float32
    expert_TK: jax.Array  # chosen experts, int32
    probs_TE: jax.Array | None  # softmax over all routed experts; None for hash routing


@dataclasses.dataclass(frozen=True)
class RouteOptions:
    """Changes to a trained model's routing at inference, for probing its experts (the paper's
    section 4.5). The defaults change nothing; pass them to ``forward(..., route=...)``.

    ``exclude_top``: remove each token's ``exclude_top`` highest-scoring routed experts before
    routing (their logits become -inf, so the softmax and the top-k run over the rest).
    ``top_k``: activate this many routed experts instead of ``moe.top_k``.
    ``shared``: False switches the shared experts off.
    ``record``: report each token's chosen experts and their gates (``Aux.expert_choices``,
    ``Aux.expert_gates``); routing is unchanged.
    """

    exclude_top: int = 0
    top_k: int | None = None
    shared: bool = True
    record: bool = False

    def apply(self, cfg: MoEConfig) -> MoEConfig:
        """``cfg`` with ``top_k`` replaced; refuses options this MoE layer cannot take."""
        if self.exclude_top < 0 or (self.top_k is not None and self.top_k < 1):
            raise ConfigError(f"route options need exclude_top >= 0 and top_k >= 1, got {self}")
        top_k = cfg.top_k if self.top_k is None else self.top_k
        if cfg.routing == "hash" and (self.exclude_top or top_k != 1):
            raise ConfigError("hash routing has no scores to exclude experts by and sends each token to one expert")
        if cfg.routing == "top_p" and self.top_k is not None:
            raise ConfigError("top-p routing chooses how many experts each token takes; change moe.top_p or "
                              "moe.max_experts instead of the route's top_k")
        if self.exclude_top + (1 if cfg.routing == "top_p" else top_k) > cfg.n_routed_experts:
            raise ConfigError(f"excluding {self.exclude_top} and routing to {top_k} needs more than the "
                              f"{cfg.n_routed_experts} routed experts")
        return dataclasses.replace(cfg, top_k=top_k)


def route_scores(x_TD: jax.Array, w_router_DE: jax.Array, cfg: MoEConfig, exclude_top: int = 0,
                 bias_E: jax.Array | None = None) -> Routing:
    """Learned routing: scores s = softmax or sigmoid (``cfg.routing``) of the float32 logits
    x e over all routed experts; each token's ``exclude_top`` best are removed first, when set.
    With ``n_group`` > 1 a token keeps only the experts of its ``topk_group`` best groups. The
    top-k scores are the gates, renormalised to sum 1 with ``norm_topk_prob``, then times
    ``routed_scaling_factor``. ``bias_E`` (auxiliary-loss-free balancing) is added to the scores
    for choosing the groups and experts only, never to the gates. ``probs_TE`` (for the balance
    losses) are the scores made to sum to 1 per token: the softmax itself, or the sigmoids divided by their sum."""
    logits_TE = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), w_router_DE.astype(jnp.float32))
    if exclude_top:
        _, best_TX = jax.lax.top_k(logits_TE, exclude_top)
        logits_TE = jnp.put_along_axis(logits_TE, best_TX, -jnp.inf, axis=-1, inplace=False)
    if cfg.routing == "top_p":
        return _route_top_p(jax.nn.softmax(logits_TE, axis=-1), cfg)
    if cfg.routing == "softmax":
        scores_TE = probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
        scores_TE = jax.nn.sigmoid(logits_TE)
        probs_TE = scores_TE / jnp.maximum(jnp.sum(scores_TE, axis=-1, keepdims=True), 1e-20)
    choose_TE = scores_TE if bias_E is None else scores_TE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    choose_TE = jnp.where(jnp.isneginf(logits_TE), -jnp.inf, choose_TE)  # an excluded expert is never chosen
    if cfg.n_group > 1:
        choose_TE = _within_best_groups(choose_TE, cfg)
    _, expert_TK = jax.lax.top_k(choose_TE, cfg.top_k)
    gate_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=-1)
    if cfg.norm_topk_prob:
        gate_TK = gate_TK / jnp.maximum(jnp.sum(gate_TK, axis=-1, keepdims=True), 1e-20)
    return Routing(gate_TK * cfg.routed_scaling_factor, expert_TK.astype(jnp.int32), probs_TE)


def _route_top_p(probs_TE: jax.Array, cfg: MoEConfig) -> Routing:
    """Dynamic routing (arXiv 2403.07652, as its released code does it): the experts by
    probability, best first, each kept while the probability ranked above it sums to at most
    ``top_p`` (the expert that carries the sum past it is kept, so at least one is), up to
    ``max_experts``; the gates are the probabilities themselves (renormalised only with
    ``norm_topk_prob``). Ties: the lower id first."""
    E = probs_TE.shape[-1]
    top_TK, expert_TK = jax.lax.top_k(probs_TE, cfg.slots)
    keep_TK = jnp.cumsum(top_TK, axis=-1) - top_TK <= cfg.threshold
    gate_TK = jnp.where(keep_TK, top_TK, 0.0)
    if cfg.norm_topk_prob:
        gate_TK = gate_TK / jnp.maximum(jnp.sum(gate_TK, axis=-1, keepdims=True), 1e-20)
    return Routing(gate_TK * cfg.routed_scaling_factor, jnp.where(keep_TK, expert_TK, E).astype(jnp.int32), probs_TE)


def active_experts(expert_TK: jax.Array, num_experts: int) -> jax.Array:
    """Experts each token activates (its slots that hold an expert): [T] float32."""
    return jnp.sum(expert_TK < num_experts, axis=-1).astype(jnp.float32)


def dynamic_loss(probs_TE: jax.Array, valid_T: jax.Array) -> jax.Array:
    """The mean entropy -sum_i P_i log P_i of the router's softmax over the real tokens: top-p
    routing's loss against spreading probability thinly to activate many experts."""
    entropy_T = -jnp.sum(jnp.where(probs_TE > 0, probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), 0.0), axis=-1)
    valid = valid_T.astype(jnp.float32)
    return jnp.sum(entropy_T * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _within_best_groups(choose_TE: jax.Array, cfg: MoEConfig) -> jax.Array:
    """``choose_TE`` with the experts outside each token's ``topk_group`` best groups at -inf."""
    T, E = choose_TE.shape
    groups_TGe = choose_TE.reshape(T, cfg.n_group, E // cfg.n_group)
    if cfg.group_score == "max":
        group_TG = jnp.max(groups_TGe, axis=-1)
    else:
        group_TG = jnp.sum(jax.lax.top_k(groups_TGe, 2)[0], axis=-1)
    _, best_TJ = jax.lax.top_k(group_TG, cfg.topk_group)
    kept_TG = jnp.any(best_TJ[:, :, None] == jnp.arange(cfg.n_group), axis=1)
    return jnp.where(jnp.repeat(kept_TG, E // cfg.n_group, axis=1), choose_TE, -jnp.inf)


def route_hash(tokens_T: jax.Array, num_experts: int) -> Routing:
    """Hash layer (Roller et al. 2021): a fixed pseudo-random token-id -> expert map, gate 1."""
    h = tokens_T.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)  # Knuth's multiplicative hash
    h = h ^ (h >> 16)
    expert_TK = (h % jnp.uint32(num_experts)).astype(jnp.int32)[:, None]
    return Routing(jnp.ones(expert_TK.shape, jnp.float32), expert_TK, None)


def expert_counts(expert_TK: jax.Array, num_experts: int, weight_T: jax.Array) -> jax.Array:
    """Weighted number of assignments to each expert."""
    onehot_TKE = jax.nn.one_hot(expert_TK, num_experts, dtype=jnp.float32)
    return jnp.einsum("tke,t->e", onehot_TKE, weight_T.astype(jnp.float32))


def balance_losses(routing: Routing, valid_T: jax.Array, cfg: MoEConfig, num_seqs: int,
                   device_groups: int = 1, segment_ids_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Expert-level and device-level balance losses (the paper's section 3.3).

    f_i = E / (K T) * #{t : t picks i},  P_i = mean_t s_i,t,  L_exp = a1 * sum_i f_i P_i
    (K T: every assignment; with top-p routing, the experts the tokens actually took);
    over D = ``device_groups`` contiguous groups of experts (the experts each expert-parallel
    device holds) f'_j = mean of f in group j, P'_j = sum of P in group j,
    L_dev = a2 * sum_j f'_j P'_j. Padding tokens (``valid_T`` = 0) are left out. With
    ``seq_aux`` the statistics are taken per sequence and the losses averaged over sequences;
    a sequence is one of the ``num_seqs`` rows, or, with ``segment_ids_T`` (packed examples,
    numbered within each row), one example: then the mean is over the examples present.
    """
    if routing.probs_TE is None:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero
    E = routing.probs_TE.shape[-1]
    chosen_TE = jax.nn.one_hot(routing.expert_TK, E, dtype=jnp.float32).sum(1)  # an empty slot (id E) picks none
    K_T1 = chosen_TE.sum(-1, keepdims=True)  # K, or the experts top-p routing took
    if cfg.seq_aux and segment_ids_T is not None:
        # one group per (row, example); a row holds at most S examples, numbered 1..S
        S = valid_T.shape[0] // num_seqs
        C = num_seqs * (S + 1)
        group_T = jnp.repeat(jnp.arange(num_seqs), S) * (S + 1) + segment_ids_T
        total = lambda a_T_: jax.ops.segment_sum(a_T_ * valid_T.astype(jnp.float32)[:, None], group_T, C)
        tokens_C1 = total(jnp.ones_like(valid_T, jnp.float32)[:, None])
        present_C = (tokens_C1[:, 0] > 0).astype(jnp.float32)
        f_CE = total(chosen_TE) * E / jnp.maximum(total(K_T1), 1.0)
        P_CE = total(routing.probs_TE) / jnp.maximum(tokens_C1, 1.0)
        mean_C = lambda a_C: jnp.sum(a_C * present_C) / jnp.maximum(jnp.sum(present_C), 1.0)
    else:
        C = num_seqs if cfg.seq_aux else 1
        valid_CT = valid_T.astype(jnp.float32).reshape(C, -1)
        tokens_C1 = jnp.maximum(jnp.sum(valid_CT, axis=1, keepdims=True), 1.0)
        assignments_C1 = jnp.einsum("ctk,ct->ck", K_T1.reshape(C, -1, 1), valid_CT)
        f_CE = jnp.einsum("cte,ct->ce", chosen_TE.reshape(C, -1, E), valid_CT) * E / jnp.maximum(assignments_C1, 1.0)
        P_CE = jnp.einsum("cte,ct->ce", routing.probs_TE.reshape(C, -1, E), valid_CT) / tokens_C1
        mean_C = jnp.mean
    expert_loss = cfg.aux_loss_alpha * mean_C(jnp.sum(f_CE * P_CE, axis=-1))
    groups = lambda a_CE: a_CE.reshape(C, device_groups, E // device_groups)
    f_dev_CD, P_dev_CD = groups(f_CE).mean(-1), groups(P_CE).sum(-1)
    device_loss = cfg.device_aux_alpha * mean_C(jnp.sum(f_dev_CD * P_dev_CD, axis=-1))
    return expert_loss, device_loss


class MoEStats(NamedTuple):
    """What one MoE layer reports besides its output."""

    expert_balance_loss: jax.Array  # float32 scalar, already weighted by moe.aux_loss_alpha
    device_balance_loss: jax.Array  # float32 scalar, weighted by moe.device_aux_alpha
    expert_load: jax.Array  # [E] tokens routed to each expert (padding left out)
    drop_fraction: jax.Array  # float32 scalar: assignments dropped by the capacity limit
    gate_sum: jax.Array  # float32 scalar: a token's routed gates summed, mean over real tokens
    dynamic_loss: jax.Array  # float32 scalar: top-p routing's entropy loss, weighted by moe.dynamic_loss_weight
    active_experts: jax.Array  # float32 scalar: routed experts a real token activates, mean
    active_histogram: jax.Array  # [K + 1] real tokens activating 0..K routed experts (K: MoEConfig.slots)
    expert_TK: jax.Array | None = None  # int32: each token's chosen experts, best first (RouteOptions.record)
    gate_TK: jax.Array | None = None  # float32: their gates, as the combine weighs them (RouteOptions.record)


class MoE(nnx.Module):
    """DeepSeekMoE FFN: fine-grained routed experts plus fused shared experts.

    route    float32 softmax (or sigmoid) scores over all routed experts, optionally limited to
             each token's best expert groups, top-k gates (renormalised with ``norm_topk_prob``,
             scaled by ``routed_scaling_factor``), or as many experts as the probabilities need to
             pass ``top_p`` (dynamic routing: unused slots empty), or a fixed token hash; balance
             (and dynamic routing's entropy) losses from the scores.
    dispatch sort the (token, slot) assignments by expert into contiguous groups, dropping those
             over capacity when ``capacity_factor`` is set.
    experts  the grouped SwiGLU MLP over the groups, by the configured backend (grouped.py);
             under a mesh with an ``expert`` axis, dispatch -> experts -> combine run inside
             ``expert_parallel.expert_parallel``, the groups travelling to their experts' devices.
    combine  unsort, weight by the gates, sum over each token's slots.
    shared   add the always-on shared experts, one dense SwiGLU of width Ks * expert_d_ff.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # model.fp8: the experts' GEMMs in FP8, by the grouped backend that has them
        self.cfg = dataclasses.replace(cfg.moe, backend="tiled_fp8") if cfg.fp8 else cfg.moe
        E, D, F = cfg.moe.n_routed_experts, cfg.d_model, cfg.moe.expert_d_ff
        std, dt = cfg.init_std, jnp.dtype(cfg.param_dtype)
        if cfg.moe.routing != "hash":
            self.w_router_DE = param(rngs, (D, E), ("embed", None), std, dt)
        if cfg.moe.score_bias:  # changed by the train step's balancing rule, not by gradients
            self.score_bias_E = nnx.Param(jnp.zeros((E,), jnp.float32), axes=(None,))
        io = (1, 1) if cfg.fp8_weights else None
        self.w_gate_EDF = param(rngs, (E, D, F), ("expert", "embed", "mlp"), std, dt, io)
        self.w_up_EDF = param(rngs, (E, D, F), ("expert", "embed", "mlp"), std, dt, io)
        self.w_down_EFD = param(rngs, (E, F, D), ("expert", "mlp", "embed"), std, dt, io)
        Ks = cfg.moe.n_shared_experts
        self.shared = MLP(D, Ks * F, std=std, param_dtype=dt, rngs=rngs, fp8=cfg.fp8_weights,
                          fp8_gemm=cfg.fp8) if Ks else None

    def __call__(self, x_BSD: jax.Array, tokens_BS: jax.Array, valid_BS: jax.Array,
                 route: RouteOptions | None = None, segment_ids_BS: jax.Array | None = None
                 ) -> tuple[jax.Array, MoEStats]:
        """Returns the FFN output and this layer's ``MoEStats``; ``route`` probes a trained
        layer with changed routing (``RouteOptions``). ``segment_ids_BS``: packed examples, each
        a sequence of its own for the sequence-wise balance statistics (``moe.seq_aux``).

        Under a mesh with an ``expert`` axis the routed experts run expert-parallel; the route
        and the shared experts stay here either way, partitioned by jit.
        """
        route = route or RouteOptions()
        cfg = route.apply(self.cfg)
        B, S, D = x_BSD.shape
        x_TD, valid_T = x_BSD.reshape(B * S, D), valid_BS.reshape(B * S)
        E = cfg.n_routed_experts

        ep = mesh_lib.expert_parallel_size()
        mesh_lib.check_expert_parallel(cfg, ep)
        with jax.named_scope("router"):
            if cfg.routing == "hash":
                routing = route_hash(tokens_BS.reshape(-1), E)
            else:
                bias_E = self.score_bias_E[...] if cfg.score_bias else None
                routing = route_scores(x_TD, self.w_router_DE[...], cfg, route.exclude_top, bias_E)
            segment_ids_T = None if segment_ids_BS is None else segment_ids_BS.reshape(B * S)
            expert_loss, device_loss = balance_losses(routing, valid_T, cfg, num_seqs=B, device_groups=cfg.device_groups
                                                      or ep, segment_ids_T=segment_ids_T)
            entropy_loss = (cfg.dynamic_loss_weight * dynamic_loss(routing.probs_TE, valid_T)
                            if cfg.dynamic_loss_weight else jnp.zeros((), jnp.float32))

        weights = (self.w_gate_EDF[...], self.w_up_EDF[...], self.w_down_EFD[...])
        # Too few tokens to split over the mesh (decoding a single sequence): run the experts in
        # place and let jit gather the expert weights they need.
        split = ep > 1 and (B * S) % mesh_lib.batch_shards() == 0
        routed = expert_parallel if split else routed_experts
        y_TD, keep_TK = routed(x_TD, routing.expert_TK, routing.gate_TK, *weights, cfg)
        if self.shared is not None and route.shared:
            with jax.named_scope("shared_experts"):
                y_TD = y_TD + self.shared(x_TD).astype(jnp.float32)

        taken_TK = (routing.expert_TK < E).astype(jnp.float32)  # top-p routing's empty slots are not assignments
        valid_TK = taken_TK * valid_T[:, None].astype(jnp.float32)
        active_T, real_T = active_experts(routing.expert_TK, E), valid_T.astype(jnp.float32)
        stats = MoEStats(
            expert_balance_loss=expert_loss,
            device_balance_loss=device_loss,
            expert_load=expert_counts(routing.expert_TK, E, valid_T),
            drop_fraction=1.0 - jnp.sum(keep_TK * valid_TK) / jnp.maximum(jnp.sum(valid_TK), 1.0),
            # the routed experts' weight beside the shared experts' 1: small softmax gates leave them silent
            gate_sum=jnp.sum(routing.gate_TK.sum(-1) * valid_T) / jnp.maximum(jnp.sum(valid_T), 1.0),
            dynamic_loss=entropy_loss,
            active_experts=jnp.sum(active_T * real_T) / jnp.maximum(jnp.sum(real_T), 1.0),
            active_histogram=jnp.zeros((cfg.slots + 1,), jnp.float32).at[active_T.astype(jnp.int32)].add(real_T),
            expert_TK=routing.expert_TK if route.record else None,
            gate_TK=routing.gate_TK.astype(jnp.float32) if route.record else None,
        )
        return y_TD.astype(x_BSD.dtype).reshape(B, S, D), stats

