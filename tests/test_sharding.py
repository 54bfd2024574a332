"""Parameter shardings from the logical axes, on 8 fake CPU devices (a subprocess: the device
count is fixed when jax starts)."""

import json
import textwrap

import jax
import pytest
from conftest import run_python

import dsmoe_jax
from dsmoe_jax import sharding
from dsmoe_jax.config import MESH_AXES
from dsmoe_jax.errors import ConfigError


def test_logical_axes_come_from_the_parameters(small_cfg):
    axes = dsmoe_jax.param_axes(small_cfg)
    assert axes["layers"][1]["ffn"]["w_gate_EDF"] == ("expert", "embed", "mlp")
    assert axes["layers"][0]["ffn"]["w_down_FD"] == ("mlp", "embed")
    assert axes["embed_VD"] == ("vocab", "embed") and axes["final_norm"]["scale_D"] == ("embed",)


SCRIPT = textwrap.dedent("""
    import functools, json, jax, jax.numpy as jnp, numpy as np
    import dsmoe_jax
    from dsmoe_jax import mesh as mesh_lib, sharding
    from jax.sharding import PartitionSpec as P
    cfg = dsmoe_jax.load_config("tiny", ["model.n_layers=2", "moe.n_routed_experts=16", "moe.top_k=2"]).model
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    ref, ref_aux = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg))(params, tokens)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert mesh_lib.logical_to_spec(("expert", "embed"), mesh, (3, 64)) == P(None, "fsdp"), "3 experts on 2 devices"
    with jax.set_mesh(mesh):
        sharded = sharding.shard_params(params, cfg)
        w = sharded["layers"][1]["ffn"]["w_gate_EDF"]
        assert w.sharding.spec == P("expert", "fsdp", None), w.sharding.spec
        assert w.addressable_shards[0].data.shape == (8, 64, 128), w.addressable_shards[0].data.shape
        batch = jax.device_put(tokens, mesh_lib.batch_sharding(mesh))
        out, aux = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg))(sharded, batch)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(aux.expert_load, ref_aux.expert_load)
    print(json.dumps({"ok": True}))
""")


def test_sharded_forward_equals_single_device():
    assert json.loads(run_python(SCRIPT).splitlines()[-1]) == {"ok": True}


# Tensor parallelism: heads, FFN widths and the vocabulary split over a tensor axis of 4 beside data
# parallelism and of 2 beside fsdp and expert parallelism: training loss, aux and gradients, and
# cached decoding, equal one device's, for the MHA model and the MLA one with its MTP depth (12
# experts: the expert axis of 2 divides them), and on the tensor x expert x fsdp mesh speculative
# decoding with the MTP depth too. One process per config (xdist runs the two side by side).
TENSOR = textwrap.dedent("""
    import dataclasses, functools, json, sys, jax, jax.numpy as jnp, numpy as np
    import dsmoe_jax
    from dsmoe_jax import inference, mesh as mesh_lib, sharding
    from dsmoe_jax.train.step import loss_fn
    from jax.sharding import PartitionSpec as P
    report = {}
    for name in sys.argv[1:]:
        mtp = ["model.mtp_depth=1"] if name == "tiny-v3" else []  # V3 with its MTP depth: loss and drafting
        cfg = dsmoe_jax.load_config(name, ["model.n_layers=2", "moe.n_routed_experts=12", *mtp])
        params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
        windows = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.model.vocab_size)
        grads = lambda c, p, w: jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg=c), has_aux=True))(p, w)
        (ref, (_, ref_aux, _)), ref_g = grads(cfg, params, windows)
        prompt = windows[:2, :6]
        decode = jax.jit(functools.partial(inference.generate, cfg=cfg.model, max_new_tokens=4, temperature=0.0))
        ref_tokens = decode(params, prompt, rng=jax.random.key(0))
        speculate = jax.jit(functools.partial(inference.generate_speculative, cfg=cfg.model, max_new_tokens=4))
        for sizes in ({"data": 2, "tensor": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}):
            mesh = mesh_lib.make_mesh(sizes)
            with jax.set_mesh(mesh):
                sharded = sharding.shard_params(params, cfg)
                (loss, (_, aux, _)), g = grads(cfg, sharded, jax.device_put(windows, mesh_lib.batch_sharding(mesh)))
                tokens = decode(sharded, prompt, rng=jax.random.key(0))
            lm_head = sharded["lm_head_DV"].sharding.spec
            assert "tensor" in jax.tree.leaves(tuple(lm_head)), (name, sizes, lm_head)
            assert abs(float(loss) - float(ref)) < 1e-5, (name, sizes, float(loss), float(ref))
            assert abs(float(aux.balance_loss) - float(ref_aux.balance_loss)) < 1e-7, (name, sizes)
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
                err = float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))
                assert err < 1e-5, (name, sizes, jax.tree_util.keystr(path), err)
            np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens), err_msg=f"{name} {sizes}")
            if mtp and "expert" in sizes:
                with jax.set_mesh(mesh):
                    drafted = speculate(sharded, prompt)[0]
                np.testing.assert_array_equal(np.asarray(drafted), np.asarray(ref_tokens), err_msg="speculative")
            report.setdefault(name, []).append(sizes)
    print(json.dumps(report))
""")


@pytest.mark.parametrize("name", ["tiny", pytest.param("tiny-v3", marks=pytest.mark.slow)])  # v3: a minute
def test_tensor_parallel_training_and_decoding_equal_one_device(name):
    report = json.loads(run_python(TENSOR, name).splitlines()[-1])
    assert report == {name: [{"data": 2, "tensor": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}]}, report


def test_a_tensor_axis_must_divide_what_it_splits(small_cfg):
    with pytest.raises(ConfigError, match=r"model.n_heads=4 does not split over the mesh's tensor axis of size 3"):
        dsmoe_jax.load_config("tiny", ["mesh.tensor=3"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=97 does not split over the mesh's tensor axis of size 2"):
        sharding.param_shardings(small_cfg, jax.sharding.AbstractMesh((1, 1, 1, 2), MESH_AXES))
