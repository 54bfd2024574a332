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
import tempfile

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp_v1

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.config import Config, config_from_dict
from dsmoe_jax.errors import CheckpointError  # noqa: F401 - raised here, and importable from here
from dsmoe_jax.model import param_shapes
from dsmoe_jax.sharding import param_shardings

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
PARAMS_DIR = "params"
CONVERTED_ITEM = "state"




def write_config(directory: str | os.PathLike, cfg: Config) -> None:
    """Write ``config.json`` atomically."""
    with atomic_file(pathlib.Path(directory) / CONFIG_FILE) as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_config(directory: str | os.PathLike) -> Config:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a dsmoe-jax run or checkpoint directory")
    try:
        tables = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): damaged; restore it from a copy, or train or "
                              "convert again") from None
    if isinstance(tables, dict) and "model_type" in tables and "model" not in tables:
        raise _hf_checkpoint(directory, tables["model_type"])
    return config_from_dict(tables)


def _hf_checkpoint(directory: str | os.PathLike, model_type: str | None = None) -> CheckpointError:
    kind = f" (model_type {model_type!r})" if model_type else ""
    return CheckpointError(f"{directory} is a Hugging Face checkpoint{kind}, not a dsmoe-jax one: convert it "
                           f"first with `dsmoe-jax convert hf-to-jax {directory} OUT`, then use OUT")


def check_workdir_writable(workdir: str | os.PathLike) -> None:
    """Create ``workdir`` if needed and prove a file can be written in it, so a workdir that is
    a file, on a read-only disk or without permission fails before training starts, not at its
    first checkpoint."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CheckpointError(f"the workdir {workdir} is a file, not a directory; pass a directory to --workdir "
                              "(a new one for a new run)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise CheckpointError(f"the workdir {workdir} is not writable ({e.strerror}); pass a --workdir on a "
                              "writable disk, or make this one writable") from None


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
    if any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin")):
        raise _hf_checkpoint(directory)
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
