"""``train.init_from``: fine-tuning starts from existing weights instead of a random initialisation.

    dsmoe-jax train --config 16b-chat-sft --set train.init_from=ckpt/16b

The source is a converted checkpoint (``dsmoe-jax convert hf-to-jax``), a training workdir (its
latest step) or ``DIR@STEP``. Only its parameters are read, straight into the run's shardings;
the optimizer state is fresh and the run starts at step 0. ``check_init_from`` refuses a source
that does not fit the run before the run writes anything; ``init_from_state`` builds the state.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from orbax.checkpoint import PLACEHOLDER

from dsmoe_jax.checkpoint import CHECKPOINTS_DIR, params_location, read_config, restore_params
from dsmoe_jax.config import Config, parse_init_from
from dsmoe_jax.errors import CheckpointError
from dsmoe_jax.model import init_params, match_layout, param_shapes
from dsmoe_jax.peft.tuning import ALL, Tuning
from dsmoe_jax.sharding import param_shardings
from dsmoe_jax.tokenizer import load_tokenizer, tokenizer_identity
from dsmoe_jax.train.checkpoint import model_differences
from dsmoe_jax.train.step import TrainState

# Model keys that say how the same model is run or trained, not which model it is: they may
# differ from the checkpoint's. Everything else in [model], [moe], [mla] and [yarn] shapes the
# parameters or the function they compute, and must be equal. model.mtp_depth is train.init_mtp's.
RECIPE_FIELDS = frozenset({
    "model.dtype", "model.param_dtype", "model.remat", "model.attention", "model.scan_layers",
    "model.init_std",  # only draws fresh parameters
    "model.max_seq_len",  # a bound on the length, the same function below it
    "model.mtp_depth",
    "moe.backend", "moe.aux_loss_alpha", "moe.device_aux_alpha", "moe.seq_aux", "moe.device_groups",
    "moe.bias_update_speed", "moe.capacity_factor",
})


class InitSource(NamedTuple):
    """A ``train.init_from`` checked against the run: where its params are, and its config."""

    location: tuple[pathlib.Path, str]  # as checkpoint.params_location gives it
    cfg: Config
    description: str  # for the log: which weights, and where


def check_init_from(cfg: Config) -> InitSource:
    """Check ``cfg.train.init_from`` against the run ``cfg`` without writing anything; raises one
    ``CheckpointError`` naming the problem and its fix: a missing or unconverted (Hugging Face)
    directory, a step it does not hold, a model that differs from the run's (every differing key
    with both values; ``RECIPE_FIELDS`` may differ; MTP depths on one side only need
    ``train.init_mtp`` "drop" or "fresh"), or a tokenizer that is not the run's ``data.tokenizer``."""
    name, step = parse_init_from(cfg.train.init_from)
    directory = pathlib.Path(name).expanduser()
    try:
        if not directory.is_dir():
            raise CheckpointError(f"{directory} does not exist (or is not a directory): give a converted checkpoint "
                                  "(dsmoe-jax convert hf-to-jax) or a training workdir")
        saved = read_config(directory)
        location = params_location(directory, step)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from: {e}") from None
    diffs = model_differences(saved, cfg, ignore=RECIPE_FIELDS, labels=("checkpoint", "run"))
    have, want = saved.model.mtp_depth, cfg.model.mtp_depth
    if (have > want and cfg.train.init_mtp != "drop") or (have < want and cfg.train.init_mtp != "fresh"):
        fix = ("train.init_mtp = 'drop' to leave the checkpoint's extra depths unread" if have > want else
               "train.init_mtp = 'fresh' to start the run's extra depths from random initialisation")
        diffs.append(f"model.mtp_depth: {have} (checkpoint) vs {want} (run): set {fix}, or model.mtp_depth = {have}")
    if diffs:
        raise CheckpointError(f"train.init_from: the run's model is not the model in {directory} "
                              f"({'; '.join(diffs)}); set these keys of the run's config to the checkpoint's values "
                              f"(its {directory / 'config.json'})")
    workdir = (directory / CHECKPOINTS_DIR).is_dir()
    _check_tokenizer(directory, saved if workdir else None, cfg)
    what = f"step {location[0].name} of the training run {directory}" if workdir else \
        f"the converted checkpoint {directory}"
    return InitSource(location, saved, what)


def _check_tokenizer(directory: pathlib.Path, saved: Config | None, cfg: Config) -> None:
    """Refuse a run whose ``data.tokenizer`` is not the checkpoint's: the ``tokenizer.json`` in
    ``directory`` (converted checkpoints carry the source's), else, for a training workdir
    (``saved``: its config), the tokenizer its config names, where it can still be read."""
    if (directory / "tokenizer.json").is_file():
        theirs = str(directory / "tokenizer.json")
    elif saved is not None and (saved.data.tokenizer == "byte" or pathlib.Path(saved.data.tokenizer).exists()):
        theirs = saved.data.tokenizer
    else:
        return
    a, b = tokenizer_identity(load_tokenizer(theirs)), tokenizer_identity(load_tokenizer(cfg.data.tokenizer))
    if a != b:
        differ = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
        raise CheckpointError(f"train.init_from: {directory} was trained with the tokenizer {theirs!r}, but the run's "
                              f"data.tokenizer {cfg.data.tokenizer!r} is another one ({differ}); set "
                              f"data.tokenizer = {theirs!r}")


def init_from_state(source: InitSource, cfg: Config, optimizer: optax.GradientTransformation,
                    shardings: TrainState, key: jax.Array, tuning: Tuning = ALL) -> TrainState:
    """The run's first train state: step 0, the params of ``source`` read straight into
    ``shardings`` (each process reads its own shards; converted to the run's params layout and
    float32 master weights), a fresh optimizer state built on the devices, and the tuning's first
    adapter (LoRA's). MTP depths the run lacks are not read; those the checkpoint lacks, and the
    adapter, are drawn from ``key`` as a fresh run's are."""
    run = cfg.model
    mesh = shardings.step.mesh
    keep = min(source.cfg.model.mtp_depth, run.mtp_depth)
    stored = dataclasses.replace(run, scan_layers=source.cfg.model.scan_layers, mtp_depth=source.cfg.model.mtp_depth)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          param_shapes(stored), param_shardings(stored, mesh))
    if "mtp" in target:  # depths past the run's stay unread
        target["mtp"] = {k: v if k < keep else jax.tree.map(lambda _: PLACEHOLDER, v) for k, v in target["mtp"].items()}
    restored = restore_params(source.location, target)
    mtp = {k: v for k, v in restored.pop("mtp", {}).items() if k < keep}
    if stored.scan_layers != run.scan_layers:  # on the devices, straight into the run's shardings
        layout = {k: v for k, v in shardings.params.items() if k != "mtp"}
        restored = jax.jit(functools.partial(match_layout, cfg=run), out_shardings=layout)(restored)
    if keep < run.mtp_depth:  # the same draw as a fresh run's; XLA computes only these depths
        fresh = {k: shardings.params["mtp"][k] for k in range(keep, run.mtp_depth)}
        mtp |= jax.jit(lambda k: {d: init_params(run, k)["mtp"][d] for d in fresh}, out_shardings=fresh)(key)
    params = {**restored, "mtp": mtp} if mtp else restored
    # the adapter (LoRA) from the key a fresh run draws it from
    adapter = jax.jit(tuning.init, out_shardings=shardings.adapter)(params, jax.random.fold_in(key, 1))
    opt_state = jax.jit(lambda p, a: optimizer.init(tuning.select(p, a)), out_shardings=shardings.opt_state)(params,
                                                                                                          adapter)
    step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings.step)()
    return TrainState(step, params, opt_state, adapter)
