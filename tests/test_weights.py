"""The adapter shard: float32 draws stored in the checkpoint's dtype as torch would store them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from meft_convert.weights import FLOAT_DTYPES, read_header, save_tensors, stored_bytes

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _hard_values() -> np.ndarray:
    """float32 values where rounding is decided: halfway cases both ways, subnormals of every
    target, values that overflow fp16 and bf16, signed zeros, infinities and NaN, and many
    ordinary ones."""
    bits = np.arange(0, 1 << 16, dtype=np.uint32) << np.uint32(16)
    halfway = bits | np.uint32(0x8000)  # exactly between two bf16 values
    near = np.concatenate([halfway - np.uint32(1), halfway + np.uint32(1), bits | np.uint32(0x7FFF)])
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.99, 6e-8, 3e-8, 1e-45, -1e-45, 3.4e38, -3.4e38,
         2.0**-24, 2.0**-25, 2.0**-14 * 1.5],
        dtype=np.float32,
    )
    random = np.random.Generator(np.random.PCG64(0)).normal(0.0, 1.0, 100_000).astype(np.float32)
    return np.concatenate([np.concatenate([bits, halfway, near]).view(np.float32), special, random * 0.02, random * 1e4])


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_stored_bytes_are_torch_s_cast_bit_for_bit(dtype):
    values = _hard_values()
    expected = torch.from_numpy(values).to(TORCH_DTYPES[dtype])
    ours = np.frombuffer(stored_bytes(values, dtype), dtype="<u2" if dtype in ("F16", "BF16") else FLOAT_DTYPES[dtype])
    # NaN payloads aside, every element's bits; NaN stays NaN
    theirs = expected.view({"F64": torch.int64, "F32": torch.int32, "F16": torch.int16, "BF16": torch.int16}[dtype]).numpy()
    nan = np.isnan(values)
    assert ours.size == values.size and nan.sum() > 0
    assert np.array_equal(ours[~nan].view(theirs.dtype), theirs[~nan])
    assert torch.isnan(torch.from_numpy(ours.copy().view(theirs.dtype)).view(TORCH_DTYPES[dtype])[torch.from_numpy(nan)]).all()


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_the_adapter_shard_is_what_safetensors_writes_for_torch_s_tensors(dtype, tmp_path):
    generator = np.random.Generator(np.random.PCG64(1))
    tensors = {
        "model.layers.1.meft.ffn.up_proj.weight": generator.normal(0, 0.02, (16, 4)).astype(np.float32),
        "model.layers.0.meft.ffn.down_proj.bias": np.zeros(4, np.float32),
        "model.layers.0.meft.ffn.down_proj.weight": generator.normal(0, 0.02, (4, 16)).astype(np.float32),
    }
    save_tensors(tensors, dtype, tmp_path / "ours.safetensors")
    cast = {key: torch.from_numpy(values).to(TORCH_DTYPES[dtype]) for key, values in tensors.items()}
    save_file(cast, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert loaded.keys() == cast.keys() and all(torch.equal(loaded[key], cast[key]) for key in cast)
    assert read_header(tmp_path / "ours.safetensors")["__metadata__"] == {"format": "pt"}


def test_the_layer_dtype_is_read_alike_from_headers_and_from_parameters(tmp_path):
    from meft_convert.templates.families import LLAMA, OPT
    from meft_convert.weights import find_weights, layer_dtype

    tensors = {
        "model.embed_tokens.weight": torch.zeros(4, 2, dtype=torch.float32),  # outside the layers: not read
        "model.layers.0.input_layernorm.weight": torch.zeros(2, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2, dtype=torch.uint8),  # a quantized matrix
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert layer_dtype(LLAMA, find_weights(tmp_path).tensors) == "BF16"
    assert layer_dtype(LLAMA, tensors) == "BF16"
    assert layer_dtype(LLAMA, {"model.layers.0.mlp.up_proj.weight": torch.zeros(1, dtype=torch.float16)}) == "F16"
    assert layer_dtype(OPT, tensors) == "F32"  # no OPT layer: float32
