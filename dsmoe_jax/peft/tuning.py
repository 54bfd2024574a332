"""What a fine-tuning run trains, as a pytree transform: ``select`` takes the trained part out of
the model's parameters (what the optimizer sees and keeps moments for), ``apply`` puts it back.

The train step differentiates the loss of ``apply(params, trainable)`` with respect to
``trainable`` only, so frozen parameters get no gradient and no optimizer state, and after any
number of steps they are the very arrays they were (``apply`` writes only the trained rows).

- ``all`` (the default): every parameter.
- ``esft``: the routed experts an ``expert_cfg.json`` names (rows of the stacked expert weights),
  plus the shared experts and every non-expert parameter when its flags say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.config import Config, ModelConfig, model_config, parse_trainable
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.model import STACKED_GROUPS, layer_groups
from dsmoe_jax.peft.esft import ExpertConfig

ROUTED = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")  # the stacked routed-expert weights of an MoE FFN


class Tuning(NamedTuple):
    """A trained subset of the parameters, as two pure functions and the trained part's axes."""

    name: str
    select: Callable[[dict], dict]  # params -> the trained part
    apply: Callable[[dict, dict], dict]  # (params, trained part) -> params with it written back
    axes: Callable[[dict], dict]  # the params' logical axes -> the trained part's


ALL = Tuning("all", lambda params: params, lambda params, trainable: trainable, lambda axes: axes)


def make_tuning(cfg: Config) -> Tuning:
    """The ``Tuning`` of ``cfg.train.trainable``."""
    kind, path = parse_trainable(cfg.train.trainable)
    if kind == "all":
        return ALL
    return esft_tuning(ExpertConfig.read(path, cfg), cfg)


def _key(path) -> str:
    return jax.tree_util.keystr(path)


def _routed_rows(expert_cfg: ExpertConfig, cfg: ModelConfig) -> dict[tuple, tuple[int | None, tuple[int, ...]]]:
    """For each trained routed-expert leaf, by its params path (in either layout): the index of its
    layer in a stacked group (None unrolled) and the expert rows it trains."""
    groups = layer_groups(cfg) if cfg.scan_layers else {}
    rows = {}
    for layer, ids in expert_cfg.experts.items():
        if not ids:
            continue
        for name in ROUTED:
            if cfg.scan_layers:
                rows[("moe_layers", "ffn", name, layer)] = (groups["moe_layers"].index(layer), ids)
            else:
                rows[("layers", layer, "ffn", name)] = (None, ids)
    return rows


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def esft_tuning(expert_cfg: ExpertConfig, cfg: Config | ModelConfig) -> Tuning:
    """ESFT's trained part: the named routed experts' rows of each MoE layer, the shared experts
    (``shared_experts``) and every parameter outside the experts (``non_expert_modules``)."""
    m = model_config(cfg)
    rows = _routed_rows(expert_cfg, m)

    def whole(names: tuple) -> bool:
        """Whether a parameter is trained as a whole."""
        in_ffn = "ffn" in names
        if in_ffn and "shared" in names:
            return expert_cfg.shared_experts
        if in_ffn and names[-1] in ROUTED:
            return False
        return expert_cfg.non_expert_modules

    def routed_key(names: tuple):
        if m.scan_layers:
            return [k for k in rows if k[:3] == names]
        return [names] if names in rows else []

    def select(params: dict) -> dict:
        out = {"experts": {}, "whole": {}}
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            names = _path_names(path)
            if whole(names):
                out["whole"][_key(path)] = leaf
            for key in routed_key(names):
                layer, ids = rows[key]
                index = np.asarray(ids)
                out["experts"][f"{key[-1] if m.scan_layers else key[1]}/{names[-1]}"] = (
                    leaf[layer][index] if layer is not None else leaf[index])
        return out

    def apply(params: dict, trainable: dict) -> dict:
        def put(path, leaf):
            names = _path_names(path)
            if whole(names):
                return trainable["whole"][_key(path)]
            for key in routed_key(names):
                layer, ids = rows[key]
                index = np.asarray(ids)
                rows_KDF = trainable["experts"][f"{key[-1] if m.scan_layers else key[1]}/{names[-1]}"]
                leaf = jnp.asarray(leaf)  # host arrays too (a checkpoint read to numpy)
                leaf = leaf.at[layer, index].set(rows_KDF) if layer is not None else leaf.at[index].set(rows_KDF)
            return leaf

        return jax.tree_util.tree_map_with_path(put, params)

    def axes(param_axes: dict) -> dict:
        """Whole parameters keep their axes; a layer's chosen expert rows lose the stacked-layer
        and expert axes (a handful of rows, not the expert axis the mesh splits)."""
        is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
        out = {"experts": {}, "whole": {}}
        for path, leaf_axes in jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=is_axes):
            names = _path_names(path)
            if whole(names):
                out["whole"][_key(path)] = leaf_axes
            for key in routed_key(names):
                dropped = 2 if names[0] in STACKED_GROUPS else 1
                out["experts"][f"{key[-1] if m.scan_layers else key[1]}/{names[-1]}"] = (None, *leaf_axes[dropped:])
        return out

    if not rows and not expert_cfg.shared_experts and not expert_cfg.non_expert_modules:
        raise ConfigError("this expert_cfg trains nothing: no expert in any layer and both flags false")
    return Tuning("esft", select, apply, axes)


def count(tuning: Tuning, params_or_shapes: dict) -> int:
    """How many parameters ``tuning`` trains."""
    shapes = jax.eval_shape(tuning.select, params_or_shapes)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))
