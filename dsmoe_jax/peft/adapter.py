"""Adapters as files beside a base model, in the formats their users already have: ESFT's as
DeepSeek ships them (below), LoRA's in PEFT's format (``lora.py``).

An ESFT adapter is what DeepSeek ships (deepseek-ai/ESFT): a directory with ``expert_cfg.json``
and safetensors holding only the trained tensors, under the base model's Hugging Face names
(``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` ...), which its ``add_adapter`` loads
into the transformers model. ``save_esft`` writes one from fine-tuned params, ``apply_adapter``
puts one onto base params (the merged model), ``merge_adapter`` writes the merged checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import jax
import numpy as np
from orbax.checkpoint import v1 as ocp_v1
from safetensors.numpy import load_file, save_file

from dsmoe_jax.atomic import atomic_directory
from dsmoe_jax.checkpoint import PARAMS_DIR, load_checkpoint, write_config
from dsmoe_jax.config import Config, ModelConfig, model_config
from dsmoe_jax.convert.mapping import hf_shapes, params_from_hf, params_to_hf
from dsmoe_jax.errors import CheckpointError
from dsmoe_jax.model import match_layout, unrolled
from dsmoe_jax.peft import lora
from dsmoe_jax.peft.esft import EXPERT_CFG, ExpertConfig, moe_layers

ESFT_WEIGHTS = "adapter.safetensors"
ADAPTER_DIR = "adapter"  # where a fine-tuning run writes its adapter, in its workdir


def esft_names(expert_cfg: ExpertConfig, cfg: Config | ModelConfig) -> list[str]:
    """The HF names of the tensors an ESFT adapter of ``expert_cfg`` holds, in the base model's order."""
    moe = set(moe_layers(cfg))

    def trained(name: str) -> bool:
        parts = name.split(".")
        layer = int(parts[2]) if parts[:2] == ["model", "layers"] else None
        if layer in moe and parts[3:5] == ["mlp", "experts"]:
            return int(parts[5]) in expert_cfg.experts.get(layer, ())
        if layer in moe and parts[3:5] == ["mlp", "shared_experts"]:
            return expert_cfg.shared_experts
        return expert_cfg.non_expert_modules

    return [name for name in hf_shapes(model_config(cfg)) if trained(name)]


def save_esft(out: str | os.PathLike, params: dict, cfg: Config | ModelConfig, expert_cfg: ExpertConfig) -> None:
    """Write an ESFT adapter of fine-tuned ``params``: ``expert_cfg.json`` and the trained tensors
    (``adapter.safetensors``, HF names), as a directory that appears whole or not at all."""
    m = model_config(cfg)
    wanted = set(esft_names(expert_cfg, m))
    tensors = {name: array for name, array in params_to_hf(params, m) if name in wanted}
    with atomic_directory(out) as tmp:
        expert_cfg.write(tmp / EXPERT_CFG)
        save_file(tensors, str(tmp / ESFT_WEIGHTS), metadata={"format": "pt"})


def read_esft(directory: str | os.PathLike, cfg: Config | ModelConfig) -> tuple[ExpertConfig, dict[str, np.ndarray]]:
    """An ESFT adapter's expert config and tensors (every ``*.safetensors`` file in it, as
    DeepSeek's loader reads them), checked against the base model ``cfg``: each tensor is one the
    expert config names, of the base model's shape, and none is missing."""
    directory = pathlib.Path(directory)
    expert_cfg = ExpertConfig.read(directory / EXPERT_CFG, cfg)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, array in load_file(str(file)).items():
            # DeepSeek's loader accepts names saved without the model prefix too
            tensors["model." + name if name.startswith("layers.") else name] = array
    shapes = hf_shapes(model_config(cfg))
    expected = esft_names(expert_cfg, cfg)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        known = "not a tensor of this base model" if extra[0] not in shapes else f"not named by its {EXPERT_CFG}"
        raise CheckpointError(f"adapter {directory}: tensor {extra[0]} is {known} ({len(extra)} such); it was made "
                              "for another base model or its expert config does not match its weights")
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"adapter {directory}: {EXPERT_CFG} trains {missing[0]} but the adapter holds no such "
                              f"tensor ({len(missing)} missing)")
    for name in expected:
        if tuple(tensors[name].shape) != shapes[name]:
            shape = tuple(tensors[name].shape)
            raise CheckpointError(f"adapter {directory}: tensor {name} has shape {shape}, the base model's is "
                                  f"{shapes[name]}: the adapter was made for another base model")
    return expert_cfg, tensors


def apply_adapter(params: dict, cfg: Config | ModelConfig, directory: str | os.PathLike) -> dict:
    """``params`` with the adapter in ``directory`` applied (the merged model): an ESFT adapter's
    tensors replace the base model's, as DeepSeek's ``add_adapter`` loads them; a LoRA adapter in
    PEFT's format adds its (alpha / r) B A to each weight it adapts."""
    directory = pathlib.Path(directory)
    m = model_config(cfg)
    if (directory / lora.CONFIG_FILE).is_file():
        run = lora.peft_lora_config(directory, Config(model=m))
        return lora.merge(params, lora.load_peft(directory, run), run)
    if not (directory / EXPERT_CFG).is_file():
        raise CheckpointError(f"{directory} is not an adapter: it holds neither {EXPERT_CFG} (an ESFT adapter, as "
                              f"DeepSeek ships them) nor {lora.CONFIG_FILE} (a LoRA adapter in PEFT's format)")
    _, tensors = read_esft(directory, m)
    base = match_layout(params, unrolled(m))
    hf = dict(params_to_hf(base, m))
    hf.update(tensors)
    merged = params_from_hf(lambda name: hf[name], lambda name: name in hf, m)
    return jax_like(merged, params)


def jax_like(new: dict, old: dict) -> dict:
    """``new`` in the dtypes of ``old`` (HF round trips give numpy arrays of the stored dtype)."""
    return jax.tree.map(lambda n, o: np.asarray(n).astype(o.dtype), new, old)


def merge_adapter(base: str | os.PathLike, directory: str | os.PathLike, out: str | os.PathLike) -> Config:
    """Write a checkpoint of ``base`` with the adapter in ``directory`` applied into ``out``
    (``convert merge-adapter``): a directory like a converted checkpoint, written whole."""
    params, cfg = load_checkpoint(base)
    merged = apply_adapter(params, cfg, directory)
    with atomic_directory(out) as tmp:
        write_config(tmp, cfg)
        ocp_v1.partial.save(tmp / PARAMS_DIR, merged)  # as a converted checkpoint is written
        ocp_v1.partial.finalize(tmp / PARAMS_DIR)
        beside = pathlib.Path(base) / "tokenizer.json"
        if beside.is_file():
            shutil.copy2(beside, tmp / "tokenizer.json")
    return cfg
