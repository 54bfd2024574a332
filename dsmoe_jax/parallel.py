"""Meshes and shardings: the one table that maps the model's logical axes to mesh axes.

Model code names only logical axes (the ``axes`` metadata of every parameter: ``embed``,
``mlp``, ``expert``, ``heads``, ...). ``RULES`` maps each to the mesh axes it is split over;
everything else here derives shardings from that table.

    mesh = make_mesh({"data": 2, "fsdp": 4})
    with jax.set_mesh(mesh):
        params = shard_params(params, cfg)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsmoe_jax.config import Config, ConfigError, MeshConfig, ModelConfig
from dsmoe_jax.model import param_axes, param_shapes

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
    axes, shapes = param_axes(cfg), param_shapes(cfg)
    return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a, mesh, s.shape)), axes, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params: dict, cfg: Config | ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Place ``params`` on ``mesh`` (default: the mesh set with ``jax.set_mesh``)."""
    mesh = mesh or jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("shard_params needs a mesh: pass one, or call it inside `with jax.set_mesh(mesh):`")
    return jax.device_put(params, param_shardings(cfg, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch split over every mesh axis it divides by."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None,
                                             *([None] * (ndim - 1))))
