"""The HF formats as data: DeepSeek v1 (``deepseek``), V2 (``deepseek_v2``), V3 (``deepseek_v3``),
and the dynamic-routing models of arXiv 2403.07652 (Dynamic_MoE: ``llama`` with ``num_experts``).

Each model type is one ``HFFormat``: its config fields (HF key -> our section and key, the
values it must hold, the defaults of keys older files lack) and its tensor names (``Tensor``: HF
name pattern -> our param path and the per-tensor transform). Everything else walks these
tables; there is no per-tensor ``if``. Which format a config is written in follows from its
values: multi-head attention is v1, MLA with softmax scores V2, MLA with sigmoid scores V3, top-p
routing Dynamic_MoE.

``Tensor`` paths name our params in the unrolled layout (one subtree per block, as HF has them);
a model with ``scan_layers`` is converted through it (``model.match_layout``).

Shape legend: D model width, F hidden width, E routed experts, N heads, K kv heads, H head
width, V vocabulary; MLA (``mla.py``): Q query latent, A = C + P key latent and rope key,
C key/value latent, J query/key head width, X = key + value head widths, W value head width.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import numpy as np

from dsmoe_jax import errors, fp8
from dsmoe_jax.config import ModelConfig, config_from_dict
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.fp8 import SCALE_SUFFIX, Fp8Weight
from dsmoe_jax.model import layer_groups, match_layout, param_shapes, unrolled

# ConversionError was importable from here; errors.py holds it (until 0.4 it resolves here too)
__getattr__ = errors.moved_errors(__name__, "ConversionError")

# ---- config --------------------------------------------------------------------------------

# HF config key -> (section, our key), shared by every format; a missing HF key keeps our default.
COMMON_FIELDS = {
    "vocab_size": ("model", "vocab_size"), "hidden_size": ("model", "d_model"),
    "num_hidden_layers": ("model", "n_layers"), "num_attention_heads": ("model", "n_heads"),
    "intermediate_size": ("model", "d_ff"), "first_k_dense_replace": ("model", "first_k_dense"),
    "max_position_embeddings": ("model", "max_seq_len"), "rms_norm_eps": ("model", "norm_eps"),
    "initializer_range": ("model", "init_std"),
    "n_routed_experts": ("moe", "n_routed_experts"), "n_shared_experts": ("moe", "n_shared_experts"),
    "num_experts_per_tok": ("moe", "top_k"), "moe_intermediate_size": ("moe", "expert_d_ff"),
    "norm_topk_prob": ("moe", "norm_topk_prob"), "aux_loss_alpha": ("moe", "aux_loss_alpha"),
    "seq_aux": ("moe", "seq_aux"),
}
# the fields V2 and V3 add: MLA's widths and the router's scaling and group limit
V2_V3_FIELDS = {
    "kv_lora_rank": ("mla", "kv_lora_rank"), "qk_nope_head_dim": ("mla", "qk_nope_head_dim"),
    "qk_rope_head_dim": ("mla", "qk_rope_head_dim"), "v_head_dim": ("mla", "v_head_dim"),
    "q_lora_rank": ("mla", "q_lora_rank"),  # null in the file: no query compression, our 0
    "routed_scaling_factor": ("moe", "routed_scaling_factor"), "n_group": ("moe", "n_group"),
    "topk_group": ("moe", "topk_group"),
}
# V3's multi-token prediction: its depths are the blocks after the model's (model.layers.{n_layers + k})
V3_FIELDS = {**V2_V3_FIELDS, "num_nextn_predict_layers": ("model", "mtp_depth")}
# rope_scaling (the released files) or rope_parameters (files transformers writes) -> [yarn]
YARN_FIELDS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len",
               "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
               "mscale_all_dim": "mscale_all_dim"}
# HF keys every config.json has: the architecture's sizes.
ESSENTIAL = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# HF keys whose other values describe a model this code does not implement.
COMMON_REQUIRED = {"moe_layer_freq": 1, "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
                   "pretraining_tp": 1, "mlp_bias": False}


class HFFormat(NamedTuple):
    """One HF model type: its config fields and tensor names."""

    model_type: str
    architecture: str
    fields: dict  # HF key -> (section, our key)
    required: dict  # HF key -> the only value it may have (written on export)
    fixed: dict  # (section, our key) -> value every model of this type has
    defaults: dict  # HF key -> its value when the file leaves it out
    tensors: tuple  # of Tensor
    written: dict  # HF key -> value, written on export only
    same: dict = {}  # (section, our key) -> HF key of ``fields`` whose value it also takes (one width for two uses)


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for an HF ``config.json`` (DeepSeek v1, V2, V3, or Dynamic_MoE); anything
    else is a clear error."""
    fmt = _format_of_file(hf)
    missing = [key for key in ESSENTIAL if key not in hf]
    if missing:  # no default can stand in for these: the file is damaged (the pipeline says so)
        raise KeyError(missing[0])
    for key, want in fmt.required.items():
        if hf.get(key, want) != want:
            raise ConfigError(f"config.json {key} = {hf[key]!r} is not supported by {fmt.model_type} (needs {want!r})")
    tables: dict[str, dict] = {"model": {}, "moe": {}}
    for (section, key), value in fmt.fixed.items():
        tables.setdefault(section, {})[key] = value
    for hf_key, (section, key) in fmt.fields.items():
        value = hf.get(hf_key, fmt.defaults.get(hf_key))
        if value is not None:
            tables.setdefault(section, {})[key] = value
    for (section, key), hf_key in fmt.same.items():
        tables[section][key] = tables[fmt.fields[hf_key][0]][fmt.fields[hf_key][1]]
    if fmt.model_type in GROUP_METHODS:
        tables["moe"].update(_group_routing_from_hf(hf, fmt))
        yarn = _yarn_from_hf(hf)
        if yarn:
            tables["yarn"] = yarn
    tables["model"].setdefault("rope_theta", _rope_theta(hf))  # unless the format fixes it
    # bf16 checkpoints run in bf16; float32, float16 and FP8 ones in float32 (no fp16 or fp8 compute)
    dtype = "bfloat16" if hf.get("torch_dtype", hf.get("dtype")) == "bfloat16" else "float32"
    tables["model"].update(param_dtype=dtype, dtype=dtype)
    return config_from_dict(tables).model


def _format_of_file(hf: dict) -> HFFormat:
    """The format of a ``config.json``: by its model_type, and for ``llama`` by Dynamic_MoE's keys
    (a dense Llama has no routed experts to convert)."""
    fmt = FORMATS.get(hf.get("model_type"))
    if fmt is None:
        raise ConfigError(f"unsupported model_type {hf.get('model_type')!r}: dsmoe-jax converts "
                          f"{', '.join(repr(t) for t in FORMATS)} (DeepSeek-MoE v1, DeepSeek-V2/V2-Lite, "
                          "DeepSeek-V3/R1/Moonlight, and Dynamic_MoE's top-p models as 'llama')")
    if fmt is DYNAMIC and not (isinstance(hf.get("num_experts"), int) and hf["num_experts"] > 0):
        raise ConfigError(f"model_type 'llama' with num_experts = {hf.get('num_experts')!r}: dsmoe-jax converts "
                          "Dynamic_MoE's llama-typed MoE files (num_experts > 0, top_p_threshold), not dense Llama "
                          "models")
    return fmt


def _rope(hf: dict) -> dict:
    return hf.get("rope_scaling") or hf.get("rope_parameters") or {}


def _rope_theta(hf: dict) -> float:
    return float(hf.get("rope_theta", _rope(hf).get("rope_theta", 10000.0)))


def _yarn_from_hf(hf: dict) -> dict:
    rope = _rope(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "yarn":
        raise ConfigError(f"config.json rope scaling {kind!r} is not supported: only 'yarn' (DeepSeek-V2/V3's) is")
    return {ours: rope[key] for key, ours in YARN_FIELDS.items() if rope.get(key) is not None}


def _group_routing_from_hf(hf: dict, fmt: HFFormat) -> dict:
    """V2's ``topk_method`` 'greedy' ignores n_group / topk_group; the others use them."""
    method = hf.get("topk_method", fmt.defaults.get("topk_method"))
    if method not in GROUP_METHODS[fmt.model_type]:
        raise ConfigError(f"config.json topk_method {method!r} is not supported by {fmt.model_type} (one of "
                          f"{', '.join(GROUP_METHODS[fmt.model_type])})")
    return {"n_group": 1, "topk_group": 1} if method == "greedy" or not hf.get("n_group") else {}


def format_for(cfg: ModelConfig) -> HFFormat:
    """The HF format a model of ``cfg`` is written in: v1 for multi-head attention, V2 for MLA
    with softmax scores, V3 for MLA with sigmoid scores (and the score bias and multi-token
    prediction V3 files carry), Dynamic_MoE for top-p routing."""
    fmt = _format_of(cfg)
    if cfg.mtp_depth and fmt is not V3:
        raise ConfigError(f"only DeepSeek-V3 files carry multi-token-prediction depths, and this model converts as "
                          f"{fmt.model_type}: set model.mtp_depth = 0 to export it without them")
    return fmt


def _format_of(cfg: ModelConfig) -> HFFormat:
    m = cfg.moe
    if m is not None and m.routing == "top_p":
        return _dynamic_format(cfg)
    if (m is None or m.routing == "hash" or m.device_aux_alpha or m.capacity_factor
            or cfg.yarn and cfg.mla is None or cfg.moe_layers != tuple(range(cfg.first_k_dense, cfg.n_layers))):
        raise ConfigError("this model has no HF DeepSeek format: HF models are dropless, with top-k score-based "
                          "routing (or top-p routing: Dynamic_MoE's files), no device-level balance loss, at least "
                          "one MoE block and every block past first_k_dense an MoE block (model.moe_layer_freq = 1), "
                          "and RoPE scaling only with MLA")
    if cfg.mla is None:
        if m.routing != "softmax" or m.n_group > 1 or m.routed_scaling_factor != 1 or m.score_bias:
            raise ConfigError("multi-head attention models convert as DeepSeek-v1, which routes by plain softmax "
                              "top-k: no sigmoid, group limit, routed_scaling_factor or score bias")
        if cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ConfigError(f"HF DeepSeek-v1 needs n_heads x head_dim = d_model ({cfg.n_heads} x {cfg.head_dim} "
                              f"!= {cfg.d_model})")
        return V1
    if m.routing == "sigmoid":
        if not m.score_bias or m.group_score != "top2_sum":
            raise ConfigError("MLA with sigmoid scores converts as DeepSeek-V3, whose router always has the score bias "
                              "(e_score_correction_bias) and scores groups by their top-2 sum: set moe.score_bias = "
                              "true (bias_update_speed 0 keeps it at zero) and moe.group_score = 'top2_sum'")
        return V3
    if m.score_bias or m.group_score != "max":
        raise ConfigError("MLA with softmax scores converts as DeepSeek-V2, which has no score bias and scores groups "
                          "by their best expert: set moe.score_bias = false and moe.group_score = 'max'")
    return V2


def _dynamic_format(cfg: ModelConfig) -> HFFormat:
    """Dynamic_MoE's modeling code (ZhenweiAn/Dynamic_MoE) has one fixed architecture around the
    top-p router; a model this code would run differently is refused with what to change."""
    m = cfg.moe
    wanted = {
        "multi-head attention (no MLA, model.n_kv_heads = n_heads, head_dim = d_model / n_heads)":
            cfg.mla is None and cfg.kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.d_model,
        "RoPE at base 10000 without scaling (their rotary embedding ignores rope_theta)":
            cfg.rope_theta == 10000.0 and cfg.yarn is None,
        "routed experts as wide as the dense FFN (moe.expert_d_ff = model.d_ff)": m.expert_d_ff == cfg.d_ff,
        "no shared experts": m.n_shared_experts == 0,
        "an MoE block every moe_layer_freq-th block from block 0 (first_k_dense = 0, moe_layer_offset = 0)":
            cfg.first_k_dense == 0 and cfg.moe_layer_offset == 0,
        "the raw probabilities as gates, without a cap (norm_topk_prob false, routed_scaling_factor 1, "
        "max_experts 0)": not m.norm_topk_prob and m.routed_scaling_factor == 1 and not m.max_experts,
        "dropless routing, no device-level loss, no multi-token prediction":
            not m.capacity_factor and not m.device_aux_alpha and not cfg.mtp_depth,
    }
    missing = [what for what, holds in wanted.items() if not holds]
    if missing:
        raise ConfigError(f"top-p models convert as Dynamic_MoE's files, whose model needs {'; '.join(missing)}")
    return DYNAMIC


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF ``config.json`` dict of ``cfg``, in the format ``format_for`` picks."""
    fmt = format_for(cfg)
    sections = {"model": cfg, "moe": cfg.moe, "mla": cfg.mla}
    hf = {hf_key: getattr(sections[section], key) for hf_key, (section, key) in fmt.fields.items()}
    hf.update(fmt.written, num_key_value_heads=cfg.kv_heads, rope_theta=cfg.rope_theta)
    if fmt in (V2, V3):
        hf["q_lora_rank"] = cfg.mla.q_lora_rank or None
        hf["topk_method"] = GROUP_METHODS[fmt.model_type][-1 if cfg.moe.n_group > 1 else 0]
        if cfg.yarn is not None:
            yarn = {key: getattr(cfg.yarn, ours) for key, ours in YARN_FIELDS.items()}
            hf["rope_scaling"] = {"type": "yarn", **yarn}
    if cfg.fp8_weights:  # as DeepSeek-V3's files declare their FP8 weights
        hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
    return {"model_type": fmt.model_type, "architectures": [fmt.architecture], **fmt.required, **hf,
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
    ours: str  # path in the params tree, '/'-separated, {i} layer ({k}: MTP depth)
    transform: Transform
    where: str  # "all" blocks, "dense" or "moe" blocks (ModelConfig.moe_layers), "shared" (MoE with shared experts)
    experts: bool = False  # one HF tensor per routed expert, stacked on our first axis
    when: str = "always"  # a key of WHEN: models that have this tensor
    copy: bool = False  # the file's copy of a tensor the model shares (V3's MTP embedding and head): written on
    # export, not read on import
    derived: Callable[[ModelConfig], np.ndarray] | None = None  # a buffer computed from the config, no param:
    # written on export, not read on import (``ours`` is empty)


def _rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The rotary frequencies a LLaMA-style attention keeps as a saved buffer, computed in float32
    as torch computes them (1 / base^(2j / head_dim))."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(cfg.head_dim)
    return (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponents)).astype(np.float32)


WHEN = {"always": lambda cfg: True, "q_lora": lambda cfg: cfg.mla.q_lora_rank > 0,
        "q_direct": lambda cfg: cfg.mla.q_lora_rank == 0}

EDGES = (
    Tensor("model.embed_tokens.weight", "embed_VD", SAME, "all"),
    Tensor("model.norm.weight", "final_norm/scale_D", SAME, "all"),
    Tensor("lm_head.weight", "lm_head_DV", LINEAR, "all"),
    Tensor("model.layers.{i}.input_layernorm.weight", "layers/{i}/attn_norm/scale_D", SAME, "all"),
    Tensor("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/ffn_norm/scale_D", SAME, "all"),
)
MHA = (
    Tensor("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/w_q_DNH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.k_proj.weight", "layers/{i}/attn/w_k_DKH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.v_proj.weight", "layers/{i}/attn/w_v_DKH", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/w_o_NHD", HEADS_OUT, "all"),
)
MLA = (
    Tensor("model.layers.{i}.self_attn.q_proj.weight", "layers/{i}/attn/w_q_DNJ", HEADS_IN, "all", when="q_direct"),
    Tensor("model.layers.{i}.self_attn.q_a_proj.weight", "layers/{i}/attn/w_q_a_DQ", LINEAR, "all", when="q_lora"),
    Tensor("model.layers.{i}.self_attn.q_a_layernorm.weight", "layers/{i}/attn/q_norm/scale_D", SAME, "all",
           when="q_lora"),
    Tensor("model.layers.{i}.self_attn.q_b_proj.weight", "layers/{i}/attn/w_q_b_QNJ", HEADS_IN, "all", when="q_lora"),
    Tensor("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "layers/{i}/attn/w_kv_a_DA", LINEAR, "all"),
    Tensor("model.layers.{i}.self_attn.kv_a_layernorm.weight", "layers/{i}/attn/kv_norm/scale_D", SAME, "all"),
    Tensor("model.layers.{i}.self_attn.kv_b_proj.weight", "layers/{i}/attn/w_kv_b_CNX", HEADS_IN, "all"),
    Tensor("model.layers.{i}.self_attn.o_proj.weight", "layers/{i}/attn/w_o_NWD", HEADS_OUT, "all"),
)
FFN = (
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
# Dynamic_MoE: v1's names but for LLaMA's norms (input_norm, post_attention_norm) and an FFN module
# around either the dense MLP (mlp.mlp) or the router and experts; no shared experts; and each
# attention's saved rotary frequencies
DYNAMIC_NAMES = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
                 "mlp.gate_proj": "mlp.mlp.gate_proj", "mlp.up_proj": "mlp.mlp.up_proj",
                 "mlp.down_proj": "mlp.mlp.down_proj", "mlp.gate.weight": "mlp.router.weight"}


def _renamed(tensors: tuple, names: dict[str, str]) -> tuple:
    """``tensors`` with each HF name's parts renamed by ``names`` (whole dotted parts only)."""
    def rename(hf: str) -> str:
        for old, new in names.items():
            hf = re.sub(rf"(?<=\.){re.escape(old)}(?=\.|$)", new, hf)
        return hf

    return tuple(t._replace(hf=rename(t.hf)) for t in tensors)


DYNAMIC_TENSORS = (
    *_renamed(EDGES + MHA, DYNAMIC_NAMES),
    Tensor("model.layers.{i}.self_attn.rotary_emb.inv_freq", "", SAME, "all", derived=_rope_frequencies),
    *_renamed(tuple(t for t in FFN if t.where != "shared"), DYNAMIC_NAMES),
)
SCORE_BIAS = (Tensor("model.layers.{i}.mlp.gate.e_score_correction_bias", "layers/{i}/ffn/score_bias_E", SAME, "moe"),)
# An MTP depth's own tensors ({i}: its HF block index); its transformer block's follow the block rules.
MTP = (
    Tensor("model.layers.{i}.enorm.weight", "mtp/{k}/embed_norm/scale_D", SAME, "mtp"),
    Tensor("model.layers.{i}.hnorm.weight", "mtp/{k}/hidden_norm/scale_D", SAME, "mtp"),
    Tensor("model.layers.{i}.eh_proj.weight", "mtp/{k}/w_proj_CD", LINEAR, "mtp"),
    Tensor("model.layers.{i}.shared_head.norm.weight", "mtp/{k}/head_norm/scale_D", SAME, "mtp"),
    Tensor("model.layers.{i}.embed_tokens.weight", "embed_VD", SAME, "mtp", copy=True),
    Tensor("model.layers.{i}.shared_head.head.weight", "lm_head_DV", LINEAR, "mtp", copy=True),
)

V1 = HFFormat(
    "deepseek", "DeepseekForCausalLM",
    fields={**COMMON_FIELDS, "num_key_value_heads": ("model", "n_kv_heads")},
    required={**COMMON_REQUIRED, "scoring_func": "softmax", "rope_scaling": None},
    fixed={("moe", "routing"): "softmax"},
    defaults={"aux_loss_alpha": 0.001, "seq_aux": True},  # copies of the released 16B config.json differ on these
    tensors=EDGES + MHA + FFN, written={})
V2 = HFFormat(
    "deepseek_v2", "DeepseekV2ForCausalLM",
    fields={**COMMON_FIELDS, **V2_V3_FIELDS},
    required={**COMMON_REQUIRED, "scoring_func": "softmax"},
    fixed={("moe", "routing"): "softmax", ("moe", "group_score"): "max"},
    defaults={"aux_loss_alpha": 0.001, "seq_aux": True, "topk_method": "greedy"},
    tensors=EDGES + MLA + FFN, written={})
V3 = HFFormat(
    "deepseek_v3", "DeepseekV3ForCausalLM",
    fields={**COMMON_FIELDS, **V3_FIELDS},
    required={**COMMON_REQUIRED, "scoring_func": "sigmoid", "rope_interleave": True},
    fixed={("moe", "routing"): "sigmoid", ("moe", "group_score"): "top2_sum", ("moe", "score_bias"): True},
    defaults={"norm_topk_prob": True, "topk_method": "noaux_tc", "num_nextn_predict_layers": 0},
    tensors=EDGES + MLA + FFN + SCORE_BIAS + MTP,
    written={})
DYNAMIC = HFFormat(
    "llama", "MoEForCausalLM",
    fields={**{k: COMMON_FIELDS[k] for k in ESSENTIAL + ("max_position_embeddings", "rms_norm_eps",
                                                         "initializer_range")},
            "num_experts": ("moe", "n_routed_experts"), "top_p_threshold": ("moe", "top_p"),
            "expert_frequency": ("model", "moe_layer_freq"),
            "experts_topk": ("moe", "top_k")},  # in their config, unused by their router
    required={"tie_word_embeddings": False, "hidden_act": "silu", "pretraining_tp": 1, "rope_scaling": None},
    # their rotary embedding is built at base 10000 whatever rope_theta says; no balance loss in their code
    fixed={("moe", "routing"): "top_p", ("moe", "n_shared_experts"): 0, ("model", "first_k_dense"): 0,
           ("model", "rope_theta"): 10000.0},
    defaults={"rms_norm_eps": 1e-6, "expert_frequency": 2, "top_p_threshold": 0.4, "experts_topk": 2},
    tensors=DYNAMIC_TENSORS, written={}, same={("moe", "expert_d_ff"): "intermediate_size"})
FORMATS = {fmt.model_type: fmt for fmt in (V1, V2, V3, DYNAMIC)}
# the values of ``topk_method`` each MLA format knows: without and with the group limit
GROUP_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}


def _layers(t: Tensor, cfg: ModelConfig) -> list[int | None]:
    if "{i}" not in t.hf:
        return [None]
    moe = cfg.moe_layers
    shared = moe if cfg.moe is not None and cfg.moe.n_shared_experts else []
    dense = [i for i in range(cfg.n_layers) if i not in moe]
    return list({"all": range(cfg.n_layers), "dense": dense, "moe": moe, "shared": shared, "mtp": []}[t.where])


def _mtp_block(t: Tensor, cfg: ModelConfig) -> bool:
    """Whether a block rule applies to the MTP depths' blocks: MoE ones when the model has MoE blocks."""
    moe = cfg.n_moe_layers > 0
    return "{i}" in t.hf and (t.where == "all" or t.where == ("moe" if moe else "dense")
                              or t.where == "shared" and moe and cfg.moe.n_shared_experts > 0)


def _entries(cfg: ModelConfig) -> Iterator[tuple[Tensor, int | None, tuple]]:
    """Every (tensor rule, layer, our path) the model of ``cfg`` has: the model's blocks, then each
    MTP depth k as HF block ``n_layers + k`` (its own tensors, then its transformer block's)."""
    path_of = lambda ours: tuple(int(p) if p.isdigit() else p for p in ours.split("/"))
    tensors = [t for t in format_for(cfg).tensors if WHEN[t.when](cfg)]
    for t in tensors:
        for i in _layers(t, cfg):
            yield t, i, path_of(t.ours.format(i=i))
    for k in range(cfg.mtp_depth):
        for t in tensors:
            if t.where == "mtp":
                yield t, cfg.n_layers + k, path_of(t.ours.format(k=k))
        for t in tensors:
            if t.where != "mtp" and _mtp_block(t, cfg):  # layers/{i}/X -> mtp/{k}/block/X
                yield t, cfg.n_layers + k, path_of(f"mtp/{k}/block/" + t.ours.split("/", 2)[2])


def _unrolled_reader(read: Callable[[tuple], np.ndarray], cfg: ModelConfig) -> Callable[[tuple], np.ndarray]:
    """A reader of unrolled-layout paths over ``read``, a reader of ``cfg``'s scanned layout. It
    keeps the last stacked array it read: ``params_to_hf`` asks for the blocks of one parameter
    one after another, so each stacked array is read once."""
    stack_of = {i: (name, j) for name, blocks in layer_groups(cfg).items() for j, i in enumerate(blocks)}
    last: dict = {}

    def read_unrolled(path: tuple) -> np.ndarray:
        if path[0] != "layers":
            return read(path)
        name, j = stack_of[path[1]]
        stacked = (name, *path[2:])
        if last.get("path") != stacked:
            last.clear()
            last.update(path=stacked, array=jax.tree.map(np.asarray, read(stacked)))
        return last["array"][j]

    return read_unrolled


def hf_shapes(cfg: ModelConfig, scales: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model of ``cfg`` and its shape, in a fixed order (nothing allocated);
    with ``scales``, each FP8 weight (``model.fp8_weights``) followed by its ``*_scale_inv``."""
    shapes, out = param_shapes(unrolled(cfg)), {}
    for t, i, path in _entries(cfg):
        if t.derived:
            out[t.hf.format(i=i)] = t.derived(cfg).shape
            continue
        leaf = get_path(shapes, path)
        one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:] if t.experts else s.shape, s.dtype), leaf)
        hf = jax.eval_shape(functools.partial(_to_hf, t.transform), one)
        for e in range(leaf.shape[0]) if t.experts else [None]:
            out[t.hf.format(i=i, e=e)] = hf.shape
            if scales and isinstance(hf, Fp8Weight):
                out[t.hf.format(i=i, e=e) + SCALE_SUFFIX] = hf.scale_inv.shape
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
    shapes, expected = param_shapes(unrolled(cfg)), hf_shapes(cfg)

    def source(name: str) -> np.ndarray:
        if not has(name):
            raise errors.ConversionError(f"the checkpoint has no tensor {name}")
        array = read(name)
        if tuple(array.shape) != expected[name]:
            raise errors.ConversionError(f"tensor {name} has shape {tuple(array.shape)}, the config needs "
                                         f"{expected[name]}")
        return array

    for t, i, path in _entries(cfg):
        if t.copy or t.derived:  # the model's own tensor, read once where the model keeps it; a buffer
            continue
        leaf = get_path(shapes, path)
        if t.experts:
            one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), leaf)  # an expert's
            parts = [as_leaf(_to_ours(t.transform, source(t.hf.format(i=i, e=e)), one), one, t.hf.format(i=i, e=e))
                     for e in range(leaf.shape[0])]
            array = jax.tree.map(lambda *a: np.stack(a), *parts)
        else:
            array = as_leaf(_to_ours(t.transform, source(t.hf.format(i=i)), leaf), leaf, t.hf.format(i=i))
        set_path(out, path, on_array(path, array) if on_array else array)
    return out if on_array else match_layout(out, cfg)


def params_to_hf(params: dict | Callable[[tuple], np.ndarray], cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor, in ``hf_names`` order. ``params`` is our params tree, or
    a function from a param path of ``cfg``'s layout to its array (read one parameter at a time)."""
    if callable(params):
        read = _unrolled_reader(params, cfg) if cfg.scan_layers else params
    else:
        tree = match_layout(params, unrolled(cfg))
        read = lambda path: get_path(tree, path)
    shapes = param_shapes(unrolled(cfg))
    for t, i, path in _entries(cfg):
        if t.derived:
            yield t.hf.format(i=i), t.derived(cfg)
            continue
        value = as_leaf(jax.tree.map(np.asarray, read(path)), get_path(shapes, path), "/".join(map(str, path)))
        for e in range(value.shape[0]) if t.experts else [None]:
            hf = _to_hf(t.transform, value[e] if t.experts else value)
            if isinstance(hf, Fp8Weight):
                yield t.hf.format(i=i, e=e), np.ascontiguousarray(hf.data)
                yield t.hf.format(i=i, e=e) + SCALE_SUFFIX, np.ascontiguousarray(hf.scale_inv)
            else:
                yield t.hf.format(i=i, e=e), np.ascontiguousarray(hf)


# ---- FP8 weights ---------------------------------------------------------------------------
# An HF FP8 weight is an ``Fp8Weight`` of its ``[out, in]`` matrix (blocks over rows, then
# columns); ours is of ``[*in, *out]``: the same bytes through the tensor's transform, the scales
# transposed (the transforms only transpose and reshape, so every block keeps its values).


def _to_ours(transform: Transform, hf, leaf):
    """An HF tensor (an array or an ``Fp8Weight``) in our layout, shaped as ``leaf``."""
    if not isinstance(hf, Fp8Weight):
        return transform.to_ours(hf, leaf.shape)
    n_in, n_out = (leaf.n_in, leaf.n_out) if isinstance(leaf, Fp8Weight) else _in_out(leaf.shape, hf.shape[1])
    return Fp8Weight(transform.to_ours(hf.data, leaf.shape), np.swapaxes(hf.scale_inv, -1, -2), n_in, n_out)


def _to_hf(transform: Transform, ours):
    """Our tensor (an array or an ``Fp8Weight``) in the HF layout."""
    if not isinstance(ours, Fp8Weight):
        return transform.to_hf(ours)
    return Fp8Weight(transform.to_hf(ours.data), ours.scale_inv.swapaxes(-1, -2))


def _in_out(shape: tuple[int, ...], n_in_values: int) -> tuple[int, int]:
    """How many leading axes of ``shape`` hold the ``n_in_values`` inputs of an HF ``[out, in]``
    matrix, and how many the outputs."""
    n_in = next(k for k in range(1, len(shape)) if math.prod(shape[:k]) == n_in_values)
    return n_in, len(shape) - n_in


def as_leaf(value, leaf, name: str = "a weight"):
    """``value`` as the model holds ``leaf``: an array is quantised where ``leaf`` is an FP8
    weight (``fp8.quantize``; a NaN or inf in it is named), an ``Fp8Weight`` dequantised where
    it is not; else unchanged."""
    if isinstance(leaf, Fp8Weight) and not isinstance(value, Fp8Weight):
        try:
            fp8.check_finite(name, value)
        except ValueError as e:
            raise errors.ConversionError(f"{e}; the checkpoint is damaged (or training diverged)") from None
        return jax.tree.map(np.asarray, fp8.quantize(value, leaf.n_in, leaf.n_out))
    if isinstance(value, Fp8Weight) and not isinstance(leaf, Fp8Weight):
        return np.asarray(fp8.dequantize(value))
    return value
