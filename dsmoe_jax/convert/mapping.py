"""The HF DeepSeek-v1 format (``model_type: deepseek``, ``DeepseekForCausalLM``) as data.

Two declarative pieces: the config fields (``CONFIG_FIELDS``: HF key -> ours, plus fields that
must hold a given value) and the tensor names (``TENSORS``: HF name pattern -> our param path and
the per-tensor transform). Everything else walks these tables; there is no per-tensor ``if``.

``TENSORS`` name our params in the unrolled layout (one subtree per block, as HF has them); a
model with ``scan_layers`` is converted through it (``model.match_layout``).

Shape legend: D model width, F hidden width, E routed experts, N heads, K kv heads, H head
width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np

from dsmoe_jax.config import ConfigError, DsmoeError, ModelConfig, MoEConfig
from dsmoe_jax.model import layer_groups, match_layout, param_shapes

HF_MODEL_TYPE = "deepseek"


class ConversionError(DsmoeError, ValueError):
    """A checkpoint that does not match its config, or an output that cannot be written."""


# HF config key -> (section, our key); a missing HF key keeps our default.
CONFIG_FIELDS = {
    "vocab_size": ("model", "vocab_size"), "hidden_size": ("model", "d_model"),
    "num_hidden_layers": ("model", "n_layers"), "num_attention_heads": ("model", "n_heads"),
    "num_key_value_heads": ("model", "n_kv_heads"), "intermediate_size": ("model", "d_ff"),
    "first_k_dense_replace": ("model", "first_k_dense"), "rope_theta": ("model", "rope_theta"),
    "max_position_embeddings": ("model", "max_seq_len"), "rms_norm_eps": ("model", "norm_eps"),
    "initializer_range": ("model", "init_std"),
    "n_routed_experts": ("moe", "n_routed_experts"), "n_shared_experts": ("moe", "n_shared_experts"),
    "num_experts_per_tok": ("moe", "top_k"), "moe_intermediate_size": ("moe", "expert_d_ff"),
    "norm_topk_prob": ("moe", "norm_topk_prob"), "aux_loss_alpha": ("moe", "aux_loss_alpha"),
    "seq_aux": ("moe", "seq_aux"),
}
# Copies of the released 16B config.json differ on whether these two are present.
HF_DEFAULTS = {"aux_loss_alpha": 0.001, "seq_aux": True}
# HF keys whose other values describe a model this code does not implement.
REQUIRED = {"moe_layer_freq": 1, "scoring_func": "softmax", "tie_word_embeddings": False,
            "attention_bias": False, "rope_scaling": None, "hidden_act": "silu", "pretraining_tp": 1}


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF DeepSeek-v1 ``config.json``; anything else is a clear error."""
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise ConfigError(f"unsupported model_type {hf.get('model_type')!r}: only DeepSeek-v1 MoE "
                          f"('{HF_MODEL_TYPE}', DeepseekForCausalLM) converts; DeepSeek-V2/V3 use MLA attention")
    for key, want in REQUIRED.items():
        if hf.get(key, want) != want:
            raise ConfigError(f"config.json {key} = {hf[key]!r} is not supported (needs {want!r})")
    tables: dict[str, dict] = {"model": {}, "moe": {}}
    for hf_key, (section, key) in CONFIG_FIELDS.items():
        value = hf.get(hf_key, HF_DEFAULTS.get(hf_key))
        if value is not None:
            tables[section][key] = float(value) if key in ("rope_theta", "norm_eps", "init_std",
                                                              "aux_loss_alpha") else value
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    # bf16 checkpoints run in bf16; float32 and float16 ones in float32 (we do not compute in fp16).
    dtype = "bfloat16" if hf.get("torch_dtype") == "bfloat16" else "float32"
    return ModelConfig(**tables["model"], head_dim=head_dim, param_dtype=dtype, dtype=dtype,
                       moe=MoEConfig(**tables["moe"]))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF ``config.json`` dict of ``cfg`` (the keys the remote code reads)."""
    if cfg.moe is None or cfg.moe.routing != "softmax" or cfg.moe.device_aux_alpha or cfg.moe.capacity_factor:
        raise ConfigError("only DeepSeek-v1 models convert to HF: softmax routing, dropless, no device-level "
                          "balance loss, at least one MoE block")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise ConfigError(f"HF DeepSeek-v1 needs n_heads x head_dim = d_model ({cfg.n_heads} x {cfg.head_dim} "
                          f"!= {cfg.d_model})")
    ours = {"model": cfg, "moe": cfg.moe}
    hf = {hf_key: getattr(ours[section], key) for hf_key, (section, key) in CONFIG_FIELDS.items()}
    hf["num_key_value_heads"] = cfg.kv_heads
    return {"model_type": HF_MODEL_TYPE, "architectures": ["DeepseekForCausalLM"], **REQUIRED, **hf,
            "torch_dtype": cfg.param_dtype}


# ---- tensors -------------------------------------------------------------------------------


class Transform(NamedTuple):
    """HF array -> ours (``to_ours``) and back (``to_hf``); ``shape`` is the model's."""

    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Transform(lambda a, shape: a, lambda a: a)
LINEAR = Transform(lambda a, shape: a.T, lambda a: a.T)  # torch Linear stores [out, in]
HEADS_IN = Transform(lambda a, shape: a.T.reshape(shape), lambda a: a.reshape(a.shape[0], -1).T)  # q/k/v
HEADS_OUT = Transform(lambda a, shape: a.T.reshape(shape), lambda a: a.reshape(-1, a.shape[-1]).T)  # o_proj


class Tensor(NamedTuple):
    hf: str  # name pattern: {i} layer, {e} routed expert
    ours: str  # path in the params tree, '/'-separated, {i} layer
    transform: Transform
    where: str  # "all" blocks, "dense" (the first_k_dense), "moe" (the rest), "shared" (MoE with shared experts)
    experts: bool = False  # one HF tensor per routed expert, stacked on our first axis


TENSORS = (
    Tensor("model.embed_tokens.weight", "embed_VD", SAME, "all"),
    Tensor("model.norm.weight", "final_norm/scale_D", SAME, "all"),
    Tensor("lm_head.weight", "lm_head_DV", LINEAR, "all"),
    Tensor("model.layers.{i}.input_layernorm.weight", "layers/{i}/attn_norm/scale_D", SAME, "all"),
    Tensor("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/ffn_norm/scale_D", SAME, "all"),
    Tensor("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/w_q_DNH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/w_k_DKH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/w_v_DKH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/w_o_NHD", HEADS_OUT, "all"),
    Tensor("model.layers.{i}.mlp.gate_proj.weight", "layers/{i}/ffn/w_gate_DF", LINEAR, "dense"),
    Tensor("model.layers.{i}.mlp.up_proj.weight", "layers/{i}/ffn/w_up_DF", LINEAR, "dense"),
    Tensor("model.layers.{i}.mlp.down_proj.weight", "layers/{i}/ffn/w_down_FD", LINEAR, "dense"),
    Tensor("model.layers.{i}.mlp.gate.weight", "layers/{i}/ffn/w_router_DE", LINEAR, "moe"),
    Tensor("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "layers/{i}/ffn/w_gate_EDF", LINEAR, "moe", True),
    Tensor("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers/{i}/ffn/w_up_EDF", LINEAR, "moe", True),
    Tensor("model.layers.{i}.mlp.experts.{e}.down_proj.weight", "layers/{i}/ffn/w_down_EFD", LINEAR, "moe", True),
    Tensor("model.layers.{i}.mlp.shared_experts.gate_proj.weight", "layers/{i}/ffn/shared/w_gate_DF", LINEAR, "shared"),
    Tensor("model.layers.{i}.mlp.shared_experts.up_proj.weight", "layers/{i}/ffn/shared/w_up_DF", LINEAR, "shared"),
    Tensor("model.layers.{i}.mlp.shared_experts.down_proj.weight", "layers/{i}/ffn/shared/w_down_FD", LINEAR, "shared"),
)


def _layers(t: Tensor, cfg: ModelConfig) -> list[int | None]:
    if "{i}" not in t.hf:
        return [None]
    moe = range(cfg.first_k_dense, cfg.n_layers)
    shared = moe if cfg.moe is not None and cfg.moe.n_shared_experts else []
    return list({"all": range(cfg.n_layers), "dense": range(cfg.first_k_dense), "moe": moe, "shared": shared}[t.where])


def _entries(cfg: ModelConfig) -> Iterator[tuple[Tensor, int | None, tuple]]:
    """Every (tensor rule, layer, our path) the model of ``cfg`` has."""
    for t in TENSORS:
        for i in _layers(t, cfg):
            path = tuple(int(p) if p.isdigit() else p for p in t.ours.format(i=i).split("/"))
            yield t, i, path


def _unrolled(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=False)


def _unrolled_reader(read: Callable[[tuple], np.ndarray], cfg: ModelConfig) -> Callable[[tuple], np.ndarray]:
    """A reader of unrolled-layout paths over ``read``, a reader of ``cfg``'s scanned layout. It
    keeps the last stacked array it read: ``params_to_hf`` asks for the blocks of one parameter
    one after another, so each stacked array is read once."""
    stack_of = {i: (name, j) for name, blocks in layer_groups(cfg).items() for j, i in enumerate(blocks)}
    last: dict = {}

    def unrolled(path: tuple) -> np.ndarray:
        if path[0] != "layers":
            return read(path)
        name, j = stack_of[path[1]]
        stacked = (name, *path[2:])
        if last.get("path") != stacked:
            last.clear()
            last.update(path=stacked, array=np.asarray(read(stacked)))
        return last["array"][j]

    return unrolled


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model of ``cfg`` and its shape, in a fixed order (nothing allocated)."""
    shapes, out = param_shapes(_unrolled(cfg)), {}
    for t, i, path in _entries(cfg):
        s = get_path(shapes, path)
        one = jax.ShapeDtypeStruct(s.shape[1:] if t.experts else s.shape, s.dtype)
        hf_shape = jax.eval_shape(t.transform.to_hf, one).shape
        for e in range(s.shape[0]) if t.experts else [None]:
            out[t.hf.format(i=i, e=e)] = hf_shape
    return out


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of the model of ``cfg``, in a fixed order."""
    return list(hf_shapes(cfg))


def get_path(tree, path):
    """The node of nested dict ``tree`` at ``path``."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path, value) -> None:
    """Set the node of nested dict ``tree`` at ``path``, making the dicts on the way."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def params_from_hf(read: Callable[[str], np.ndarray], has: Callable[[str], bool], cfg: ModelConfig,
                   on_array: Callable[[tuple, np.ndarray], object] | None = None) -> dict:
    """Our params tree from HF tensors, one output array at a time: ``read(name)`` gives an HF
    tensor, ``has(name)`` says whether it exists (every name and shape is checked);
    ``on_array(path, array)`` (default: keep it) may write the array away and return what goes
    in the tree instead, so that only one output array need be in memory at a time. The tree
    is in the unrolled layout with ``on_array``, otherwise in ``cfg``'s."""
    out: dict = {}
    shapes, expected = param_shapes(_unrolled(cfg)), hf_shapes(cfg)

    def source(name: str) -> np.ndarray:
        if not has(name):
            raise ConversionError(f"the checkpoint has no tensor {name}")
        array = read(name)
        if tuple(array.shape) != expected[name]:
            raise ConversionError(f"tensor {name} has shape {tuple(array.shape)}, the config needs {expected[name]}")
        return array

    for t, i, path in _entries(cfg):
        shape = get_path(shapes, path).shape
        if t.experts:
            array = np.stack([t.transform.to_ours(source(t.hf.format(i=i, e=e)), shape[1:]) for e in range(shape[0])])
        else:
            array = t.transform.to_ours(source(t.hf.format(i=i)), shape)
        set_path(out, path, on_array(path, array) if on_array else array)
    return out if on_array else match_layout(out, cfg)


def params_to_hf(params: dict | Callable[[tuple], np.ndarray], cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor, in ``hf_names`` order. ``params`` is our params tree, or
    a function from a param path of ``cfg``'s layout to its array (read one parameter at a time)."""
    if callable(params):
        read = _unrolled_reader(params, cfg) if cfg.scan_layers else params
    else:
        unrolled = match_layout(params, _unrolled(cfg))
        read = lambda path: get_path(unrolled, path)
    for t, i, path in _entries(cfg):
        array = np.asarray(read(path))
        if t.experts:
            for e in range(array.shape[0]):
                yield t.hf.format(i=i, e=e), np.ascontiguousarray(t.transform.to_hf(array[e]))
        else:
            yield t.hf.format(i=i), np.ascontiguousarray(t.transform.to_hf(array))
