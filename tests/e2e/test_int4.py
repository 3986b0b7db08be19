"""int4 end to end: pipo on 4-bit weights equals transformers running the same weights dequantized."""

from __future__ import annotations

import pytest
import torch

import pipo
from pipo.engine.weights import QUANTIZABLE
from pipo.io.source import open_model
from pipo.ops.quant import dequantize, quantize
from tests.e2e.conftest import PROMPTS, SMOL_NEW_TOKENS, SMOL_PROMPTS, build_model, hf_greedy

HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
assert len(HF_LINEARS) == len(QUANTIZABLE)


def dequantized_like_pipo(model, group_size):
    """Replace each attention/MLP matrix of the HF model by its int4 round trip."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in HF_LINEARS:
                module.weight.copy_(dequantize(quantize(module.weight.float(), group_size)))
    return model


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("placement", ["resident", "host"])
def test_tiny_llama_int4_equals_dequantized_transformers(tmp_path, group_size, placement):
    model = build_model("llama", tmp_path)
    reference = hf_greedy(dequantized_like_pipo(model, group_size), PROMPTS, 16)
    with pipo.load(tmp_path, weights="int4", group_size=group_size, placement=placement,
                   dtype="float32") as e:  # fp32 compute: the exact (numba) int4 path
        result = e.generate_ids(PROMPTS, 16, keep_logits=True)
    for row, (tokens, logits) in enumerate(reference):
        assert result.tokens[row] == tokens
        ours = torch.stack([step[row] for step in result.logits])
        assert (ours - logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("placement", ["resident", "host"])
def test_tiny_llama_cpu_packed_int4_is_close_to_dequantized_transformers(tmp_path, placement):
    """The default int4 CPU path (torch's int4 kernel, bf16 inside blocks, fp32 residual): the
    prefill logits of the same weights within bf16 rounding of transformers' fp32 ones."""
    model = build_model("llama", tmp_path)
    reference = hf_greedy(dequantized_like_pipo(model, 32), PROMPTS, 1)
    with pipo.load(tmp_path, weights="int4", group_size=32, placement=placement) as e:
        assert e.dtype == torch.bfloat16
        result = e.generate_ids(PROMPTS, 1, keep_logits=True)
        kinds = {type(v).__name__ for v in e._weights.block("L0.attn", None).values()} \
            if placement == "resident" else {"PackedInt4"}
    assert "PackedInt4" in kinds
    for row, (_, logits) in enumerate(reference):
        ours, theirs = result.logits[0][row], logits[0]
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() < 0.03 * scale
        assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.parametrize("dtype,kind", [("float32", "QuantTensor"), (None, "PackedInt4")])
def test_int4_weights_stay_4bit_in_memory(tmp_path, dtype, kind):
    build_model("llama", tmp_path)
    with pipo.load(tmp_path, weights="int4", dtype=dtype) as engine:
        engine.generate_ids([[1, 2, 3]], 2)
        attn = engine._weights.resident["L0.attn"]
    assert all(type(attn[name]).__name__ == kind for name in ("wqkv", "wo"))


@pytest.mark.slow
def test_smollm2_shipped_int4_equals_transformers_gguf(smollm2_reference):
    source = open_model(None, keep_quant=True)
    assert type(source.read_block("L0.mlp")["w_up"]).__name__ == "QuantTensor"
    with pipo.load(weights="int4", dtype="float32") as engine:  # the exact int4 path
        texts = engine.generate(SMOL_PROMPTS, SMOL_NEW_TOKENS)
    assert texts == smollm2_reference


def _int4_store(tmp_path):
    from pipo.io.store import convert

    build_model("llama", tmp_path / "hf")
    return convert(open_model(tmp_path / "hf"), tmp_path / "store", weights="int4", group_size=64)


def test_int4_store_streamed_from_disk_equals_the_store_loaded_into_ram(tmp_path):
    """The exact fp32 int4 path: blocks streamed from disk give the resident run's tokens and
    logits bit for bit (the same numba kernel on the same stored codes)."""
    store = _int4_store(tmp_path)
    with pipo.load(store, placement="resident", dtype="float32") as engine:
        in_ram = engine.generate_ids(PROMPTS, 16, keep_logits=True)
    for staged in (False, True):
        with pipo.load(store, placement="disk", kv_offload=True, staged_disk=staged,
                       dtype="float32") as engine:
            from_disk = engine.generate_ids(PROMPTS, 16, keep_logits=True)
        assert from_disk.tokens == in_ram.tokens
        assert all(torch.equal(a, b) for a, b in zip(from_disk.logits, in_ram.logits))


def test_cpu_4bit_store_streamed_from_disk_is_close_to_the_resident_packed_path(tmp_path):
    """The default CPU 4-bit path: resident blocks are repacked once for torch's int4 kernel,
    streamed ones are multiplied as stored (StoredInt4, no repack per load). Prefill logits agree
    within bf16 rounding (the packed path rounds scales and zeros to bf16)."""
    store = _int4_store(tmp_path)
    with pipo.load(store, placement="resident") as engine:
        assert engine.dtype == torch.bfloat16
        in_ram = engine.generate_ids(PROMPTS, 1, keep_logits=True)
    for placement, staged in (("disk", False), ("disk", True), ("host", False)):
        with pipo.load(store, placement=placement, staged_disk=staged) as engine:
            streamed = engine.generate_ids(PROMPTS, 1, keep_logits=True)
            kinds = {type(v).__name__ for v in engine._weights.slot_views[0].values()}
        assert ("StoredInt4" if placement == "disk" else "PackedInt4") in kinds
        for ours, theirs in zip(streamed.logits[0], in_ram.logits[0]):
            scale = theirs.abs().max().item()
            assert (ours.float() - theirs.float()).abs().max().item() < 0.02 * scale
            assert int(ours.argmax()) == int(theirs.argmax())


@pytest.mark.slow
def test_smollm2_kept_store_streamed_from_disk_matches_the_resident_4bit_path(tmp_path):
    """The default model kept 4-bit in a store (Q4_1 blocks, Q8_0 head and embedding): streamed
    from disk (blocks as stored, the embedding read by rows) it gives the resident packed path's
    greedy tokens, logits within bf16 rounding through 30 layers."""
    from pipo.io.store import convert

    store = convert(open_model(None, keep_quant=True), tmp_path / "store", weights="keep")
    prompt = [[1, 504, 3575, 282, 4649, 314]]
    with pipo.load(store, placement="resident") as engine:
        in_ram = engine.generate_ids(prompt, 8, keep_logits=True)
    with pipo.load(store, placement="disk") as engine:
        from_disk = engine.generate_ids(prompt, 8, keep_logits=True)
        table = engine._weights.row_tables["embed"]["tok"]
        assert 0 < table.nbytes_read < 1 << 20  # rows, not the 30 MB table
    assert from_disk.tokens == in_ram.tokens
    for ours, theirs in zip(from_disk.logits, in_ram.logits):
        scale = theirs.abs().max().item()
        assert (ours.float() - theirs.float()).abs().max().item() < 0.05 * scale
