"""DeepSeek-V3's FP8 files kept in FP8 (``convert hf-to-jax --keep-fp8``, ``model.fp8_weights``):
served as transformers' DeepseekV3ForCausalLM serves their dequantised weights, held in one byte
per value, written back bit-exact; unquantised models quantised on export as the definition says
(checked against a torch statement of it); bad files named."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dsmoe_jax
from dsmoe_jax import cli, convert
from dsmoe_jax.errors import ConfigError, ConversionError
from dsmoe_jax.fp8 import Fp8Weight
from helpers import tiny_tokenizer

# widths past one 128-wide block (hidden 160, expert 144, kv_b 4 x 72 = 288, ...), so the scales
# of every projection have several blocks along at least one axis and partial last blocks
V3_FP8 = dict(vocab_size=64, hidden_size=160, intermediate_size=136, moe_intermediate_size=144, num_hidden_layers=3,
              num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=136,
              kv_lora_rank=144, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=40, first_k_dense_replace=1,
              max_position_embeddings=128, routed_scaling_factor=1.5, n_group=4, topk_group=2)
QUANTISED = re.compile(r"(_proj|_proj_with_mqa)\.weight$")  # V3's FP8 tensors: every projection, not the router


def _quantised(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantisation of an ``[out, in]`` weight, stated in torch: per 128 x 128
    block scale = amax / 448 (1 for a zero block), values w / scale in float8_e4m3fn."""
    rows, cols = w.shape
    R, C = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(R * 128, C * 128)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(R, 128, C, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(R * 128, C * 128)
    return q[:rows, :cols].contiguous(), scale


def _dequantised(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return q.float() * scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def _fp8_v3(directory):
    """A random transformers DeepseekV3 model saved as V3 ships: projections in FP8 with block
    scales; the model itself then holds their dequantised values (the reference)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**V3_FP8)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    model.save_pretrained(directory)  # the released names (one tensor per expert), in float32
    tensors, dequantised = {}, {}
    for name, w in load_file(directory / "model.safetensors").items():
        if QUANTISED.search(name):
            q, scale = _quantised(w)
            tensors |= {name: q, name + "_scale_inv": scale}
            dequantised[name] = _dequantised(q, scale)
        else:
            tensors[name] = dequantised[name] = w
    save_file(dequantised, directory / "model.safetensors", metadata={"format": "pt"})
    model = type(model).from_pretrained(directory).eval()  # the reference: the dequantised weights
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(directory / "tokenizer.json")
    return model, tensors


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """The FP8 checkpoint, its reference model, and its conversions kept (fp8) and dequantised (f32)."""
    root = tmp_path_factory.mktemp("v3fp8")
    model, tensors = _fp8_v3(root / "hf")
    convert.hf_to_jax(root / "hf", root / "fp8", keep_fp8=True, progress=False)
    convert.hf_to_jax(root / "hf", root / "f32", progress=False)
    return root, model, tensors


TOKENS = np.random.RandomState(0).randint(0, 64, (2, 20)).astype(np.int32)


def test_kept_fp8_weights_serve_as_transformers_serves_their_dequantised_values(v3):
    root, model, _ = v3
    params, cfg = dsmoe_jax.load_checkpoint(root / "fp8")
    assert cfg.model.fp8_weights
    experts = params["layers"][1]["ffn"]["w_gate_EDF"]
    assert isinstance(experts, Fp8Weight) and experts.data.dtype == jnp.float8_e4m3fn
    assert experts.scale_inv.shape == (8, 2, 2), "per expert: [D 160 -> 2 blocks, F 144 -> 2 blocks]"
    with torch.no_grad():
        want = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    got, _ = dsmoe_jax.forward(params, TOKENS, cfg.model)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0, err_msg="FP8-served logits")
    dequantised, cfg32 = dsmoe_jax.load_checkpoint(root / "f32")
    ref, _ = dsmoe_jax.forward(dequantised, TOKENS, cfg32.model)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0,
                               err_msg="kept and dequantised conversions compute the same")


def test_the_command_line_keeps_fp8_and_generates_from_it(v3, tmp_path, capsys):
    root, _, _ = v3
    assert cli.main(["convert", "hf-to-jax", str(root / "hf"), str(tmp_path / "fp8"), "--keep-fp8"]) == 0
    assert "projections and experts in FP8" in capsys.readouterr().out
    generate = ["generate", "--prompt", "the cat", "--max-new-tokens", "6", "--temperature", "0", "--checkpoint"]
    outputs = []
    for checkpoint in (tmp_path / "fp8", root / "f32"):  # cached decoding: MLA's absorbed path reads the weights
        assert cli.main(generate + [str(checkpoint)]) == 0, checkpoint
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("the cat") and outputs[0] == outputs[1], outputs


def test_a_compiled_forward_takes_the_fp8_weights_in_one_byte_per_value(v3):
    root, _, _ = v3
    is_fp8 = lambda x: isinstance(x, Fp8Weight)
    sizes = {}
    for name in ("fp8", "f32"):
        params, cfg = dsmoe_jax.load_checkpoint(root / name)
        compiled = jax.jit(lambda p, t, c=cfg.model: dsmoe_jax.forward(p, t, c)[0]).lower(params, TOKENS).compile()
        sizes[name] = compiled.memory_analysis().argument_size_in_bytes
        if name == "fp8":
            leaves = jax.tree.leaves(params, is_leaf=is_fp8)
            values = sum(w.data.size for w in leaves if is_fp8(w))
            scales = sum(w.scale_inv.size for w in leaves if is_fp8(w))
            other = sum(w.size for w in leaves if not is_fp8(w))
    assert values > 4 * other, "most of the model is in the FP8 projections and experts"
    assert sizes["fp8"] == values + 4 * scales + 4 * other + TOKENS.nbytes, (
        f"arguments {sizes['fp8']} bytes: not 1 byte per FP8 value ({values}) + float32 scales and the rest")
    assert sizes["f32"] == 4 * values + 4 * other + TOKENS.nbytes, f"the float32 conversion: {sizes['f32']} bytes"


def test_kept_fp8_weights_are_written_back_bit_exact(v3, tmp_path):
    root, _, _ = v3
    convert.jax_to_hf(root / "fp8", tmp_path / "back", progress=False)
    before, after = load_file(root / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after), "the same tensors, scales included"
    for name, t in before.items():
        assert after[name].dtype == t.dtype, f"{name}: {after[name].dtype} vs {t.dtype}"
        bits = lambda x: x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
        assert torch.equal(bits(after[name]), bits(t)), f"{name} changed in the round trip"
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}


def test_an_unquantised_model_is_quantised_on_export_as_v3_quantises(v3, tmp_path):
    root, _, tensors = v3
    convert.jax_to_hf(root / "f32", tmp_path / "q", quantize="fp8", progress=False)
    out = load_file(tmp_path / "q" / "model.safetensors")
    assert sorted(out) == sorted(tensors), "the FP8 file's tensors"
    for name in (n for n in tensors if QUANTISED.search(n)):
        q, scale = _quantised(_dequantised(tensors[name], tensors[name + "_scale_inv"]))  # the float weight
        assert torch.equal(out[name + "_scale_inv"], scale), f"{name}: block scales"
        assert torch.equal(out[name].view(torch.uint8), q.view(torch.uint8)), f"{name}: e4m3 values"
    assert out["model.layers.1.mlp.gate.weight"].dtype == torch.float32, "the router stays unquantised"
    assert cli.main(["convert", "jax-to-hf", str(root / "f32"), str(tmp_path / "x"), "--keep-fp8"]) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda t, n: t.update({n + "_scale_inv": t[n + "_scale_inv"][:, :1].contiguous()}),
     r"_scale_inv has shape \[3, 1\], but .* of shape \[288, 144\] in blocks of 128x128 needs \[3, 2\]"),
    (lambda t, n: t[n + "_scale_inv"].__setitem__((0, 0), float("inf")),
     r"holds 1 non-finite block scales \(the first at block \(0, 0\)\)"),
    (lambda t, n: t.update({n: t[n].float().to(torch.float8_e5m2)}),
     r"is F8_E5M2; of the float8 formats only block-quantised F8_E4M3"),
])
def test_bad_fp8_tensors_are_named_and_leave_no_output(v3, tmp_path, damage, message):
    root, _, tensors = v3
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (hf / f).write_bytes((root / "hf" / f).read_bytes())
    damaged = {k: v.clone() for k, v in tensors.items()}
    damage(damaged, "model.layers.0.self_attn.kv_b_proj.weight")
    save_file(damaged, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=message):
        convert.hf_to_jax(hf, tmp_path / "out", keep_fp8=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_keep_fp8_needs_fp8_weights_in_128_blocks(v3, tmp_path):
    root, _, tensors = v3
    with pytest.raises(ConversionError, match="--keep-fp8: .* holds no FP8"):
        convert.hf_to_jax(_unquantised(root, tmp_path), tmp_path / "out", keep_fp8=True, progress=False)
    hf = tmp_path / "blocks"
    hf.mkdir()
    config = json.loads((root / "hf" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (hf / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if not k.endswith("_scale_inv")} | {
        k: torch.ones(-(-tensors[k[:-10]].shape[0] // 64), -(-tensors[k[:-10]].shape[1] // 64))
        for k in tensors if k.endswith("_scale_inv")}, hf / "model.safetensors")
    with pytest.raises(ConversionError, match=r"weight_block_size \[64, 64\]: FP8 weights are kept only in 128x128"):
        convert.hf_to_jax(hf, tmp_path / "out", keep_fp8=True, progress=False)


def test_quantising_a_non_finite_weight_on_export_is_named(v3):
    root, _, _ = v3
    params, cfg = dsmoe_jax.load_checkpoint(root / "f32")
    params = jax.tree.map(np.array, params)
    params["layers"][1]["ffn"]["w_up_EDF"][3, 150, 7] = np.inf
    with pytest.raises(ConversionError, match=r"layers/1/ffn/w_up_EDF: 1 non-finite values \(the first at "
                                              r"\(3, 150, 7\)\).*damaged"):
        list(convert.params_to_hf(params, dataclasses.replace(cfg.model, fp8_weights=True)))


def _unquantised(root, tmp_path):
    """An export of the dequantised conversion: no FP8 weights."""
    convert.jax_to_hf(root / "f32", tmp_path / "plain", progress=False)
    return tmp_path / "plain"


def test_training_refuses_fp8_weights(tmp_path):
    from dsmoe_jax.train.loop import train

    cfg = dsmoe_jax.load_config("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8_weights=True))
    with pytest.raises(ConfigError, match="model.fp8_weights holds weights in FP8 for serving"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "refused before anything is written"
