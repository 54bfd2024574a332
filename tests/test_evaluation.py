"""Validation: which windows are read, and the loss and its standard error against numpy."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import Config, TrainConfig
from dsmoe_jax.evaluation import evaluate, validation_windows
from dsmoe_jax.moe import RouteOptions


def test_windows_are_the_whole_split_or_spread_evenly_over_it():
    tokens = np.zeros(1001)  # 100 windows of 10 (+1 target)
    np.testing.assert_array_equal(validation_windows(tokens, 10, 0), np.arange(100))
    np.testing.assert_array_equal(validation_windows(tokens, 10, 50), [0, 20, 40, 60, 80])
    np.testing.assert_array_equal(validation_windows(tokens, 10, 10**6), np.arange(100), "capped by the split")
    with pytest.raises(ValueError, match="cannot fill one window"):
        validation_windows(np.zeros(5), 10, 0)


def _numpy_loss(params, cfg, tokens, index):
    """Per-window mean cross-entropy, from full-model logits, in numpy."""
    seq = cfg.train.seq_len
    windows = np.stack([tokens[i * seq:i * seq + seq + 1] for i in index])
    logits = np.asarray(jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg.model))(params, windows[:, :-1])[0],
                        np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
    return nll.mean(-1)


@pytest.mark.parametrize("batch_size", [3, 4])
def test_loss_and_standard_error_match_numpy(small_cfg, batch_size):
    cfg = Config(model=small_cfg, train=TrainConfig(seq_len=8, batch_size=batch_size, eval_tokens=56))
    tokens = np.random.default_rng(0).integers(0, small_cfg.vocab_size, 161)  # 20 windows, 7 read
    params = dsmoe_jax.init_params(small_cfg, jax.random.key(0))
    result = evaluate(params, cfg, tokens)
    per_window = _numpy_loss(params, cfg, tokens, validation_windows(tokens, 8, 56))
    assert (result.windows, result.tokens) == (7, 56)
    assert result.loss == pytest.approx(per_window.mean(), rel=1e-5)
    assert result.stderr == pytest.approx(per_window.std(ddof=1) / np.sqrt(7), rel=1e-3)
    whole = evaluate(params, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_tokens=0)), tokens)
    assert whole.windows == 20


def test_route_options_reach_the_evaluation(small_cfg):
    cfg = Config(model=small_cfg, train=TrainConfig(seq_len=8, batch_size=4))
    tokens = np.random.default_rng(1).integers(0, small_cfg.vocab_size, 81)
    params = dsmoe_jax.init_params(small_cfg, jax.random.key(0))
    plain, probed = evaluate(params, cfg, tokens), evaluate(params, cfg, tokens, route=RouteOptions(shared=False))
    assert plain.loss != probed.loss, "switching the shared experts off must change the loss"


def test_experts_per_token_of_top_p_routing_are_counted_by_layer(small_cfg):
    """The mean of each MoE layer's experts per read position, over windows read in batches of 3
    (the last padded), against the router's recorded choices over the same windows at once."""
    model = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, routing="top_p", top_p=0.5))
    cfg = Config(model=model, train=TrainConfig(seq_len=8, batch_size=3, eval_tokens=56))
    tokens = np.random.default_rng(1).integers(0, model.vocab_size, 161)
    params = dsmoe_jax.init_params(model, jax.random.key(0))
    got = evaluate(params, cfg, tokens).active_experts
    index = validation_windows(tokens, 8, 56)
    windows = np.stack([tokens[i * 8:i * 8 + 8] for i in index])
    _, aux = dsmoe_jax.forward(params, windows, model, route=RouteOptions(record=True))
    want = (np.asarray(aux.expert_choices) < model.moe.n_routed_experts).sum(-1).mean(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(got) == model.n_moe_layers and all(1 <= a < model.moe.n_routed_experts for a in got), got
    top_k = evaluate(params, dataclasses.replace(cfg, model=small_cfg), tokens).active_experts
    assert top_k == (3.0,) * small_cfg.n_moe_layers, "top-k routing: always K"
