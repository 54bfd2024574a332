"""AdamW with global-norm clipping and the paper's learning-rate schedules (Optax)."""

from __future__ import annotations

import jax
import optax

from dsmoe_jax.config import TrainConfig
from dsmoe_jax.model import STACKED_GROUPS


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``lr``; then ``step``: x ``decay_factor`` at each ``decay_at`` fraction of
    ``steps`` (the paper: 0.316 at 80% and 90%), or ``constant`` (the 145B run)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        boundaries = {max(round(f * cfg.steps) - cfg.warmup_steps, 0): cfg.decay_factor for f in cfg.decay_at}
        after = optax.piecewise_constant_schedule(cfg.lr, boundaries)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only: norm scales and score biases (one vector per block) are not
    decayed. In the scanned layout the leading axis of stacked blocks does not count."""
    def is_matrix(path, p) -> bool:
        return p.ndim - (path[0].key in STACKED_GROUPS) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
