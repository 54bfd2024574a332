"""Scale on paper: per-device memory, FLOPs and all_to_all traffic of a training step.

    dsmoe-jax plan --config 16b --mesh data=8,expert=8 --gpu-memory 80

Everything here is arithmetic on the config and the mesh, nothing is allocated. Parameters,
gradients and Adam's two moments are float32 (training keeps float32 master weights) and split
as ``mesh.RULES`` splits them. Activations are what the backward pass keeps per token and
layer, counted tensor by tensor for the code in model.py / moe.py / expert_parallel.py; with
rematerialisation only each block's input is kept, plus one block's activations while it is
recomputed. ``tests/test_plan.py`` holds the estimates against XLA's own memory analysis of the
compiled train step.

Node-limited routing (``moe.n_group`` groups of experts, ``topk_group`` kept per token) bounds
how many expert-parallel devices one token's experts sit on when the groups align with the
devices. The exchange here sends one row per (token, expert) assignment, which the bound does
not shrink; an exchange that sends each token once per device it reaches, with buffers sized
for the worst case as here, would move the ``dedup_bytes`` the plan reports, which it does.

Shape legend: t tokens per device per micro-batch, D model width, F hidden width, E routed
experts, K top-k, L experts per device, N expert-parallel devices, V vocabulary, S sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
from jax.sharding import AxisType

from dsmoe_jax import mesh as mesh_lib
from dsmoe_jax.attention import QUERY_BLOCK, resolve_implementation
from dsmoe_jax.config import MESH_AXES, Config, MeshConfig, ModelConfig
from dsmoe_jax.costs import cache_bytes_per_token, flops_per_token
from dsmoe_jax.expert_parallel import send_buffer_rows
from dsmoe_jax.model import param_axes, param_shapes, unrolled
from dsmoe_jax.peft.tuning import make_tuning, trained_shapes
from dsmoe_jax.sharding import axes_shardings, param_shardings

GIB = 2**30
# Dense bf16 matmul peak per device, TFLOP/s (vendor figures, without sparsity): the denominator
# of model-FLOPs utilisation in training logs and of the step-time bound here.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
DEFAULT_PEAK_TFLOPS = PEAK_TFLOPS["H100"]


def device_peak_flops(device=None) -> float | None:
    """The bf16 peak FLOP/s of ``device`` (default: the first device), None when unknown (CPUs)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((1e12 * v for k, v in PEAK_TFLOPS.items() if k in kind), None)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes and per-step work of one training step of a config on a mesh."""

    mesh: dict[str, int]
    attention: str  # the implementation the step's attention takes (dsmoe_jax.attention)
    tokens_per_device: int  # per micro-batch
    params: int
    grads: int
    optimizer: int
    update: int  # transients of the step: the gradient-accumulation buffer and the optimizer's updates
    activations: int  # without rematerialisation
    activations_remat: int
    flops_per_step: float  # the whole step, all devices (remat recomputes the forward)
    all_to_all_bytes: int  # sent by one device per step (the dense buffers the exchange moves)
    routed_bytes: int  # of which routed rows: what a ragged all_to_all would move
    devices_per_token: int  # at most this many expert-parallel devices hold one token's experts
    devices_per_token_unlimited: int  # the same bound without the group limit: min(top_k, devices)
    dedup_bytes: int  # what an exchange sending a token once per device it reaches would move (worst case)
    dedup_bytes_unlimited: int  # the same without the group limit
    tensor_bytes: int  # sent by one device per step in the tensor axis's all-reduces (ring)
    cache_bytes_per_token: int  # the inference KV cache, all layers, in model.dtype
    weights: int = 0  # serving: the weights one device holds as the model stores them (FP8 with model.fp8_weights)
    weights_held: str = ""  # how: their dtypes

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    def total(self, remat: bool) -> int:
        return (self.params + self.grads + self.optimizer + self.update
                + (self.activations_remat if remat else self.activations))


def _device_elements(cfg: ModelConfig, mesh: jax.sharding.AbstractMesh) -> int:
    """Parameter elements one device holds under ``mesh.RULES``."""
    return _held(param_shardings(cfg, mesh), param_shapes(cfg))


def _trained_device_elements(cfg: Config, mesh: jax.sharding.AbstractMesh) -> int:
    """Elements of the trained part (``train.trainable``) one device holds: what gradients and
    Adam's moments are kept for."""
    tuning = make_tuning(cfg)
    shapes = trained_shapes(tuning, param_shapes(cfg))
    return _held(axes_shardings(tuning.axes(param_axes(cfg)), shapes, mesh), shapes)


def _held(shardings, shapes, itemsize: bool = False) -> int:
    """Elements (or with ``itemsize`` bytes) of ``shapes`` one device holds under ``shardings``."""
    return sum(math.prod(sharding.shard_shape(shape.shape)) * (shape.dtype.itemsize if itemsize else 1)
               for sharding, shape in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))


def _scores_bytes(implementation: str, N: int, seq: int) -> int:
    """Float32 bytes per token that attention keeps for the backward pass beyond its inputs and
    output: the scores, masked scores and probabilities of each query row ("xla": a row of
    ``seq`` keys; "blocked": the keys up to the end of the row's block, (seq + block) / 2 on
    average), or only the softmax's log-sum-exp for the fused flash kernel ("cudnn")."""
    if implementation == "cudnn":
        return 4 * N
    keys = seq if implementation == "xla" else (seq + min(QUERY_BLOCK, seq)) // 2
    return 3 * 4 * N * keys


def _attention_widths(cfg: ModelConfig) -> int:
    """Numbers per token that attention keeps for the backward pass besides the scores."""
    D, N, Kv, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    if cfg.mla is None:  # norm in/out, q k v before and after RoPE, attention output, o-projection
        return 3 * D + 2 * (N + 2 * Kv) * H + N * H
    m = cfg.mla
    P, C, W, J = m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim, m.qk_head_dim
    queries = 2 * m.q_lora_rank + N * J + N * P  # the latent and its norm, q, the rotated part
    latents = (C + P) + C + P  # the kv projection, its normed latent, the rotated key
    expanded = N * (m.qk_nope_head_dim + W) + 2 * N * J  # keys and values per head, assembled q and k
    return 3 * D + queries + latents + expanded + N * W


def _layer_activation_bytes(cfg: ModelConfig, ffn: dict, t: int, seq: int, ep: int, attention_impl: str) -> int:
    """Bytes the backward pass keeps for one block over ``t`` tokens; ``ffn`` is the block's FFN
    parameter shapes (from ``param_shapes``), which give every width the FFN has."""
    c = 4 if cfg.dtype == "float32" else 2
    D = cfg.d_model
    attention = t * c * _attention_widths(cfg) + t * _scores_bytes(attention_impl, cfg.n_heads, seq)
    if "w_gate_EDF" not in ffn:  # a dense block
        return attention + t * c * (2 * D + 3 * ffn["w_gate_DF"].shape[1])
    m = cfg.moe
    if ep > 1:  # the grouped rows are the dense receive buffers of the exchange
        rows = ep * send_buffer_rows(m, t, ep)
    else:
        rows = m.slots * t
    E, F = ffn["w_gate_EDF"].shape[0], ffn["w_gate_EDF"].shape[2]
    router = t * 4 * 2 * E  # logits and probabilities, float32
    grouped = rows * c * (2 * D + 3 * F)  # rows in and out, gate, up, gated product
    shared = t * c * 3 * ffn["shared"]["w_gate_DF"].shape[1] if "shared" in ffn else 0
    return attention + router + grouped + shared + t * (2 * c * D + 4 * D)  # norm, combine (float32)


def devices_per_token(moe, ep: int) -> int:
    """At most how many of ``ep`` expert-parallel devices one token's top-k experts sit on:
    ``min(top_k, ep)``, or fewer under group-limited routing whose groups align with the devices
    (each group on whole devices, or each device holding whole groups)."""
    bound = min(moe.slots, ep)
    if moe.n_group > 1 and (moe.n_group % ep == 0 or ep % moe.n_group == 0):
        bound = min(bound, moe.topk_group * max(1, ep // moe.n_group))
    return bound


def make_plan(cfg: Config, mesh_sizes: Mapping[str, int], batch: int | None = None, seq: int | None = None,
              platform: str = "gpu") -> Plan:
    """The plan of ``cfg`` (``train.batch_size`` x ``train.seq_len`` unless given) on a mesh of
    ``mesh_sizes`` (axes ``data``, ``fsdp``, ``expert``, ``tensor``; missing axes are 1) of ``platform``
    devices, which decides the attention implementation and so its activations."""
    sizes = MeshConfig.from_sizes(mesh_sizes).resolve()
    # Auto axes, as make_mesh builds them (jax 0.11 made Explicit the AbstractMesh default)
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    served = cfg.model
    weights = _held(param_shardings(served, mesh), param_shapes(served), itemsize=True)
    # a model served from FP8 weights trains from unquantised ones: the training lines are for those
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(served, fp8_weights=False))
    m, t_cfg = cfg.model, cfg.train
    batch, seq = batch or t_cfg.batch_size, seq or t_cfg.seq_len
    devices, ep = mesh_lib.batch_shards(mesh), sizes["expert"]  # the batch splits over every device
    mesh_lib.check_run(cfg, mesh, batch)
    t = batch // t_cfg.grad_accum * seq // devices

    elements, trained = _device_elements(m, mesh), _trained_device_elements(cfg, mesh)
    attention = resolve_implementation(m.attention, platform=platform, dtype=m.dtype)
    blocks = param_shapes(unrolled(m))["layers"].values()  # one per block
    layers = [_layer_activation_bytes(m, block["ffn"], t, seq, ep, attention) for block in blocks]
    c = 4 if m.dtype == "float32" else 2
    logits = t * m.vocab_size * 4 * 2  # float32 logits and their log-softmax
    residual = t * m.d_model * c  # each block's input, all that remat keeps
    activations = sum(layers) + logits
    activations_remat = m.n_layers * residual + max(layers) + logits

    # dispatch and return, in the forward, the backward and (with remat) the recomputed forward
    passes = 3 if m.remat else 2
    exchanges = 0 if ep == 1 else 2 * passes * m.n_moe_layers * t_cfg.grad_accum
    buffer = 0 if ep == 1 else ep * send_buffer_rows(m.moe, t, ep) * m.d_model * c
    routed = 0 if ep == 1 else m.moe.slots * t * m.d_model * c
    reach, reach_unlimited = (devices_per_token(m.moe, ep), min(m.moe.slots, ep)) if ep > 1 else (1, 1)
    per_device_row = exchanges * t * m.d_model * c  # one row per token and device it reaches
    leaves = (ep - 1) / ep
    # Tensor parallelism sums partial outputs over the tensor group twice per block (attention's
    # output projection, the FFN's down projection) in every forward pass, and the input
    # gradients twice per block in the backward; a ring all-reduce of n bytes sends 2 (k-1)/k n.
    tp = sizes["tensor"]
    all_reduces = 2 * passes * m.n_layers * t_cfg.grad_accum if tp > 1 else 0
    tensor_bytes = int(all_reduces * t * m.d_model * c * 2 * (tp - 1) / tp)
    return Plan(
        # a LoRA run holds its adapter (the trained part) beside the params
        mesh=sizes, attention=attention, tokens_per_device=t,
        params=4 * (elements + (trained if t_cfg.lora.rank else 0)), grads=4 * trained,
        optimizer=8 * trained,
        update=8 * trained,
        activations=activations, activations_remat=activations_remat,
        flops_per_step=(passes + 1) * flops_per_token(m, seq) * batch * seq,  # backward = 2 forwards
        all_to_all_bytes=int(exchanges * buffer * leaves), routed_bytes=int(exchanges * routed * leaves),
        devices_per_token=reach, devices_per_token_unlimited=reach_unlimited,
        dedup_bytes=int(per_device_row * reach * leaves),
        dedup_bytes_unlimited=int(per_device_row * reach_unlimited * leaves),
        tensor_bytes=tensor_bytes,
        cache_bytes_per_token=cache_bytes_per_token(m),
        weights=weights, weights_held=("FP8 projections and experts (1 byte + block scales), the rest "
                                       if served.fp8_weights else "") + served.param_dtype,
    )


def format_plan(plan: Plan, gpu_memory_gib: float | None = None, peak_tflops: float | None = None) -> str:
    """A human-readable table of ``plan``; says whether it fits ``gpu_memory_gib`` per device."""
    g = lambda b: f"{b / GIB:8.2f} GiB"
    mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"mesh              {mesh} ({plan.devices} devices), {plan.tokens_per_device} tokens per device per "
        "micro-batch",
        f"parameters        {g(plan.params)}   float32 master weights",
        f"gradients         {g(plan.grads)}",
        f"optimizer state   {g(plan.optimizer)}   Adam moments of the trained parameters",
        f"step transients   {g(plan.update)}   gradient accumulator, optimizer updates",
        f"activations       {g(plan.activations)}   ({g(plan.activations_remat).strip()} with model.remat = true), "
        f"{plan.attention} attention",
        f"total             {g(plan.total(False))}   ({g(plan.total(True)).strip()} with remat)",
        f"FLOPs per step    {plan.flops_per_step:.3e} ({plan.flops_per_step / plan.devices:.3e} per device)",
        f"all_to_all        {plan.all_to_all_bytes / GIB:.2f} GiB sent per device per step "
        f"({plan.routed_bytes / GIB:.2f} GiB of it routed rows)",
    ]
    if plan.mesh["expert"] > 1:
        lines.append(f"  node limit     a token's experts sit on <= {plan.devices_per_token} of "
                     f"{plan.mesh['expert']} expert devices (<= {plan.devices_per_token_unlimited} without a group "
                     f"limit); sent once per device that is {plan.dedup_bytes / GIB:.2f} GiB "
                     f"({plan.dedup_bytes_unlimited / GIB:.2f} GiB unlimited)")
    if plan.mesh["tensor"] > 1:
        lines.append(f"tensor all-reduce {plan.tensor_bytes / GIB:.2f} GiB sent per device per step (attention and FFN "
                     f"outputs and their input gradients, over {plan.mesh['tensor']} devices)")
    lines.append(f"KV cache          {plan.cache_bytes_per_token / 1024:.1f} KiB per token, all layers (inference)")
    lines.append(f"serving weights   {g(plan.weights)}   {plan.weights_held}")
    if gpu_memory_gib:
        room = gpu_memory_gib * GIB - plan.weights
        cache = (f"{room / GIB:.1f} GiB left per device: a KV cache of {int(room // plan.cache_bytes_per_token):,} "
                 "tokens" if room > 0 else "the weights alone do NOT fit")
        lines.append(f"serving           {cache} in {gpu_memory_gib:g} GiB")
    if peak_tflops:
        lines.append(f"step time         >= {plan.flops_per_step / plan.devices / (peak_tflops * 1e12):.2f} s at "
                     f"{peak_tflops:g} TFLOP/s per device")
    if gpu_memory_gib:
        for remat in (False, True):
            need = plan.total(remat) / GIB
            verdict = "fits" if need <= gpu_memory_gib else "does NOT fit"
            lines.append(f"{'with remat' if remat else 'without remat':<17} {verdict} in {gpu_memory_gib:g} GiB "
                         f"({need:.1f} GiB needed)")
    return "\n".join(lines)
