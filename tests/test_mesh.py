"""Meshes: sizes checked in one place (MeshConfig), devices ordered by jax.make_mesh."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from dsmoe_jax import ConfigError, MeshConfig, load_config, mesh
from dsmoe_jax.config import MESH_AXES


def test_mesh_size_errors_name_the_problem():
    with pytest.raises(ConfigError, match="needs 4 devices, there are 1"):
        mesh.make_mesh({"data": 2, "expert": 2})
    with pytest.raises(ConfigError, match="unknown mesh axes \\['model'\\]; valid: data, fsdp, expert, tensor"):
        mesh.make_mesh({"model": 1})
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        mesh.make_mesh({"data": -1, "expert": -1})
    assert mesh.make_mesh({"data": -1}).shape == {"data": len(jax.devices()), "fsdp": 1, "expert": 1, "tensor": 1}


def test_mesh_config_resolves_the_inferred_axis():
    assert MeshConfig(data=-1, expert=4).resolve(16) == {"data": 4, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(ConfigError, match="do not divide by the fixed mesh axes"):
        MeshConfig(data=-1, expert=3).resolve(16)
    with pytest.raises(ConfigError, match="give every axis a size"):
        MeshConfig(data=-1).resolve()


def test_mesh_axes_are_automatic_so_jit_partitions_from_shardings():
    m = mesh.make_mesh({"data": 1})
    assert m.axis_names == ("data", "fsdp", "expert", "tensor")
    assert all(t == AxisType.Auto for t in m.axis_types), m.axis_types


def test_a_mesh_axis_splits_at_most_one_dimension_of_an_array():
    """MLA's key/value down-projection is [embed, kv_lora] and both rules name fsdp: the first
    dimension takes it, the second stays whole (a spec may name a mesh axis only once)."""
    from jax.sharding import AbstractMesh, PartitionSpec

    abstract = AbstractMesh((1, 4, 2), ("data", "fsdp", "expert"))
    assert mesh.logical_to_spec(("embed", "kv_lora"), abstract, (64, 32)) == PartitionSpec("fsdp", None)
    assert mesh.logical_to_spec(("kv_lora", "heads", "head_dim"), abstract, (32, 4, 8)) == PartitionSpec(
        "fsdp", None, None), "the latent up-projection splits over fsdp"


def test_tensor_groups_must_not_span_processes():
    """Two processes of four devices each: a tensor axis of 2 or 4 keeps each group in one
    process, one of 8 would need both processes to read the same tokens."""
    devices = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    fake = lambda tensor: types.SimpleNamespace(shape={"data": 8 // tensor, "tensor": tensor},
                                                devices=np.array(devices, object).reshape(8 // tensor, tensor))
    for tensor in (1, 2, 4):
        mesh.check_tensor_groups_local(fake(tensor))
    with pytest.raises(ConfigError, match=r"tensor groups span processes \(devices \[0, 1, 2, 3, 4, 5, 6, 7\] belong "
                                          r"to processes \[0, 1\]\); choose mesh.tensor dividing the 4 devices"):
        mesh.check_tensor_groups_local(fake(8))


def test_check_run_refuses_what_does_not_split_and_names_the_fix():
    from jax.sharding import AbstractMesh

    cfg = load_config("tiny", ["train.batch_size=12", "train.grad_accum=2"])  # 15 routed experts
    auto = (AxisType.Auto,) * len(MESH_AXES)
    on = lambda **sizes: AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES, axis_types=auto)
    mesh.check_run(cfg, on(data=2, expert=3))  # 12 = 2 micro-batches of 6, over 6 devices; 15 experts over 3
    with pytest.raises(ConfigError, match="n_routed_experts=15 does not split over the mesh's expert axis of size 2"):
        mesh.check_run(cfg, on(expert=2))
    with pytest.raises(ConfigError, match=r"train.batch_size=12 must split into train.grad_accum=2 micro-batches "
                                          r"that divide over the 4 devices .* choose a multiple of 8"):
        mesh.check_run(cfg, on(data=4))
    mesh.check_run(cfg, on(data=4), batch=16)  # plan's --batch
