"""Helpers shared by several test modules: inputs for the grouped-MLP backends, a tiny HF
DeepSeek-v1 checkpoint and its independent PyTorch oracle, and an emulation of
``lax.ragged_all_to_all`` for platforms that lack it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import convert, grouped

# ---- attention ---------------------------------------------------------------------------

# Off a GPU, attention="cudnn" runs cuDNN's arguments through XLA's reference, in any dtype; on
# a GPU the kernel itself runs and takes 16-bit inputs only, so the float32 comparisons of those
# cases do not apply there (benchmarks/gpu_check.py's attention step checks the kernel in bf16).
CUDNN_ARGUMENTS = pytest.param("cudnn", marks=pytest.mark.skipif(
    jax.default_backend() == "gpu", reason="float32 check of cuDNN's arguments; the GPU kernel is bf16-only"))

# ---- the grouped MLP ---------------------------------------------------------------------

D, F = 16, 8

GROUPS = {
    "uneven_with_empty": [7, 0, 20, 13, 0, 4],
    "all_in_one": [0, 0, 44, 0, 0, 0],
    "single_rows": [1, 1, 1, 1, 1, 1],
    "tile_multiple": [8, 16, 0, 8, 4, 8],
}


def grouped_inputs(group_sizes, rows, dtype=jnp.float32):
    E = len(group_sizes)
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (rows, D), dtype)
    ws = [0.3 * jax.random.normal(k[i], s, dtype) for i, s in ((1, (E, D, F)), (2, (E, D, F)), (3, (E, F, D)))]
    return x, ws, jnp.asarray(group_sizes, jnp.int32)


def numpy_grouped_reference(x, ws, group_sizes):
    """Row by row: the row's own expert's SwiGLU, zeros past the last group."""
    x, (wg, wu, wd) = np.asarray(x, np.float64), [np.asarray(w, np.float64) for w in ws]
    y = np.zeros_like(x)
    row = 0
    for e, n in enumerate(np.asarray(group_sizes)):
        for r in range(row, row + n):
            g, u = x[r] @ wg[e], x[r] @ wu[e]
            y[r] = (g / (1 + np.exp(-g)) * u) @ wd[e]
        row += n
    return y


def grouped_loss(backend, group_sizes):
    def loss(x, wg, wu, wd):
        y = grouped.grouped_mlp(x, wg, wu, wd, group_sizes, backend=backend)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
    return loss


# ---- HF checkpoints ----------------------------------------------------------------------

# A tiny config.json in the released format (deepseek-moe-16b-base's keys, small sizes).
TINY_HF = {
    "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "vocab_size": 101, "hidden_size": 32,
    "intermediate_size": 72, "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8, "num_experts_per_tok": 3,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 100, "eos_token_id": 100,
    "initializer_range": 0.02, "torch_dtype": "float32",
}


def random_hf_checkpoint(cfg, seed=0, std=0.08):
    """Every HF tensor of ``cfg``: normal with ``std``, norms around one; the same for a seed."""
    rng = np.random.default_rng(seed)
    return {name: (std * rng.standard_normal(shape)).astype(np.float32) + (1.0 if "norm" in name else 0.0)
            for name, shape in convert.hf_shapes(cfg).items()}


def qwen2moe_oracle(tensors, hf_cfg):
    """transformers' Qwen2Moe with the same weights: dense first layer via mlp_only_layers, zero
    q/k/v biases, and a shared-expert gate fixed at sigmoid(0) = 0.5 with the shared down
    projection doubled, so the shared experts count exactly once."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = hf_cfg
    qcfg = Qwen2MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        moe_intermediate_size=c["moe_intermediate_size"],
        shared_expert_intermediate_size=c["n_shared_experts"] * c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"], norm_topk_prob=False,
        mlp_only_layers=list(range(c["first_k_dense_replace"])), decoder_sparse_step=1,
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=False,
    )
    qcfg._attn_implementation = "eager"
    model = Qwen2MoeForCausalLM(qcfg).float().eval()
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    E = c["n_routed_experts"]
    for name, array in tensors.items():
        t = torch.from_numpy(array)
        if ".mlp.experts." in name:
            layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            prefix = f"model.layers.{layer}.mlp.experts."
            if proj == "down_proj":
                state[prefix + "down_proj"][e] = t
            else:
                F = t.shape[0]
                state[prefix + "gate_up_proj"][e, (0 if proj == "gate_proj" else F):][:F] = t
        elif ".mlp.shared_experts." in name:
            target = name.replace("shared_experts", "shared_expert")
            state[target] = 2 * t if "down_proj" in name else t
        else:
            state[name] = t
    assert E == state["model.layers.1.mlp.experts.gate_up_proj"].shape[0]
    model.load_state_dict(state)
    return model


# ---- the ragged exchange -----------------------------------------------------------------

def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """``lax.ragged_all_to_all``'s semantics built from all_gathers, for platforms without it
    (XLA:CPU): the tests run the ragged exchange's bookkeeping through this."""
    del recv_sizes  # implied by the senders' send_sizes
    me = jax.lax.axis_index(axis_name)
    gather = lambda a: jax.lax.all_gather(a, axis_name)
    operands, starts = gather(operand), gather(input_offsets)
    sizes, offsets = gather(send_sizes), gather(output_offsets)
    rows = jnp.arange(output.shape[0])
    for sender in range(operands.shape[0]):
        start, size, offset = starts[sender, me], sizes[sender, me], offsets[sender, me]
        inside = (rows >= offset) & (rows < offset + size)
        source = jnp.clip(start + rows - offset, 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], operands[sender][source], output)
    return output


def tiny_tokenizer(path) -> None:
    """A six-word tokenizer.json (ids 0-5) for converted tiny checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
