"""Configuration: small frozen dataclasses, one per concern, validated when built.

A config file is TOML with the sections ``[model]``, ``[moe]``, ``[mla]``, ``[yarn]``, ``[train]``,
``[data]`` and ``[mesh]``. ``[moe]`` (the FFN of the MoE blocks), ``[mla]`` (multi-head latent
attention) and ``[yarn]`` (rope scaling) live inside ``Config.model`` so that the model functions
need only a ``ModelConfig``. Every key is checked: an unknown key or a value
of the wrong type is a ``ConfigError`` naming the key and the valid ones, and impossible
combinations are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import pathlib
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dsmoe_jax import errors

DTYPES = ("float32", "bfloat16")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Values ``moe.backend`` accepts: "auto" and the grouped-MLP backends of ``grouped.py`` (and
# ``kernels/``). ``grouped.register_backend`` adds a new name here, so a config naming a backend
# registered before it is built validates like a built-in one.
GROUPED_BACKENDS = {"auto", "dense", "ragged", "tiled", "tiled_fp8", "triton"}
# ConfigError and DsmoeError were importable from here; errors.py holds them (until 0.4 they resolve here too)
__getattr__ = errors.moved_errors(__name__, "ConfigError", "DsmoeError")






def _require(ok: bool, message: str) -> None:
    if not ok:
        raise errors.ConfigError(message)


@dataclass(frozen=True)
class MoEConfig:
    """The DeepSeekMoE FFN: fine-grained routed experts plus always-on shared experts.

    ``capacity_factor = 0`` is dropless (the default); a positive value keeps at most
    ``ceil(capacity_factor * tokens * top_k / n_routed_experts)`` assignments per expert,
    GShard-style, and reports the dropped fraction.
    """

    n_routed_experts: int
    expert_d_ff: int
    n_shared_experts: int = 0
    top_k: int = 1
    # scores: softmax (v1, V2), sigmoid (V3), a token-id hash, or "top_p": softmax scores, each
    # token taking the fewest experts whose probabilities exceed moe.top_p (dynamic routing,
    # arXiv 2403.07652), at most moe.max_experts; moe.top_k is then unused
    routing: Literal["softmax", "sigmoid", "hash", "top_p"] = "softmax"
    top_p: float | None = None  # top-p routing's threshold (None: the paper's 0.4)
    max_experts: int = 0  # top-p routing's cap on experts per token (0: all routed experts)
    dynamic_loss_weight: float = 0.0  # top-p routing: beta x the mean entropy of the router's softmax
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0  # multiplies the gates (V2, V3)
    # group-limited routing (V2's group_limited_greedy, V3's noaux_tc): experts in n_group
    # contiguous groups; a token first keeps its topk_group best groups, scored by their best
    # expert ("max") or the sum of their best two ("top2_sum"), then picks top_k inside them
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    # auxiliary-loss-free balancing (V3): a per-expert bias added to the scores for choosing the
    # experts only (gates use the unbiased scores); after each training step
    # b_i += bias_update_speed * sign(mean load - load_i). 0 keeps the bias as it is.
    score_bias: bool = False
    bias_update_speed: float = 0.0
    capacity_factor: float = 0.0
    aux_loss_alpha: float = 0.0  # a1, expert-level balance
    device_aux_alpha: float = 0.0  # a2, device-level balance
    device_groups: int = 0  # D contiguous expert groups; 0 = one per expert-parallel device of the mesh
    seq_aux: bool = False  # balance statistics per sequence, then averaged (the released 16B)
    backend: str = "auto"  # grouped MLP backend, see dsmoe_jax.grouped

    def __post_init__(self):
        _require(self.n_routed_experts >= 1, f"moe.n_routed_experts must be >= 1, got {self.n_routed_experts}")
        _require(self.n_shared_experts >= 0, f"moe.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _require(self.expert_d_ff >= 1, f"moe.expert_d_ff must be >= 1, got {self.expert_d_ff}")
        _require(
            1 <= self.top_k <= self.n_routed_experts,
            f"moe.top_k={self.top_k} must be between 1 and moe.n_routed_experts={self.n_routed_experts}",
        )
        _require(
            self.routing != "hash" or self.top_k == 1,
            f"hash routing sends each token to exactly one expert; set moe.top_k = 1 (got {self.top_k})",
        )
        top_p = self.routing == "top_p"
        _require(self.top_p is None or top_p, f"moe.top_p = {self.top_p} is the threshold of top-p routing; set "
                 f"moe.routing = 'top_p' (routing is {self.routing!r})")
        _require(self.top_p is None or 0 < self.top_p <= 1,
                 f"moe.top_p must be in (0, 1] (a share of the router's probability), got {self.top_p}")
        _require(not self.max_experts or top_p, f"moe.max_experts caps top-p routing; with {self.routing!r} routing "
                 "moe.top_k sets the experts per token")
        _require(0 <= self.max_experts <= self.n_routed_experts, f"moe.max_experts must be between 1 and "
                 f"moe.n_routed_experts={self.n_routed_experts} (0: no cap), got {self.max_experts}")
        _require(self.dynamic_loss_weight >= 0, f"moe.dynamic_loss_weight must be >= 0, got {self.dynamic_loss_weight}")
        _require(not self.dynamic_loss_weight or top_p, "moe.dynamic_loss_weight weighs top-p routing's entropy "
                 f"loss; with {self.routing!r} routing it has nothing to weigh")
        _require(not (top_p and (self.score_bias or self.n_group > 1)),
                 "top-p routing takes experts by their softmax probability alone: group-limited routing "
                 "(moe.n_group > 1) and the balancing bias (moe.score_bias) change which experts are taken, not "
                 "their probabilities, and have no threshold to meet; set moe.n_group = 1 and moe.score_bias = false")
        _require(self.bias_update_speed >= 0, f"moe.bias_update_speed must be >= 0, got {self.bias_update_speed}")
        _require(self.score_bias or not self.bias_update_speed,
                 "moe.bias_update_speed updates the score bias, which moe.score_bias = false leaves out; set "
                 "moe.score_bias = true")
        _require(not (self.score_bias and self.routing == "hash"), "hash routing has no scores to bias; set "
                 "moe.score_bias = false")
        _require(self.routed_scaling_factor > 0,
                 f"moe.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        _require(
            self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
            f"moe.n_group={self.n_group} must be >= 1 and divide moe.n_routed_experts={self.n_routed_experts}",
        )
        if self.n_group > 1:
            per_group = self.n_routed_experts // self.n_group
            _require(1 <= self.topk_group <= self.n_group,
                     f"moe.topk_group={self.topk_group} must be between 1 and moe.n_group={self.n_group}")
            _require(self.top_k <= self.topk_group * per_group,
                     f"moe.top_k={self.top_k} experts cannot be chosen from moe.topk_group={self.topk_group} groups "
                     f"of {per_group}; raise topk_group or lower top_k")
            _require(self.group_score != "top2_sum" or per_group >= 2,
                     f"moe.group_score 'top2_sum' needs groups of at least 2 experts, got {per_group}")
            _require(self.routing != "hash", "hash routing has no scores to limit by group; set moe.n_group = 1")
        _require(self.capacity_factor >= 0,
                 f"moe.capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
        _require(
            self.aux_loss_alpha >= 0 and self.device_aux_alpha >= 0,
            "moe.aux_loss_alpha and moe.device_aux_alpha must be >= 0",
        )
        _require(
            self.device_groups >= 0 and (self.device_groups == 0 or self.n_routed_experts % self.device_groups == 0),
            f"moe.device_groups={self.device_groups} must divide moe.n_routed_experts={self.n_routed_experts}",
        )
        _require(
            self.backend in GROUPED_BACKENDS,
            f"unknown moe.backend {self.backend!r}; valid: {', '.join(sorted(GROUPED_BACKENDS))} (or a name "
            "added with dsmoe_jax.register_backend before the config is built)",
        )


    @property
    def slots(self) -> int:
        """Experts a token can activate: ``top_k``, or top-p routing's cap."""
        return (self.max_experts or self.n_routed_experts) if self.routing == "top_p" else self.top_k

    @property
    def threshold(self) -> float:
        """Top-p routing's threshold: ``top_p``, or the paper's 0.4."""
        return 0.4 if self.top_p is None else self.top_p

@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): every head's keys and values are expanded
    from one per-token latent of ``kv_lora_rank`` (plus one rope key of ``qk_rope_head_dim``
    shared by all heads), and that latent and key are all an inference cache holds. Queries go
    through a ``q_lora_rank`` bottleneck, or straight from the model width when it is 0 (V2-Lite).
    """

    kv_lora_rank: int
    qk_nope_head_dim: int  # per head, the query/key part without position
    qk_rope_head_dim: int  # per head (queries) and shared (the key), the part rotated by RoPE
    v_head_dim: int
    q_lora_rank: int = 0

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) >= 1, f"mla.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.q_lora_rank >= 0, f"mla.q_lora_rank must be >= 0 (0 = no query compression), got "
                 f"{self.q_lora_rank}")
        _require(self.qk_rope_head_dim % 2 == 0, f"mla.qk_rope_head_dim must be even for rotary embeddings, got "
                 f"{self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class YarnConfig:
    """YaRN rope scaling (Peng et al. 2023) as DeepSeek-V2/V3 use it: frequencies interpolated by
    ``factor`` below the ``beta_slow``..``beta_fast`` rotation band of ``original_max_seq_len``,
    and the attention temperature corrected by ``mscale`` / ``mscale_all_dim``."""

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _require(self.factor >= 1, f"yarn.factor must be >= 1, got {self.factor}")
        _require(self.original_max_seq_len >= 1, f"yarn.original_max_seq_len must be >= 1, got "
                 f"{self.original_max_seq_len}")
        _require(self.beta_fast > self.beta_slow > 0, f"yarn needs beta_fast > beta_slow > 0, got {self.beta_fast} "
                 f"and {self.beta_slow}")
        _require(self.mscale >= 0 and self.mscale_all_dim >= 0, "yarn.mscale and yarn.mscale_all_dim must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: sizes, positions, dtypes; the MoE blocks' FFN in ``moe``.

    The first ``first_k_dense`` blocks use a dense SwiGLU of width ``d_ff``; the rest use
    DeepSeekMoE, or with ``moe_layer_freq`` = k only every k-th of them (block i with
    ``(i - moe_layer_offset) % k == 0``; the others dense). ``first_k_dense = n_layers`` is the
    dense baseline and needs no ``moe``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    head_dim: int | None = None  # None: d_model // n_heads, which must then divide evenly
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    first_k_dense: int = 0
    # an MoE block every moe_layer_freq-th block from moe_layer_offset on, past first_k_dense
    # (DeepSeek-V2's moe_layer_freq; Dynamic MoE's expert_frequency = 2: blocks 0, 2, 4, ...)
    moe_layer_freq: int = 1
    moe_layer_offset: int = 0
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    init_std: float = 0.006
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; the router and the logits are always float32
    remat: bool = False  # keep only each block's input for the backward pass; recompute the rest
    # run the blocks as a lax.scan over their stacked parameters (dense blocks, then MoE blocks),
    # so compile time no longer grows with depth; changes the params layout (model.match_layout)
    scan_layers: bool = False
    # attention over a sequence's own keys (dsmoe_jax.attention): "auto" is "blocked" on CPU and
    # cuDNN's flash attention on GPU; "cudnn" needs each row's real tokens contiguous
    attention: Literal["auto", "xla", "blocked", "cudnn"] = "auto"
    # multi-token prediction (DeepSeek-V3): depths of MTP blocks, each predicting one token further
    # ahead for the training loss (train.mtp_weight); 0: none
    mtp_depth: int = 0
    # hold the blocks' projection and expert matrices as float8_e4m3fn with a float32 scale per
    # 128 x 128 block (DeepSeek-V3's released format, ``dsmoe_jax.fp8``), dequantised at each
    # matmul: for serving (``convert hf-to-jax --keep-fp8``); training needs unquantised weights
    fp8_weights: bool = False
    # train with FP8 GEMMs (DeepSeek-V3's recipe, ``fp8.dot``): the projections' and experts'
    # matmuls, forward and backward, read e4m3 inputs scaled per 1 x 128 tile (activations,
    # gradients) and per 128 x 128 block (weights); embeddings, head, router, norms and attention
    # stay as they are. Emulated in float32 where the hardware has no FP8 (CPUs)
    fp8: bool = False
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None  # None: multi-head attention with n_kv_heads key/value heads
    yarn: YarnConfig | None = None  # None: plain RoPE

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.mla is not None:
            # MLA's heads have their own widths ([mla]); head_dim names the query/key head width
            _require(self.head_dim in (None, self.mla.qk_head_dim),
                     f"model.head_dim={self.head_dim} does not apply to MLA attention, whose query/key heads are "
                     f"mla.qk_nope_head_dim + mla.qk_rope_head_dim = {self.mla.qk_head_dim} wide; remove it")
            _require(self.n_kv_heads in (None, self.n_heads),
                     "model.n_kv_heads does not apply to MLA attention (every head expands its keys and values "
                     "from the shared latent); remove it")
            object.__setattr__(self, "head_dim", self.mla.qk_head_dim)
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                "change one, or give model.head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _require(self.head_dim >= 1, f"model.head_dim must be >= 1, got {self.head_dim}")
        _require(self.mla is not None or self.head_dim % 2 == 0,
                 f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        _require(
            self.n_heads % self.kv_heads == 0,
            f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}",
        )
        _require(
            0 <= self.first_k_dense <= self.n_layers,
            f"model.first_k_dense={self.first_k_dense} must be between 0 and model.n_layers={self.n_layers}",
        )
        _require(self.moe_layer_freq >= 1 and 0 <= self.moe_layer_offset < self.moe_layer_freq,
                 f"model.moe_layer_freq must be >= 1 and model.moe_layer_offset between 0 and moe_layer_freq - 1, got "
                 f"{self.moe_layer_freq} and {self.moe_layer_offset}")
        _require(
            self.moe is not None or not self.moe_layers,
            f"{len(self.moe_layers)} blocks are MoE blocks but there is no [moe] section; "
            "add one, or set model.first_k_dense = model.n_layers for a dense model",
        )
        _require(not self.scan_layers or self.moe_layers == tuple(range(self.n_dense_layers, self.n_layers)),
                 "model.scan_layers runs the dense blocks, then the MoE blocks, each group as one scan; MoE blocks "
                 f"interleaved with dense ones (model.moe_layer_freq = {self.moe_layer_freq}) need "
                 "model.scan_layers = false")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            _require(value in DTYPES, f"model.{name} must be one of {DTYPES}, got {value!r}")
        _require(self.norm_eps > 0 and self.init_std > 0, "model.norm_eps and model.init_std must be > 0")
        _require(not (self.fp8 and self.fp8_weights),
                 "model.fp8 trains with FP8 GEMMs from unquantised master weights; model.fp8_weights holds FP8 "
                 "weights for serving: set one of them")
        _require(not self.fp8 or self.moe is None or self.moe.backend in ("auto", "tiled", "tiled_fp8"),
                 f"model.fp8 runs the routed experts' GEMMs in FP8 on the tiled backend (the one grouped backend "
                 f"with FP8 GEMMs so far), not moe.backend = {self.moe.backend if self.moe else None!r}: set "
                 "moe.backend = 'auto'")
        _require(self.mtp_depth >= 0,
                 f"model.mtp_depth must be >= 0 (0: no multi-token prediction), got {self.mtp_depth}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The indices of the MoE blocks (the others are dense)."""
        return tuple(i for i in range(self.first_k_dense, self.n_layers)
                     if (i - self.moe_layer_offset) % self.moe_layer_freq == 0)

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers


def parse_init_from(value: str) -> tuple[str, int | None]:
    """``train.init_from`` as ``(directory, step)``: ``DIR@STEP`` names a step of a training
    workdir; anything else (an ``@`` not followed by digits included) is a directory, step None."""
    directory, at, step = value.strip().rpartition("@")
    if not (at and step.isdigit()):
        directory, step = value.strip(), None
    _require(bool(directory) and not directory.endswith("@"),
             f"train.init_from {value!r} must be a directory (a converted checkpoint or a training workdir) or "
             "DIR@STEP (a step of a training workdir)")
    return directory, None if step is None else int(step)


def parse_trainable(value: str) -> tuple[str, str | None]:
    """``train.trainable``: ``("all", None)`` or ``("esft", PATH)`` (an ``expert_cfg.json`` or a
    directory holding one)."""
    if value == "all":
        return "all", None
    kind, _, path = value.partition(":")
    _require(kind == "esft" and bool(path), f"train.trainable = {value!r}: expected 'all' or 'esft:PATH' (PATH an "
             "expert_cfg.json, e.g. from `dsmoe-jax esft-score`)")
    return kind, path


# What LoRA adapts (``train.lora.targets``): the projections of attention (q/k/v/o, or MLA's
# q/q_a/q_b/kv_a/kv_b/o), the dense blocks' FFN, the shared experts, the routed experts
LORA_TARGETS = ("attention", "dense_ffn", "shared_experts", "routed_experts")


@dataclass(frozen=True)
class LoRAConfig:
    """``[train.lora]``: low-rank adapters (Hu et al. 2021) on the ``targets``' weights, ``W +
    (alpha / rank) * B @ A`` with ``A`` [rank, in] and ``B`` [out, rank], the rest frozen
    (``dsmoe_jax.peft.lora``). ``rank = 0`` (the default) trains no adapter."""

    rank: int = 0
    alpha: float | None = None  # None: the rank, so that the scale alpha / rank is 1 whatever the rank
    dropout: float = 0.0  # on the adapters' input, as PEFT's lora_dropout; only 0 is supported yet
    targets: tuple[Literal["attention", "dense_ffn", "shared_experts", "routed_experts"], ...] = ("attention",)

    def __post_init__(self):
        _require(self.rank >= 0, f"train.lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        _require(self.alpha is None or self.alpha > 0, f"train.lora.alpha must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        # the forward runs on the merged weights W + s B A, where dropout on the adapters' input has no place
        _require(self.dropout == 0, f"train.lora.dropout = {self.dropout}: LoRA dropout is not supported yet (the "
                 "adapters are trained through their merged weights); set train.lora.dropout = 0")
        _require(len(self.targets) > 0 and len(set(self.targets)) == len(self.targets),
                 f"train.lora.targets must name each target once, at least one of {list(LORA_TARGETS)}; got "
                 f"{list(self.targets)}")

    @property
    def scale(self) -> float:
        """``alpha / rank``: what ``B @ A`` is multiplied by (PEFT's ``scaling``)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def lora_targets_absent(lora: LoRAConfig, cfg: ModelConfig) -> list[str]:
    """The ``train.lora.targets`` the model of ``cfg`` has no weight for, each with the reason."""
    moe = cfg.n_moe_layers > 0
    missing = {"dense_ffn": (cfg.n_dense_layers > 0, "no dense block (model.first_k_dense = 0, every block MoE)"),
               "shared_experts": (moe and cfg.moe.n_shared_experts > 0, "no shared experts (moe.n_shared_experts = 0 "
                                  "or no MoE block)"),
               "routed_experts": (moe, "no MoE block (model.first_k_dense = model.n_layers)")}
    return [f"{t!r} ({missing[t][1]})" for t in lora.targets if t in missing and not missing[t][0]]


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe: AdamW, warmup, then lr x ``decay_factor`` at each of ``decay_at``."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 2000
    schedule: Literal["step", "constant"] = "step"
    decay_at: tuple[float, ...] = (0.8, 0.9)  # fractions of train.steps
    decay_factor: float = 0.316
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_tokens: int = 65_536  # validation reads this many tokens, spread over the split; 0 = all of it
    log_every: int = 10
    seed: int = 0
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient: stop the run, or skip the step
    # seconds a step of a multi-process run may take (after the first, which compiles) before the
    # process stops, saying a peer has probably stopped and which checkpoint to resume from; 0 = never
    step_timeout: float = 900.0
    mtp_weight: float = 0.3  # weight of the multi-token-prediction loss (DeepSeek-V3: 0.3, later 0.1)
    # fine-tuning: start from the params (only: a fresh optimizer state, step 0) of a converted
    # checkpoint, a training workdir's latest step, or "DIR@STEP"; --resume ignores it (train/init_from.py)
    init_from: str | None = None
    # MTP depths on one side only of init_from: "match" refuses, "drop" leaves the checkpoint's
    # extra depths unread, "fresh" starts the run's extra depths from random initialisation
    init_mtp: Literal["match", "drop", "fresh"] = "match"
    # a finite dataset's passes: > 0 trains this many epochs (each reshuffled; train.steps is then
    # derived from the dataset's size); 0: train.steps decides
    epochs: int = 0
    # what fine-tuning trains: "all" parameters, or "esft:PATH", the routed experts an
    # expert_cfg.json names (dsmoe-jax esft-score writes one); the rest stays frozen (peft/tuning.py)
    trainable: str = "all"
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # [train.lora]: low-rank adapters, off by default

    def __post_init__(self):
        parse_trainable(self.trainable)
        _require(not (self.lora.rank and self.trainable != "all"),
                 f"train.lora.rank = {self.lora.rank} trains low-rank adapters with every weight frozen, and "
                 f"train.trainable = {self.trainable!r} trains some of those weights themselves: choose one (set "
                 "train.lora.rank = 0 for ESFT, or train.trainable = 'all' for LoRA)")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "eval_every", "log_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.init_from is not None:
            parse_init_from(self.init_from)
        _require(self.mtp_weight >= 0, f"train.mtp_weight must be >= 0, got {self.mtp_weight}")
        _require(self.epochs >= 0, f"train.epochs must be >= 0 (0: train.steps decides), got {self.epochs}")
        _require(self.step_timeout >= 0,
                 f"train.step_timeout must be >= 0 seconds (0: no limit), got {self.step_timeout}")
        _require(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1: it is how many of the newest "
                 f"checkpoints are kept, and with {self.keep_checkpoints} the trained model would be deleted")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.eval_tokens >= 0, f"train.eval_tokens must be >= 0 (0 = the whole split), got {self.eval_tokens}")
        _require(
            all(0 < f < 1 for f in self.decay_at) and list(self.decay_at) == sorted(self.decay_at),
            f"train.decay_at must be increasing fractions in (0, 1), got {list(self.decay_at)}",
        )


@dataclass(frozen=True)
class DataSource:
    """A named dataset: a source of a training mixture (``[[data.mix]]``, drawn in proportion to
    ``weight``) or a validation-only set (``[[data.val]]``, no weight). ``path`` is anything
    ``data.path`` takes, usually a ``dsmoe-jax prepare-data`` directory."""

    name: str
    path: str
    weight: float = 1.0

    def __post_init__(self):
        # the name becomes a metric key (val_loss/<name>): keep it to characters every logger takes
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
                 f"data source name {self.name!r} must be letters, digits, '_', '.' or '-' (it names the metric "
                 "val_loss/<name>)")
        _require(math.isfinite(self.weight) and self.weight > 0,
                 f"data source {self.name!r}: weight must be a finite number > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: the embedded corpus (``path`` unset), the user's files or a
    prepared dataset (``path``), or a weighted mixture of named sources (``mix``); ``val`` adds
    named validation-only sets, each evaluated and logged as ``val_loss/<name>``. ``path`` and
    ``mix`` together are refused when training starts (``data.load_training_data``), not here:
    evaluation may point ``path`` at other data for a run trained on a mixture."""

    path: str | None = None
    tokenizer: str = "byte"  # "byte" or a path to an HF tokenizer.json
    mix: tuple[DataSource, ...] = ()
    val: tuple[DataSource, ...] = ()
    # pretraining on a prepared dataset: each document its own segment (attention and the loss
    # stay inside it), as packed chat examples always are
    document_mask: bool = False
    # a chat example longer than train.seq_len + 1: cut it (and count it), or refuse the data
    long_examples: Literal["truncate", "error"] = "truncate"

    def __post_init__(self):
        names = [s.name for s in (*self.mix, *self.val)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        _require(not repeated, f"data source names must be unique across data.mix and data.val; repeated: "
                 f"{', '.join(repeated)}")
        _require(all(s.weight == 1.0 for s in self.val), "data.val sets are only evaluated, so they take no weight; "
                 "remove weight from the [[data.val]] tables")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 on one axis means "all remaining devices". The one place mesh
    sizes are checked: ``mesh.make_mesh`` and ``plan`` build theirs through ``from_sizes``."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        _require(all(s >= 1 or s == -1 for s in sizes.values()), f"mesh sizes must be >= 1 or -1, got {sizes}")
        _require(list(sizes.values()).count(-1) <= 1, f"at most one mesh axis may be -1 (inferred), got {sizes}")

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, int]) -> MeshConfig:
        """A mesh from ``{axis: size}``; axes not given are 1."""
        unknown = set(sizes) - set(MESH_AXES)
        _require(not unknown, f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
        return cls(**{a: sizes.get(a, 1) for a in MESH_AXES})

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}

    def resolve(self, num_devices: int | None = None) -> dict[str, int]:
        """The concrete sizes over ``num_devices`` devices (the -1 axis takes what is left). Without
        a device count (planning on paper) every size must be given."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes.values() if s != -1)
        if num_devices is None:
            _require(-1 not in sizes.values(), f"mesh {sizes}: give every axis a size (-1 needs real devices)")
            return sizes
        if -1 in sizes.values():
            _require(num_devices % known == 0,
                     f"{num_devices} devices do not divide by the fixed mesh axes (product {known})")
            sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
        _require(math.prod(sizes.values()) == num_devices,
                 f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are {num_devices}; make the sizes "
                 "multiply to the device count")
        return sizes


def check_tensor_parallel(model: ModelConfig, tensor: int) -> None:
    """Refuse a model whose split dimensions a ``tensor`` mesh axis does not divide: attention
    heads (and key/value heads), the dense and expert FFN widths, the vocabulary."""
    if tensor == 1:
        return
    widths = {"model.n_heads": model.n_heads, "model.vocab_size": model.vocab_size}
    if model.mla is None:
        widths["model.n_kv_heads"] = model.kv_heads
    if model.n_dense_layers:
        widths["model.d_ff"] = model.d_ff
    if model.n_moe_layers:
        widths["moe.expert_d_ff"] = model.moe.expert_d_ff
    for name, size in widths.items():
        _require(size % tensor == 0, f"{name}={size} does not split over the mesh's tensor axis of size {tensor}; "
                                     f"choose mesh.tensor dividing it")


@dataclass(frozen=True)
class Config:
    """Everything one run needs."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        check_tensor_parallel(self.model, self.mesh.tensor)

    def to_dict(self) -> dict:
        """The TOML-shaped dict (sections model, moe, train, data, mesh); None values omitted."""
        out = {}
        for section, obj in self._sections().items():
            if obj is not None:
                out[section] = {k: v for k, v in dataclasses.asdict(obj).items()
                                if v is not None and k not in _MODEL_PARTS}
        return out

    def _sections(self) -> dict:
        parts = {name: getattr(self.model, name) for name in _MODEL_PARTS}
        return {"model": self.model, **parts, "train": self.train, "data": self.data, "mesh": self.mesh}


# sections that live inside ModelConfig, under their own name
_MODEL_PARTS = {"moe": MoEConfig, "mla": MLAConfig, "yarn": YarnConfig}
_SECTIONS = {"model": ModelConfig, **_MODEL_PARTS, "train": TrainConfig, "data": DataConfig, "mesh": MeshConfig}


def model_config(cfg: Config | ModelConfig) -> ModelConfig:
    """The ``ModelConfig`` inside ``cfg`` (which may already be one)."""
    if isinstance(cfg, Config):
        return cfg.model
    if isinstance(cfg, ModelConfig):
        return cfg
    raise TypeError(f"expected a Config or ModelConfig, got {type(cfg).__name__}")


def _coerce(value, hint, where: str):
    """Check ``value`` against the annotation ``hint``; return it converted where lossless."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        reasons = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except errors.ConfigError as e:
                reasons.append(str(e))
        raise errors.ConfigError(reasons[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        _require(value in choices, f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        (item, _) = typing.get_args(hint)
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok, f"{where} must be a number, got {value!r}")
        # inf and nan pass every range check (inf >= 0) and fail later, far from the setting
        _require(math.isfinite(value), f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):  # a table inside a section, e.g. one [[data.mix]] entry
        if isinstance(value, hint):
            return value
        _require(isinstance(value, Mapping), f"{where} must be a table, got {value!r}")
        return _build(hint, value, where)
    _require(isinstance(value, hint), f"{where} must be of type {hint.__name__}, got {value!r}")
    return value


def _build(cls, table: Mapping, section: str, **fixed):
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    for key in table:
        _require(key in valid, f"unknown key {section}.{key}; valid keys in [{section}]: {', '.join(valid)}")
    try:
        return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in table.items()}, **fixed)
    except TypeError as e:  # a required key is missing
        raise errors.ConfigError(f"[{section}]: {e}; valid keys: {', '.join(valid)}") from None


def config_from_dict(tables: Mapping[str, Mapping]) -> Config:
    """Build and validate a ``Config`` from TOML-shaped tables."""
    for section in tables:
        _require(section in _SECTIONS, f"unknown section [{section}]; valid sections: {', '.join(_SECTIONS)}")
    _require("model" in tables, "a config needs a [model] section")
    parts = {name: _build(cls, tables[name], name) if name in tables else None for name, cls in _MODEL_PARTS.items()}
    model = _build(ModelConfig, tables["model"], "model", **parts)
    rest = {s: _build(_SECTIONS[s], tables[s], s) for s in ("train", "data", "mesh") if s in tables}
    return Config(model=model, **rest)


def _parse_override(item: str) -> tuple[str, str, object]:
    key, sep, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    _require(bool(sep and dot and name), f"override {item!r} must look like section.key=value (e.g. train.steps=200)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as bfloat16
    return section, name, value


def resolve_config_path(path_or_name: str | pathlib.Path) -> pathlib.Path:
    """A config file path, or the name of a shipped config (``tiny``, ``16b``, ...)."""
    path = pathlib.Path(path_or_name)
    if path.is_file():
        return path
    shipped = importlib.resources.files("dsmoe_jax.configs")
    candidate = shipped / f"{path.stem if path.suffix == '.toml' else path.name}.toml"
    if candidate.is_file():
        return pathlib.Path(str(candidate))
    names = sorted(p.name.removesuffix(".toml") for p in shipped.iterdir() if p.name.endswith(".toml"))
    raise errors.ConfigError(f"no config file {str(path_or_name)!r}; shipped configs: {', '.join(names)}")


def load_config(path_or_name: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config (a path or a shipped config's name) and apply ``section.key=value`` overrides."""
    path = resolve_config_path(path_or_name)
    try:
        tables = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise errors.ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        section, name, value = _parse_override(item)
        table = tables.setdefault(section, {})
        *parents, last = name.split(".")  # train.lora.rank: the key rank of the table [train.lora]
        for parent in parents:
            table = table.setdefault(parent, {})
            _require(isinstance(table, dict), f"override {item!r}: {section}.{parent} is not a table")
        table[last] = value
    try:
        return check_run_config(config_from_dict(tables))
    except errors.ConfigError as e:
        raise errors.ConfigError(f"{path}: {e}") from None


def updated(cfg: Config, **sections: Mapping[str, object]) -> Config:
    """``cfg`` with some keys of some sections replaced, e.g. ``updated(cfg, moe={"top_k": 2})``,
    checked as a whole as a loaded config is (so the order of the changes never matters)."""
    tables = cfg.to_dict()
    for section, values in sections.items():
        if section not in _SECTIONS:
            raise errors.ConfigError(f"unknown config section [{section}]; choose from {', '.join(_SECTIONS)}")
        _merge_tables(tables.setdefault(section, {}), values)
    return check_run_config(config_from_dict(tables))


def _merge_tables(table: dict, values: Mapping) -> None:
    """``values`` written into ``table``; a table inside (``train.lora``) keeps the keys not given."""
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(table.get(key), Mapping):
            table[key] = dict(table[key])
            _merge_tables(table[key], value)
        else:
            table[key] = value


def check_run_config(cfg: Config) -> Config:
    """``cfg``, after the checks of a config that trains (a converted checkpoint's config keeps the
    default train section whatever its model, so these live here rather than in ``Config``)."""
    _require(cfg.train.seq_len <= cfg.model.max_seq_len,
             f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}, the longest "
             "sequence the model takes; lower train.seq_len or raise model.max_seq_len")
    _require(cfg.model.mtp_depth < cfg.train.seq_len,
             f"model.mtp_depth={cfg.model.mtp_depth} predicts tokens that far ahead, which needs windows longer "
             f"than that: train.seq_len={cfg.train.seq_len} is too short; raise train.seq_len or lower "
             "model.mtp_depth")
    if cfg.train.lora.rank:
        absent = lora_targets_absent(cfg.train.lora, cfg.model)
        _require(not absent, f"train.lora.targets names what this model does not have: {', '.join(absent)}; remove "
                 "them from train.lora.targets")
    return cfg
