"""The expert-parallel exchange on 8 fake CPU devices (a subprocess: the device count is fixed
when jax starts): loss and gradients equal one device's, and the exchange equals a token-by-token
reference, dense and (through an emulation of its semantics) ragged."""

import json
import textwrap

import pytest
from conftest import run_python

EQUIVALENCE = textwrap.dedent("""
    import dataclasses, functools, json, jax, jax.numpy as jnp, numpy as np
    import dsmoe_jax
    from dsmoe_jax import mesh as mesh_lib, sharding
    from dsmoe_jax.train.step import loss_fn
    cfg = dsmoe_jax.load_config("tiny", ["model.n_layers=2", "moe.n_routed_experts=16", "moe.top_k=3",
                                         "moe.device_aux_alpha=0.01"])
    params = dsmoe_jax.init_params(cfg.model, jax.random.key(0))
    windows = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.model.vocab_size)
    grads = lambda c, p, w: jax.jit(jax.value_and_grad(functools.partial(loss_fn, cfg=c), has_aux=True))(p, w)
    report = {"equal": []}
    for ep in (1, 2, 4, 8):
        # one device, the device-level loss told the grouping explicitly ...
        moe = dataclasses.replace(cfg.model.moe, device_groups=ep)
        one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
        (ref, (_, ref_aux, _)), ref_g = grads(one, params, windows)
        # ... equals expert parallelism over ep devices, the grouping taken from the mesh
        mesh = mesh_lib.make_mesh({"data": 8 // ep, "expert": ep})
        with jax.set_mesh(mesh):
            (loss, (_, aux, _)), g = grads(cfg, sharding.shard_params(params, cfg),
                                   jax.device_put(windows, mesh_lib.batch_sharding(mesh)))
        w = g["layers"][1]["ffn"]["w_gate_EDF"]
        assert ep == 1 or w.sharding.spec[0] == "expert", (ep, w.sharding)
        assert abs(float(loss) - float(ref)) < 1e-5, (ep, float(loss), float(ref))
        assert abs(float(aux.device_balance_loss) - float(ref_aux.device_balance_loss)) < 1e-8, ep
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
            err = float(jnp.abs(a - b).max() / jnp.abs(b).max())
            assert err < 1e-5, (ep, jax.tree_util.keystr(path), err)
        report["equal"].append(ep)
    # the scanned layout under the same mesh (ep = 8): stacked experts split on their expert axis
    scanned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=True))
    with jax.set_mesh(mesh):
        (loss_s, _), g_s = grads(scanned, sharding.shard_params(dsmoe_jax.match_layout(params, scanned), scanned),
                                 jax.device_put(windows, mesh_lib.batch_sharding(mesh)))
    assert g_s["moe_layers"]["ffn"]["w_gate_EDF"].sharding.spec[:2] == (None, "expert"), g_s["moe_layers"]
    assert abs(float(loss_s) - float(loss)) < 1e-5, (float(loss_s), float(loss))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dsmoe_jax.match_layout(g_s, cfg)), jax.tree.leaves(g)):
        assert float(jnp.abs(a - b).max() / jnp.abs(b).max()) < 1e-5, jax.tree_util.keystr(path)
    report["scanned"] = True
    # a batch too small to split over the mesh (one sequence of 3 tokens) runs its experts in place
    ref, _ = dsmoe_jax.forward(params, windows[:1, :3], cfg.model)
    with jax.set_mesh(mesh_lib.make_mesh({"expert": 8})):
        out, _ = jax.jit(functools.partial(dsmoe_jax.forward, cfg=cfg.model))(
            sharding.shard_params(params, cfg), windows[:1, :3])
    np.testing.assert_allclose(out, ref, atol=2e-5)
    report["small_batch_in_place"] = True
    print(json.dumps(report))
""")


@pytest.mark.slow  # about 60 s (8 fake devices, four meshes and the scanned layout): run with -m slow
def test_expert_parallel_loss_and_gradients_equal_one_device():
    report = json.loads(run_python(EQUIVALENCE).splitlines()[-1])
    assert report == {"equal": [1, 2, 4, 8], "scanned": True, "small_batch_in_place": True}, report


EXCHANGE = textwrap.dedent("""
    import json, math, jax, jax.numpy as jnp, numpy as np
    from dsmoe_jax import MoEConfig, expert_parallel as ep_lib, mesh as mesh_lib
    from helpers import ragged_all_to_all_reference
    T, K, E, D, F, ep = 64, 3, 8, 16, 8, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    # skewed routing, distinct experts per token: expert 0 is half the first choices, so capacity bites
    first = np.where(rng.random(T) < 0.5, 0, rng.integers(1, E, T))
    expert = np.stack([np.r_[f, rng.permutation([e for e in range(E) if e != f])[:K - 1]] for f in first])
    expert = expert.astype(np.int32)
    # top-p routing's empty slots (id E, gate 0) in a third of the later slots: no row, no capacity
    empty = np.where((rng.random((T, K)) < 1 / 3) & (np.arange(K) > 0), E, expert).astype(np.int32)
    gate = rng.random((T, K)).astype(np.float32)
    wg, wu = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    silu = lambda a: a / (1 + np.exp(-a))
    mesh = mesh_lib.make_mesh({"data": 2, "expert": ep})
    shards = 2 * ep
    report = {"dropped": {}}
    # the dense exchange, and the ragged one's bookkeeping (XLA:CPU has no ragged all_to_all)
    for factor, ragged, slots in [(f, r, s) for s in ("full", "empty") for f in (0.0, 1.0)
                                  for r in (None, ragged_all_to_all_reference)]:
        cfg = MoEConfig(n_routed_experts=E, top_k=K, expert_d_ff=F, capacity_factor=factor)
        chosen = expert if slots == "full" else empty
        gates = np.where(chosen < E, gate, 0.0).astype(np.float32)
        with jax.set_mesh(mesh):
            y, keep = jax.jit(lambda *a: ep_lib.expert_parallel(*a, cfg, ragged))(x, chosen, gates, wg, wu, wd)
        # reference, token by token: each device's tokens compete for capacity on their own,
        # first choices of all tokens before any second choice, earlier tokens first (GShard)
        Tl = T // shards
        cap = math.ceil(factor * Tl * K / E) if factor else None
        want_keep, want_y = np.zeros((T, K), bool), np.zeros((T, D), np.float32)
        for s in range(shards):
            used = np.zeros(E, int)
            for k in range(K):
                for t in range(s * Tl, (s + 1) * Tl):
                    e = chosen[t, k]
                    if e == E:  # an empty slot: not an assignment
                        continue
                    used[e] += 1
                    want_keep[t, k] = cap is None or used[e] <= cap
                    if want_keep[t, k]:
                        want_y[t] += gate[t, k] * (silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e]
        np.testing.assert_array_equal(np.asarray(keep), want_keep)
        np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
        report["dropped"][f"capacity {factor}, {'ragged' if ragged else 'dense'}, {slots}"] = \
            int((~want_keep & (chosen < E)).sum())
    # gradients through both exchanges agree (through the ragged one by the autodiff of its emulation)
    cfg = MoEConfig(n_routed_experts=E, top_k=K, expert_d_ff=F)
    def loss(ragged, *args):
        y, _ = ep_lib.expert_parallel(*args, cfg, ragged)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
    with jax.set_mesh(mesh):
        grads = [jax.jit(jax.grad(lambda *a, r=r: loss(r, *a), argnums=(0, 2, 3, 4, 5)))(x, expert, gate, wg, wu, wd)
                 for r in (None, ragged_all_to_all_reference)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    report["gradients_agree"] = True
    print(json.dumps(report))
""")


def test_expert_parallel_exchange_against_a_token_by_token_reference():
    report = json.loads(run_python(EXCHANGE).splitlines()[-1])
    dropped = report["dropped"]
    for slots in ("full", "empty"):  # every slot taken, and top-p routing's empty slots
        assert dropped[f"capacity 0.0, dense, {slots}"] == dropped[f"capacity 0.0, ragged, {slots}"] == 0, \
            "dropless drops nothing"
        assert dropped[f"capacity 1.0, dense, {slots}"] == dropped[f"capacity 1.0, ragged, {slots}"] > 0, \
            "the capacity case must actually drop assignments"
    assert dropped["capacity 1.0, dense, empty"] < dropped["capacity 1.0, dense, full"], \
        "empty slots take no capacity: fewer assignments compete for it"
    assert report["gradients_agree"]

