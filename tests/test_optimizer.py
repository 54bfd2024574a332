"""The learning-rate schedules and AdamW's weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from dsmoe_jax import TrainConfig
from dsmoe_jax.train.optimizer import learning_rate, make_optimizer


def test_step_schedule_has_the_paper_factors():
    s = learning_rate(TrainConfig(steps=1000, lr=1.0, warmup_steps=100))
    values = {step: float(s(step)) for step in (0, 50, 100, 799, 800, 899, 900, 999)}
    assert values[0] == 0.0 and values[50] == pytest.approx(0.5), "linear warmup"
    assert values[100] == pytest.approx(1.0) and values[799] == pytest.approx(1.0), "full lr until 80%"
    assert values[800] == pytest.approx(0.316) and values[899] == pytest.approx(0.316), "x0.316 at 80%"
    assert values[900] == pytest.approx(0.316**2) and values[999] == pytest.approx(0.316**2), "again at 90%"


def test_constant_schedule_after_warmup():
    s = learning_rate(TrainConfig(steps=1000, lr=3e-4, warmup_steps=10, schedule="constant"))
    assert float(s(5)) == pytest.approx(1.5e-4) and float(s(999)) == pytest.approx(3e-4)


def test_weight_decay_applies_to_matrices_not_norms():
    opt = make_optimizer(TrainConfig(lr=0.1, warmup_steps=0, weight_decay=0.5))
    params = {"w_DF": jnp.ones((2, 3)), "scale_D": jnp.ones((3,))}
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates["w_DF"], -0.1 * 0.5, rtol=1e-6, err_msg="decoupled decay: -lr * wd * w")
    np.testing.assert_array_equal(updates["scale_D"], 0.0)



def test_weight_decay_mask_is_the_same_in_both_params_layouts(small_cfg):
    """Stacked blocks add a leading axis: their norm scales are [layers, D], still not decayed."""
    import dataclasses

    import jax

    import dsmoe_jax
    from dsmoe_jax.train.optimizer import decay_mask

    scanned = dataclasses.replace(small_cfg, scan_layers=True)
    unrolled_mask = decay_mask(dsmoe_jax.param_shapes(small_cfg))
    scanned_mask = decay_mask(dsmoe_jax.param_shapes(scanned))
    assert scanned_mask["moe_layers"]["attn_norm"]["scale_D"] is False
    assert scanned_mask["moe_layers"]["ffn"]["w_gate_EDF"] is True
    stacked = dsmoe_jax.match_layout(jax.tree.map(jnp.asarray, unrolled_mask), scanned)
    assert jax.tree.map(lambda a: bool(a.all()), stacked) == scanned_mask
