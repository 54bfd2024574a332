"""What a fine-tuning run trains, as a pytree transform of the model's parameters and the run's
adapter (LoRA's factors, which the params cannot hold; ``{}`` for the other tunings): ``select``
takes the trained part out (what the optimizer sees and keeps moments for), ``apply`` gives the
params the forward runs with, ``store`` puts an updated trained part back where it lives.

The train step differentiates the loss of ``apply(params, trainable)`` with respect to
``trainable`` only, so frozen parameters get no gradient and no optimizer state, and after any
number of steps they are the very arrays they were (``store`` writes only the trained part).

- ``all`` (the default): every parameter.
- ``esft``: the routed experts an ``expert_cfg.json`` names (rows of the stacked expert weights),
  plus the shared experts and every non-expert parameter when its flags say so.
- ``lora`` (``train.lora.rank > 0``): low-rank adapters of the weights ``train.lora.targets``
  names (``peft/lora.py``); the params are all frozen and the forward runs on W + s B A.
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
from dsmoe_jax.peft import lora
from dsmoe_jax.peft.esft import ExpertConfig

ROUTED = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")  # the stacked routed-expert weights of an MoE FFN


class Tuning(NamedTuple):
    """What a run trains, as pure functions of the params and the adapter, and the trained part's axes."""

    name: str
    # (params, adapter) -> the trained part; the adapter may be left out where the params hold it
    select: Callable[..., dict]
    apply: Callable[[dict, dict], dict]  # (params, trained part) -> the params the forward runs with
    axes: Callable[[dict], dict]  # the params' logical axes -> the trained part's
    store: Callable[[dict, dict, dict], tuple[dict, dict]]  # (params, adapter, trained part) -> (params, adapter)
    init: Callable[[dict, jax.Array], dict]  # (params, key) -> the run's first adapter


def _no_adapter(params: dict, key: jax.Array) -> dict:
    return {}


ALL = Tuning("all", lambda params, adapter=None: params, lambda params, trainable: trainable, lambda axes: axes,
             lambda params, adapter, trainable: (trainable, adapter), _no_adapter)


def make_tuning(cfg: Config) -> Tuning:
    """The ``Tuning`` of ``cfg.train.trainable`` and ``cfg.train.lora``."""
    if cfg.train.lora.rank:
        return lora_tuning(cfg)
    kind, path = parse_trainable(cfg.train.trainable)
    if kind == "all":
        return ALL
    return esft_tuning(ExpertConfig.read(path, cfg), cfg)


def lora_tuning(cfg: Config) -> Tuning:
    """LoRA's trained part: the adapter of ``cfg.train.lora``, held beside the params, which stay
    as they are; the forward runs on the merged weights (``lora.merge``)."""
    if not cfg.train.lora.rank:
        raise ConfigError("lora_tuning needs train.lora.rank > 0")
    return Tuning("lora", lambda params, adapter: adapter, lambda params, adapter: lora.merge(params, adapter, cfg),
                  lambda param_axes: lora.adapter_axes(param_axes, cfg),
                  lambda params, adapter, trainable: (params, trainable),
                  lambda params, key: lora.init_adapter(params, cfg, key))


def _key(path) -> str:
    return jax.tree_util.keystr(path)


class _Rows(NamedTuple):
    """The expert rows ESFT trains in one routed-expert leaf of one layer."""

    stacked: int | None  # the layer's index in its scanned group; None unrolled
    index: np.ndarray  # the expert ids, as rows of the leaf
    name: str  # "<layer>/<weight>": where the trained part keeps them


def _routed_rows(expert_cfg: ExpertConfig, cfg: ModelConfig) -> dict[tuple, _Rows]:
    """For each trained routed-expert leaf and layer, by its params path (in either layout; the
    scanned layout's key ends with the layer): the rows it trains."""
    groups = layer_groups(cfg) if cfg.scan_layers else {}
    rows = {}
    for layer, ids in expert_cfg.experts.items():
        if not ids:
            continue
        for name in ROUTED:
            trained = f"{layer}/{name}"
            if cfg.scan_layers:
                rows[("moe_layers", "ffn", name, layer)] = _Rows(groups["moe_layers"].index(layer), np.asarray(ids),
                                                                 trained)
            else:
                rows[("layers", layer, "ffn", name)] = _Rows(None, np.asarray(ids), trained)
    return rows


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

    def select(params: dict, adapter: dict | None = None) -> dict:
        out = {"experts": {}, "whole": {}}
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            names = lora.path_names(path)
            if whole(names):
                out["whole"][_key(path)] = leaf
            for key in routed_key(names):
                r = rows[key]
                out["experts"][r.name] = leaf[r.stacked][r.index] if r.stacked is not None else leaf[r.index]
        return out

    def apply(params: dict, trainable: dict) -> dict:
        def put(path, leaf):
            names = lora.path_names(path)
            if whole(names):
                return trainable["whole"][_key(path)]
            for key in routed_key(names):
                r = rows[key]
                rows_KDF = trainable["experts"][r.name]
                leaf = jnp.asarray(leaf)  # host arrays too (a checkpoint read to numpy)
                leaf = leaf.at[r.stacked, r.index].set(rows_KDF) if r.stacked is not None else \
                    leaf.at[r.index].set(rows_KDF)
            return leaf

        return jax.tree_util.tree_map_with_path(put, params)

    def axes(param_axes: dict) -> dict:
        """Whole parameters keep their axes; a layer's chosen expert rows lose the stacked-layer
        and expert axes (a handful of rows, not the expert axis the mesh splits)."""
        is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
        out = {"experts": {}, "whole": {}}
        for path, leaf_axes in jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=is_axes):
            names = lora.path_names(path)
            if whole(names):
                out["whole"][_key(path)] = leaf_axes
            for key in routed_key(names):
                dropped = 2 if names[0] in STACKED_GROUPS else 1
                out["experts"][rows[key].name] = (None, *leaf_axes[dropped:])
        return out

    if not rows and not expert_cfg.shared_experts and not expert_cfg.non_expert_modules:
        raise ConfigError("this expert_cfg trains nothing: no expert in any layer and both flags false")
    return Tuning("esft", select, apply, axes, lambda params, adapter, trainable: (apply(params, trainable), adapter),
                  _no_adapter)


def trained_shapes(tuning: Tuning, params_or_shapes: dict) -> dict:
    """The shapes of what ``tuning`` trains, from the params (or their shapes); nothing allocated."""
    return jax.eval_shape(lambda p: tuning.select(p, tuning.init(p, jax.random.key(0))), params_or_shapes)


def model_params(tuning: Tuning, params: dict, adapter: dict) -> dict:
    """The params the model runs with: ``params``, the adapter merged in where the run holds one."""
    return tuning.apply(params, tuning.select(params, adapter)) if adapter else params


def count(tuning: Tuning, params_or_shapes: dict) -> int:
    """How many parameters ``tuning`` trains."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(trained_shapes(tuning, params_or_shapes))))
