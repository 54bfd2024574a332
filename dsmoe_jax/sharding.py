"""Where parameters live on a mesh: NamedShardings from the logical axes and ``mesh.RULES``.

    mesh = make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        params = shard_params(params, cfg)
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from dsmoe_jax.config import Config, ModelConfig, check_tensor_parallel, model_config
from dsmoe_jax.fp8 import Fp8Weight
from dsmoe_jax.mesh import logical_to_spec
from dsmoe_jax.model import param_axes, param_shapes


def param_shardings(cfg: Config | ModelConfig, mesh) -> dict:
    """NamedShardings of every parameter on ``mesh`` (a Mesh, or an AbstractMesh for planning)."""
    check_tensor_parallel(model_config(cfg), dict(mesh.shape).get("tensor", 1))
    return axes_shardings(param_axes(cfg), param_shapes(cfg), mesh)


def axes_shardings(axes: dict, shapes: dict, mesh) -> dict:
    """NamedShardings of a pytree of arrays (``shapes``) from their logical ``axes``. An FP8
    weight's values split as the weight would; its block scales only along its batch axes
    (experts, layers), being 16384 times fewer."""
    def sharding(a, s):
        if isinstance(s, Fp8Weight):
            batch = a[:s.n_batch] + (None, None)
            return Fp8Weight(sharding(a, s.data), sharding(batch, s.scale_inv), s.n_in, s.n_out)
        return NamedSharding(mesh, logical_to_spec(a, mesh, s.shape))

    return jax.tree.map(sharding, axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params: dict, cfg: Config | ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Place ``params`` on ``mesh`` (default: the mesh set with ``jax.set_mesh``)."""
    mesh = mesh or jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("shard_params needs a mesh: pass one, or call it inside `with jax.set_mesh(mesh):`")
    return jax.device_put(params, param_shardings(cfg, mesh))
