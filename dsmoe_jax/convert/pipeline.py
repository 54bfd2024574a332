"""Whole-checkpoint conversion, HF (DeepSeek v1, V2, V3; Dynamic_MoE) <-> dsmoe-jax, with bounded memory.

    hf_to_jax("deepseek-moe-16b-base", "ckpt/16b")          # then dsmoe_jax.load_checkpoint("ckpt/16b")
    jax_to_hf("ckpt/16b", "hf-out")                         # or a training workdir

hf -> jax reads one HF tensor at a time and hands each finished output array (one per parameter:
the routed experts of a layer stacked together) to Orbax's partial save, which writes it and lets
it go, so peak memory is a small multiple of the largest parameter (the 16B model's 0.4 GB
embedding), not the 32.8 GB model. jax -> hf reads one parameter at a time and holds at most one
safetensors shard. Both write into a temporary directory that is renamed into place only when
complete, and hold the output's lock (``lock.py``, beside it) meanwhile: one conversion per output.
FP8 checkpoints (V3, R1) are dequantised tensor by tensor while reading (``hf_files``), or kept
as they are (``keep_fp8``: ``model.fp8_weights``); ``jax_to_hf`` writes FP8 weights back bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sys

import jax
import numpy as np
from orbax.checkpoint import PLACEHOLDER
from orbax.checkpoint import v1 as ocp_v1
from tqdm import tqdm

from dsmoe_jax.atomic import atomic_directory
from dsmoe_jax.checkpoint import PARAMS_DIR, params_location, read_config, restore_params, write_config
from dsmoe_jax.config import Config
from dsmoe_jax.convert.hf_files import (
    DTYPES,
    HFCheckpoint,
    copy_tokenizer,
    plan_shards,
    write_safetensors,
)
from dsmoe_jax.convert.mapping import (
    config_from_hf,
    config_to_hf,
    get_path,
    hf_shapes,
    params_from_hf,
    params_to_hf,
    set_path,
)
from dsmoe_jax.errors import ConversionError, DsmoeError, storage_error
from dsmoe_jax.fp8 import E4M3, SCALE_SUFFIX, Fp8Weight
from dsmoe_jax.lock import output_lock
from dsmoe_jax.model import param_shapes, unrolled

HF_CONFIG_COPY = "hf_config.json"  # the source config.json, so jax -> hf keeps fields we do not model (bos/eos ids)
# Tensors some HF checkpoints carry that are derived, not learned: RoPE frequencies come from rope_theta.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
# config.json keys that describe the source files, not the model: not carried into an export
SOURCE_ONLY_KEYS = ("quantization_config",)


def hf_to_jax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
              progress: bool = True, drop_mtp: bool = False, keep_fp8: bool = False) -> Config:
    """Convert the HF checkpoint in ``hf_dir`` into a dsmoe-jax checkpoint directory ``out_dir``
    (``config.json``, Orbax ``params/``, tokenizer files). ``dtype`` (float32 | bfloat16) defaults
    to the checkpoint's ``torch_dtype`` (float16 and FP8 become float32). DeepSeek-V3's
    multi-token-prediction layers (``model.layers.{num_hidden_layers + k}``)
    are converted as ``model.mtp_depth`` depths, or left out with ``drop_mtp``. FP8 weights are
    dequantised, or with ``keep_fp8`` kept as they are (``model.fp8_weights``: the projection and
    expert matrices the file holds in FP8 keep their bytes and block scales; any the file holds
    unquantised are quantised, any others dequantised). Returns the converted config."""
    source = HFCheckpoint(hf_dir)
    if keep_fp8 and not source.fp8:
        raise ConversionError(f"--keep-fp8: {source.directory} holds no FP8 (float8_e4m3fn) weights; convert without "
                              "it (or quantise a converted model on export: jax-to-hf --quantize fp8)")
    try:
        model = config_from_hf(source.config)
    except (KeyError, TypeError) as e:  # a field missing or of the wrong type
        raise ConversionError(f"{source.directory / 'config.json'} is damaged: {type(e).__name__} {e} reading it; "
                              "download it again") from None
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"dtype {dtype!r}: choose float32 or bfloat16")
        model = dataclasses.replace(model, param_dtype=dtype, dtype=dtype)
    if keep_fp8:
        model = dataclasses.replace(model, fp8_weights=True)
    names = [n for n in source.names() if not n.endswith(DERIVED_SUFFIXES)]
    mtp = [n for n in names if _layer_index(n) >= model.n_layers]
    layers = sorted({_layer_index(n) for n in mtp})
    if drop_mtp or not layers:
        if model.mtp_depth and not drop_mtp:  # transformers counts V3's MTP layer in its configs but never saves it
            print(f"note: {source.directory / 'config.json'} counts {model.mtp_depth} multi-token-prediction layer(s) "
                  "but the checkpoint holds none: converted without them", file=sys.stderr)
        model, names = dataclasses.replace(model, mtp_depth=0), [n for n in names if n not in set(mtp)]
    elif len(layers) != model.mtp_depth:
        named = ", ".join(f"model.layers.{i}.*" for i in layers)
        held = f"holds {len(layers)} multi-token-prediction layer(s) ({named})" if layers else \
            "holds no multi-token-prediction layer"
        raise ConversionError(f"{source.directory} {held}, but "
                              f"its config.json's num_nextn_predict_layers says {model.mtp_depth}: convert with "
                              "--drop-mtp to build the model without them (it is complete without them)")
    # derived buffers (written on export for the files' loaders) may be absent and are never read
    expected = {n: s for n, s in hf_shapes(model).items() if not n.endswith(DERIVED_SUFFIXES)}
    _check_names(names, expected, source.directory)
    shapes = param_shapes(unrolled(model))

    cfg = Config(model=model)
    with _writing(out_dir, "convert hf-to-jax"), atomic_directory(out_dir) as tmp, tqdm(
            total=len(expected), desc="hf-to-jax", unit="tensor", disable=not progress, dynamic_ncols=True) as bar:
        write_config(tmp, cfg)
        (tmp / HF_CONFIG_COPY).write_text(json.dumps(source.config, indent=2) + "\n")

        def read(name: str) -> np.ndarray | Fp8Weight:
            bar.update(1)
            return source.read_fp8(name) if keep_fp8 and name in source.fp8 else source.read(name)

        def write(path: tuple, array: np.ndarray | Fp8Weight) -> None:
            tree: dict = {}
            leaf = get_path(shapes, path)  # the score bias stays fp32; FP8 weights as they are
            set_path(tree, path, array if isinstance(leaf, Fp8Weight) else array.astype(leaf.dtype, copy=False))
            ocp_v1.partial.save(tmp / PARAMS_DIR, tree)

        params_from_hf(read, source.has, model, on_array=write)
        ocp_v1.partial.finalize(tmp / PARAMS_DIR)
        copy_tokenizer(source.directory, tmp)
    return cfg


@contextlib.contextmanager
def _writing(out_dir: str | os.PathLike, what: str):
    """The block that writes ``out_dir``: under its lock, and with a full or read-only disk
    reported as one ``StorageError`` naming it (Orbax's writer fails as ``ValueError``)."""
    with output_lock(out_dir, what, beside=True):
        try:
            yield
        except Exception as e:
            error = None if isinstance(e, DsmoeError) else storage_error(e, "convert", out_dir, "OUT")
            if error is None:
                raise
            raise error from e


def _layer_index(name: str) -> int:
    """The block index of an HF tensor name (``model.layers.{i}....``); -1 outside the blocks."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and parts[2].isdigit() else -1


def _check_names(names: list[str], expected: dict, directory: pathlib.Path) -> None:
    present = set(names)
    missing = [n for n in expected if n not in present]
    extra = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config needs are missing ({_some(missing)})")
    if extra:
        problems.append(f"{len(extra)} tensors are not part of this model ({_some(extra)})")
    if problems:
        raise ConversionError(f"{directory} does not match its config.json: {'; '.join(problems)}")


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def jax_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
              max_shard_bytes: int = 2 * 1024**3, progress: bool = True, quantize: str | None = None) -> None:
    """Write the dsmoe-jax checkpoint ``ckpt_dir`` (a converted directory, or a training workdir's
    latest checkpoint or ``step``) as an HF checkpoint (DeepSeek v1, V2, V3 or Dynamic_MoE:
    ``mapping.format_for``): sharded safetensors with the released tensor names, their index,
    ``config.json`` and the tokenizer files. FP8 weights (``model.fp8_weights``) are written as
    they are held; ``quantize="fp8"`` quantises an unquantised model's projection and expert
    matrices the same way (float8_e4m3fn, a float32 ``*_scale_inv`` per 128 x 128 block)."""
    if quantize not in (None, "fp8"):
        raise ConversionError(f"quantize {quantize!r}: the one quantisation is 'fp8' (DeepSeek-V3's block-wise e4m3)")
    ckpt_dir = pathlib.Path(ckpt_dir)
    stored = read_config(ckpt_dir).model
    model = dataclasses.replace(stored, fp8_weights=stored.fp8_weights or quantize == "fp8")
    hf_config = config_to_hf(model)
    if (ckpt_dir / HF_CONFIG_COPY).is_file():
        source = json.loads((ckpt_dir / HF_CONFIG_COPY).read_text())
        hf_config = {**{k: v for k, v in source.items() if k not in SOURCE_ONLY_KEYS}, **hf_config}
    location = params_location(ckpt_dir, step)
    shapes = param_shapes(stored)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(path: tuple) -> np.ndarray | Fp8Weight:  # one parameter: every other leaf is skipped
        target = jax.tree.map(lambda _: PLACEHOLDER, shapes)
        leaf = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), get_path(shapes, path))
        set_path(target, path, leaf)
        return jax.tree.map(np.asarray, get_path(restore_params(location, target), path))

    tensors = hf_shapes(model, scales=True)
    dtype_of = lambda name: (np.dtype(np.float32) if name.endswith(SCALE_SUFFIX)
                             else np.dtype(E4M3) if name + SCALE_SUFFIX in tensors else DTYPES[model.param_dtype])
    shards = plan_shards(((n, s, dtype_of(n)) for n, s in tensors.items()), max_shard_bytes)
    with _writing(out_dir, "convert jax-to-hf"), atomic_directory(out_dir) as tmp, tqdm(
            total=sum(map(len, shards)), desc="jax-to-hf", unit="tensor", disable=not progress,
            dynamic_ncols=True) as bar:
        write_safetensors(params_to_hf(read, model), shards, tmp, progress=bar)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_tokenizer(ckpt_dir, tmp)

