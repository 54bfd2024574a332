"""Hugging Face DeepSeek checkpoints (v1 ``deepseek``, ``deepseek_v2``, ``deepseek_v3``) <-> dsmoe_jax params.

``mapping``: the format as data (config fields, tensor names, per-tensor transforms);
``hf_files``: reading and writing HF checkpoint directories; ``pipeline``: whole-checkpoint
conversion with bounded memory (``dsmoe-jax convert hf-to-jax | jax-to-hf``).
"""

from dsmoe_jax.convert.hf_files import HFCheckpoint
from dsmoe_jax.convert.mapping import (
    config_from_hf,
    config_to_hf,
    hf_names,
    hf_shapes,
    params_from_hf,
    params_to_hf,
)
from dsmoe_jax.convert.pipeline import hf_to_jax, jax_to_hf
from dsmoe_jax.errors import ConversionError

__all__ = ["ConversionError", "HFCheckpoint", "config_from_hf", "config_to_hf", "hf_names", "hf_shapes",
           "hf_to_jax", "jax_to_hf", "params_from_hf", "params_to_hf"]
