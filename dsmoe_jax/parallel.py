"""Meshes, shardings and expert parallelism.

Model code names only logical axes (the ``axes`` metadata of every parameter: ``embed``,
``mlp``, ``expert``, ``heads``, ...). ``RULES`` maps each to the mesh axes it is split over;
everything else here derives shardings from that table. ``expert_parallel`` is the one place
where tokens cross devices explicitly: the shard_map all_to_all exchange of the routed experts.

    mesh = make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        params = shard_params(params, cfg)

Shape legend (inside the exchange, per device): T local tokens, K top-k, A = K*T assignments,
D model width, F expert hidden width, N expert-parallel devices, L = E/N local experts,
R rows of each per-device send buffer.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsmoe_jax import grouped
from dsmoe_jax import model as model_lib  # model -> moe -> parallel: import the modules, not names
from dsmoe_jax import moe as moe_lib
from dsmoe_jax.config import Config, ConfigError, MeshConfig, ModelConfig, MoEConfig

EXPERT_AXIS = "expert"

MESH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axes it is split over (None: replicated)
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations: every device holds different tokens
    "embed": "fsdp",  # weights: fully sharded data parallelism splits the model width
    "expert": "expert",  # routed experts: expert parallelism
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "vocab": None,
}


def _cluster_env_says_multiprocess() -> bool:
    """Whether the environment describes a multi-process job that jax's cluster detection reads."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 \
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout_s: int = 100) -> None:
    """Join a multi-process run before anything touches a device. With ``coordinator``
    (``HOST:PORT`` of process 0) the three arguments are used as given; without, jax's own
    cluster detection fills them in when the environment describes a multi-process job (SLURM,
    Open MPI, ``JAX_COORDINATOR_ADDRESS``); otherwise this is a single-process run and nothing
    happens. A process that stops sending heartbeats for ``heartbeat_timeout_s`` fails the others."""
    if coordinator is None and not _cluster_env_says_multiprocess():
        if num_processes not in (None, 1):
            raise ConfigError("--num-processes needs --coordinator HOST:PORT (the address of process 0)")
        return
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ConfigError("--coordinator needs --num-processes and --process-id")
    # Collectives between CPU processes (tests, the local launcher) go over gloo; GPUs use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)


def make_mesh(sizes: Mapping[str, int] | MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``data``, ``fsdp``, ``expert`` over ``devices`` (default all); one size
    may be -1 (the devices left over); sizes not given are 1."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(sizes, MeshConfig):
        sizes = {"data": sizes.data, "fsdp": sizes.fsdp, "expert": sizes.expert}
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices do not divide by the fixed mesh axes (product {known})")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                          f"there are {len(devices)}; make the sizes multiply to the device count")
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], mesh: jax.sharding.Mesh, shape: tuple[int, ...]) -> PartitionSpec:
    """The PartitionSpec of an array with logical ``axes``: each dimension is split over its
    rule's mesh axes of size > 1, unless they do not divide it (then it stays replicated)."""
    spec = []
    for name, dim in zip(axes, shape):
        rule = RULES.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(cfg: Config | ModelConfig, mesh: jax.sharding.Mesh) -> dict:
    """NamedShardings of every parameter on ``mesh``, from ``RULES``."""
    axes, shapes = model_lib.param_axes(cfg), model_lib.param_shapes(cfg)
    return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a, mesh, s.shape)), axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params: dict, cfg: Config | ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Place ``params`` on ``mesh`` (default: the mesh set with ``jax.set_mesh``)."""
    mesh = mesh or jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("shard_params needs a mesh: pass one, or call it inside `with jax.set_mesh(mesh):`")
    return jax.device_put(params, param_shardings(cfg, mesh))


def _batch_axes(mesh) -> tuple[str, ...] | None:
    return tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch split over every mesh axis of size > 1."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh), *([None] * (ndim - 1))))


def expert_parallel_size(mesh=None) -> int:
    """The size of the ``expert`` axis of ``mesh`` (default: the context mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty or EXPERT_AXIS not in mesh.axis_names else mesh.shape[EXPERT_AXIS]


def batch_shards(mesh=None) -> int:
    """How many ways a batch is split on ``mesh`` (default: the context mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in _batch_axes(mesh) or ())


def check_expert_parallel(cfg: MoEConfig | None, ep: int) -> None:
    """Refuse a MoE config that cannot spread over ``ep`` expert-parallel devices."""
    if cfg is None or ep == 1:
        return
    if cfg.n_routed_experts % ep:
        raise ConfigError(f"moe.n_routed_experts={cfg.n_routed_experts} does not split over the mesh's expert axis of "
                          f"size {ep}; choose mesh.expert dividing it")
    if cfg.device_groups and cfg.device_groups != ep:
        raise ConfigError(f"moe.device_groups={cfg.device_groups} but the mesh spreads the experts over {ep} devices; "
                          "set moe.device_groups = 0 to follow the mesh")


def send_buffer_rows(cfg: MoEConfig, local_tokens: int, ep: int) -> int:
    """Rows each device reserves per destination in the dense all_to_all. A token's top-k experts
    are distinct, so it sends at most min(K, L) rows to one device: T * min(K, L) can never
    overflow, which keeps dropless routing dropless. With a capacity limit no device receives
    more than L * capacity rows from one sender, a smaller bound when it is."""
    L = cfg.n_routed_experts // ep
    rows = local_tokens * min(cfg.top_k, L)
    cap = moe_lib.capacity(cfg, local_tokens)
    return rows if cap is None else min(rows, L * cap)


def expert_parallel(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: MoEConfig,
                    ragged_all_to_all=None):
    """The routed experts spread over the context mesh's ``expert`` axis, with the same contract
    as ``moe.routed_experts``: returns the float32 routed output and ``keep_TK``.

    Tokens stay split over the batch axes (``RULES["batch"]``); each device holds E/N experts.
    Inside ``jax.shard_map`` every device dispatches its own tokens (a capacity limit, if set,
    counts each device's tokens, as GShard's groups do), sends each expert's rows to the device
    holding it with one all_to_all, runs its local experts with the grouped backend, and gets
    the results back with a second all_to_all before the gate-weighted combine.

    The exchange moves fixed-size worst-case buffers with ``lax.all_to_all`` (XLA:CPU has no
    ragged all_to_all), or only the routed rows with ``lax.ragged_all_to_all`` on GPU; pass
    ``ragged_all_to_all`` to choose another implementation of the latter's semantics.
    """
    mesh = jax.sharding.get_abstract_mesh()
    ep, batch, shards = expert_parallel_size(mesh), _batch_axes(mesh), batch_shards(mesh)
    T = x_TD.shape[0]
    if T % shards:
        raise ValueError(f"expert parallelism needs the {T} tokens of a batch to split over the mesh's {shards} "
                         "batch shards")
    rows = send_buffer_rows(cfg, T // shards, ep)
    tokens, experts = PartitionSpec(batch, None), PartitionSpec(EXPERT_AXIS, None, None)
    if ragged_all_to_all is None and jax.default_backend() == "gpu":
        ragged_all_to_all = jax.lax.ragged_all_to_all
    body = functools.partial(_exchange, cfg=cfg, ep=ep, rows=rows, ragged_all_to_all=ragged_all_to_all)
    return jax.shard_map(body, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=(tokens, tokens), check_vma=False)(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _exchange(x_TD, expert_TK, gate_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *, cfg: MoEConfig, ep: int, rows: int,
              ragged_all_to_all=None):
    """One device's part of ``expert_parallel`` (inside shard_map). Each sender's rows land in
    block ``sender`` (``rows`` long) of the receive buffer, whichever all_to_all moves them."""
    T, D = x_TD.shape
    N, L, R = ep, w_gate_LDF.shape[0], rows
    with jax.named_scope("dispatch"):
        # Sorted by global expert is sorted by destination: device j holds experts [j L, (j+1) L).
        plan = moe_lib.dispatch(expert_TK, N * L, moe_lib.capacity(cfg, T))
        x_AD = x_TD[plan.order_A % T]
        sizes_NL = plan.group_sizes_E.reshape(N, L)
        send_N = sizes_NL.sum(1)
        starts_N = jnp.cumsum(send_N) - send_N
        row_A = jnp.arange(x_AD.shape[0])
        dest_A = jnp.searchsorted(starts_N + send_N, row_A, side="right")  # N for dropped rows, past every group
        slot_A = row_A - starts_N[jnp.minimum(dest_A, N - 1)]
    with jax.named_scope("exchange"):
        recv_sizes_NL = jax.lax.all_to_all(sizes_NL, EXPERT_AXIS, 0, 0, tiled=True)
        recv_N = recv_sizes_NL.sum(1)
        if ragged_all_to_all is None:
            send_NRD = jnp.zeros((N, R, D), x_TD.dtype).at[dest_A, slot_A].set(x_AD, mode="drop")
            recv_GD = jax.lax.all_to_all(send_NRD, EXPERT_AXIS, 0, 0, tiled=True).reshape(N * R, D)
        else:
            me = jax.lax.axis_index(EXPERT_AXIS)
            recv_GD = ragged_all_to_all(x_AD, jnp.zeros((N * R, D), x_TD.dtype), starts_N, send_N,
                                        jnp.full((N,), me * R, starts_N.dtype), recv_N, axis_name=EXPERT_AXIS)
    with jax.named_scope("experts"):
        # Each sender's block is sorted by local expert; regroup all blocks by local expert.
        expert_NR = jax.vmap(lambda ends, r: jnp.searchsorted(ends, r, side="right"), (0, None))(
            jnp.cumsum(recv_sizes_NL, axis=1), jnp.arange(R))  # L marks unused buffer rows
        order_G = jnp.argsort(expert_NR.reshape(-1), stable=True)
        y_sorted_GD = grouped.grouped_mlp(recv_GD[order_G], w_gate_LDF, w_up_LDF, w_down_LFD,
                                          recv_sizes_NL.sum(0), backend=cfg.backend)
        y_GD = jnp.zeros_like(y_sorted_GD).at[order_G].set(y_sorted_GD)
    with jax.named_scope("return"):
        if ragged_all_to_all is None:
            back_NRD = jax.lax.all_to_all(y_GD.reshape(N, R, D), EXPERT_AXIS, 0, 0, tiled=True)
            y_AD = back_NRD.at[dest_A, slot_A].get(mode="fill", fill_value=0)
        else:
            # my rows go back to each sender at the offset where that sender's group for me began
            their_starts_N = jax.lax.all_to_all(starts_N, EXPERT_AXIS, 0, 0, tiled=True)
            y_AD = ragged_all_to_all(y_GD, jnp.zeros_like(x_AD, dtype=y_GD.dtype), jnp.arange(N) * R, recv_N,
                                     their_starts_N, send_N, axis_name=EXPERT_AXIS)
    with jax.named_scope("combine"):
        return moe_lib.combine(y_AD, plan, gate_TK), plan.keep_A.reshape(-1, T).T


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """``lax.ragged_all_to_all``'s semantics built from all_gathers, for platforms without it
    (XLA:CPU): the tests run the ragged exchange's bookkeeping through this."""
    del recv_sizes  # implied by the senders' send_sizes
    me = jax.lax.axis_index(axis_name)
    gather = lambda a: jax.lax.all_gather(a, axis_name)
    operands, starts, sizes, offsets = gather(operand), gather(input_offsets), gather(send_sizes), gather(output_offsets)
    rows = jnp.arange(output.shape[0])
    for sender in range(operands.shape[0]):
        start, size, offset = starts[sender, me], sizes[sender, me], offsets[sender, me]
        inside = (rows >= offset) & (rows < offset + size)
        source = jnp.clip(start + rows - offset, 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], operands[sender][source], output)
    return output
