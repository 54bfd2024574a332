"""Multi-token prediction (DeepSeek-V3): the MTP depths against a float64 numpy computation of the
report's equations, and the MTP loss in training (it falls; the score bias of an MoE depth moves)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import ConfigError, model
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, loss_fn, make_train_step

EPS = 1e-6


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def _rope(x_SNH, positions, theta=10000.0):
    """Rotate-half RoPE: the first and second halves of each head are the pairs."""
    H = x_SNH.shape[-1]
    angle_Sh = positions[:, None] * theta ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(angle_Sh)[:, None, :], np.sin(angle_Sh)[:, None, :]
    x1, x2 = x_SNH[..., :H // 2], x_SNH[..., H // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _block(x_SD, p, positions):
    """A pre-norm decoder block with a dense SwiGLU FFN, one sequence, float64."""
    h = _rms(x_SD, p["attn_norm"]["scale_D"])
    a = p["attn"]
    q, k, v = (np.einsum("sd,dnh->snh", h, a[w]) for w in ("w_q_DNH", "w_k_DKH", "w_v_DKH"))
    q, k = _rope(q, positions), _rope(k, positions)
    scores = np.einsum("snh,tnh->nst", q, k) / np.sqrt(q.shape[-1])
    S = len(x_SD)
    scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    x_SD = x_SD + np.einsum("nst,tnh,nhd->sd", weights, v, a["w_o_NHD"])
    h = _rms(x_SD, p["ffn_norm"]["scale_D"])
    f = p["ffn"]
    gate = h @ f["w_gate_DF"]
    return x_SD + (gate / (1 + np.exp(-gate)) * (h @ f["w_up_DF"])) @ f["w_down_FD"]


def _reference(params, tokens_S):
    """The report's equations, one sequence: h^0 from the model (one dense block here), then for
    each depth k and position i < S - k: h'_i = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
    h^k = TRM(h'), logits = OutHead(RMSNorm(h^k))."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    S, positions = len(tokens_S), np.arange(len(tokens_S), dtype=np.float64)
    h = _rms(_block(p["embed_VD"][tokens_S], p["layers"][0], positions), p["final_norm"]["scale_D"])
    main, ahead = h @ p["lm_head_DV"], []
    for k, depth in sorted(p["mtp"].items()):
        n = S - (k + 1)
        c = np.concatenate([_rms(p["embed_VD"][tokens_S[k + 1:]], depth["embed_norm"]["scale_D"]),
                            _rms(h[:n], depth["hidden_norm"]["scale_D"])], axis=-1)
        h = _block(c @ depth["w_proj_CD"], depth["block"], positions[:n])
        ahead.append(_rms(h, depth["head_norm"]["scale_D"]) @ p["lm_head_DV"])
    return main, ahead


def test_mtp_depths_follow_the_reports_equations():
    cfg = dsmoe_jax.ModelConfig(vocab_size=53, d_model=24, n_layers=1, n_heads=2, d_ff=40, first_k_dense=1,
                                max_seq_len=32, init_std=0.2, mtp_depth=2)
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size))
    logits, _, ahead = jax.jit(functools.partial(model.forward_mtp, cfg=cfg))(params, jnp.asarray(tokens))
    assert [a.shape for a in ahead] == [(2, 8, 53), (2, 7, 53)], "depth k covers the first S - k positions"
    for b in range(2):
        main, want = _reference(params, tokens[b])
        np.testing.assert_allclose(logits[b], main, rtol=1e-4, atol=1e-4, err_msg="main logits")
        for k, (got, ref) in enumerate(zip(ahead, want), 1):
            np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-4, err_msg=f"depth {k}")
    plain, _ = dsmoe_jax.forward(params, jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(plain, logits, atol=1e-5, err_msg="the depths leave the model's own logits alone")


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_mtp_loss_is_added_logged_and_trains_an_moe_depth_and_its_score_bias():
    cfg = dsmoe_jax.load_config("tiny-v3", ["model.n_layers=2", "model.mtp_depth=1", "train.batch_size=4",
                                            "train.seq_len=32", "train.lr=3e-3", "train.warmup_steps=1",
                                            "train.mtp_weight=0.5"])
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    windows = jax.random.randint(jax.random.key(1), (4, 33), 0, 64)  # a small alphabet: learnable
    loss, (ce, aux, mtp_ce) = loss_fn(params, windows, cfg)
    assert mtp_ce.shape == (1,) and float(loss) == pytest.approx(float(ce + aux.balance_loss + 0.5 * mtp_ce[0]),
                                                                   rel=1e-6)
    assert aux.expert_load.shape == (2, 15), "one row per MoE layer, then one for the depth's MoE block"
    optimizer = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(cfg, optimizer))
    state = init_state(params, optimizer)
    first = None
    for _ in range(20):
        state, metrics = step(state, windows)
        first = first if first is not None else float(metrics.mtp_ce[0])
    assert float(metrics.mtp_ce[0]) < first - 0.5, (first, float(metrics.mtp_ce[0]))
    bias = state.params["mtp"][0]["block"]["ffn"]["score_bias_E"]
    assert float(jnp.abs(bias).max()) > 0, "the depth's score bias is balanced like the model's layers"


def test_forward_mtp_needs_depths():
    cfg = dsmoe_jax.load_config("tiny", ["model.n_layers=1"]).model
    with pytest.raises(ConfigError, match="model.mtp_depth >= 1"):
        model.forward_mtp(dsmoe_jax.init_params(cfg, jax.random.key(0)), jnp.zeros((1, 4), jnp.int32), cfg)
    with pytest.raises(ConfigError, match="model.mtp_depth must be >= 0"):
        dsmoe_jax.load_config("tiny", ["model.mtp_depth=-1"])


def test_forward_mtp_refuses_sequences_no_longer_than_the_depth():
    cfg = dsmoe_jax.load_config("tiny", ["model.n_layers=1", "model.mtp_depth=2"]).model
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    with pytest.raises(model.InputError, match="forward_mtp: 2 tokens per sequence leave nothing for multi-token "
                                               "prediction 2 tokens ahead"):
        model.forward_mtp(params, jnp.zeros((1, 2), jnp.int32), cfg)
