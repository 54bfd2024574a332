"""Reading and writing the files of an HF checkpoint directory.

Reading: ``config.json`` and the weights, as sharded safetensors (``model.safetensors.index.json``),
older ``pytorch_model-*.bin`` shards (``pytorch_model.bin.index.json``; needs torch) or a single
unsharded file. Each tensor is read on its own from a memory-mapped file that is closed again
right after, so reading never keeps more than the tensor itself resident.

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
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dsmoe_jax.convert.mapping import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


class HFCheckpoint:
    """The tensors of an HF checkpoint directory, by name (``names``, ``has``, ``read``)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ConversionError(f"{directory} has no config.json: not an HF checkpoint directory; pass the "
                                  "directory that holds config.json and the *.safetensors files (download the "
                                  "whole model repository, not only its weights)")
        self.config = _read_json(self.directory / "config.json", "the model's config")
        self.files = self._weight_map()

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
                        keys = set(_keys(d / f))
                        absent = sorted(n for n, g in weight_map.items() if g == f and n not in keys)
                        if absent:
                            raise ConversionError(f"{d / f} lacks tensors that {index} places in it "
                                                  f"({', '.join(absent[:3])}); download both files again")
                return {name: d / f for name, f in weight_map.items()}
        if (d / "model.safetensors").is_file():
            return dict.fromkeys(_keys(d / "model.safetensors"), d / "model.safetensors")
        if (d / "pytorch_model.bin").is_file():
            return dict.fromkeys(_torch_load(d / "pytorch_model.bin"), d / "pytorch_model.bin")
        raise ConversionError(f"{d} has no weights: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, model.safetensors "
                              "or pytorch_model.bin")

    def names(self) -> list[str]:
        return list(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, "np") as f:  # closing it unmaps the file again
                    return f.get_tensor(name)
            except SafetensorError as e:
                raise ConversionError(_damaged(path, e)) from None
        return _torch_to_numpy(_torch_load(path)[name])


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


def _keys(path: pathlib.Path) -> list[str]:
    """The tensor names of a safetensors file; reads only its header, which also proves the file
    is as long as the header says."""
    try:
        with safe_open(path, "np") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ConversionError(_damaged(path, e)) from None


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
