"""Meshes: sizes checked in one place (MeshConfig), devices ordered by jax.make_mesh."""

import jax
import pytest
from jax.sharding import AxisType

from dsmoe_jax import ConfigError, MeshConfig, mesh


def test_mesh_size_errors_name_the_problem():
    with pytest.raises(ConfigError, match="needs 4 devices, there are 1"):
        mesh.make_mesh({"data": 2, "expert": 2})
    with pytest.raises(ConfigError, match="unknown mesh axes \\['tensor'\\]"):
        mesh.make_mesh({"tensor": 1})
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        mesh.make_mesh({"data": -1, "expert": -1})
    assert mesh.make_mesh({"data": -1}).shape == {"data": len(jax.devices()), "fsdp": 1, "expert": 1}


def test_mesh_config_resolves_the_inferred_axis():
    assert MeshConfig(data=-1, expert=4).resolve(16) == {"data": 4, "fsdp": 1, "expert": 4}
    with pytest.raises(ConfigError, match="do not divide by the fixed mesh axes"):
        MeshConfig(data=-1, expert=3).resolve(16)
    with pytest.raises(ConfigError, match="give every axis a size"):
        MeshConfig(data=-1).resolve()


def test_mesh_axes_are_automatic_so_jit_partitions_from_shardings():
    m = mesh.make_mesh({"data": 1})
    assert m.axis_names == ("data", "fsdp", "expert")
    assert all(t == AxisType.Auto for t in m.axis_types), m.axis_types


def test_a_mesh_axis_splits_at_most_one_dimension_of_an_array():
    """MLA's key/value down-projection is [embed, kv_lora] and both rules name fsdp: the first
    dimension takes it, the second stays whole (a spec may name a mesh axis only once)."""
    from jax.sharding import AbstractMesh, PartitionSpec

    abstract = AbstractMesh((1, 4, 2), ("data", "fsdp", "expert"))
    assert mesh.logical_to_spec(("embed", "kv_lora"), abstract, (64, 32)) == PartitionSpec("fsdp", None)
    assert mesh.logical_to_spec(("kv_lora", "heads", "head_dim"), abstract, (32, 4, 8)) == PartitionSpec(
        "fsdp", None, None), "the latent up-projection splits over fsdp"
