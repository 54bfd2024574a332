"""Device meshes and the logical-axis rules.

Model code names only logical axes (the ``axes`` metadata of every parameter: ``embed``,
``mlp``, ``expert``, ``heads``, ...; activations: ``batch``). ``RULES`` is the one table mapping
each to the mesh axes it is split over; every sharding in the project derives from it.

    mesh = make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from dsmoe_jax.config import MESH_AXES, Config, MeshConfig, MoEConfig
from dsmoe_jax.errors import ConfigError

EXPERT_AXIS = "expert"

# logical axis -> mesh axes it is split over (None: replicated)
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations: every device holds different tokens
    "embed": "fsdp",  # weights: fully sharded data parallelism splits the model width
    "expert": "expert",  # routed experts: expert parallelism
    # tensor parallelism (the devices of a tensor group hold the same tokens): attention heads,
    # FFN widths (dense, shared and routed experts) and the vocabulary of the embedding and head
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "q_lora": "fsdp",  # MLA's latent widths: the only splittable axis of its up-projections
    "kv_lora": "fsdp",
    "vocab": "tensor",
    "layers": None,  # the stacked blocks of model.scan_layers: every device holds every layer
}


def make_mesh(sizes: Mapping[str, int] | MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ``data``, ``fsdp``, ``expert``, ``tensor`` over ``devices`` (default all, ordered by
    ``jax.make_mesh`` so that neighbouring mesh positions are close in the topology); one size
    may be -1 (the devices left over); sizes not given are 1."""
    devices = list(jax.devices() if devices is None else devices)
    mesh_cfg = sizes if isinstance(sizes, MeshConfig) else MeshConfig.from_sizes(sizes)
    shape = tuple(mesh_cfg.resolve(len(devices)).values())
    # Auto axes: jit partitions everything outside the expert exchange from the shardings alone.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_run(cfg: Config, mesh, batch: int | None = None) -> None:
    """Every check of a run's config against its mesh and processes, in one place (the checks of
    one config section against another run at config load): the routed experts split over the
    expert axis, the batch (``train.batch_size`` unless given) into ``train.grad_accum``
    micro-batches over the batch's devices and processes, and, on a real mesh, tensor groups
    inside processes. ``ConfigError`` (exit 2) names both sides."""
    m, t = cfg.model, cfg.train
    check_expert_parallel(m.moe if m.n_moe_layers else None, expert_parallel_size(mesh))
    batch, shards = batch or t.batch_size, batch_shards(mesh)
    real = isinstance(mesh, jax.sharding.Mesh)
    processes = len({d.process_index for d in mesh.devices.flat}) if real else 1
    if batch % (processes * t.grad_accum) or (batch // t.grad_accum) % shards:
        unit = math.lcm(processes * t.grad_accum, t.grad_accum * shards)
        raise ConfigError(f"train.batch_size={batch} must split into train.grad_accum={t.grad_accum} micro-batches "
                          f"that divide over the {shards} devices ({processes} process{'es' * (processes > 1)}) the "
                          f"batch is split over; choose a multiple of {unit}")
    if real:
        check_tensor_groups_local(mesh)


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


def check_tensor_groups_local(mesh) -> None:
    """Refuse a mesh whose tensor groups span processes: the devices of a group hold the same
    tokens, which each process reads for itself (process-local batches), so a group must sit in
    one process (one host's GPUs; ``make_mesh`` puts the tensor axis on neighbouring devices)."""
    size = dict(mesh.shape).get("tensor", 1)
    groups = mesh.devices.reshape(-1, size)  # tensor is the last mesh axis: each row is one group
    split = [g for g in groups if len({d.process_index for d in g}) > 1]
    if split:
        raise ConfigError(f"the mesh's tensor groups span processes (devices {[d.id for d in split[0]]} belong to "
                          f"processes {sorted({d.process_index for d in split[0]})}); choose mesh.tensor dividing the "
                          f"{len([d for d in groups.flat if d.process_index == 0])} devices of each process")


def logical_to_spec(axes: tuple[str | None, ...], mesh, shape: tuple[int, ...]) -> PartitionSpec:
    """The PartitionSpec of an array with logical ``axes``: each dimension is split over its
    rule's mesh axes of size > 1, unless they do not divide it or an earlier dimension already
    uses them (MLA's ``[embed, kv_lora]``: both rules name fsdp); then it stays replicated."""
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        rule = RULES.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape.get(a, 1) > 1)
        if mesh_axes and not used & set(mesh_axes) and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used |= set(mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def batch_axes(mesh) -> tuple[str, ...] | None:
    """The mesh axes (of size > 1) a batch is split over, or None."""
    return tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch split over every mesh axis of size > 1."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def expert_parallel_size(mesh=None) -> int:
    """The size of the ``expert`` axis of ``mesh`` (default: the context mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty or EXPERT_AXIS not in mesh.axis_names else mesh.shape[EXPERT_AXIS]


def batch_shards(mesh=None) -> int:
    """How many ways a batch is split on ``mesh`` (default: the context mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape[a] for a in batch_axes(mesh) or ())
