"""An offload store's Q8_0 embedding table read by rows (StoredRows) equals the table read whole."""

from __future__ import annotations

import pytest
import torch

import pipo
from pipo.io.source import open_model
from pipo.io.store import convert
from tests.io.test_gguf import write_tiny_gguf


@pytest.fixture
def store(tmp_path):
    return convert(open_model(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "store", weights="keep")


def test_rows_equal_the_whole_tables_lookup(store):
    source = open_model(store)
    whole = source.read_block("embed")["tok"]
    table = source.table_rows("embed", "tok")
    ids = torch.tensor([[5, 0, 5, whole.shape[0] - 1], [3, 3, 1, 2]])
    assert torch.equal(table.rows(ids), whole.rows(ids))
    row_nbytes = whole.shape[1] + whole.shape[1] // 32 * 2  # int8 codes + fp16 scales
    assert table.nbytes_read == 6 * row_nbytes  # the distinct ids only
    with pytest.raises(IndexError, match="out of range"):
        table.rows(torch.tensor([whole.shape[0]]))
    assert source.table_rows("L0.mlp", "w_down") is None  # not alone in its block


def test_disk_streamed_generation_with_rows_equals_the_whole_table(store, monkeypatch):
    from pipo.engine.weights import PlacedWeights

    with pipo.load(store, placement="disk") as engine:
        by_rows = engine.generate_ids([[3, 17, 42, 8]], 4, keep_logits=True)
        assert engine._weights.row_tables["embed"]["tok"].nbytes_read > 0
    monkeypatch.setattr(PlacedWeights, "_row_tables", lambda self: {})  # stream the table whole
    with pipo.load(store, placement="disk") as engine:
        whole = engine.generate_ids([[3, 17, 42, 8]], 4, keep_logits=True)
        assert engine._weights.row_tables == {}
    assert by_rows.tokens == whole.tokens
    assert all(torch.equal(a, b) for a, b in zip(by_rows.logits, whole.logits))


@pytest.mark.parametrize("weights", ["fp32", "fp16"])
def test_a_dense_tables_rows_equal_its_whole_lookup(tmp_path, weights):
    store = convert(open_model(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "store",
                    weights=weights)
    source = open_model(store)
    whole = source.read_block("embed")["tok"]
    table = source.table_rows("embed", "tok")
    ids = torch.tensor([[5, 0, 5, whole.shape[0] - 1], [3, 3, 1, 2]])
    assert torch.equal(table.rows(ids), whole[ids])
    assert table.nbytes_read == 6 * whole.shape[1] * whole.element_size()  # distinct ids only
    table.out_dtype = torch.float32
    assert torch.equal(table.rows(ids), whole[ids].float())
    with pytest.raises(IndexError, match="out of range"):
        table.rows(torch.tensor([whole.shape[0]]))


@pytest.mark.parametrize(("weights", "dtype"), [("fp32", "float32"), ("fp16", "float32"),
                                                 ("keep", "float32"), ("fp32", "bfloat16")])
def test_disk_generation_reading_dense_rows_equals_streaming_the_table(tmp_path, monkeypatch,
                                                                       weights, dtype):
    from pipo.engine.weights import PlacedWeights

    store = convert(open_model(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "store",
                    weights=weights)
    prompt = [[3, 17, 42, 8], [9, 9, 1, 30]]
    with pipo.load(store, placement="disk", dtype=dtype) as engine:
        by_rows = engine.generate_ids(prompt, 4, keep_logits=True)
        assert engine._weights.row_tables["embed"]["tok"].nbytes_read > 0
    monkeypatch.setattr(PlacedWeights, "_row_tables", lambda self: {})
    with pipo.load(store, placement="disk", dtype=dtype) as engine:
        whole = engine.generate_ids(prompt, 4, keep_logits=True)
    assert by_rows.tokens == whole.tokens
    assert all(torch.equal(a, b) for a, b in zip(by_rows.logits, whole.logits, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_on_cuda_rows_equal_streaming_the_table(tmp_path, monkeypatch, dtype):
    from pipo.engine.weights import PlacedWeights

    store = convert(open_model(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "store",
                    weights="fp32")
    prompt = [[3, 17, 42, 8], [9, 9, 1, 30]]
    with pipo.load(store, placement="disk", device="cuda", dtype=dtype) as engine:
        by_rows = engine.generate_ids(prompt, 4, keep_logits=True)
        assert engine._weights.row_tables["embed"]["tok"].nbytes_read > 0
    monkeypatch.setattr(PlacedWeights, "_row_tables", lambda self: {})
    with pipo.load(store, placement="disk", device="cuda", dtype=dtype) as engine:
        whole = engine.generate_ids(prompt, 4, keep_logits=True)
    assert by_rows.tokens == whole.tokens
    assert all(torch.equal(a, b) for a, b in zip(by_rows.logits, whole.logits, strict=True))
