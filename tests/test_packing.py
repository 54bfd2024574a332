"""Packed fine-tuning (``packing.py``) against independent oracles: transformers' DeepSeek models
(v1 through the project's Qwen2-MoE oracle, V2 and V3 through their own classes) run on each
example alone; a float64 numpy attention that masks by causality and example; each example's
own forward, balance loss and multi-token-prediction loss; a step without gradient
accumulation; and the packing bookkeeping by hand."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_convert import _transformers_model

import dsmoe_jax
from dsmoe_jax import Config, convert, packing
from dsmoe_jax.attention import attention, causal_mask
from dsmoe_jax.errors import DataError
from dsmoe_jax.model import forward_mtp, segment_positions
from dsmoe_jax.packing import Packed, PackedRows, pack_bins
from dsmoe_jax.shards import Examples
from dsmoe_jax.train.step import init_state, loss_fn, make_train_step
from helpers import CUDNN_ARGUMENTS, TINY_HF, qwen2moe_oracle, random_hf_checkpoint, tiny_tokenizer

# ---- building packed batches by hand -----------------------------------------------------------


def _examples(lengths, answers, vocab, seed):
    """Random examples of ``lengths`` tokens, each with a loss mask keeping its last ``answers``
    tokens (the answer)."""
    rng = np.random.default_rng(seed)
    out = []
    for n, a in zip(lengths, answers):
        mask = np.zeros(n, np.int32)
        mask[n - a:] = 1
        out.append((rng.integers(0, vocab, n).astype(np.int32), mask))
    return out


def _pack(examples, layout, R):
    """``Packed`` rows of ``R`` tokens: row r holds the examples ``layout[r]`` one after another,
    then padding. Also returns where each example went: (row, first slot) by example index."""
    B = len(layout)
    tokens, segments, mask = (np.zeros((B, R), np.int32) for _ in range(3))
    where = {}
    for r, row in enumerate(layout):
        at = 0
        for number, e in enumerate(row, 1):
            t, m = examples[e]
            tokens[r, at:at + len(t)], segments[r, at:at + len(t)], mask[r, at:at + len(t)] = t, number, m
            where[e] = (r, at)
            at += len(t)
        assert at <= R, f"row {r} overflows: {at} > {R}"
    return Packed(tokens, segments, mask), where


def _alone_rows(examples, L):
    """Each example in its own row from slot 0, right-padded to ``L`` with token 0 and an
    attention mask hiding the padding: causal attention makes each row's logits at its real
    positions those of the example run alone."""
    tokens, valid = np.zeros((len(examples), L), np.int32), np.zeros((len(examples), L), np.int32)
    for i, (t, _) in enumerate(examples):
        tokens[i, :len(t)], valid[i, :len(t)] = t, 1
    return tokens, valid


def _nll(logits, targets):
    """float64 negative log-likelihood of ``targets`` under ``logits [..., V]``."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


# Two rows of 21 tokens (seq_len 20): three examples then padding, and two examples filling the row
# exactly. Example 1's loss mask keeps every token: its first token must still not be predicted
# (it has nothing of its own example before it).
HF_LENGTHS, HF_ANSWERS, HF_LAYOUT, HF_R = [5, 9, 4, 12, 9], [2, 9, 1, 5, 3], [[0, 1, 2], [3, 4]], 21


def _hf_model(model_type, tmp_path):
    """(our params, our model config, a function ids [1, n] -> (transformers logits, mean loss
    over labels)) for a tiny random checkpoint of ``model_type``, converted as test_convert.py does."""
    if model_type == "deepseek":  # transformers has no v1 class: the project's Qwen2-MoE oracle
        cfg = convert.config_from_hf(TINY_HF)
        tensors = random_hf_checkpoint(cfg, seed=1)
        params = convert.params_from_hf(tensors.__getitem__, tensors.__contains__, cfg)
        model = qwen2moe_oracle(tensors, TINY_HF)
    else:
        case = {"deepseek_v2": "v2-group-limited-q-lora", "deepseek_v3": "v3-sigmoid-bias-q-lora"}[model_type]
        model = _transformers_model(case)
        assert model.config.model_type == model_type, model.config.model_type
        model.save_pretrained(tmp_path / "hf")
        tiny_tokenizer(tmp_path / "hf" / "tokenizer.json")
        convert.hf_to_jax(tmp_path / "hf", tmp_path / "jax", progress=False)
        params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
        cfg = loaded.model

    def run(ids, labels):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long())
        return out.logits.numpy(), float(out.loss)
    return params, cfg, run


@pytest.mark.parametrize("model_type", ["deepseek", pytest.param("deepseek_v2", marks=pytest.mark.slow), "deepseek_v3"])
def test_packed_loss_and_logits_equal_transformers_on_each_example_alone(model_type, tmp_path, capsys):
    params, model_cfg, hf = _hf_model(model_type, tmp_path)
    capsys.readouterr()
    # balance losses off: the loss is then the masked cross-entropy alone
    model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, aux_loss_alpha=0.0,
                                                                       device_aux_alpha=0.0))
    cfg = Config(model=model_cfg)
    examples = _examples(HF_LENGTHS, HF_ANSWERS, model_cfg.vocab_size, seed=3)
    batch, where = _pack(examples, HF_LAYOUT, HF_R)
    alone_tokens, alone_valid = _alone_rows(examples, max(HF_LENGTHS))

    @jax.jit
    def ours(params, batch, alone_tokens, alone_valid):
        packed, _ = dsmoe_jax.forward(params, batch.tokens[:, :-1], model_cfg, segment_ids=batch.segment_ids[:, :-1])
        alone, _ = dsmoe_jax.forward(params, alone_tokens, model_cfg, attention_mask=alone_valid)
        return packed, alone, loss_fn(params, batch, cfg)

    packed, alone, (loss, (ce, aux, _)) = jax.device_get(ours(params, batch, alone_tokens, alone_valid))

    total, count = 0.0, 0
    for e, (tokens, mask) in enumerate(examples):
        n = len(tokens)
        labels = np.where(mask > 0, tokens, -100)
        want_logits, mean_loss = hf(tokens[None], labels[None])
        counted = int(np.sum(mask[1:]))  # transformers shifts: label j is predicted at j - 1
        total, count = total + mean_loss * counted, count + counted
        r, at = where[e]
        real = min(n, HF_R - 1 - at)  # positions of this example that are inputs of the packed row
        np.testing.assert_allclose(packed[r, at:at + real], want_logits[0, :real], atol=1e-4, rtol=0,
                                   err_msg=f"{model_type}: example {e}'s packed logits against transformers alone")
        np.testing.assert_allclose(packed[r, at:at + real], alone[e, :real], atol=1e-5, rtol=0,
                                   err_msg=f"{model_type}: example {e}'s packed logits against our forward alone")
    assert count == sum(a - (a == n) for n, a in zip(HF_LENGTHS, HF_ANSWERS)) == 19, count
    want = total / count
    assert abs(float(ce) - want) < 1e-5, \
        f"{model_type}: packed masked cross-entropy {float(ce)} != transformers' {want}"
    assert abs(float(loss) - want) < 1e-5 and float(aux.balance_loss) == 0.0, \
        f"{model_type}: loss {float(loss)} (balance {float(aux.balance_loss)}) != transformers' {want}"


# ---- document masking in each attention implementation ------------------------------------------

ATTENTION_CASES = {  # B, S, N query heads, K key heads, H, W value width; segment ids of each row (0: padding)
    "grouped_query": ((3, 24, 4, 2, 8, 8), [[1] * 7 + [2] * 10 + [3] * 4 + [0] * 3,
                                            [1] * 24,  # one example filling the row
                                            [1] * 3 + [2] + [3] * 15 + [0] * 5]),  # a one-token example
    "narrow_values": ((2, 16, 2, 2, 8, 6), [[1] * 5 + [2] * 5 + [3] * 3 + [0] * 3,
                                            [1] * 12 + [0] * 4]),  # one example, then padding
    # 200 > QUERY_BLOCK: example 2 spans slots 50-149, across the first query block's end
    "block_boundary": ((1, 200, 2, 1, 8, 8), [[1] * 50 + [2] * 100 + [3] * 40 + [0] * 10]),
}


def _attention_inputs(case):
    (B, S, N, K, H, W), rows = ATTENTION_CASES[case]
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (B, S, N, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, K, W), jnp.float32)
    cotangent = jax.random.normal(ks[3], (B, S, N, W), jnp.float32)
    return q, k, v, jnp.asarray(rows, jnp.int32), cotangent


def _float64_reference(q, k, v, segments):
    """Softmax attention in float64, query s of row b seeing key t when t <= s and both lie in the
    same example; zeros at padding queries."""
    q, k, v, segments = (np.asarray(a, np.float64) for a in (q, k, v, segments))
    (B, S, N, H), K = q.shape, k.shape[2]
    out = np.zeros((B, S, N, v.shape[3]))
    for b in range(B):
        for s in range(S):
            if segments[b, s] == 0:
                continue
            seen = (np.arange(S) <= s) & (segments[b] == segments[b, s])
            for n in range(N):
                kv = n // (N // K)  # query heads grouped under their key head, as jax.nn's attention does
                scores = k[b, seen, kv] @ q[b, s, n] / np.sqrt(H)
                p = np.exp(scores - scores.max())
                out[b, s, n] = p @ v[b, seen, kv] / p.sum()
    return out


def _masked_float32(q, k, v, valid, segments):
    """jax's own attention with the explicit [B, 1, S, S] mask of ``causal_mask`` (values zero-padded
    to the key width, as its API needs)."""
    H, W = k.shape[-1], v.shape[-1]
    mask = causal_mask(valid, jnp.arange(q.shape[1]), segments)
    out = jax.nn.dot_product_attention(q, k, jnp.pad(v, [(0, 0)] * 3 + [(0, H - W)]), mask=mask)
    return out[..., :W]


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("implementation", ["xla", "blocked", CUDNN_ARGUMENTS])
def test_document_masking_equals_a_float64_reference(implementation, case):
    q, k, v, segments, cotangent = _attention_inputs(case)
    real = np.asarray(segments > 0)[:, :, None, None]
    want = _float64_reference(q, k, v, segments)
    # the padding marked invalid (the natural call), or every key valid, as the model calls it
    # (block.own_keys): the segment ids alone then keep the padding to itself
    run = jax.jit(functools.partial(attention, implementation=implementation))
    for valid in (segments > 0, jnp.ones_like(segments)):
        got = run(q, k, v, valid, segment_ids_BT=segments)
        assert got.shape == want.shape and got.dtype == jnp.float32, (got.shape, got.dtype)
        np.testing.assert_allclose(np.where(real, got, 0), want, atol=1e-5, rtol=0,
                                   err_msg=f"{implementation}/{case}: values on real queries")

    valid = segments > 0

    def loss(f):  # a weighted sum over the real queries
        return lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v) * cotangent, 0.0))

    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    ours = grad(lambda q, k, v: attention(q, k, v, valid, implementation=implementation, segment_ids_BT=segments))
    ref = grad(lambda q, k, v: _masked_float32(q, k, v, valid, segments))
    for name, a, b in zip("qkv", ours, ref):
        assert np.all(np.isfinite(a)), f"{implementation}/{case}: d{name} is not finite"
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=f"{implementation}/{case}: d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["blocked", "cudnn"])
def test_document_masking_in_bfloat16_stays_close(implementation):
    """The bf16 path a GPU takes (cuDNN's kernel there; XLA's reference of the same call on a CPU),
    with every key valid as the model calls it, within bf16 rounding of the float64 reference."""
    q, k, v, segments, _ = _attention_inputs("grouped_query")
    H, W = k.shape[-1], v.shape[-1]
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, H - W)])  # cuDNN takes values as wide as the keys
    want = _float64_reference(q, k, v, segments)
    bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = jax.jit(functools.partial(attention, implementation=implementation))(
        *bf16, jnp.ones_like(segments), segment_ids_BT=segments)
    real = np.asarray(segments > 0)[:, :, None, None]
    assert got.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(got, np.float32))), got.dtype
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0), want, atol=3e-2,
                               err_msg=f"{implementation}: bf16 values on real queries")


def test_the_reference_mask_separates_examples():
    """The float64 reference itself: a query of example 2 is unchanged by example 1's keys and
    values, and differs from unmasked causal attention (so the comparisons above can fail)."""
    q, k, v, segments, _ = _attention_inputs("narrow_values")
    base = _float64_reference(q, k, v, segments)
    changed = _float64_reference(q, k.at[0, :5].add(3.0), v.at[0, :5].add(3.0), segments)
    np.testing.assert_array_equal(changed[0, 5:], base[0, 5:])
    assert np.abs(changed[0, :5] - base[0, :5]).max() > 0.1
    causal = _float64_reference(q, k, v, jnp.where(segments > 0, 1, 0))
    assert np.abs(causal[0, 5:13] - base[0, 5:13]).max() > 0.1


# ---- positions ------------------------------------------------------------------------------


def test_segment_positions_restart_at_each_example():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0],
                            [1, 1, 1, 1, 1, 1, 1, 1],
                            [1, 2, 2, 2, 2, 2, 2, 0],
                            [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
    want = [[0, 1, 2, 0, 1, 0, 0, 1],
            [0, 1, 2, 3, 4, 5, 6, 7],
            [0, 0, 1, 2, 3, 4, 5, 0],
            [0, 0, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(segment_positions(segments), want)


# ---- whole models: a packed row against each example alone ----------------------------------

MODEL_LENGTHS, MODEL_ANSWERS, MODEL_LAYOUT, MODEL_R = [7, 10, 4, 13, 12], [3, 10, 1, 6, 4], [[0, 1, 2], [3, 4]], 26


def _model_cfg(name, *overrides):
    # init_std 0.1: attention far from uniform, so a key of another example would change the output
    return dsmoe_jax.load_config(name, ["model.n_layers=2", "model.attention='xla'", "model.init_std=0.1",
                                        *overrides])


@pytest.mark.parametrize("name", ["tiny", "tiny-v3"])
@pytest.mark.parametrize("implementation, scan_layers", [  # the scanned layout through "blocked"
    ("xla", False), ("blocked", True),
    # cuDNN's CPU path is the float64-checked attention above; the whole model through it is slow-marked
    pytest.param("cudnn", False, marks=[*CUDNN_ARGUMENTS.marks, pytest.mark.slow])])
def test_a_packed_row_equals_each_example_alone(name, implementation, scan_layers):
    cfg = _model_cfg(name, f"model.attention='{implementation}'", f"model.scan_layers={str(scan_layers).lower()}")
    assert cfg.model.mla is not None if name == "tiny-v3" else cfg.model.mla is None
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    examples = _examples(MODEL_LENGTHS, MODEL_ANSWERS, cfg.model.vocab_size, seed=4)
    batch, where = _pack(examples, MODEL_LAYOUT, MODEL_R)
    alone_tokens, alone_valid = _alone_rows(examples, max(MODEL_LENGTHS))

    @jax.jit
    def run(params, tokens, segments, alone_tokens, alone_valid):
        packed, _ = dsmoe_jax.forward(params, tokens, cfg, segment_ids=segments)
        alone, _ = dsmoe_jax.forward(params, alone_tokens, cfg, attention_mask=alone_valid)
        if implementation != "xla" or scan_layers:
            return packed, alone, None
        unpacked, _ = dsmoe_jax.forward(params, tokens, cfg, attention_mask=(segments > 0).astype(jnp.int32))
        return packed, alone, unpacked

    packed, alone, unpacked = jax.device_get(run(params, batch.tokens, batch.segment_ids, alone_tokens, alone_valid))
    for e, (tokens, _) in enumerate(examples):
        r, at = where[e]
        n = len(tokens)
        np.testing.assert_allclose(packed[r, at:at + n], alone[e, :n], atol=1e-5, rtol=1e-5,
                                   err_msg=f"{name}/{implementation}/scan={scan_layers}: example {e}")
        # the test can fail: without segment ids the later examples see the earlier ones
        if at and unpacked is not None:
            assert np.abs(unpacked[r, at:at + n] - alone[e, :n]).max() > 1e-2, \
                f"{name}: example {e} is insensitive to the examples before it; the comparison proves nothing"


def test_sequence_wise_balance_loss_is_per_example():
    cfg = _model_cfg("tiny", "moe.seq_aux=true", "moe.aux_loss_alpha=0.1")
    params = dsmoe_jax.init_params(cfg, jax.random.key(1))
    examples = _examples(MODEL_LENGTHS, MODEL_ANSWERS, cfg.model.vocab_size, seed=5)
    batch, _ = _pack(examples, MODEL_LAYOUT, MODEL_R)
    alone_tokens, alone_valid = _alone_rows(examples, max(MODEL_LENGTHS))
    fwd = jax.jit(lambda params, tokens, **kw: dsmoe_jax.forward(params, tokens, cfg, **kw)[1].balance_loss)
    packed = float(fwd(params, batch.tokens, segment_ids=batch.segment_ids))
    # each example alone: a batch of one, its padding hidden (left out of the statistics)
    each = [float(fwd(params, alone_tokens[e:e + 1], attention_mask=alone_valid[e:e + 1]))
            for e in range(len(examples))]
    assert abs(packed - np.mean(each)) < 1e-6, f"packed balance loss {packed} != mean of the examples' {each}"
    by_row = float(fwd(params, batch.tokens, attention_mask=(batch.segment_ids > 0).astype(jnp.int32)))
    assert abs(by_row - packed) > 1e-4, f"per-row statistics ({by_row}) should differ from per-example ({packed})"


def test_multi_token_prediction_statistics_are_per_example():
    """The MTP depth's MoE block counts, in its load and sequence-wise balance loss, only the
    positions whose token ahead lies in their own example, as each example alone does."""
    cfg = _model_cfg("tiny-v3", "model.mtp_depth=1", "moe.seq_aux=true", "moe.aux_loss_alpha=0.1")
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    a, b = (np.random.default_rng(7).integers(0, cfg.model.vocab_size, n).astype(np.int32) for n in (5, 7))
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    aux = jax.jit(lambda params, tokens, segments=None: forward_mtp(params, tokens, cfg, segment_ids=segments)[1])
    packed = aux(params, np.concatenate([a, b])[None], segments)
    alone = [aux(params, x[None]) for x in (a, b)]
    np.testing.assert_array_equal(packed.expert_load, sum(x.expert_load for x in alone),
                                  "tokens routed per expert, the model's layer then the MTP block")
    np.testing.assert_allclose(float(packed.balance_loss), np.mean([float(x.balance_loss) for x in alone]),
                               rtol=1e-6, err_msg="sequence-wise balance loss, the MTP block's included")


def test_multi_token_prediction_targets_stop_at_the_examples_end():
    cfg = _model_cfg("tiny-v3", "model.mtp_depth=1")
    params = dsmoe_jax.init_params(cfg, jax.random.key(2))
    examples = _examples(MODEL_LENGTHS, MODEL_ANSWERS, cfg.model.vocab_size, seed=6)
    batch, _ = _pack(examples, MODEL_LAYOUT, MODEL_R)
    loss, (ce, aux, mtp_ce) = jax.jit(functools.partial(loss_fn, cfg=cfg))(params, batch)

    # each example alone, right-padded with token 0 (no mask: forward_mtp takes none); causality
    # leaves the positions the loss counts (those whose targets lie inside the example) as alone
    alone_tokens, _ = _alone_rows(examples, max(MODEL_LENGTHS))
    main, _, (ahead,) = jax.jit(functools.partial(forward_mtp, cfg=cfg))(params, jnp.asarray(alone_tokens))
    sums, counts = np.zeros(2), np.zeros(2)
    for e, (tokens, mask) in enumerate(examples):
        n = len(tokens)
        for k, logits in ((1, main), (2, ahead)):  # the next token, and depth 1: two ahead
            kept = mask[k:] > 0  # target i + k of input i, inside the example
            nll = _nll(logits[e, :n - k], tokens[k:])
            sums[k - 1] += nll[kept].sum()
            counts[k - 1] += kept.sum()
    assert counts.tolist() == [23.0, 22.0], counts
    want_ce, want_mtp = sums / counts
    assert abs(float(ce) - want_ce) < 1e-5, f"main cross-entropy {float(ce)} != {want_ce}"
    assert mtp_ce.shape == (1,) and abs(float(mtp_ce[0]) - want_mtp) < 1e-5, \
        f"depth-1 cross-entropy {mtp_ce} != the examples' own {want_mtp}"
    want_loss = want_ce + float(aux.balance_loss) + cfg.train.mtp_weight * want_mtp
    assert abs(float(loss) - want_loss) < 1e-5, (float(loss), want_loss)


def test_gradient_accumulation_weighs_micro_batches_by_their_counted_tokens():
    cfg = _model_cfg("tiny", "moe.aux_loss_alpha=0.0", "train.batch_size=4", "train.seq_len=24")
    params = dsmoe_jax.init_params(cfg, jax.random.key(3))
    # four rows (one micro-batch each with grad_accum = 4) counting 1, 22, 6 and 14 targets
    examples = _examples([3, 23, 6, 8, 5, 9, 7], [1, 23, 3, 3, 2, 9, 4], cfg.model.vocab_size, seed=7)
    batch, _ = _pack(examples, [[0], [1], [2, 3], [4, 5, 6]], 25)
    per_row = np.asarray(packing.target_weights(batch).sum(1))
    assert per_row.tolist() == [1, 22, 6, 14], per_row
    optimizer = optax.sgd(1.0)  # the new params are params - gradient: the gradients compared exactly
    state = init_state(params, optimizer)
    accumulated = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=4))
    one, m1 = jax.jit(make_train_step(cfg, optimizer))(state, batch)
    four, m4 = jax.jit(make_train_step(accumulated, optimizer))(state, batch)
    for what, a, b in (("loss", m1.loss, m4.loss), ("ce", m1.ce, m4.ce)):
        assert abs(float(a) - float(b)) < 1e-6, f"{what}: grad_accum 1 gives {float(a)}, grad_accum 4 {float(b)}"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(params))) \
        > 1e-3, "the step moved nothing: the comparison proves nothing"

    # the naive mean over micro-batches (each its own count) weighs the one-target row like the 22-target one
    # (the loss is what the gradient is of: a naive step would move the params elsewhere too)
    rows = [jax.tree.map(lambda a, i=i: a[i:i + 1], batch) for i in range(4)]
    ce = jax.jit(lambda params, row: loss_fn(params, row, cfg)[1][0])
    naive_ce = np.mean([float(ce(params, row)) for row in rows])
    assert abs(naive_ce - float(m1.ce)) > 0.05, f"the naive mean {naive_ce} should differ from {float(m1.ce)}"


# ---- pack_bins and PackedRows ---------------------------------------------------------------


def _numbered_examples(lengths, with_mask=True):
    """Examples whose tokens name them: token j of example i is 1000 i + j; mask = token parity."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([1000 * i + np.arange(n) for i, n in enumerate(lengths)]).astype(np.int32)
    mask = (tokens % 2).astype(np.uint8) if with_mask else None
    return Examples(tokens, mask, starts)


def _read_rows(rows, first, count):
    """{example index: how many times it appears} over rows ``first .. first + count - 1``,
    checking each row's segments against the examples' own tokens and masks."""
    seen = {}
    for i in range(first, first + count):
        row = rows[i]
        assert row.tokens.shape == row.segment_ids.shape == row.loss_mask.shape == (rows.capacity,)
        segments = row.segment_ids
        used = int(np.sum(segments > 0))
        assert np.all(segments[:used] > 0) and np.all(segments[used:] == 0), f"row {i}: padding only at the end"
        assert np.all(np.diff(segments[:used]) >= 0) and np.all(np.diff(segments[:used]) <= 1), \
            f"row {i}: segments numbered 1, 2, ... in order"
        assert np.all(row.tokens[used:] == 0) and np.all(row.loss_mask[used:] == 0), f"row {i}: padding"
        for s in range(1, int(segments.max()) + 1):
            tokens = row.tokens[segments == s]
            e = int(tokens[0]) // 1000
            n = min(int(rows.examples.starts[e + 1] - rows.examples.starts[e]), rows.capacity)
            np.testing.assert_array_equal(tokens, 1000 * e + np.arange(n), err_msg=f"row {i} segment {s}")
            want_mask = np.ones(n) if rows.examples.mask is None else tokens % 2
            np.testing.assert_array_equal(row.loss_mask[segments == s], want_mask, err_msg=f"row {i} segment {s}")
            seen[e] = seen.get(e, 0) + 1
    return seen


def test_pack_bins_best_fit_decreasing_by_hand():
    rows = pack_bins(np.array([2, 5, 1, 3, 4, 3, 2]), 10)
    # 5 -> new; 4 -> with 5 (1 left); 3 -> new; 3 -> with it (4 left); 2, 2 -> there (0 left); 1 -> with 5, 4
    assert rows == [[1, 4, 2], [3, 5, 0, 6]], rows
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 300)
    rows = pack_bins(lengths, 64, order=rng.permutation(300))
    assert sorted(i for row in rows for i in row) == list(range(300)), "every example once"
    assert max(sum(lengths[i] for i in row) for row in rows) <= 64, "no row over capacity"


def test_packed_rows_epochs_cover_every_example_once_and_are_deterministic():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, 80)
    examples = _numbered_examples(lengths)
    rows = PackedRows(examples, seq_len=31, seed=5, epochs=3)
    R = rows.rows_per_epoch
    assert len(rows) == 3 * R and rows.truncated == 0 and rows.capacity == 32
    assert rows.real_tokens_per_epoch == lengths.sum()
    assert R >= int(np.ceil(lengths.sum() / 32)), "rows hold at most capacity tokens"
    orders = []
    for epoch in range(3):
        seen = _read_rows(rows, epoch * R, R)
        assert seen == {e: 1 for e in range(80)}, f"epoch {epoch}: every example exactly once, got {seen}"
        orders.append([tuple(rows[epoch * R + k].tokens) for k in range(R)])
    for seed in range(4):  # (a row more or less in some epoch would lose or repeat examples above)
        order = np.random.default_rng(seed).permutation(80)
        assert len(pack_bins(np.minimum(lengths, 32), 32, order=order)) == R, "the same rows whatever the order"
    assert orders[0] != orders[1] != orders[2] != orders[0], "each epoch its own order"
    # asked again (epoch 0 recomputed: the cache holds two epochs), and by a new source of the same seed
    again = PackedRows(examples, seq_len=31, seed=5, epochs=3)
    for i in [0, R - 1, R, 2 * R + 3, 1, 0, 3 * R - 1]:
        for other in (rows, again):
            for a, b in zip(rows[i], other[i]):
                np.testing.assert_array_equal(a, b, err_msg=f"row {i} read twice")
    np.testing.assert_array_equal(np.asarray(orders[0][3]), rows[3].tokens, err_msg="row 3 of epoch 0 after others")
    other_seed = PackedRows(examples, seq_len=31, seed=6)
    assert [tuple(other_seed[k].tokens) for k in range(R)] != orders[0], "another seed, other rows"
    fixed = PackedRows(_numbered_examples(lengths, with_mask=False), seq_len=31, seed=None, epochs=2)
    assert _read_rows(fixed, 0, R) == {e: 1 for e in range(80)}
    for k in range(R):  # unshuffled (validation): every epoch the same rows
        np.testing.assert_array_equal(fixed[k].tokens, fixed[R + k].tokens)


def test_packing_efficiency_of_uniform_lengths():
    lengths = np.random.default_rng(2).integers(20, 201, 2000)
    assert packing.efficiency(lengths, 512) >= 0.95, packing.efficiency(lengths, 512)
    rows = PackedRows(_numbered_examples(lengths, with_mask=False), seq_len=511, seed=0)
    assert rows.efficiency >= 0.95, rows.efficiency
    assert rows.efficiency == pytest.approx(lengths.sum() / (rows.rows_per_epoch * 512))


def test_long_examples_are_truncated_and_counted_or_refused():
    lengths = np.array([5, 12, 40, 9, 33, 34])  # rows of 33: examples 2 and 5 are longer
    examples = _numbered_examples(lengths)
    rows = PackedRows(examples, seq_len=32, seed=0)
    assert rows.truncated == 2, rows.truncated
    assert rows.real_tokens_per_epoch == 5 + 12 + 33 + 9 + 33 + 33
    assert _read_rows(rows, 0, rows.rows_per_epoch) == {e: 1 for e in range(6)}  # each cut to its first 33
    with pytest.raises(DataError, match=r"the train split: example 2 has 40 tokens, more than a row of "
                                        r"train.seq_len \+ 1 = 33"):
        PackedRows(examples, seq_len=32, seed=0, long_examples="error", where="the train split")
    assert PackedRows(examples, seq_len=39, long_examples="error").truncated == 0, "40 tokens fit a row of 40"
    with pytest.raises(DataError, match="example 2 has 40 tokens"):
        PackedRows(examples, seq_len=38, long_examples="error")
