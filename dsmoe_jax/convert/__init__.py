"""Hugging Face DeepSeek-v1 checkpoints <-> dsmoe_jax params (see ``mapping``)."""

from dsmoe_jax.convert.mapping import config_from_hf, config_to_hf, hf_names, hf_shapes, params_from_hf, params_to_hf

__all__ = ["config_from_hf", "config_to_hf", "hf_names", "hf_shapes", "params_from_hf", "params_to_hf"]
