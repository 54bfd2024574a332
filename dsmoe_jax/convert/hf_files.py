"""Reading and writing the files of an HF checkpoint directory.

Reading: ``config.json`` and the weights, as sharded safetensors (``model.safetensors.index.json``),
older ``pytorch_model-*.bin`` shards (``pytorch_model.bin.index.json``; needs torch) or a single
unsharded file. Each tensor is read on its own from a memory-mapped file that is closed again
right after, so reading never keeps more than the tensor itself resident. Block-quantised FP8
checkpoints (DeepSeek-V3/R1: float8_e4m3fn weights with a float32 ``<name>_scale_inv`` per
128x128 block) are dequantised to float32 as each weight is read, its companion scale consumed.

Writing: sharded safetensors named and indexed as ``transformers`` does, the shard plan computed
from the shapes up front so each shard is written once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import shutil
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dsmoe_jax import fp8
from dsmoe_jax.errors import ConversionError
from dsmoe_jax.fp8 import SCALE_SUFFIX, Fp8Weight

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
FP8 = "F8_E4M3"  # safetensors' name for float8_e4m3fn


class HFCheckpoint:
    """The tensors of an HF checkpoint directory, by name (``names``, ``has``, ``read``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ConversionError(f"{directory} has no config.json: not an HF checkpoint directory; pass the "
                                  "directory that holds config.json and the *.safetensors files (download the "
                                  "whole model repository, not only its weights)")
        self.config = _read_json(self.directory / "config.json", "the model's config")
        self.block = _fp8_block(self.config, self.directory / "config.json")
        self.dtypes: dict[str, str] = {}  # safetensors dtype names, filled in by _weight_map
        self.files = self._weight_map()
        # FP8 weights and the scales they consume; checked now so a missing scale fails before any
        # output is written
        # (a float8 tensor of another format with a scale is one too, refused by name when read)
        self.fp8 = {n for n in self.files if self.dtypes.get(n) == FP8
                    or self.dtypes.get(n, "").startswith("F8") and n + SCALE_SUFFIX in self.files}
        missing = sorted(n for n in self.fp8 if n + SCALE_SUFFIX not in self.files)
        if missing:
            raise ConversionError(f"{self.directory} holds FP8 (float8_e4m3fn) weights without the "
                                  f"{SCALE_SUFFIX} tensor that holds their block scales ({', '.join(missing[:3])}"
                                  f"{', ...' if len(missing) > 3 else ''}); download the checkpoint's index and "
                                  "shards again")
        self.scales = {n + SCALE_SUFFIX for n in self.fp8}

    def _weight_map(self) -> dict[str, pathlib.Path]:
        d = self.directory
        for index in (SAFETENSORS_INDEX, BIN_INDEX):
            if (d / index).is_file():
                weight_map = _read_json(d / index, "the index of the weight shards").get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise ConversionError(f"{d / index} has no valid weight_map (tensor name -> shard file); "
                                          "download it again")
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise ConversionError(f"{index} lists shards that are not in {d}: {', '.join(missing)}; "
                                          "download them (an interrupted download?)")
                if index == SAFETENSORS_INDEX:  # headers only: a damaged shard fails now, not hours in
                    for f in sorted(set(weight_map.values())):
                        keys = _keys(d / f)
                        self.dtypes.update(keys)
                        absent = sorted(n for n, g in weight_map.items() if g == f and n not in keys)
                        if absent:
                            raise ConversionError(f"{d / f} lacks tensors that {index} places in it "
                                                  f"({', '.join(absent[:3])}); download both files again")
                return {name: d / f for name, f in weight_map.items()}
        if (d / "model.safetensors").is_file():
            keys = _keys(d / "model.safetensors")
            self.dtypes.update(keys)
            return dict.fromkeys(keys, d / "model.safetensors")
        if (d / "pytorch_model.bin").is_file():
            return dict.fromkeys(_torch_load(d / "pytorch_model.bin"), d / "pytorch_model.bin")
        raise ConversionError(f"{d} has no weights: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, model.safetensors "
                              "or pytorch_model.bin")

    def names(self) -> list[str]:
        """The tensors' names, without the ``*_scale_inv`` companions of FP8 weights (``read``
        consumes them), so a quantised checkpoint lists the same names as an unquantised one."""
        return [n for n in self.files if n not in self.scales]

    def has(self, name: str) -> bool:
        return name in self.files and name not in self.scales

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name``; an FP8 weight comes dequantised, as float32."""
        if name in self.fp8:
            return self._dequantised(name)
        path = self.files[name]
        if path.suffix == ".safetensors":
            if self.dtypes.get(name, "").startswith("F8"):  # safetensors' numpy reader has no float8
                raise _other_float8(path, name, self.dtypes[name])
            try:
                with safe_open(path, "np") as f:  # closing it unmaps the file again
                    return f.get_tensor(name)
            except SafetensorError as e:
                raise ConversionError(_damaged(path, e)) from None
        return _torch_to_numpy(_torch_load(path)[name])

    def read_fp8(self, name: str) -> Fp8Weight:
        """FP8 weight ``name`` as stored: float8_e4m3fn values ``[rows, cols]`` (a memory map) and
        their float32 block scales ``[row blocks, col blocks]``, checked (shapes, finite scales);
        its value is ``fp8.dequantize`` of it. Only 128x128 blocks (V3's) are read this way."""
        if name not in self.fp8:
            raise ConversionError(f"{self.files[name]}: tensor {name} is {self.dtypes.get(name, 'not safetensors')}, "
                                  "not an FP8 weight")
        if self.block != (fp8.BLOCK, fp8.BLOCK):
            raise ConversionError(f"{self.directory / 'config.json'}: weight_block_size {list(self.block)}: FP8 "
                                  f"weights are kept only in {fp8.BLOCK}x{fp8.BLOCK} blocks (DeepSeek-V3's); convert "
                                  "without --keep-fp8 to dequantise them")
        return Fp8Weight(*self._fp8_parts(name))

    def _fp8_parts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The e4m3 values of FP8 weight ``name`` (memory-mapped) and its float32 block scales,
        checked: a 2-D weight, one finite scale per (block_rows x block_cols) block."""
        path, scale_name = self.files[name], name + SCALE_SUFFIX
        if self.dtypes[name] != FP8:
            raise _other_float8(path, name, self.dtypes[name])
        weight = _read_raw(path, name, ml_dtypes.float8_e4m3fn)
        scale = self.read(scale_name).astype(np.float32, copy=False)
        (br, bc) = self.block
        if weight.ndim != 2:
            raise ConversionError(f"{path}: FP8 tensor {name} has shape {list(weight.shape)}; only 2-D weights "
                                  "are block-quantised")
        blocks = (-(-weight.shape[0] // br), -(-weight.shape[1] // bc))
        if scale.shape != blocks:
            raise ConversionError(f"{self.files[scale_name]}: {scale_name} has shape {list(scale.shape)}, but "
                                  f"{name} of shape {list(weight.shape)} in blocks of {br}x{bc} needs "
                                  f"{list(blocks)}; download both shards again")
        bad = np.argwhere(~np.isfinite(scale))
        if bad.size:
            raise ConversionError(f"{self.files[scale_name]}: {scale_name} holds {len(bad)} non-finite block scales "
                                  f"(the first at block {tuple(int(b) for b in bad[0])}): every logit would be NaN; "
                                  "the file is damaged, download it again")
        nan = np.argwhere((weight.view(np.uint8) & 0x7F) == 0x7F)  # e4m3fn's NaN codes: a damaged byte
        if nan.size:
            raise ConversionError(f"{path}: FP8 tensor {name} holds a NaN at {list(map(int, nan[0]))}: every logit "
                                  "would be NaN; the file is damaged, download it again")
        return weight, scale

    def _dequantised(self, name: str) -> np.ndarray:
        """``weight.astype(float32) * scale_inv``, each scale broadcast over its (block_rows x
        block_cols) block, the last blocks of each axis partial where the shape is not a multiple.
        Goes one row of blocks at a time, so besides the float32 result only one such row is held
        (and, while ``_fp8_parts`` looks for NaN bytes, one byte per value)."""
        weight, scale = self._fp8_parts(name)
        (br, bc), (rows, cols) = self.block, weight.shape
        out = np.empty((rows, cols), np.float32)
        for i in range(scale.shape[0]):
            r = slice(i * br, min((i + 1) * br, rows))
            np.multiply(weight[r], np.repeat(scale[i], bc)[:cols], out=out[r], dtype=np.float32)
        return out


def _other_float8(path: pathlib.Path, name: str, dtype: str) -> ConversionError:
    return ConversionError(f"{path}: tensor {name} is {dtype}; of the float8 formats only block-quantised {FP8} "
                           "(float8_e4m3fn) weights are supported, as quantization_config's fmt 'e4m3' declares")


def _damaged(path: pathlib.Path, error: Exception) -> str:
    reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0]  # torch's run on
    return (f"{path} is damaged or truncated ({reason}): an interrupted download? Download it again "
            "(its size must match the one listed on the model's page)")


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} ({what}) is not valid JSON ({e}); download it again") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} ({what}) holds a JSON {type(value).__name__}, not an object; "
                              "download it again")
    return value


def _keys(path: pathlib.Path) -> dict[str, str]:
    """The tensor names of a safetensors file, with their dtypes (``F32``, ``BF16``, ``F8_E4M3``,
    ...); reads only its header, which also proves the file is as long as the header says."""
    try:
        with safe_open(path, "np") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as e:
        raise ConversionError(_damaged(path, e)) from None


def _read_raw(path: pathlib.Path, name: str, dtype) -> np.ndarray:
    """Tensor ``name`` of a safetensors file as a read-only memory map of ``dtype``, for dtypes
    safetensors' numpy reader lacks (it asks numpy for ``float8_e4m3fn``, which only ml_dtypes has).
    The file's length was checked against its header when the checkpoint was opened (``_keys``)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(n))[name]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
        raise ConversionError(_damaged(path, ValueError(f"{name} takes {end - begin} bytes, not the "
                                                        f"{math.prod(shape)} of shape {shape}")))
    if end == begin:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)


def _fp8_block(config: dict, path: pathlib.Path) -> tuple[int, int]:
    """The (rows, cols) block of the checkpoint's FP8 weight scales, from ``quantization_config``
    (default 128x128); a quantisation other than block-wise FP8 e4m3 is refused here."""
    q = config.get("quantization_config")
    if q is None:
        return (128, 128)
    method, fmt = (q.get("quant_method"), q.get("fmt")) if isinstance(q, dict) else (None, None)
    if not isinstance(q, dict) or method != "fp8" or fmt not in ("e4m3", None):
        which = f"quant_method {method!r}" + (f", fmt {fmt!r}" if fmt is not None else "")
        raise ConversionError(f"{path}: quantization_config with {which} is not supported; only unquantised "
                              "checkpoints and block-wise FP8 ones (quant_method 'fp8', fmt 'e4m3', as "
                              "DeepSeek-V3/R1 ship) can be read: convert from an unquantised (bf16/fp16/fp32) "
                              "copy of the model")
    block = q.get("weight_block_size", [128, 128])
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConversionError(f"{path}: quantization_config.weight_block_size {json.dumps(block)} is not two "
                              "positive integers (e.g. [128, 128])")
    return (block[0], block[1])


def _torch_load(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path.name} is a PyTorch pickle: reading it needs torch (pip install torch), "
                              "or convert from the safetensors copy of the checkpoint") from e
    # mmap: only the tensors read are paged in; weights_only refuses arbitrary pickled code.
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except PermissionError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # what torch raises for a cut-off file
        raise ConversionError(_damaged(path, e)) from None


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through the bits
        return t.contiguous().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy().copy()


def plan_shards(tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into consecutive shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(arrays: Iterator[tuple[str, np.ndarray]], shards: list[list[str]], directory: pathlib.Path,
                      progress=None) -> None:
    """Write ``arrays`` (in the order of ``shards``) as ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``; only one shard is held in memory at a time."""
    n = len(shards)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        shard = {}
        for want in names:
            name, array = next(arrays)
            assert name == want, f"tensors out of order: got {name}, expected {want}"
            shard[name] = array
            total += array.nbytes
            weight_map[name] = filename
            if progress is not None:
                progress.update(1)
        save_file(shard, directory / filename, metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source: pathlib.Path, target: pathlib.Path) -> list[str]:
    """Copy the tokenizer files that ``source`` has; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    return copied
