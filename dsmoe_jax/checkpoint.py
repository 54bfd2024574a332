"""Reading checkpoints and their configs: the library side, used by ``load_checkpoint``,
conversion, evaluation and generation (training's ``Checkpointer`` lives in ``train/``).

Two kinds of directory hold parameters:

- a training workdir: ``config.json`` and ``checkpoints/<step>/`` with the items ``params``,
  ``opt`` and ``data`` (train/checkpoint.py writes them);
- a converted checkpoint (``dsmoe-jax convert hf-to-jax``): ``config.json``, the tokenizer files
  and ``params/``, an Orbax checkpoint written one array at a time (Orbax's partial save), whose
  single pytree Orbax names "state".
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp_v1

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.config import Config, DsmoeError, config_from_dict
from dsmoe_jax.model import param_shapes
from dsmoe_jax.sharding import param_shardings

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
PARAMS_DIR = "params"
CONVERTED_ITEM = "state"


class CheckpointError(DsmoeError, RuntimeError):
    """A workdir or checkpoint that cannot be used as asked."""


def write_config(directory: str | os.PathLike, cfg: Config) -> None:
    """Write ``config.json`` atomically."""
    with atomic_file(pathlib.Path(directory) / CONFIG_FILE) as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_config(directory: str | os.PathLike) -> Config:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a dsmoe-jax run or checkpoint directory")
    return config_from_dict(json.loads(path.read_text()))


def params_location(directory: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, str]:
    """The Orbax checkpoint holding the params of a training workdir (its latest checkpoint, or
    ``step``) or of a converted checkpoint directory, and the name of the params inside it."""
    directory = pathlib.Path(directory).absolute()
    if (directory / CHECKPOINTS_DIR).is_dir():
        with ocp.CheckpointManager(directory / CHECKPOINTS_DIR) as manager:
            steps = manager.all_steps()
        if step is None and steps:
            step = max(steps)
        if step is None or step not in steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint" + (f" at step {step}; it has steps "
                                  f"{sorted(steps)}" if step is not None and steps else ""))
        return directory / CHECKPOINTS_DIR / str(step), "params"
    if (directory / PARAMS_DIR).is_dir():
        if step is not None:
            raise CheckpointError(f"{directory} is a converted checkpoint: it has no steps to choose from")
        return directory / PARAMS_DIR, CONVERTED_ITEM
    raise CheckpointError(f"{directory} holds no complete checkpoint (neither checkpoints/ nor {PARAMS_DIR}/)")


def restore_params(location: tuple[pathlib.Path, str], target) -> dict:
    """Read the params at ``location`` (see ``params_location``) into the tree of
    ``jax.ShapeDtypeStruct`` ``target``, each onto its ``sharding``; leaves set to
    ``orbax.checkpoint.PLACEHOLDER`` are skipped (read part of a checkpoint)."""
    path, name = location
    try:
        return ocp_v1.load(path, target, checkpointable_name=name)
    except ValueError as e:
        raise CheckpointError(f"{path} does not hold the parameters its config.json describes: {e}") from e


def load_checkpoint(directory: str | os.PathLike, step: int | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[dict, Config]:
    """``(params, cfg)`` from a training workdir (its latest checkpoint, or ``step``) or from a
    converted checkpoint directory (``dsmoe-jax convert hf-to-jax``). With ``mesh`` every array is
    read straight into its sharding from ``mesh.RULES`` (each process reads only its own
    shards); without, onto the default device."""
    cfg = read_config(directory)
    location = params_location(directory, step)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), param_shapes(cfg))
    else:
        shardings = param_shardings(cfg, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), param_shapes(cfg),
                          shardings)
    return restore_params(location, target), cfg
