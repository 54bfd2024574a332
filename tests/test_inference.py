"""Cached inference against full forward passes: logits, greedy decoding, ragged batches, EOS."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import inference
from helpers import CUDNN_ARGUMENTS


@pytest.fixture
def params(small_cfg, key):
    return dsmoe_jax.init_params(small_cfg, key)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", CUDNN_ARGUMENTS])
def test_cached_decoding_reproduces_full_forward_logits(small_cfg, params, attention):
    """Prefill and decode (own-keys attention by ``attention``, then the cache) against a full
    forward pass with every score masked explicitly ("xla")."""
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, small_cfg.vocab_size)
    full, _ = dsmoe_jax.forward(params, tokens, dataclasses.replace(small_cfg, attention="xla"))
    small_cfg = dataclasses.replace(small_cfg, attention=attention)
    cache = inference.init_cache(small_cfg, batch=2, max_len=16)
    logits, cache = jax.jit(inference.prefill, static_argnames="cfg")(params, tokens[:, :5], cache, small_cfg)
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5, err_msg="prefill")
    step = jax.jit(functools.partial(inference.decode_step, cfg=small_cfg))
    for t in range(5, 12):
        logits_BV, cache = step(params, token_B=tokens[:, t], positions_B=jnp.full((2,), t), cache=cache)
        np.testing.assert_allclose(logits_BV, full[:, t], atol=1e-5, err_msg=f"decode at position {t}")
    assert int(cache.index) == 12


def test_cached_decoding_with_top_p_routing_reproduces_full_forward_logits(small_cfg, key):
    """A decoding step routes its one token to as many experts as its probabilities need: the
    cache path gives the full forward pass's logits."""
    cfg = dataclasses.replace(small_cfg, moe=dataclasses.replace(small_cfg.moe, routing="top_p", top_p=0.5))
    params = dsmoe_jax.init_params(cfg, key)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    full, aux = dsmoe_jax.forward(params, tokens, cfg)
    assert len(set(np.asarray(aux.active_histogram).nonzero()[1].tolist())) > 1, "tokens take varying counts"
    cache = inference.init_cache(cfg, batch=2, max_len=12)
    logits, cache = inference.prefill(params, tokens[:, :4], cache, cfg)
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5, err_msg="prefill")
    step = jax.jit(functools.partial(inference.decode_step, cfg=cfg))
    for t in range(4, 10):
        logits_BV, cache = step(params, token_B=tokens[:, t], positions_B=jnp.full((2,), t), cache=cache)
        np.testing.assert_allclose(logits_BV, full[:, t], atol=1e-5, err_msg=f"decode at position {t}")


def _greedy_by_full_forward(params, cfg, prompt, n):
    """The oracle: rerun the whole sequence through ``forward`` for every new token (in a
    fixed-length buffer: causal logits at a position ignore whatever follows it)."""
    forward = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg))
    seq = jnp.zeros((1, len(prompt) + n), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    for t in range(len(prompt), len(prompt) + n):
        logits, _ = forward(params, seq)
        seq = seq.at[0, t].set(jnp.argmax(logits[0, t - 1]))
    return seq[0, len(prompt):].tolist()


_generate = jax.jit(inference.generate, static_argnames=("cfg", "max_new_tokens", "temperature", "eos"))


@pytest.mark.gpu
def test_greedy_generation_matches_full_forward_and_is_deterministic(small_cfg, params):
    prompt = [5, 17, 3, 42, 8]
    gen = _generate
    out = gen(params, jnp.asarray([prompt]), small_cfg, max_new_tokens=8, rng=jax.random.key(0), temperature=0.0)
    assert out.tolist()[0] == _greedy_by_full_forward(params, small_cfg, prompt, 8)
    again = gen(params, jnp.asarray([prompt]), small_cfg, max_new_tokens=8, rng=jax.random.key(1), temperature=0.0)
    np.testing.assert_array_equal(out, again)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", pytest.param(CUDNN_ARGUMENTS, marks=pytest.mark.slow)])  # 16 s
def test_ragged_batch_equals_prompts_one_by_one(small_cfg, params, attention):
    small_cfg = dataclasses.replace(small_cfg, attention=attention)
    prompts = [[5, 17, 3, 42, 8, 9, 1], [60, 2], [11, 12, 13, 14]]
    ids, mask = inference.pad_prompts(prompts)
    batch = _generate(params, ids, small_cfg, 6, jax.random.key(0), temperature=0.0, prompt_mask=mask)
    for row, prompt in zip(batch.tolist(), prompts):
        alone = _generate(params, jnp.asarray([prompt]), small_cfg, 6, jax.random.key(0), temperature=0.0)
        assert row == alone.tolist()[0], f"prompt {prompt} differs in a batch"


def test_scanned_layout_generates_what_the_unrolled_one_does(small_cfg, params):
    """Decoding with a cache runs the scanned layout's blocks one slice at a time."""
    scanned = dataclasses.replace(small_cfg, scan_layers=True)
    prompt = jnp.asarray([[5, 17, 3, 42, 8]])
    out = _generate(dsmoe_jax.match_layout(params, scanned), prompt, scanned, 8, jax.random.key(0), temperature=0.0)
    assert out.tolist()[0] == _greedy_by_full_forward(params, small_cfg, [5, 17, 3, 42, 8], 8)


def test_generation_stops_at_eos(small_cfg, params):
    prompt = jnp.asarray([[5, 17, 3]])
    free = _generate(params, prompt, small_cfg, 6, jax.random.key(0), temperature=0.0)
    eos = int(free[0, 2])  # make the third generated token the end of sequence
    out = _generate(params, prompt, small_cfg, 6, jax.random.key(0), temperature=0.0, eos=eos)
    first = free.tolist()[0].index(eos)
    assert out.tolist()[0] == free.tolist()[0][: first + 1] + [eos] * (5 - first)


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draw = lambda **kw: np.asarray(inference.sample(logits, jax.random.key(3), 1.0, **kw))
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.7).tolist()) == {0, 1}, "0.5 + 0.3 covers 0.7"
    assert set(draw(top_p=0.9).tolist()) == {0, 1, 2}
    counts = np.bincount(draw(), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_stream_yields_the_generated_tokens(small_cfg, params):
    prompt = [5, 17, 3, 42]
    out = _generate(params, jnp.asarray([prompt]), small_cfg, 6, jax.random.key(0), temperature=0.0)
    streamed = list(inference.stream(params, prompt, small_cfg, 6, jax.random.key(0), temperature=0.0))
    assert streamed == out.tolist()[0]
    eos = streamed[3]
    cut = list(inference.stream(params, prompt, small_cfg, 6, jax.random.key(0), temperature=0.0, eos=eos))
    assert cut == streamed[: streamed.index(eos)], "stops before yielding eos"


def test_the_old_argument_order_still_works_with_a_deprecation_warning(small_cfg):
    cfg = dataclasses.replace(small_cfg, n_layers=1, first_k_dense=1)  # small: this runs eagerly
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    prompt = jnp.asarray([[5, 17, 3]])
    cache = inference.init_cache(cfg, batch=1, max_len=8)
    new_logits, new_cache = inference.prefill(params, prompt, cache, cfg)
    with pytest.warns(DeprecationWarning, match=r"prefill\(params, cfg, ...\) is deprecated"):
        old_logits, _ = inference.prefill(params, cfg, prompt, cache=cache)
    np.testing.assert_array_equal(old_logits, new_logits)
    token, position = jnp.asarray([7]), jnp.asarray([3])
    new_step, _ = inference.decode_step(params, token, position, new_cache, cfg)
    with pytest.warns(DeprecationWarning, match="decode_step"):
        old_step, _ = inference.decode_step(params, cfg, token, position, new_cache)
    np.testing.assert_array_equal(old_step, new_step)


def test_prefill_starts_a_used_cache_over(small_cfg, params):
    """A cache that already holds a longer sequence is reused for a new prompt: nothing of the
    old sequence may be attended to, and decoding continues the new one exactly."""
    tokens = jax.random.randint(jax.random.key(2), (2, 14), 0, small_cfg.vocab_size)
    prefill = jax.jit(inference.prefill, static_argnames="cfg")
    step = jax.jit(functools.partial(inference.decode_step, cfg=small_cfg))
    cache = inference.init_cache(small_cfg, batch=2, max_len=16)
    _, cache = prefill(params, tokens[:, 6:], cache, small_cfg)  # 8 slots of another sequence
    logits, cache = prefill(params, tokens[:, :4], cache, small_cfg)
    full, _ = dsmoe_jax.forward(params, tokens[:, :6], small_cfg)
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5, err_msg="prefill over a used cache")
    for t in (4, 5):
        logits_BV, cache = step(params, token_B=tokens[:, t], positions_B=jnp.full((2,), t), cache=cache)
        np.testing.assert_allclose(logits_BV, full[:, t], atol=1e-5, err_msg=f"decode at position {t}")


@pytest.mark.slow  # about 18 s: run with -m slow
def test_forward_cached_extends_a_prefilled_cache_by_a_chunk(small_cfg, params):
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, small_cfg.vocab_size)
    full, _ = dsmoe_jax.forward(params, tokens, small_cfg)
    cache = inference.init_cache(small_cfg, batch=2, max_len=12)
    _, cache = inference.prefill(params, tokens[:, :5], cache, small_cfg)
    chunk = jax.jit(dsmoe_jax.model.forward_cached, static_argnames="cfg")
    logits, cache = chunk(params, tokens[:, 5:], cache, small_cfg, jnp.ones((2, 7), jnp.int32),
                          jnp.broadcast_to(jnp.arange(5, 12), (2, 7)))
    np.testing.assert_allclose(logits, full[:, 5:], atol=1e-5, err_msg="a 7-token chunk after a 5-token prefill")
    assert int(cache.index) == 12


@pytest.mark.parametrize("setting, message", [
    (dict(temperature=-1.0), r"temperature must be a finite number >= 0 .*got -1.0; pass e.g. 0.8"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0 .*got nan"),
    (dict(top_k=-1), r"top_k must be an integer from 0 to the vocabulary size 97, got -1; pass e.g. 50, or None"),
    (dict(top_k=98), r"top_k must be an integer from 0 to the vocabulary size 97, got 98"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], the probability mass sampled from, got 0.0; pass e.g. 0.9"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\].*got 1.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\].*got nan"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(eos=97), r"eos 97 is not a token id of the model \(ids are 0 to 96\); pass the end-of-sequence id"),
])
def test_bad_generation_settings_are_refused_before_anything_runs(small_cfg, params, setting, message):
    """They are static: refused at trace time under jit too; stream refuses when called."""
    kwargs = dict(max_new_tokens=4, temperature=1.0) | setting
    jitted = jax.jit(inference.generate, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p",
                                                           "eos"))
    with pytest.raises(dsmoe_jax.InputError, match="generate: " + message):
        jitted(params, jnp.asarray([[5, 17]]), small_cfg, rng=jax.random.key(0), **kwargs)
    with pytest.raises(dsmoe_jax.InputError, match="stream: " + message):
        inference.stream(params, [5, 17], small_cfg, rng=jax.random.key(0), **kwargs)  # no next() needed


def test_sample_refuses_bad_settings_and_top_k_zero_is_no_limit():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 500))
    with pytest.raises(dsmoe_jax.InputError, match=r"sample: top_p must be in \(0, 1\]"):
        inference.sample(logits, jax.random.key(0), 1.0, top_p=0.0)
    with pytest.raises(dsmoe_jax.InputError, match="sample: top_k must be an integer from 0 to the vocabulary size 4"):
        inference.sample(logits, jax.random.key(0), 1.0, top_k=5)
    assert set(np.asarray(inference.sample(logits, jax.random.key(0), 1.0, top_k=0)).tolist()) == {0, 1, 2, 3}


def test_sequences_past_max_seq_len_are_refused(small_cfg, params):
    """small_cfg.max_seq_len is 64."""
    prompt = jnp.zeros((1, 60), jnp.int32)
    with pytest.raises(dsmoe_jax.InputError, match=r"generate: the prompt's 60 tokens plus max_new_tokens=5 make "
                                                   r"65, more than model.max_seq_len 64; lower max_new_tokens to at "
                                                   "most 4, or shorten the prompt"):
        inference.generate(params, prompt, small_cfg, 5, jax.random.key(0))
    with pytest.raises(dsmoe_jax.InputError, match="stream: the prompt's 64 tokens plus max_new_tokens=1 make 65, "
                                                   "more than model.max_seq_len 64; shorten the prompt to at most 63"):
        inference.stream(params, [0] * 64, small_cfg, 1, jax.random.key(0))
    with pytest.raises(dsmoe_jax.InputError, match="init_cache: max_len 65 exceeds model.max_seq_len 64.*lower "
                                                   "max_len to at most 64"):
        inference.init_cache(small_cfg, 1, 65)
    with pytest.raises(dsmoe_jax.InputError, match="prefill: 65 tokens per sequence exceed model.max_seq_len 64"):
        inference.prefill(params, jnp.zeros((1, 65), jnp.int32), inference.init_cache(small_cfg, 1, 64), small_cfg)
    with pytest.raises(dsmoe_jax.InputError, match=r"prefill: 9 prompt tokens do not fit the cache's 8 slots; make "
                                                   r"the cache with init_cache\(cfg, batch, max_len\)"):
        inference.prefill(params, jnp.zeros((1, 9), jnp.int32), inference.init_cache(small_cfg, 1, 8), small_cfg)


def test_prompt_token_ids_are_checked(small_cfg, params):
    cache = inference.init_cache(small_cfg, 1, 8)
    with pytest.raises(dsmoe_jax.InputError, match=r"generate: token id 97 is outside the vocabulary: ids must lie "
                                                   r"in \[0, 97\)"):
        inference.generate(params, jnp.asarray([[5, 97]]), small_cfg, 2, jax.random.key(0))
    with pytest.raises(dsmoe_jax.InputError, match=r"prefill: token id -1 is outside the vocabulary"):
        inference.prefill(params, jnp.asarray([[-1, 5]]), cache, small_cfg)
    with pytest.raises(dsmoe_jax.InputError, match="stream: token ids must be an integer array, got float64"):
        inference.stream(params, [5, 2.5], small_cfg, 2, jax.random.key(0))
    with pytest.raises(dsmoe_jax.InputError, match="stream: the prompt is empty; give at least one token"):
        inference.stream(params, [], small_cfg, 2, jax.random.key(0))
    with pytest.raises(dsmoe_jax.InputError, match="generate: token ids must be an integer array, got float32"):
        _generate(params, jnp.asarray([[5.0, 2.0]]), small_cfg, 2, jax.random.key(0))  # dtype is static: under jit too


# ---- self-speculative decoding with the MTP module ------------------------------------------

_speculative = jax.jit(inference.generate_speculative, static_argnames=("cfg", "max_new_tokens", "eos"))


# MHA with softmax routing; MLA with sigmoid groups (20 s: -m slow)
@pytest.mark.parametrize("config", ["small", pytest.param("tiny-v3", marks=pytest.mark.slow)])
def test_speculative_decoding_is_greedy_decoding_token_for_token(small_cfg, config):
    """Untrained weights: nearly every draft is wrong, so a rejected draft's slot is masked (in
    a ragged batch) or overwritten (alone) step after step; the output must not notice."""
    cfg = (dataclasses.replace(small_cfg, mtp_depth=1) if config == "small" else
           dsmoe_jax.load_config("tiny-v3", ["model.n_layers=2", "model.vocab_size=24", "model.d_model=64",
                                             "model.max_seq_len=64", "model.mtp_depth=1", "train.seq_len=32"]).model)
    params = dsmoe_jax.init_params(cfg, jax.random.key(3))
    prompts = [[5, 17, 3, 2, 8, 9, 1], [6, 2], [11, 12, 13, 14]]
    ids, mask = inference.pad_prompts(prompts)
    out, stats = _speculative(params, ids, cfg, 12, prompt_mask=mask)
    greedy = _generate(params, ids, cfg, 12, jax.random.key(0), temperature=0.0, prompt_mask=mask)
    np.testing.assert_array_equal(out, greedy, err_msg="speculative decoding changed the greedy tokens")
    assert stats.tokens_B.tolist() == [12] * 3 and (stats.drafted_B >= stats.accepted_B).all(), stats
    alone, alone_stats = _speculative(params, jnp.asarray([prompts[0]]), cfg, 12)
    assert alone.tolist()[0] == _greedy_by_full_forward(params, cfg, prompts[0], 12)
    assert int(alone_stats.steps) == 11 - int(alone_stats.accepted_B[0]), "each accepted draft saves one step"


def _train_on_a_cycle_and_noise(steps: int):
    """A small MTP model trained on the repeating sequence 0, 1, ..., 9, where both the model and
    its MTP depth can be right every time, and on two fixed random strings of the tokens 10-15,
    where they often disagree."""
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import init_state, make_train_step

    cfg = dsmoe_jax.load_config("tiny", ["model.n_layers=2", "model.vocab_size=16", "model.d_model=32",
                                         "model.head_dim=8", "model.d_ff=64", "moe.expert_d_ff=16",
                                         "model.max_seq_len=64", "model.mtp_depth=1", "train.batch_size=4",
                                         "train.seq_len=24", "train.lr=1e-2", "train.warmup_steps=1"])
    noise = np.random.default_rng(0).integers(10, 16, (2, 25)).tolist()
    windows = jnp.asarray([[(start + i) % 10 for i in range(25)] for start in (0, 5)] + noise)
    optimizer = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(cfg, optimizer))
    state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(0)), optimizer)
    for _ in range(steps):
        state, _ = step(state, windows)
    return state.params, cfg.model


@pytest.fixture(scope="module")
def cycle_model():
    return _train_on_a_cycle_and_noise(60)


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_a_trained_mtp_depth_gets_its_drafts_accepted_and_eos_stops_mid_pair(cycle_model):
    params, cfg = cycle_model
    prompt = jnp.asarray([[2, 3, 4, 5]])
    out, stats = _speculative(params, prompt, cfg, 16)
    assert out.tolist()[0] == [(6 + i) % 10 for i in range(16)], "the model learned the cycle"
    # 16 tokens in 9 passes: 1 from the prompt's, 2 from each step (the 8th step's second is past N)
    assert (stats.acceptance, int(stats.steps)) == (1.0, 8), stats
    assert stats.tokens_per_step == pytest.approx(16 / 9)
    np.testing.assert_array_equal(out, _generate(params, prompt, cfg, 16, jax.random.key(0), temperature=0.0))
    for eos in (9, 0):  # eos as the first or the second token of an accepted pair
        stopped, s = _speculative(params, prompt, cfg, 16, eos=eos)
        first = out.tolist()[0].index(eos)
        assert stopped.tolist()[0] == out.tolist()[0][: first + 1] + [eos] * (15 - first), eos
        assert int(s.tokens_B[0]) == first + 1, "tokens counted up to and including eos"


def test_rows_that_accept_and_rows_that_reject_share_a_batch(cycle_model):
    """On the cycle the drafts are right; among the random tokens many are not: rows then keep
    different numbers of tokens per step in one cache, and finish at different steps."""
    params, cfg = cycle_model
    prompts = [[2, 3, 4, 5], [12, 15, 11, 14, 13], [13, 10]]
    ids, mask = inference.pad_prompts(prompts)
    out, stats = _speculative(params, ids, cfg, 14, prompt_mask=mask)
    greedy = _generate(params, ids, cfg, 14, jax.random.key(0), temperature=0.0, prompt_mask=mask)
    np.testing.assert_array_equal(out, greedy, err_msg="speculative decoding changed the greedy tokens")
    accepted, drafted = stats.accepted_B.tolist(), stats.drafted_B.tolist()
    assert accepted[0] == drafted[0] and all(0 < a < d for a, d in zip(accepted[1:], drafted[1:])), stats
    for row, prompt in zip(out.tolist(), prompts):
        assert row == _greedy_by_full_forward(params, cfg, prompt, 14), prompt


def test_speculative_settings_are_refused_with_the_fix(small_cfg, params):
    prompt = jnp.asarray([[5, 17, 3]])
    with pytest.raises(dsmoe_jax.ConfigError, match="needs model.mtp_depth >= 1"):
        inference.generate_speculative(params, prompt, small_cfg, 4)
    with pytest.raises(dsmoe_jax.InputError, match="decodes greedily, but temperature=0.8"):
        inference.generate(params, prompt, small_cfg, 4, jax.random.key(0), temperature=0.8, speculative="mtp")
    with pytest.raises(dsmoe_jax.InputError, match="speculative='medusa' is not a drafting method"):
        inference.generate(params, prompt, small_cfg, 4, jax.random.key(0), temperature=0.0, speculative="medusa")


def test_forward_cached_mtp_is_forward_cached_with_an_mtp_cache_and_warns(small_cfg):
    """The two cached forwards are one, ``forward_cached(..., mtp_cache=...)``; the old name
    keeps working, with a DeprecationWarning, until 0.4."""
    cfg = dataclasses.replace(small_cfg, mtp_depth=1)
    params = dsmoe_jax.init_params(cfg, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, cfg.vocab_size)
    caches = inference.init_cache(cfg, 2, 8), inference.init_cache(cfg, 2, 8, mtp=True)
    mask, positions = jnp.ones((2, 6), jnp.int32), jnp.broadcast_to(jnp.arange(6), (2, 6))
    new = dsmoe_jax.model.forward_cached(params, tokens, caches[0], cfg, mask, positions, fresh=True,
                                         mtp_cache=caches[1])
    with pytest.warns(DeprecationWarning, match="forward_cached_mtp.*is deprecated.*mtp_cache=mtp_cache"):
        old = dsmoe_jax.model.forward_cached_mtp(params, tokens, *caches, cfg, mask, positions, fresh=True)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)
    logits, _ = dsmoe_jax.model.forward_cached(params, tokens, caches[0], cfg, mask, positions, fresh=True)
    np.testing.assert_array_equal(logits, new[0], err_msg="drafting leaves the model's logits alone")
