"""The decoder and the functional API: causality, masks, RoPE, dtypes, parameter counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import dsmoe_jax
from dsmoe_jax import mha
from dsmoe_jax import model as model_lib
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.model import layer_groups
from dsmoe_jax.rope import rope


def _forward(cfg):
    return jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg))


def test_count_params_16b_is_the_released_number():
    total, activated = dsmoe_jax.count_params(dsmoe_jax.load_config("16b"))
    assert total == 16_375_728_128, f"16B total {total:,}"
    assert abs(activated / 2.8e9 - 1) < 0.03, f"16B activated {activated:,} not within 3% of 2.8B"


def test_count_params_2b_rounds_to_the_paper():
    total, activated = dsmoe_jax.count_params(dsmoe_jax.load_config("2b"))
    assert round(total / 1e9, 1) == 2.0 and round(activated / 1e9, 1) == 0.3, (total, activated)


def test_top_p_routing_counts_at_its_cap_or_at_a_measured_mean():
    """Top-p routing activates at most max_experts (the count top-k at that K gives), or, given
    the mean experts per token, that many: each routed expert of the 16 x 3 x 128 x 128 weights."""
    top4 = dsmoe_jax.count_params(dsmoe_jax.load_config("tiny", ["moe.top_k=4"]))
    top_p = dsmoe_jax.load_config("tiny", ["moe.routing=top_p", "moe.max_experts=4"])
    assert dsmoe_jax.count_params(top_p) == top4
    total, at_mean = dsmoe_jax.count_params(top_p, experts_per_token=2.5)
    per_expert = top_p.model.n_moe_layers * 3 * top_p.model.d_model * top_p.model.moe.expert_d_ff
    assert top4[1] - at_mean == int(1.5 * per_expert), (top4, at_mean)


def test_count_params_145b_within_one_percent():
    total, activated = dsmoe_jax.count_params(dsmoe_jax.load_config("145b"))
    assert abs(total / 144.6e9 - 1) < 0.01, f"145B total {total:,}"
    assert abs(activated / 22.2e9 - 1) < 0.01, f"145B activated {activated:,}"


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [("dense-2b", 0.2, 0.2), ("hash-2b", 2.0, 0.2), ("switch-2b", 2.0, 0.2), ("gshard-2b", 2.0, 0.3)],
)
def test_paper_baselines_have_table_1_sizes(name, total_b, active_b):
    total, activated = dsmoe_jax.count_params(dsmoe_jax.load_config(name))
    assert (round(total / 1e9, 1), round(activated / 1e9, 1)) == (total_b, active_b), (name, total, activated)


def test_count_params_matches_initialised_params(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    assert sum(x.size for x in jax.tree.leaves(params)) == dsmoe_jax.count_params(small_cfg)[0]


@pytest.mark.parametrize("name", ["count_params", "flops_per_token", "cache_dims", "cache_bytes_per_token"])
def test_the_costs_still_resolve_from_model_with_a_deprecation_warning(name):
    """They moved to costs.py; ``dsmoe_jax.model.NAME`` keeps working, warning, until 0.4."""
    from dsmoe_jax import costs

    with pytest.warns(DeprecationWarning, match=f"dsmoe_jax.model.{name} moved to dsmoe_jax.costs.{name}"):
        moved = getattr(model_lib, name)
    assert moved is getattr(costs, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        model_lib.no_such_name  # noqa: B018 - the attribute access is the test


@pytest.mark.gpu
def test_future_tokens_do_not_change_earlier_logits(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, small_cfg.vocab_size)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 11) % small_cfg.vocab_size)
    f = _forward(small_cfg)
    (a, _), (b, _) = f(params, tokens), f(params, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7], err_msg="logits before position 7 saw the future")
    assert not np.allclose(a[:, 7:], b[:, 7:]), "the changed positions must change"


@pytest.mark.gpu
def test_padding_is_invisible_to_real_tokens(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 0, small_cfg.vocab_size)
    # Left-pad by 3 with garbage; positions keep counting from the first real token.
    padded = jnp.concatenate([jnp.full((1, 3), 42), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3)), jnp.ones((1, 10))], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.arange(13) - 3, 0)[None]
    ref, ref_aux = _forward(small_cfg)(params, tokens)
    out, aux = dsmoe_jax.forward(params, padded, small_cfg, attention_mask=mask, positions=positions)
    assert np.all(np.isfinite(out)), "fully masked query rows must stay finite"
    np.testing.assert_allclose(out[:, 3:], ref, atol=2e-5, err_msg="padding changed real tokens' logits")
    np.testing.assert_allclose(aux.expert_balance_loss, ref_aux.expert_balance_loss, rtol=1e-5,
                               err_msg="padding must stay out of the balance loss")
    np.testing.assert_array_equal(aux.expert_load, ref_aux.expert_load)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(3), (2, 1, 1, 1, 16))
    score = lambda i, j: jnp.sum(rope(q, jnp.array([[i]]), 1e4) * rope(k, jnp.array([[j]]), 1e4))
    assert float(score(7, 3)) == pytest.approx(float(score(104, 100)), rel=1e-4)
    assert float(score(0, 0)) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5), "position 0 is the identity"
    # Rotate-half: dimension i pairs with i + H/2, rotated by angle p * theta^(-2i/H).
    x = jnp.zeros((1, 1, 1, 16)).at[..., 1].set(1.0)
    out = rope(x, jnp.array([[5]]), 1e4)
    angle = 5 * 1e4 ** (-2 / 16)
    np.testing.assert_allclose(out[0, 0, 0, [1, 9]], [np.cos(angle), np.sin(angle)], rtol=1e-5)


def test_attention_matches_naive_softmax(small_cfg, key):
    attn = mha.Attention(small_cfg, rngs=__import__("flax").nnx.Rngs(0))
    x = jax.random.normal(key, (1, 5, small_cfg.d_model))
    pos = jnp.arange(5)[None]
    out, _ = attn(x, pos, jnp.ones((1, 5), bool))
    q = rope(jnp.einsum("bsd,dnh->bsnh", x, attn.w_q_DNH[...]), pos, small_cfg.rope_theta)
    k = rope(jnp.einsum("bsd,dnh->bsnh", x, attn.w_k_DKH[...]), pos, small_cfg.rope_theta)
    v = jnp.einsum("bsd,dnh->bsnh", x, attn.w_v_DKH[...])
    q, k, v = (np.asarray(a[0], np.float64) for a in (q, k, v))
    ref = np.zeros((5, small_cfg.n_heads, small_cfg.head_dim))
    for n in range(small_cfg.n_heads):
        for i in range(5):
            s = np.array([q[i, n] @ k[j, n] for j in range(i + 1)]) / np.sqrt(small_cfg.head_dim)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            ref[i, n] = p @ v[: i + 1, n]
    ref = np.einsum("snh,nhd->sd", ref, np.asarray(attn.w_o_NHD[...], np.float64))
    np.testing.assert_allclose(out[0], ref, atol=1e-5)


@pytest.mark.gpu
def test_bfloat16_forward_stays_close_to_float32(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, small_cfg.vocab_size)
    ref, _ = _forward(small_cfg)(params, tokens)
    bf16 = dataclasses.replace(small_cfg, dtype="bfloat16")
    out, aux = _forward(bf16)(params, tokens)
    assert out.dtype == jnp.float32, "logits come back in float32"
    assert np.all(np.isfinite(out))
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert rel < 0.05, f"bf16 logits differ from float32 by {rel:.3f} (relative to the largest logit)"
    bf16_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    out2, _ = _forward(dataclasses.replace(bf16, param_dtype="bfloat16"))(bf16_params, tokens)
    assert float(jnp.abs(out2 - ref).max() / jnp.abs(ref).max()) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ragged", "tiled"])
def test_full_model_gradients_match_dense_backend(small_cfg, key, backend):
    params = dsmoe_jax.init_params(small_cfg, key)
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, small_cfg.vocab_size)

    def grads(name):
        cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, backend=name))

        def loss(p):
            logits, aux = dsmoe_jax.forward(p, tokens, cfg)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux.balance_loss

        return jax.jit(jax.grad(loss))(params)

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads(backend)), jax.tree.leaves(grads("dense"))):
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["dense-2b", "hash-2b", "switch-2b", "gshard-2b", "tiny"])
def test_every_variant_runs_at_small_width(name, key):
    cfg = dsmoe_jax.load_config(name, ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.d_ff=64",
                                       "model.n_layers=2", "model.vocab_size=64"] +
                                (["moe.expert_d_ff=16"] if name != "dense-2b" else ["model.first_k_dense=2"]))
    params = dsmoe_jax.init_params(cfg, key)
    logits, aux = _forward(cfg)(params, jnp.arange(16).reshape(2, 8) % 64)
    assert logits.shape == (2, 8, 64) and np.all(np.isfinite(logits))
    n_moe = cfg.model.n_moe_layers
    assert aux.expert_load.shape[0] == n_moe and aux.drop_fraction.shape == (n_moe,)


def test_aux_reports_per_layer_load(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    _, aux = _forward(small_cfg)(params, jnp.zeros((3, 5), jnp.int32))
    assert aux.expert_load.shape == (2, 8), "two MoE layers, eight routed experts"
    np.testing.assert_array_equal(aux.expert_load.sum(-1), [15 * 3, 15 * 3])
    assert float(aux.balance_loss) == pytest.approx(
        float(aux.expert_balance_loss + aux.device_balance_loss))


@pytest.mark.parametrize("freq, offset, first_k, want", [(1, 0, 1, (1, 2, 3)), (2, 0, 0, (0, 2)), (2, 1, 0, (1, 3)),
                                                      (2, 0, 1, (2,)), (3, 1, 0, (1,))])
def test_an_moe_block_every_k_th_block(small_cfg, key, freq, offset, first_k, want):
    """Which blocks are MoE (V2's moe_layer_freq, Dynamic MoE's expert_frequency = 2 from block 0):
    the params hold a router exactly there, the rest dense FFNs; the forward reports one load row
    per MoE block and each block's output goes through the FFN its params say."""
    cfg = dataclasses.replace(small_cfg, n_layers=4, first_k_dense=first_k, moe_layer_freq=freq,
                              moe_layer_offset=offset)
    assert cfg.moe_layers == want and cfg.n_dense_layers == 4 - len(want)
    params = dsmoe_jax.init_params(cfg, key)
    kinds = tuple(i for i in range(4) if "w_router_DE" in params["layers"][i]["ffn"])
    assert kinds == want, kinds
    assert all("w_gate_DF" in params["layers"][i]["ffn"] for i in range(4) if i not in want)
    tokens = jax.random.randint(key, (2, 6), 0, cfg.vocab_size)
    _, aux = _forward(cfg)(params, tokens)
    assert aux.expert_load.shape == (len(want), cfg.moe.n_routed_experts)
    np.testing.assert_allclose(aux.expert_load.sum(1), 12 * cfg.moe.top_k)


def test_interleaved_moe_blocks_refuse_the_scanned_layout_and_a_bad_offset(small_cfg):
    with pytest.raises(ConfigError, match="interleaved with dense ones .* need model.scan_layers = false"):
        dataclasses.replace(small_cfg, first_k_dense=0, moe_layer_freq=2, scan_layers=True)
    with pytest.raises(ConfigError, match="moe_layer_offset between 0 and moe_layer_freq - 1, got 2 and 2"):
        dataclasses.replace(small_cfg, moe_layer_freq=2, moe_layer_offset=2)
    # every MoE block after every dense one: the scan's two groups still hold
    scanned = dataclasses.replace(small_cfg, n_layers=4, first_k_dense=2, moe_layer_freq=2, moe_layer_offset=1,
                                  scan_layers=True)
    assert scanned.moe_layers == (3,) and layer_groups(scanned) == {"dense_layers": range(3), "moe_layers": range(3, 4)}


def test_mismatched_params_are_a_clear_error(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    bigger = dataclasses.replace(small_cfg, d_ff=128)
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['ffn'\]\['w_down_FD'\] has shape \(64, 32\)"):
        dsmoe_jax.forward(params, jnp.zeros((1, 4), jnp.int32), bigger)
    del params["lm_head_DV"]
    with pytest.raises(ValueError, match="missing.*lm_head_DV"):
        dsmoe_jax.forward(params, jnp.zeros((1, 4), jnp.int32), small_cfg)


def _both_layouts(cfg):
    return dataclasses.replace(cfg, scan_layers=False), dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.parametrize("remat", [pytest.param(False, marks=pytest.mark.slow), True])  # False: 25 s, -m slow
def test_scanned_and_unrolled_blocks_give_equal_logits_aux_and_gradients(small_cfg, remat):
    """The same parameters in both layouts: one lax.scan per group of blocks (a dense group and a
    MoE group here) computes what the unrolled blocks compute, forward and backward."""
    unrolled, scanned = _both_layouts(dataclasses.replace(small_cfg, remat=remat))
    params = model_lib.init_params(unrolled, jax.random.key(0))
    stacked = model_lib.match_layout(params, scanned)
    assert stacked["moe_layers"]["ffn"]["w_gate_EDF"].shape == (2, 8, 32, 16), "2 MoE blocks stacked"
    assert stacked["dense_layers"]["ffn"]["w_gate_DF"].shape == (1, 32, 64), "1 dense block stacked"
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, small_cfg.vocab_size)

    def loss(p, cfg):
        logits, aux = model_lib.forward(p, tokens, cfg)
        return jnp.mean(logits**2) + aux.balance_loss, (logits, aux)

    (l_u, (logits_u, aux_u)), g_u = jax.value_and_grad(loss, has_aux=True)(params, unrolled)
    (l_s, (logits_s, aux_s)), g_s = jax.value_and_grad(loss, has_aux=True)(stacked, scanned)
    np.testing.assert_allclose(logits_s, logits_u, atol=1e-5, err_msg="logits")
    for name, a, b in zip(aux_u._fields, aux_s, aux_u):
        if b is None:  # expert_choices: only recorded when asked for
            assert a is None, f"aux.{name}"
            continue
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"aux.{name}")
    g_s = model_lib.match_layout(g_s, unrolled)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_u)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_scanned_layout_same_seed_same_params_and_a_clear_error_for_the_wrong_layout(small_cfg):
    unrolled, scanned = _both_layouts(small_cfg)
    params = model_lib.init_params(unrolled, jax.random.key(3))
    stacked = model_lib.init_params(scanned, jax.random.key(3))
    assert set(stacked) == {"embed_VD", "dense_layers", "moe_layers", "final_norm", "lm_head_DV"}, set(stacked)
    for a, b in zip(jax.tree.leaves(model_lib.match_layout(params, scanned)), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    back = model_lib.match_layout(stacked, unrolled)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    axes = model_lib.param_axes(scanned)
    assert axes["moe_layers"]["ffn"]["w_gate_EDF"] == ("layers", "expert", "embed", "mlp"), axes["moe_layers"]
    with pytest.raises(ValueError, match="unrolled layout but the config has model.scan_layers = True"):
        model_lib.forward(params, jnp.zeros((1, 4), jnp.int32), scanned)


@pytest.mark.parametrize("bad_id", [97, -1])
def test_forward_refuses_token_ids_outside_the_vocabulary(small_cfg, key, bad_id):
    """The embedding lookup would read id 97 of 97 as 96 and -1 as 96: plausible, wrong logits."""
    params = dsmoe_jax.init_params(small_cfg, key)
    with pytest.raises(dsmoe_jax.InputError, match=rf"forward: token id {bad_id} is outside the vocabulary: ids "
                                                   r"must lie in \[0, 97\) .*encode text with the tokenizer"):
        dsmoe_jax.forward(params, jnp.asarray([[5, bad_id, 3]]), small_cfg)


def test_forward_refuses_float_unbatched_and_too_long_tokens_also_under_jit(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    for forward in (functools.partial(dsmoe_jax.forward, cfg=small_cfg), _forward(small_cfg)):
        with pytest.raises(dsmoe_jax.InputError, match=r"must be an integer array, got float32; pass "
                                                       r"jnp.asarray\(ids, jnp.int32\) \(floats are refused"):
            forward(params, jnp.asarray([[5.0, 3.7]]))
        with pytest.raises(dsmoe_jax.InputError, match=r"shape \[batch, seq\], got \(2,\); add a batch axis"):
            forward(params, jnp.asarray([5, 3]))
        with pytest.raises(dsmoe_jax.InputError, match="65 tokens per sequence exceed model.max_seq_len 64; "
                                                       "shorten the sequences to at most 64 tokens"):
            forward(params, jnp.zeros((1, 65), jnp.int32))


def test_check_tokens_leaves_traced_ids_unchecked(small_cfg):
    """Under jit the ids are unknown: only what is static is checked, as the docstrings say."""
    jax.jit(lambda t: model_lib.check_tokens(t, small_cfg, "test"))(jnp.asarray([[97]]))
    with pytest.raises(dsmoe_jax.InputError, match="test: token id 97"):
        model_lib.check_tokens(jnp.asarray([[97]]), small_cfg, "test")


def test_checked_mode_refuses_bad_ids_under_jit_through_checkify(small_cfg, key):
    params = dsmoe_jax.init_params(small_cfg, key)
    checked = jax.jit(checkify.checkify(functools.partial(dsmoe_jax.forward, cfg=small_cfg, check_ids=True)))
    err, (logits, _) = checked(params, jnp.asarray([[1, 2, 3]]))
    assert err.get() is None and logits.shape == (1, 3, 97), err.get()
    for bad in (97, -4):
        err, _ = checked(params, jnp.asarray([[1, bad, 3]]))
        with pytest.raises(checkify.JaxRuntimeError, match=rf"forward: token id {bad} is outside the vocabulary: "
                                                           r"ids must lie in \[0, 97\)"):
            err.throw()
    generate = functools.partial(dsmoe_jax.generate, cfg=small_cfg, max_new_tokens=2, temperature=0.0, check_ids=True)
    err, _ = jax.jit(checkify.checkify(generate))(params, jnp.asarray([[5, 200]]), rng=key)
    with pytest.raises(checkify.JaxRuntimeError, match="generate: token id 200 is outside"):
        err.throw()
    with pytest.raises(Exception, match="checkify"):  # staged without checkify: said at trace time
        jax.jit(functools.partial(dsmoe_jax.forward, cfg=small_cfg, check_ids=True))(params, jnp.asarray([[1]]))
