"""LoRA (Hu et al. 2021, arXiv 2106.09685) as pure functions of the params and an adapter.

An adapter holds, for each adapted weight W, factors A [R, I] and B [O, R]; the model runs with
W + s B A, s = alpha / rank (``train.lora``; PEFT's ``scaling``). I is W's input, the axes the
forward contracts with the activations, flattened (w_q_DNH: D; w_o_NHD: N and H), and O the rest,
flattened in order: the ``[out, in]`` weight of the HF module, whose LoRA factors PEFT stores as
they are. ``train.lora.targets`` chooses the weights: ``attention`` (q/k/v/o, or MLA's q, q_a,
q_b, kv_a, kv_b and o), ``dense_ffn`` (the dense blocks' gate/up/down), ``shared_experts``,
``routed_experts`` (each expert its own factors). Multi-token-prediction blocks are not adapted.

The adapter is a tree like the params: the path of each adapted weight leads to
``{"a_RI": A, "b_OR": B}``, stacked on the same leading axes as the weight (the layers of a
scanned group, the routed experts).

Shape legend: R rank, I input features, O output features, L stacked layers, E routed experts,
``...`` the leading axes (L, E or both); in our weights' names, D model width, N heads, K kv
heads, H head width, F hidden width, and MLA's Q, A, C, J, X, W (``mla.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.atomic import atomic_directory
from dsmoe_jax.config import LORA_TARGETS, Config, ModelConfig
from dsmoe_jax.errors import CheckpointError, ConfigError
from dsmoe_jax.model import layer_groups, param_shapes, unrolled

# Each weight LoRA can adapt: its target kind ("ffn": dense_ffn or shared_experts, by where it
# sits) and how many of its axes are its input; the rest of the letters after the routed
# experts' E are its output.
WEIGHTS = {
    "w_q_DNH": ("attention", 1), "w_k_DKH": ("attention", 1), "w_v_DKH": ("attention", 1),
    "w_o_NHD": ("attention", 2),
    "w_q_DNJ": ("attention", 1), "w_q_a_DQ": ("attention", 1), "w_q_b_QNJ": ("attention", 1),
    "w_kv_a_DA": ("attention", 1), "w_kv_b_CNX": ("attention", 1), "w_o_NWD": ("attention", 2),
    "w_gate_DF": ("ffn", 1), "w_up_DF": ("ffn", 1), "w_down_FD": ("ffn", 1),
    "w_gate_EDF": ("routed_experts", 1), "w_up_EDF": ("routed_experts", 1), "w_down_EFD": ("routed_experts", 1),
}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names


def path_names(path) -> tuple:
    """A params tree path's keys and indices, e.g. ``("layers", 1, "ffn", "w_gate_EDF")``."""
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def kind_of(names: tuple) -> str | None:
    """The target kind of the weight at params path ``names`` (either layout); None for a
    weight LoRA never adapts (embeddings, norms, the router, MTP blocks)."""
    if names[0] == "mtp" or names[-1] not in WEIGHTS:
        return None
    kind = WEIGHTS[names[-1]][0]
    if kind == "ffn":
        return "shared_experts" if "shared" in names else "dense_ffn"
    return kind


def _split(name: str, shape: tuple) -> tuple[tuple, int, int]:
    """A weight's shape as (its leading axes, I, O)."""
    letters = name.rsplit("_", 1)[1].removeprefix("E" if WEIGHTS[name][0] == "routed_experts" else "")
    n_in, core = WEIGHTS[name][1], len(letters)
    lead, in_out = shape[:len(shape) - core], shape[len(shape) - core:]
    return tuple(lead), math.prod(in_out[:n_in]), math.prod(in_out[n_in:])


def _adapted(tree: dict, targets: Sequence[str], is_leaf=None) -> Iterator[tuple[tuple, object]]:
    """(params path, leaf) of each weight of ``tree`` (params, shapes or axes) that ``targets`` adapt."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf):
        names = path_names(path)
        if kind_of(names) in targets:
            yield names, leaf


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _factors(tree: dict) -> Iterator[tuple[tuple, dict]]:
    """(params path, ``{"a_RI", "b_OR"}``) of each adapted weight of an adapter."""
    for path, node in tree.items():
        if "a_RI" in node:
            yield (path,), node
        else:
            for sub, factors in _factors(node):
                yield (path, *sub), factors


def init_adapter(params: dict, cfg: Config, key: jax.Array) -> dict:
    """A fresh adapter of the weights ``cfg.train.lora.targets`` names in ``params`` (arrays or
    shapes): A as PEFT draws it (kaiming-uniform with a = sqrt(5): U(-1/sqrt(I), 1/sqrt(I))) and
    B = 0, so that the model computes what it did without the adapter. Float32 whatever the params."""
    lora = cfg.train.lora
    adapter: dict = {}
    for index, (names, w) in enumerate(_adapted(params, lora.targets)):
        lead, n_in, n_out = _split(names[-1], w.shape)
        bound = 1 / math.sqrt(n_in)
        a_RI = jax.random.uniform(jax.random.fold_in(key, index), (*lead, lora.rank, n_in), jnp.float32, -bound, bound)
        _set(adapter, names, {"a_RI": a_RI, "b_OR": jnp.zeros((*lead, n_out, lora.rank), jnp.float32)})
    return adapter


def delta(shape: tuple, a_RI: jax.Array, b_OR: jax.Array) -> jax.Array:
    """B @ A in the layout of a weight of ``shape``: its leading axes, its input axes, its output's."""
    # HIGHEST: on GPUs float32 matmuls otherwise run as TF32, and the update is what training moves
    d_IO = jnp.einsum("...ri,...or->...io", a_RI, b_OR, precision=jax.lax.Precision.HIGHEST)
    return d_IO.reshape(shape)


def merge(params: dict, adapter: dict, cfg: Config) -> dict:
    """``params`` with each adapted weight W replaced by W + s B A (in W's dtype), s =
    ``cfg.train.lora.scale``; differentiable in ``adapter``, and every other leaf is the very
    array it was."""
    if not adapter:
        return params
    scale = cfg.train.lora.scale
    out = dict(params)
    for names, factors in _factors(adapter):
        parent = out
        for p in names[:-1]:  # copy the dicts on the way only
            parent[p] = dict(parent[p])
            parent = parent[p]
        w = parent[names[-1]]
        d = delta(w.shape, factors["a_RI"], factors["b_OR"])
        parent[names[-1]] = (w + scale * d).astype(w.dtype)
    return out


def adapter_axes(param_axes: dict, cfg: Config) -> dict:
    """The adapter's logical axes from the params': the leading ones (layers, experts) as the
    weight's, an input or output of one axis as that axis, a flattened one and the rank unsplit."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    out: dict = {}
    for names, axes in _adapted(param_axes, cfg.train.lora.targets, is_leaf=is_axes):
        letters = names[-1].rsplit("_", 1)[1]
        n_in = WEIGHTS[names[-1]][1]
        core = len(letters) - (WEIGHTS[names[-1]][0] == "routed_experts")
        lead, ins, outs = axes[:len(axes) - core], axes[len(axes) - core:][:n_in], axes[len(axes) - core:][n_in:]
        one = lambda a: a[0] if len(a) == 1 else None
        _set(out, names, {"a_RI": (*lead, None, one(ins)), "b_OR": (*lead, one(outs), None)})
    return out


def weighted_sum(adapters: Sequence[dict], weights: Sequence[float], cfgs: Sequence[Config]) -> tuple[dict, Config]:
    """One adapter computing sum_i w_i s_i B_i A_i for each weight: PEFT's ``add_weighted_adapter``
    with ``combination_type="cat"``. Its rank is the sum of the ranks: A stacks the w_i s_i A_i,
    B the B_i (zeros where adapter i leaves a weight out), and its alpha is that rank, scale 1.
    ``cfgs[i]`` is adapter i's config (its scale); they must share a model. Returns the adapter
    and its config (the first one's, with the new ``train.lora``)."""
    if not (len(adapters) == len(weights) == len(cfgs) >= 1):
        raise ValueError(f"weighted_sum takes as many weights and configs as adapters (at least one), got "
                         f"{len(adapters)} adapters, {len(weights)} weights, {len(cfgs)} configs")
    others = [i for i, c in enumerate(cfgs) if c.model != cfgs[0].model]
    if others:
        raise ConfigError(f"weighted_sum: adapters {others} are for another model than adapter 0")
    each = [dict(_factors(adapter)) for adapter in adapters]
    leaves = {names: factors for held in each for names, factors in held.items()}
    out: dict = {}
    for names, like in leaves.items():
        a_parts, b_parts = [], []
        for held, w, c in zip(each, weights, cfgs):
            factors = held.get(names)
            rank = c.train.lora.rank
            if factors is None:  # this adapter leaves the weight as it is
                factors = {"a_RI": jnp.zeros((*like["a_RI"].shape[:-2], rank, like["a_RI"].shape[-1])),
                           "b_OR": jnp.zeros((*like["b_OR"].shape[:-1], rank))}
            a_parts.append(w * c.train.lora.scale * factors["a_RI"])
            b_parts.append(factors["b_OR"])
        _set(out, names, {"a_RI": jnp.concatenate(a_parts, axis=-2), "b_OR": jnp.concatenate(b_parts, axis=-1)})
    rank = sum(c.train.lora.rank for c in cfgs)
    targets = tuple(t for t in LORA_TARGETS if any(t in c.train.lora.targets for c in cfgs))
    lora = dataclasses.replace(cfgs[0].train.lora, rank=rank, alpha=float(rank), targets=targets)
    return out, dataclasses.replace(cfgs[0], train=dataclasses.replace(cfgs[0].train, lora=lora))


# ---- PEFT's files --------------------------------------------------------------------------


def _hf_modules(cfg: ModelConfig) -> dict[str, str]:
    """Our unrolled weight pattern (``layers/{i}/attn/w_q_DNH``) -> its HF module's name
    (``model.layers.{i}.self_attn.q_proj``; ``{e}`` a routed expert), from the conversion map."""
    from dsmoe_jax.convert.mapping import WHEN, format_for

    try:
        fmt = format_for(cfg)
    except ConfigError as e:
        raise ConfigError(f"a LoRA adapter is saved under the HF DeepSeek module names, and {e}") from None
    return {t.ours: t.hf.removesuffix(".weight") for t in fmt.tensors
            if WHEN[t.when](cfg) and t.ours.split("/")[-1] in WEIGHTS}


def _unrolled(adapter: dict, cfg: ModelConfig) -> dict:
    """An adapter of ``cfg``'s layout, one subtree per block."""
    if not cfg.scan_layers:
        return adapter
    groups = layer_groups(cfg)
    return {"layers": {i: jax.tree.map(lambda a, j=j: a[j], sub)
                       for name, sub in adapter.items() for j, i in enumerate(groups[name])}}


def _layout(adapter: dict, cfg: ModelConfig) -> dict:
    """An unrolled adapter in ``cfg``'s layout (each scanned group's blocks stacked)."""
    if not cfg.scan_layers:
        return adapter
    layers = adapter.get("layers", {})
    return {name: jax.tree.map(lambda *a: np.stack(a), *[layers[i] for i in blocks])
            for name, blocks in layer_groups(cfg).items() if blocks[0] in layers}


def lora_modules(cfg: ModelConfig, targets: Sequence[str]) -> dict[str, tuple[tuple, int | None]]:
    """Each HF module the adapters of ``targets`` attach to, in the model's order: its name ->
    (our weight's path in the unrolled layout, the routed expert or None)."""
    patterns = _hf_modules(cfg)
    out = {}
    for names, shape in _adapted(param_shapes(unrolled(cfg)), targets):
        pattern = patterns["/".join("{i}" if k == 1 else str(n) for k, n in enumerate(names))]
        experts = range(shape.shape[0]) if WEIGHTS[names[-1]][0] == "routed_experts" else [None]
        out.update({pattern.format(i=names[1], e=e): (names, e) for e in experts})
    return out


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _alpha(lora) -> float:
    return float(lora.rank if lora.alpha is None else lora.alpha)


def save_peft(directory: str | pathlib.Path, adapter: dict, cfg: Config, base_model: str | None = None) -> pathlib.Path:
    """Write ``adapter`` (of ``cfg``'s model and ``train.lora``) as PEFT saves a LoRA adapter, into
    the new directory ``directory``, atomically: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` [R, I] and
    ``lora_B.weight`` [O, R] in float32, routed experts one module each (the per-expert Linear
    layers of DeepSeek's own modeling code; peft converts them onto the fused expert parameters of
    transformers 5's DeepSeek-V2/V3). ``base_model``: recorded as ``base_model_name_or_path`` (an
    HF id or path; None leaves it to whoever loads it). ``PeftModel.from_pretrained`` reads it."""
    from safetensors.numpy import save_file

    lora = cfg.train.lora
    modules = lora_modules(cfg.model, lora.targets)
    flat = _unrolled(adapter, cfg.model)
    held = {names for names, _ in _factors(flat)}
    wanted = {names for names, _ in modules.values()}
    if held != wanted:
        raise ConfigError(f"this adapter does not adapt what train.lora.targets = {list(lora.targets)} names: "
                          f"{len(held - wanted)} weights more, {len(wanted - held)} fewer (pass the run's config)")
    tensors = {}
    for module, (names, e) in modules.items():
        factors = _get(flat, names)
        a_RI, b_OR = np.asarray(factors["a_RI"], np.float32), np.asarray(factors["b_OR"], np.float32)
        if e is not None:
            a_RI, b_OR = a_RI[e], b_OR[e]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_RI)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_OR)
    # every block's modules have the same names after "model.layers.{i}.": PEFT matches those suffixes
    targets = list(dict.fromkeys(module.split(".", 3)[3] for module in modules))
    alpha = _alpha(lora)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": lora.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return pathlib.Path(directory)


# settings of PEFT's LoRA that change what the adapter computes, and the only value read here
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
FACTORS = {".lora_A.weight": "a_RI", ".lora_B.weight": "b_OR"}  # PEFT's tensor name suffix -> ours


def _read_config(directory: pathlib.Path) -> dict:
    """A PEFT LoRA directory's ``adapter_config.json``, refused where this code would compute
    something else than PEFT does."""
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    raw = json.loads((directory / CONFIG_FILE).read_text())
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{directory}: peft_type {raw.get('peft_type')!r}; only LoRA adapters ('LORA') are read")
    odd = [f"{k} = {raw[k]!r}" for k, want in UNSUPPORTED.items() if raw.get(k) and raw[k] != want]
    if odd:
        raise CheckpointError(f"{directory}: {', '.join(odd)} is not supported (plain LoRA only)")
    return raw


def _module_of(directory: pathlib.Path, key: str) -> tuple[str, str]:
    """(HF module, ``a_RI`` or ``b_OR``) of a tensor name of PEFT's adapter file."""
    suffix = next((s for s in FACTORS if key.endswith(s)), None)
    if not key.startswith(PREFIX) or suffix is None:
        raise CheckpointError(f"{directory}: tensor {key} is not a LoRA factor of a module (lora_A or lora_B)")
    return key[len(PREFIX):-len(suffix)], FACTORS[suffix]


def _kinds(directory: pathlib.Path, modules, cfg: ModelConfig) -> tuple[str, ...]:
    """The target kinds of the HF ``modules`` an adapter adapts; one the model lacks is refused."""
    known = lora_modules(cfg, [t for t in LORA_TARGETS if t in _present_kinds(cfg)])
    unknown = [module for module in modules if module not in known]
    if unknown:
        raise CheckpointError(f"{directory} adapts {len(unknown)} modules this model does not have (first "
                              f"{unknown[0]}): an adapter of another base model")
    return tuple(t for t in LORA_TARGETS if any(kind_of(known[module][0]) == t for module in modules))


def peft_lora_config(directory: str | pathlib.Path, cfg: Config) -> Config:
    """``cfg`` with the ``train.lora`` of the PEFT LoRA adapter in ``directory`` (its rank, alpha
    and the targets its modules make up), which ``load_peft`` and ``merge`` then take."""
    from safetensors import safe_open

    directory = pathlib.Path(directory)
    raw = _read_config(directory)
    with safe_open(str(directory / WEIGHTS_FILE), "np") as f:
        modules = dict.fromkeys(_module_of(directory, key)[0] for key in f.keys())
    lora = dataclasses.replace(cfg.train.lora, rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                               dropout=0.0, targets=_kinds(directory, modules, cfg.model))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora=lora, trainable="all"))


def load_peft(directory: str | pathlib.Path, cfg: Config) -> dict:
    """The adapter a PEFT LoRA directory holds, in ``cfg``'s params layout, to ``merge`` into
    ``cfg``'s model. Refused, with what differs: an adapter of modules this model lacks or of
    other shapes (another base model), one whose rank, alpha or targets are not ``cfg.train.lora``'s
    (``peft_lora_config`` gives a config with the adapter's), or one that uses PEFT settings this
    code does not compute (``UNSUPPORTED``). Its ``lora_dropout`` counts only in training."""
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    raw = _read_config(directory)
    m = cfg.model
    by_module: dict[str, dict] = {}
    for key, array in load_file(str(directory / WEIGHTS_FILE)).items():
        module, part = _module_of(directory, key)
        by_module.setdefault(module, {})[part] = array
    kinds = _kinds(directory, by_module, m)
    lora, alpha = cfg.train.lora, float(raw.get("lora_alpha", 8))
    differ = [f"{theirs} (adapter) vs {ours} (config)" for theirs, ours, same in (
        (f"r = {raw.get('r')}", f"train.lora.rank = {lora.rank}", raw.get("r") == lora.rank),
        (f"lora_alpha = {alpha:g}", f"train.lora.alpha = {_alpha(lora):g}", alpha == _alpha(lora)),
        (f"targets {list(kinds)}", f"train.lora.targets = {list(lora.targets)}", set(kinds) == set(lora.targets)))
        if not same]
    if differ:
        raise ConfigError(f"{directory} is an adapter of other LoRA settings: {'; '.join(differ)}; set the config's "
                          "train.lora keys to the adapter's (peft_lora_config does)")
    wanted = lora_modules(m, lora.targets)
    missing = [module for module in wanted if module not in by_module]
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} of the {len(wanted)} modules its targets cover "
                              f"(first {missing[0]}): an adapter of another base model, or of some layers only")
    shapes = param_shapes(unrolled(m))
    parts: dict[tuple, dict] = {}
    for module, (names, e) in wanted.items():
        _, n_in, n_out = _split(names[-1], _get(shapes, names).shape)
        for part, shape in {"a_RI": (lora.rank, n_in), "b_OR": (n_out, lora.rank)}.items():
            got = by_module[module].get(part)
            if got is None or got.shape != shape:
                raise CheckpointError(f"{directory}: {module}'s {'lora_A' if part == 'a_RI' else 'lora_B'} has shape "
                                      f"{None if got is None else got.shape}, this model needs {shape}: an adapter "
                                      "of another base model")
        parts.setdefault(names, {})[e] = by_module[module]
    flat: dict = {}
    for names, by_expert in parts.items():
        order = sorted(by_expert, key=lambda e: -1 if e is None else e)
        stack = (lambda arrays: arrays[0]) if order == [None] else np.stack
        _set(flat, names, {k: stack([by_expert[e][k].astype(np.float32) for e in order]) for k in ("a_RI", "b_OR")})
    return jax.tree.map(jnp.asarray, _layout(flat, m))


def _present_kinds(cfg: ModelConfig) -> set[str]:
    """The target kinds the model of ``cfg`` has weights of."""
    return {kind_of(names) for names, _ in _adapted(param_shapes(unrolled(cfg)), LORA_TARGETS)}
