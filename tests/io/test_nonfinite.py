"""NaN / inf weights are refused when read, naming the tensor: GGUF values and block scales, safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipo.errors import ModelFormatError
from pipo.io.gguf_file import GGUFFile
from pipo.io.gguf_parse import parse_gguf
from pipo.io.safetensors_dir import SafetensorsDir
from tests.e2e.conftest import build_model
from tests.io.test_gguf import write_tiny_gguf

# tensor -> (block that reads it, byte offset in its data, bytes written there)
CORRUPTIONS = {
    "blk.0.attn_norm.weight": ("L0.attn", 8, np.float32(np.nan).tobytes()),  # F32 value
    "token_embd.weight": ("embed", 34 * 3, np.float16(np.inf).tobytes()),  # Q8_0 scale of block 3
    "blk.1.ffn_gate.weight": ("L1.mlp", 20 * 2 + 2, np.float16(np.nan).tobytes()),  # Q4_1 min
    "blk.1.attn_q.weight": ("L1.attn", 18 * 5, np.float16(-np.inf).tobytes()),  # Q4_0 scale
    "blk.0.attn_v.weight": ("L0.attn", 2, np.float16(np.nan).tobytes()),  # F16 value
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("keep_quant", [True, False])
def test_gguf_nonfinite_tensor_is_refused(tmp_path, name, keep_quant):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    block, offset, data = CORRUPTIONS[name]
    with open(path, "r+b") as file:
        file.seek(parse_gguf(path).tensors[name].offset + offset)
        file.write(data)
    source = GGUFFile(path, keep_quant=keep_quant)
    with pytest.raises(ModelFormatError, match=f"tensor {name} holds NaN or infinite values"):
        source.read_block(block)
    source.read_block("L1.attn" if block != "L1.attn" else "L0.mlp")  # the other blocks still read


def test_safetensors_nonfinite_tensor_is_refused(tmp_path):
    build_model("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name][3, 5] = torch.nan
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = SafetensorsDir(tmp_path)
    with pytest.raises(ModelFormatError, match=f"tensor {name} holds NaN"):
        source.read_block("L1.mlp")
    source.read_block("L0.mlp")
