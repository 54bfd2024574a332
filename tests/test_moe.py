"""Router, balance losses and the DeepSeekMoE layer against hand computations (dispatch and
combine: test_dispatch.py)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsmoe_jax import ConfigError, ModelConfig, MoEConfig
from dsmoe_jax import moe as moe_lib

# Router example: 3 tokens, 4 experts. The logits are logs of small integers, so the softmax
# probabilities are exact fractions: t0 -> [1,2,3,4]/10, t1 -> [4,3,2,1]/10, t2 -> [1,4,9,16]/30.
X_TD = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
W_DE = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
PROBS = np.array([[1, 2, 3, 4], [4, 3, 2, 1], [1, 4, 9, 16]], float) / np.array([[10], [10], [30]])


def _router(**fields) -> MoEConfig:
    return MoEConfig(**{"n_routed_experts": 4, "expert_d_ff": 1, **fields})


def test_excluding_the_top_expert_equals_its_logit_at_minus_infinity():
    r = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2), exclude_top=1)
    # t0: e3 (4/10) excluded -> softmax over [1, 2, 3]/6; t1: e0 excluded -> [3, 2, 1]/6;
    # t2: e3 (16/30) excluded -> [1, 4, 9]/14
    np.testing.assert_allclose(r.probs_TE, [[1 / 6, 2 / 6, 3 / 6, 0], [0, 3 / 6, 2 / 6, 1 / 6],
                                            [1 / 14, 4 / 14, 9 / 14, 0]], rtol=1e-6)
    np.testing.assert_array_equal(r.expert_TK, [[2, 1], [1, 2], [2, 1]])
    np.testing.assert_allclose(r.gate_TK, [[3 / 6, 2 / 6], [3 / 6, 2 / 6], [9 / 14, 4 / 14]], rtol=1e-6)
    two = moe_lib.route_scores(X_TD, W_DE, _router(top_k=1), exclude_top=2)
    np.testing.assert_array_equal(two.expert_TK[:, 0], [1, 2, 1], err_msg="the third-best expert of each token")


@pytest.mark.parametrize("options", [moe_lib.RouteOptions(exclude_top=2), moe_lib.RouteOptions(top_k=5),
                                     moe_lib.RouteOptions(shared=False, top_k=4)],
                         ids=["exclude2", "top5", "no_shared"])
def test_route_options_match_the_token_by_token_reference(small_cfg, options):
    layer = _layer(small_cfg)
    x_BSD = jax.random.normal(jax.random.key(3), (2, 10, small_cfg.d_model))
    y, stats = layer(x_BSD, jnp.zeros((2, 10), jnp.int32), jnp.ones((2, 10)), options)
    ref, _ = _numpy_moe(layer, x_BSD.reshape(20, -1), top_k=options.top_k, exclude_top=options.exclude_top,
                        shared=options.shared)
    np.testing.assert_allclose(y, ref.reshape(y.shape), atol=1e-5, err_msg=f"{options}")
    assert float(stats.expert_load.sum()) == 20 * (options.top_k or small_cfg.moe.top_k)


def test_recorded_choices_are_the_routers_and_leave_the_output_alone(small_cfg):
    import dsmoe_jax

    params = dsmoe_jax.init_params(small_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, small_cfg.vocab_size)
    plain, aux = dsmoe_jax.forward(params, tokens, small_cfg)
    logits, recorded = dsmoe_jax.forward(params, tokens, small_cfg, route=moe_lib.RouteOptions(record=True))
    np.testing.assert_array_equal(logits, plain, err_msg="recording changes nothing")
    assert aux.expert_choices is None and recorded.expert_choices.shape == (2, 24, 3), recorded.expert_choices.shape
    for layer, choices in enumerate(np.asarray(recorded.expert_choices)):
        np.testing.assert_array_equal(np.bincount(choices.ravel(), minlength=8), aux.expert_load[layer],
                                      err_msg="the choices are what the load counts")
        assert all(len(set(row)) == 3 for row in choices.tolist()), "three distinct experts per token"


def test_impossible_route_options_are_refused(small_cfg):
    with pytest.raises(ConfigError, match="needs more than the 8 routed experts"):
        moe_lib.RouteOptions(exclude_top=6).apply(small_cfg.moe)
    hashed = dataclasses.replace(small_cfg.moe, routing="hash", top_k=1)
    with pytest.raises(ConfigError, match="hash routing"):
        moe_lib.RouteOptions(exclude_top=1).apply(hashed)


def test_router_top_k_and_gates_by_hand():
    r = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2))
    np.testing.assert_allclose(r.probs_TE, PROBS, rtol=1e-6, err_msg="softmax over all routed experts")
    np.testing.assert_array_equal(r.expert_TK, [[3, 2], [0, 1], [3, 2]])
    np.testing.assert_allclose(r.gate_TK, [[0.4, 0.3], [0.4, 0.3], [16 / 30, 9 / 30]], rtol=1e-6,
                               err_msg="gates are the raw probabilities, not renormalised")
    normed = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2, norm_topk_prob=True))
    np.testing.assert_allclose(normed.gate_TK, [[4 / 7, 3 / 7], [4 / 7, 3 / 7], [16 / 25, 9 / 25]], rtol=1e-6)


def test_sigmoid_scores_and_scaled_gates_by_hand():
    """V3's scoring: sigmoid(logit) = n / (n + 1) for logit log n; the chosen scores renormalised
    to sum 1, then times routed_scaling_factor; the balance statistics see the scores / their sum."""
    r = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2, routing="sigmoid", norm_topk_prob=True,
                                                 routed_scaling_factor=2.5))
    sig = np.array([[1 / 2, 2 / 3, 3 / 4, 4 / 5], [4 / 5, 3 / 4, 2 / 3, 1 / 2], [1 / 2, 4 / 5, 9 / 10, 16 / 17]])
    np.testing.assert_array_equal(r.expert_TK, [[3, 2], [0, 1], [3, 2]])
    top = np.array([[4 / 5, 3 / 4], [4 / 5, 3 / 4], [16 / 17, 9 / 10]])
    np.testing.assert_allclose(r.gate_TK, 2.5 * top / top.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(r.probs_TE, sig / sig.sum(1, keepdims=True), rtol=1e-6)
    raw = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2, routing="sigmoid"))
    np.testing.assert_allclose(raw.gate_TK, top, rtol=1e-6, err_msg="without norm_topk_prob: the sigmoids")


def test_group_limited_routing_by_hand():
    """Two groups {e0, e1} and {e2, e3}; each token keeps its best group, then its top-2 inside.
    Softmax scores (PROBS): t0 [1,2,3,4]/10 -> group 1 (max 4 > 2, top-2 sum 7 > 3): e3, e2;
    t1 [4,3,2,1]/10 -> group 0: e0, e1; t2 [1,4,9,16]/30 -> group 1: e3, e2. With top-1 and a
    group scored by its max, a group that holds the best expert wins; by the sum of its best two
    a group of two good experts beats one holding a single best one."""
    limited = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2, n_group=2, topk_group=1))
    np.testing.assert_array_equal(limited.expert_TK, [[3, 2], [0, 1], [3, 2]])
    np.testing.assert_allclose(limited.gate_TK, [[0.4, 0.3], [0.4, 0.3], [16 / 30, 9 / 30]], rtol=1e-6)
    # logits log [5, 4, 6, 1]: the max picks group 1 (6 > 5), the top-2 sum group 0 (9 > 7)
    x = jnp.array([[1.0]])
    w = jnp.log(jnp.array([[5.0, 4.0, 6.0, 1.0]]))
    by_max = moe_lib.route_scores(x, w, _router(top_k=2, n_group=2, topk_group=1))
    by_sum = moe_lib.route_scores(x, w, _router(top_k=2, n_group=2, topk_group=1, group_score="top2_sum"))
    np.testing.assert_array_equal(by_max.expert_TK, [[2, 3]], err_msg="group {e2, e3} holds the best expert")
    np.testing.assert_array_equal(by_sum.expert_TK, [[0, 1]], err_msg="group {e0, e1} has the best two")
    free = moe_lib.route_scores(x, w, _router(top_k=2))
    np.testing.assert_array_equal(free.expert_TK, [[2, 0]], err_msg="without groups: the two best anywhere")


def test_a_score_bias_changes_the_choice_not_the_gates_by_hand():
    """t0's scores [1,2,3,4]/10: a bias of +0.25 lifts e0's 0.1 to 0.35, above e2's 0.3, so the
    top-2 is e3, e0, gated by their unbiased scores 0.4 and 0.1."""
    bias = jnp.array([0.25, 0.0, 0.0, 0.0])
    r = moe_lib.route_scores(X_TD[:1], W_DE, _router(top_k=2), bias_E=bias)
    np.testing.assert_array_equal(r.expert_TK, [[3, 0]])
    np.testing.assert_allclose(r.gate_TK, [[0.4, 0.1]], rtol=1e-6, err_msg="gates come from the unbiased scores")
    np.testing.assert_allclose(r.probs_TE, PROBS[:1], rtol=1e-6, err_msg="so do the balance statistics")


def test_impossible_group_settings_are_refused():
    with pytest.raises(ConfigError, match="moe.n_group=3 must be >= 1 and divide moe.n_routed_experts=4"):
        _router(n_group=3)
    with pytest.raises(ConfigError, match="moe.top_k=3 experts cannot be chosen from moe.topk_group=1 groups of 2"):
        _router(top_k=3, n_group=2, topk_group=1)


def _losses(seq_aux, num_seqs, valid=(1, 1, 1)):
    cfg = MoEConfig(n_routed_experts=4, top_k=2, expert_d_ff=1, aux_loss_alpha=0.1, device_aux_alpha=0.2,
                    seq_aux=seq_aux)
    r = moe_lib.route_scores(X_TD, W_DE, _router(top_k=2))
    return [float(v) for v in moe_lib.balance_losses(r, jnp.array(valid), cfg, num_seqs, device_groups=2)]


def test_balance_losses_by_hand():
    # Picks: e0 once, e1 once, e2 twice, e3 twice. f_i = E/(K T) * count_i = 4/6 * count_i.
    f = np.array([1, 1, 2, 2]) * 4 / 6
    P = PROBS.mean(0)
    expert, device = _losses(seq_aux=False, num_seqs=3)
    assert expert == pytest.approx(0.1 * np.sum(f * P), rel=1e-6)
    # Device groups {e0, e1}, {e2, e3}: f' is the mean of f in a group, P' the sum of P.
    f_dev = np.array([f[:2].mean(), f[2:].mean()])
    P_dev = np.array([P[:2].sum(), P[2:].sum()])
    assert device == pytest.approx(0.2 * np.sum(f_dev * P_dev), rel=1e-6)


def test_sequence_wise_balance_loss_by_hand():
    # Three sequences of one token: per sequence f = E/K = 2 on its two picks, P = its probs.
    per_seq = [2 * (0.4 + 0.3), 2 * (0.4 + 0.3), 2 * (16 + 9) / 30]
    expert, _ = _losses(seq_aux=True, num_seqs=3)
    assert expert == pytest.approx(0.1 * np.mean(per_seq), rel=1e-6)
    batch_wise, _ = _losses(seq_aux=False, num_seqs=3)
    assert abs(expert - batch_wise) > 1e-3, "the sequence-wise variant must differ on this example"


def test_padding_tokens_are_left_out_of_balance_statistics():
    # Only t0 and t1 count: picks e3, e2, e0, e1 once each -> f = 4/(2*2) = 1 for all experts.
    expert, _ = _losses(seq_aux=False, num_seqs=3, valid=(1, 1, 0))
    assert expert == pytest.approx(0.1 * np.sum(PROBS[:2].mean(0)), rel=1e-6)


def _top_p_reference(probs, p, cap):
    """The released code's rule in words: experts best first (ties: lower id), each added until
    their probabilities sum past p, at most ``cap``."""
    chosen, total = [], 0.0
    for e in np.argsort(-probs, kind="stable")[:cap]:
        chosen.append(int(e))
        total += probs[e]
        if total > p:
            break
    return np.array(chosen, int)


def _layer(cfg: ModelConfig, seed=0) -> moe_lib.MoE:
    return moe_lib.MoE(cfg, rngs=nnx.Rngs(seed))


def _numpy_moe(layer: moe_lib.MoE, x_TD, keep_TK=None, top_k=None, exclude_top=0, shared=True):
    """Token by token: sum_k g_k FFN_{e_k}(x) + shared(x), routing recomputed in float64
    (softmax or sigmoid scores, the best groups first when ``n_group`` > 1, gates scaled);
    ``exclude_top`` drops each token's best experts from the scores, ``shared`` False the
    shared experts. Returns the output and each token's sum of gates."""
    c = layer.cfg
    top_k = top_k or c.top_k
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    swiglu = lambda x, wg, wu, wd: ((x @ wg) / (1 + np.exp(-(x @ wg))) * (x @ wu)) @ wd
    x = np.asarray(x_TD, np.float64)
    y, gate_sum_T = np.zeros_like(x), np.zeros(x.shape[0])
    for t in range(x.shape[0]):
        logits = x[t] @ p["w_router_DE"]
        logits[np.argsort(-logits, kind="stable")[:exclude_top]] = -np.inf
        if c.routing in ("softmax", "top_p"):
            scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        choose = scores.copy()
        if c.n_group > 1:
            groups = choose.reshape(c.n_group, -1)
            group_score = groups.max(1) if c.group_score == "max" else np.sort(groups, 1)[:, -2:].sum(1)
            dropped = np.argsort(-group_score, kind="stable")[c.topk_group:]
            groups[dropped] = -np.inf
        top = np.argsort(-choose, kind="stable")[:top_k]
        if c.routing == "top_p":
            top = _top_p_reference(scores, c.threshold, c.slots)
        gates = scores[top] / (scores[top].sum() if c.norm_topk_prob else 1.0) * c.routed_scaling_factor
        gate_sum_T[t] = gates.sum()
        for k, (e, g) in enumerate(zip(top, gates)):
            if keep_TK is None or keep_TK[t, k]:
                y[t] += g * swiglu(x[t], p["w_gate_EDF"][e], p["w_up_EDF"][e], p["w_down_EFD"][e])
        if c.n_shared_experts and shared:
            y[t] += swiglu(x[t], *(p["shared"][n] for n in ("w_gate_DF", "w_up_DF", "w_down_FD")))
    return y, gate_sum_T


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dense", "ragged", "tiled"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_layer_matches_token_by_token_reference(small_cfg, backend, norm_topk_prob):
    cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, backend=backend,
                                                                 norm_topk_prob=norm_topk_prob))
    layer = _layer(cfg)
    x_BSD = jax.random.normal(jax.random.key(3), (2, 10, cfg.d_model))
    y, stats = layer(x_BSD, jnp.zeros((2, 10), jnp.int32), jnp.ones((2, 10)))
    ref, gate_sum_T = _numpy_moe(layer, x_BSD.reshape(20, -1))
    np.testing.assert_allclose(y, ref.reshape(y.shape), atol=1e-5,
                               err_msg=f"MoE layer ({backend}) != token-by-token reference")
    assert float(stats.expert_load.sum()) == 20 * cfg.moe.top_k
    assert float(stats.drop_fraction) == 0.0
    assert float(stats.gate_sum) == pytest.approx(gate_sum_T.mean(), rel=1e-5), "the routed gates' mean sum"
    assert norm_topk_prob == (float(stats.gate_sum) == pytest.approx(1.0)), "renormalised gates sum to 1"


@pytest.mark.parametrize("routing", [
    dict(routing="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2,
         group_score="top2_sum"),
    dict(routing="softmax", routed_scaling_factor=16.0, n_group=2, topk_group=1),
], ids=["v3_sigmoid_top2sum_groups", "v2_softmax_max_groups"])
def test_moe_layer_with_deepseek_v2_v3_routing_matches_reference(small_cfg, routing):
    cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, **routing))
    layer = _layer(cfg)
    x_BSD = jax.random.normal(jax.random.key(5), (2, 10, cfg.d_model))
    valid_BS = jnp.ones((2, 10)).at[1, 7:].set(0)  # padding is left out of the gate sum
    y, stats = layer(x_BSD, jnp.zeros((2, 10), jnp.int32), valid_BS)
    ref, gate_sum_T = _numpy_moe(layer, x_BSD.reshape(20, -1))
    np.testing.assert_allclose(y, ref.reshape(y.shape), atol=1e-5)
    assert float(stats.expert_load.sum()) == 17 * cfg.moe.top_k
    assert float(stats.gate_sum) == pytest.approx(gate_sum_T[:17].mean(), rel=1e-5), "gates scaled, padding out"


def test_moe_layer_with_capacity_matches_reference_with_drops(small_cfg):
    cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, capacity_factor=0.5))
    layer = _layer(cfg)
    x_TD = jax.random.normal(jax.random.key(4), (16, cfg.d_model))
    y, stats = layer(x_TD[None], jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16)))
    # Recompute which assignments survive, independently: slot-major, first come first served.
    r = moe_lib.route_scores(x_TD, layer.w_router_DE[...], cfg.moe)
    C = math.ceil(0.5 * 16 * cfg.moe.top_k / cfg.moe.n_routed_experts)
    used, keep = np.zeros(cfg.moe.n_routed_experts, int), np.zeros((16, cfg.moe.top_k), bool)
    for k in range(cfg.moe.top_k):
        for t in range(16):
            e = int(r.expert_TK[t, k])
            keep[t, k] = used[e] < C
            used[e] += 1
    assert 0 < (~keep).sum() < keep.size, "the example must drop some assignments, not all"
    np.testing.assert_allclose(y[0], _numpy_moe(layer, x_TD, keep)[0], atol=1e-5)
    assert float(stats.drop_fraction) == pytest.approx((~keep).mean())


def test_large_capacity_is_dropless(small_cfg):
    layer = _layer(small_cfg)
    big = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, capacity_factor=8 / 3))
    layer_big = _layer(big)  # same seed, same weights; capacity = all tokens
    x = jax.random.normal(jax.random.key(5), (1, 12, small_cfg.d_model))
    args = (jnp.zeros((1, 12), jnp.int32), jnp.ones((1, 12)))
    (y, _), (y_big, stats) = layer(x, *args), layer_big(x, *args)
    np.testing.assert_array_equal(y, y_big)
    assert float(stats.drop_fraction) == 0.0


def test_hash_routing_depends_only_on_token_id(small_cfg):
    cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, routing="hash", top_k=1))
    tokens = jnp.array([5, 17, 5, 3, 17, 5])
    r = moe_lib.route_hash(tokens, cfg.moe.n_routed_experts)
    e = np.asarray(r.expert_TK[:, 0])
    assert e[0] == e[2] == e[5] and e[1] == e[4], "one token id, one expert"
    assert np.all(np.asarray(r.gate_TK) == 1.0)
    experts = moe_lib.route_hash(jnp.arange(4096), 8).expert_TK
    counts = np.bincount(np.asarray(experts[:, 0]), minlength=8)
    assert counts.min() > 0.8 * 512, f"the hash should spread token ids evenly: {counts}"
    layer = _layer(cfg)
    assert not hasattr(layer, "w_router_DE"), "hash routing has no router weights"
    _, stats = layer(jnp.ones((1, 6, cfg.d_model)), tokens[None], jnp.ones((1, 6)))
    assert float(stats.expert_balance_loss) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ragged", "tiled"])
def test_layer_gradients_match_dense_backend(small_cfg, backend):
    x = jax.random.normal(jax.random.key(6), (2, 8, small_cfg.d_model))

    def grads(name):
        cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, backend=name))
        graphdef, params = nnx.split(_layer(cfg))

        def loss(params, x):
            y, stats = nnx.merge(graphdef, params)(x, jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8)))
            return jnp.sum(jnp.sin(y)) + stats.expert_balance_loss

        return jax.grad(loss, argnums=(0, 1))(params, x)

    got, want = grads(backend), grads("dense")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{backend}: gradient of {jax.tree_util.keystr(path)}")



# ---- top-p (dynamic) routing ----------------------------------------------------------------------


@pytest.mark.parametrize("p, cap", [(0.2, 0), (0.4, 0), (0.4, 3), (0.7, 0), (0.9, 2), (1.0, 0)])
def test_top_p_routing_matches_the_float64_rule_token_by_token(p, cap):
    rng = np.random.default_rng(0)
    x_TD = rng.standard_normal((256, 6)).astype(np.float32)
    w_DE = (rng.standard_normal((6, 8)) * 0.8).astype(np.float32)
    cfg = _router(n_routed_experts=8, routing="top_p", top_p=p, max_experts=cap)
    r = moe_lib.route_scores(jnp.asarray(x_TD), jnp.asarray(w_DE), cfg)
    logits = x_TD.astype(np.float64) @ w_DE.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ranked = -np.sort(-probs, 1)
    assert np.abs(np.cumsum(ranked, 1)[:, :-1] - p).min() > 1e-6, "no token may sit on the threshold (float32 vs 64)"
    counts = []
    for t in range(256):
        want = _top_p_reference(probs[t], p, cap or 8)
        got = np.asarray(r.expert_TK[t])
        counts.append(len(want))
        np.testing.assert_array_equal(got[:len(want)], want, err_msg=f"token {t}")
        assert (got[len(want):] == 8).all(), f"token {t}: the empty slots hold id E"
        np.testing.assert_allclose(np.asarray(r.gate_TK[t]), np.r_[probs[t][want], np.zeros(len(got) - len(want))],
                                   atol=1e-6, err_msg=f"token {t}: gates are the probabilities, not renormalised")
    assert r.expert_TK.shape[1] == (cap or 8), "one slot per expert a token can take"
    assert min(counts) >= 1 and (p == 1.0 or len(set(counts)) > 1), f"the count varies by token: {set(counts)}"


def test_top_p_ties_and_a_dominant_expert_by_hand():
    """Four equal probabilities (1/4 exactly): at p = 0.4 the second carries the sum to 0.5, past
    p, so two; at p = 0.5 the sum 0.5 is not past p, so a third (the released code's strict >);
    ties go to the lower id. A token whose best expert alone passes p takes that one."""
    x_TD = jnp.array([[0.0], [1.0]])
    w_DE = jnp.array([[8.0, 0.0, 0.0, 0.0]])  # token 0: all equal; token 1: e0 with e^8 / (e^8 + 3)
    for p, want in ((0.4, [0, 1, 4, 4]), (0.5, [0, 1, 2, 4])):
        r = moe_lib.route_scores(x_TD, w_DE, _router(routing="top_p", top_p=p))
        assert r.expert_TK[0].tolist() == want, (p, r.expert_TK[0])
        assert r.expert_TK[1].tolist() == [0, 4, 4, 4], (p, r.expert_TK[1])
        np.testing.assert_allclose(r.gate_TK[0], [0.25 if e < 4 else 0.0 for e in want], rtol=1e-6)
    renormalised = moe_lib.route_scores(x_TD, w_DE, _router(routing="top_p", top_p=0.4, norm_topk_prob=True))
    np.testing.assert_allclose(renormalised.gate_TK[0], [0.5, 0.5, 0, 0], rtol=1e-6)


def test_top_p_balance_and_entropy_losses_by_hand():
    """f_i = E * (picks of i) / (all picks), so a token taking three experts weighs three times
    one taking one; the dynamic loss is the mean entropy of the softmax over real tokens."""
    cfg = _router(routing="top_p", top_p=0.5, aux_loss_alpha=0.1, dynamic_loss_weight=1.0)
    r = moe_lib.route_scores(X_TD, W_DE, cfg)
    # t0 [.1 .2 .3 .4]: e3, e2 (0.4, then 0.7 > .5); t1 [.4 .3 .2 .1]: e0, e1; t2 [1 4 9 16]/30: e3 alone
    assert r.expert_TK.tolist() == [[3, 2, 4, 4], [0, 1, 4, 4], [3, 4, 4, 4]], r.expert_TK
    expert, _ = moe_lib.balance_losses(r, jnp.ones(3), cfg, num_seqs=1)
    f = 4 * np.array([1, 1, 1, 2]) / 5
    assert float(expert) == pytest.approx(0.1 * np.sum(f * PROBS.mean(0)), rel=1e-6)
    entropy = -(PROBS * np.log(PROBS)).sum(1)
    assert float(moe_lib.dynamic_loss(r.probs_TE, jnp.array([1.0, 1.0, 0.0]))) == pytest.approx(entropy[:2].mean(),
                                                                                                  rel=1e-6)


@pytest.mark.parametrize("backend", ["dense", "ragged", "tiled"])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_moe_layer_with_top_p_routing_matches_reference(small_cfg, backend, capacity_factor):
    """Every dispatch path with a varying number of experts per token (at most 3 of 8): the empty
    slots take no row (the load counts the experts taken) and no capacity (the survivors
    recomputed by hand; capacity is counted in slots, ``MoEConfig.slots``)."""
    moe = dataclasses.replace(small_cfg.moe, routing="top_p", top_p=0.4, max_experts=3, backend=backend,
                              capacity_factor=capacity_factor, dynamic_loss_weight=1e-4, n_shared_experts=1)
    cfg = dataclasses.replace(small_cfg, moe=moe)
    layer = _layer(cfg)
    x_TD = jax.random.normal(jax.random.key(6), (24, cfg.d_model))
    y, stats = layer(x_TD[None], jnp.zeros((1, 24), jnp.int32), jnp.ones((1, 24)))
    r = moe_lib.route_scores(x_TD, layer.w_router_DE[...], moe)
    taken = np.asarray(r.expert_TK) < moe.n_routed_experts
    keep = taken.copy()
    if capacity_factor:
        C = math.ceil(capacity_factor * 24 * moe.slots / moe.n_routed_experts)
        used = np.zeros(moe.n_routed_experts, int)
        for k in range(moe.slots):
            for t in range(24):
                if taken[t, k]:
                    e = int(r.expert_TK[t, k])
                    keep[t, k] = used[e] < C
                    used[e] += 1
        assert 0 < (taken & ~keep).sum(), "the example must drop some assignments"
    ref, _ = _numpy_moe(layer, x_TD, keep)
    np.testing.assert_allclose(y[0], ref, atol=1e-5, err_msg=f"top-p MoE ({backend}) != token-by-token reference")
    assert float(stats.expert_load.sum()) == taken.sum(), "the load counts the experts taken"
    assert float(stats.active_experts) == pytest.approx(taken.sum(1).mean())
    np.testing.assert_array_equal(stats.active_histogram, np.bincount(taken.sum(1), minlength=moe.slots + 1))
    assert float(stats.drop_fraction) == pytest.approx((taken & ~keep).sum() / taken.sum())
    assert 1 < len(set(taken.sum(1).tolist())), "tokens take different numbers of experts"


@pytest.mark.parametrize("fields, message", [
    (dict(routing="top_p", top_p=0.0), r"moe.top_p must be in \(0, 1\]"),
    (dict(routing="top_p", top_p=1.5), r"moe.top_p must be in \(0, 1\]"),
    (dict(top_p=0.4), "set moe.routing = 'top_p'"),
    (dict(routing="top_p", max_experts=5), "moe.max_experts must be between 1 and moe.n_routed_experts=4"),
    (dict(max_experts=2), "moe.max_experts caps top-p routing"),
    (dict(routing="top_p", dynamic_loss_weight=-1e-4), "moe.dynamic_loss_weight must be >= 0"),
    (dict(dynamic_loss_weight=1e-4), "with 'softmax' routing it has nothing to weigh"),
    (dict(routing="top_p", n_group=2, topk_group=1), "set moe.n_group = 1 and moe.score_bias = false"),
    (dict(routing="top_p", score_bias=True), "set moe.n_group = 1 and moe.score_bias = false"),
])
def test_bad_top_p_settings_are_refused_with_the_reason(fields, message):
    with pytest.raises(ConfigError, match=message):
        _router(**fields)


def test_route_options_refuse_a_top_k_for_top_p_routing(small_cfg):
    moe = dataclasses.replace(small_cfg.moe, routing="top_p")
    with pytest.raises(ConfigError, match="top-p routing chooses how many experts"):
        moe_lib.RouteOptions(top_k=2).apply(moe)
