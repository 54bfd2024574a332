"""Checkpoints with Orbax: params, optimizer state, step and the data iterator, saved together.

A run's workdir holds ``config.json`` (the run's config, written before the first step) and
``checkpoints/<step>/`` with the items ``params``, ``opt`` (step and optimizer state) and
``data`` (the grain iterator). Orbax writes each checkpoint into a temporary directory and renames
it when complete, so a crash mid-save never exposes a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp_v1

from dsmoe_jax.config import Config, DsmoeError, config_from_dict
from dsmoe_jax.model import param_shapes
from dsmoe_jax.parallel import param_shardings

CONFIG_FILE = "config.json"
# A converted checkpoint (``dsmoe-jax convert hf-to-jax``) is ``config.json``, the tokenizer files
# and ``params/``: an Orbax checkpoint written one array at a time (Orbax's partial save), whose
# single pytree Orbax names "state".
PARAMS_DIR = "params"
CONVERTED_ITEM = "state"


class CheckpointError(DsmoeError, RuntimeError):
    """A workdir or checkpoint that cannot be used as asked."""


def write_config(directory: str | os.PathLike, cfg: Config) -> None:
    """Write ``config.json`` atomically."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".json", delete=False) as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(f.name, directory / CONFIG_FILE)


def read_config(directory: str | os.PathLike) -> Config:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: not a dsmoe-jax run or checkpoint directory")
    return config_from_dict(json.loads(path.read_text()))


def _model_differences(a: Config, b: Config) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k}: {da.get(s, {}).get(k)!r} (saved) vs {db.get(s, {}).get(k)!r} (now)"
            for s in ("model", "moe") for k in sorted(set(da.get(s, {})) | set(db.get(s, {})))
            if da.get(s, {}).get(k) != db.get(s, {}).get(k)]


class Checkpointer:
    """Saves every ``train.checkpoint_every`` steps asynchronously, keeps the last
    ``train.keep_checkpoints``; restores the latest complete one."""

    def __init__(self, workdir: str | os.PathLike, cfg: Config):
        self.workdir = pathlib.Path(workdir).absolute()
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=True, create=True),
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
        )

    def check_compatible(self, resume: bool) -> int | None:
        """The step to resume from (None for a fresh run); refuses a workdir that holds another
        model's checkpoints, or checkpoints when ``resume`` is off."""
        latest = self.manager.latest_step()
        if latest is None:
            return None
        if not resume:
            raise CheckpointError(f"{self.workdir} already holds checkpoints (latest step {latest}); pass --resume "
                                  "to continue that run, or choose a new --workdir")
        saved = read_config(self.workdir)
        diffs = _model_differences(saved, self.cfg)
        if diffs:
            raise CheckpointError(f"{self.workdir} holds checkpoints of a different model ({'; '.join(diffs)}); "
                                  "resume with the saved config, or start a new --workdir")
        return latest

    def save(self, step: int, state, data_iterator) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ))

    def restore(self, step: int, abstract_state, data_iterator):
        """The train state at ``step``; ``data_iterator`` is set to the position saved with it."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
        ))
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except ValueError:
            # Saved by a different number of processes (grain keeps one state per process). All
            # processes stand at the same batch, one batch per step, and global batch k holds
            # the same windows whatever the process count (data.batches), so position by step.
            data_iterator.set_state({"next_index": step})
        return type(abstract_state)(restored.opt["step"], restored.params, restored.opt["opt_state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def params_location(directory: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, str]:
    """The Orbax checkpoint holding the params of a training workdir (its latest checkpoint, or
    ``step``) or of a converted checkpoint directory, and the name of the params inside it."""
    directory = pathlib.Path(directory).absolute()
    if (directory / "checkpoints").is_dir():
        with ocp.CheckpointManager(directory / "checkpoints") as manager:
            steps = manager.all_steps()
        if step is None and steps:
            step = max(steps)
        if step is None or step not in steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint" + (f" at step {step}; it has steps "
                                  f"{sorted(steps)}" if step is not None and steps else ""))
        return directory / "checkpoints" / str(step), "params"
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
    read straight into its sharding from ``parallel.RULES`` (each process reads only its own
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
