"""Parameter shardings from the logical axes, on 8 fake CPU devices (a subprocess: the device
count is fixed when jax starts)."""

import json
import textwrap

from conftest import run_python

import dsmoe_jax


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
