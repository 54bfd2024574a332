"""Reading HF checkpoint directories: block-quantised FP8 weights (DeepSeek-V3/R1's layout) come
dequantised, their ``*_scale_inv`` companions consumed, and malformed ones are named with the fix."""

import json
import math
import pathlib
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dsmoe_jax
from dsmoe_jax import convert
from dsmoe_jax.errors import ConversionError
from helpers import TINY_HF, random_hf_checkpoint

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
FP8_SHAPES = {"a.weight": (200, 130), "b.weight": (256, 128), "c.weight": (5, 3)}


def _fp8_tensors(shapes, block, seed=0):
    """float8_e4m3fn weights (torch's own rounding) and float32 block scales of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in shapes.items():
        out[name] = (4 * torch.randn(rows, cols, generator=g)).to(torch.float8_e4m3fn)
        blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        out[name + "_scale_inv"] = torch.rand(*blocks, generator=g) * 0.01 + 1e-4
    return out


def _write(directory: pathlib.Path, shards: list[dict], quant: dict | None = QUANT,
           config: dict | None = None) -> pathlib.Path:
    """A checkpoint as released: config.json (with ``quant``), shards of torch tensors, their index."""
    directory.mkdir(parents=True)
    config = dict(config or {"model_type": "deepseek_v3", "torch_dtype": "bfloat16"})
    if quant is not None:
        config["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _dequantise_by_blocks(weight: torch.Tensor, scale: torch.Tensor, block) -> np.ndarray:
    """The definition, block by block."""
    w = weight.to(torch.float32).numpy()
    out = np.zeros_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = w[rows, cols] * scale[i, j].item()
    return out


@pytest.mark.parametrize("block", [[128, 128], [64, 48]])
def test_fp8_weights_read_dequantised_and_scales_are_consumed(tmp_path, block):
    t = _fp8_tensors(FP8_SHAPES, block)
    norm = torch.randn(130, dtype=torch.bfloat16)
    # the scale of a.weight sits in another shard than its weight, as can happen in the release
    shards = [{"a.weight": t["a.weight"], "b.weight": t["b.weight"], "b.weight_scale_inv": t["b.weight_scale_inv"],
               "norm.weight": norm},
              {"a.weight_scale_inv": t["a.weight_scale_inv"], "c.weight": t["c.weight"],
               "c.weight_scale_inv": t["c.weight_scale_inv"]}]
    ckpt = convert.HFCheckpoint(_write(tmp_path / "hf", shards, {**QUANT, "weight_block_size": block}))

    assert sorted(ckpt.names()) == ["a.weight", "b.weight", "c.weight", "norm.weight"]
    assert ckpt.has("a.weight") and not ckpt.has("a.weight_scale_inv")
    for name in FP8_SHAPES:
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.shape == FP8_SHAPES[name]
        np.testing.assert_array_equal(got, _dequantise_by_blocks(t[name], t[name + "_scale_inv"], block),
                                      err_msg=name)
    unquantised = ckpt.read("norm.weight")
    assert unquantised.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(unquantised.astype(np.float32), norm.float().numpy())


def test_fp8_without_quantization_config_uses_128_blocks(tmp_path):
    t = _fp8_tensors({"a.weight": (200, 130)}, [128, 128], seed=1)
    ckpt = convert.HFCheckpoint(_write(tmp_path / "hf", [t], quant=None))
    np.testing.assert_array_equal(ckpt.read("a.weight"),
                                  _dequantise_by_blocks(t["a.weight"], t["a.weight_scale_inv"], [128, 128]))


def test_an_fp8_checkpoint_converts_like_its_dequantised_weights(tmp_path):
    """Through the pipeline: the tiny model's projections stored in FP8 (embeddings, norms and the
    router left unquantised, as in DeepSeek-V3), in 16x16 blocks so the shapes have partial ones."""
    cfg = convert.config_from_hf(TINY_HF)
    block = [16, 16]
    tensors, expected = {}, {}
    for name, array in random_hf_checkpoint(cfg, seed=2).items():
        if name.endswith("_proj.weight"):
            q = _fp8_tensors({name: array.shape}, block, seed=len(tensors))
            q[name] = (torch.from_numpy(array) / q[name + "_scale_inv"].repeat_interleave(16, 0)[:array.shape[0]]
                       .repeat_interleave(16, 1)[:, :array.shape[1]]).to(torch.float8_e4m3fn)
            tensors.update(q)
            expected[name] = _dequantise_by_blocks(q[name], q[name + "_scale_inv"], block)
        else:
            tensors[name] = torch.from_numpy(array)
            expected[name] = array
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    names = list(tensors)
    hf = _write(tmp_path / "hf", [{n: tensors[n] for n in names[:len(names) // 2]},
                                  {n: tensors[n] for n in names[len(names) // 2:]}],
                {**QUANT, "weight_block_size": block}, config=TINY_HF)
    convert.hf_to_jax(hf, tmp_path / "jax", dtype="float32", progress=False)
    params, loaded = dsmoe_jax.load_checkpoint(tmp_path / "jax")
    want = convert.params_from_hf(expected.__getitem__, expected.__contains__, loaded.model)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    jax.tree.map(lambda got, ref: np.testing.assert_array_equal(np.asarray(got), np.asarray(ref)), params, want)


def test_an_fp8_weight_without_its_scale_is_named(tmp_path):
    t = _fp8_tensors({"a.weight": (200, 130), "b.weight": (256, 128)}, [128, 128])
    del t["b.weight_scale_inv"]
    with pytest.raises(ConversionError, match=r"FP8 \(float8_e4m3fn\) weights without the _scale_inv tensor .*"
                                              r"\(b\.weight\)"):
        convert.HFCheckpoint(_write(tmp_path / "hf", [t]))


def test_a_scale_of_the_wrong_shape_names_both_shapes(tmp_path):
    t = _fp8_tensors({"a.weight": (200, 130)}, [128, 128])
    t["a.weight_scale_inv"] = t["a.weight_scale_inv"][:, :1].contiguous()  # [2, 1]; [200, 130] needs [2, 2]
    ckpt = convert.HFCheckpoint(_write(tmp_path / "hf", [t]))
    with pytest.raises(ConversionError) as e:
        ckpt.read("a.weight")
    assert re.search(r"a\.weight_scale_inv has shape \[2, 1\], but a\.weight of shape \[200, 130\] in blocks "
                     r"of 128x128 needs \[2, 2\]", str(e.value)), e.value


def test_a_nan_in_an_fp8_scale_or_weight_is_named_not_converted(tmp_path):
    t = _fp8_tensors({"a.weight": (200, 130), "b.weight": (256, 128)}, [128, 128])
    t["a.weight_scale_inv"][1, 0] = float("nan")
    bits = t["b.weight"].view(torch.uint8).clone()
    bits[130, 7] = 0x7F  # float8_e4m3fn's NaN
    t["b.weight"] = bits.view(torch.float8_e4m3fn)
    ckpt = convert.HFCheckpoint(_write(tmp_path / "hf", [t]))
    with pytest.raises(ConversionError, match=r"a\.weight_scale_inv holds 1 non-finite block scales \(the first at "
                                              r"block \(1, 0\)\).*damaged, download it again"):
        ckpt.read("a.weight")
    with pytest.raises(ConversionError, match=r"FP8 tensor b\.weight holds a NaN at \[130, 7\].*damaged"):
        ckpt.read("b.weight")


@pytest.mark.parametrize("quant, named", [
    ({**QUANT, "quant_method": "gptq"}, "quant_method 'gptq', fmt 'e4m3'"),
    ({**QUANT, "fmt": "e5m2"}, "quant_method 'fp8', fmt 'e5m2'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is"),
])
def test_other_quantizations_are_refused_naming_it_and_what_is_supported(tmp_path, quant, named):
    t = _fp8_tensors({"a.weight": (200, 130)}, [128, 128])
    with pytest.raises(ConversionError) as e:
        convert.HFCheckpoint(_write(tmp_path / "hf", [t], quant))
    message = str(e.value)
    assert "is not supported" in message and named in message, message
    assert "quant_method 'fp8', fmt 'e4m3'" in message, "says what is supported"


def test_a_bad_block_size_is_named(tmp_path):
    t = _fp8_tensors({"a.weight": (200, 130)}, [128, 128])
    with pytest.raises(ConversionError, match=r"weight_block_size \[128\] is not two positive integers"):
        convert.HFCheckpoint(_write(tmp_path / "hf", [t], {**QUANT, "weight_block_size": [128]}))


def test_other_float8_formats_are_refused_when_read(tmp_path):
    ckpt = convert.HFCheckpoint(_write(tmp_path / "hf", [{"a.weight": torch.zeros(4, 4, dtype=torch.float8_e5m2)}]))
    assert ckpt.names() == ["a.weight"]
    with pytest.raises(ConversionError, match=r"a\.weight is F8_E5M2; .* only block-quantised F8_E4M3"):
        ckpt.read("a.weight")
