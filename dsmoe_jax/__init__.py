"""dsmoe-jax: DeepSeekMoE (arXiv 2401.06066) in JAX / Flax NNX.

    cfg = dsmoe_jax.load_config("tiny")                    # a shipped config, or a TOML path
    params = dsmoe_jax.init_params(cfg, jax.random.key(0))
    logits, aux = dsmoe_jax.forward(params, tokens, cfg)   # aux: balance losses, expert load
    total, activated = dsmoe_jax.count_params(cfg)
    params, cfg = dsmoe_jax.load_checkpoint("runs/tiny")    # a training workdir or converted HF checkpoint
    params, cfg = dsmoe_jax.load_checkpoint("ckpt/16b", mesh=dsmoe_jax.make_mesh({"fsdp": 8}))  # sharded
    out = dsmoe_jax.generate(params, prompt_ids, cfg, max_new_tokens=32, rng=jax.random.key(0))
    prompt = dsmoe_jax.render_chat(messages, tokenizer, add_generation_prompt=True)  # chat format -> ids

Also: ``dsmoe_jax.convert`` (HF checkpoints), ``dsmoe_jax.plan`` (memory and FLOPs per device),
``dsmoe_jax.mesh`` (meshes and the logical-axis rules), ``dsmoe_jax.expert_parallel`` (the
all_to_all exchange of the routed experts). The README's "Where things are" table maps every
concept to its module.
"""

# First: in a checkout without an editable install it makes kernels/, train/ and configs/ the
# subpackages they are once installed (dsmoe_jax/toplevel.py).
from dsmoe_jax import toplevel  # noqa: F401

# isort: split
from dsmoe_jax import kernels  # noqa: F401 - importing it registers the "triton" grouped-MLP backend
from dsmoe_jax.chat import RenderedChat, render_chat
from dsmoe_jax.checkpoint import load_checkpoint
from dsmoe_jax.config import (
    Config,
    DataConfig,
    DataSource,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    load_config,
)
from dsmoe_jax.costs import count_params, flops_per_token
from dsmoe_jax.errors import ConfigError, DsmoeError, InputError
from dsmoe_jax.evaluation import Evaluation, evaluate
from dsmoe_jax.grouped import grouped_mlp, register_backend, unregister_backend
from dsmoe_jax.inference import (
    SpeculativeStats,
    decode_step,
    generate,
    generate_speculative,
    init_cache,
    pad_prompts,
    prefill,
)
from dsmoe_jax.mesh import make_mesh
from dsmoe_jax.model import (
    Aux,
    forward,
    init_params,
    match_layout,
    param_axes,
    param_shapes,
)
from dsmoe_jax.moe import RouteOptions
from dsmoe_jax.sharding import shard_params

__all__ = [
    "Aux",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "DsmoeError",
    "Evaluation",
    "InputError",
    "MeshConfig",
    "ModelConfig",
    "MoEConfig",
    "RenderedChat",
    "TrainConfig",
    "count_params",
    "decode_step",
    "evaluate",
    "flops_per_token",
    "forward",
    "generate",
    "generate_speculative",
    "grouped_mlp",
    "init_cache",
    "init_params",
    "load_checkpoint",
    "load_config",
    "make_mesh",
    "match_layout",
    "pad_prompts",
    "param_axes",
    "param_shapes",
    "prefill",
    "render_chat",
    "RouteOptions",
    "SpeculativeStats",
    "register_backend",
    "shard_params",
    "unregister_backend",
]
