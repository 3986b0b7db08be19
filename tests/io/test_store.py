"""Offload store: convert, read back byte for byte (sync and async), reject damaged stores, bound RAM."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from pipo.errors import ModelFormatError, PipoError
from pipo.io.source import WeightSource, open_model
from pipo.io.spec import ModelSpec
from pipo.io.store import DATA_NAME, INDEX_NAME, OffloadStore, aligned_empty, convert
from pipo.ops import quant

SPEC = ModelSpec(
    family="llama", vocab_size=96, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
    ffn=128, max_positions=64, bos_id=1, eos_ids=(2,), name="tiny",
)
GROUP_SIZE = 32


class FakeSource:
    """A WeightSource with random fp32 canonical tensors for SPEC (kept in memory)."""

    def __init__(self, path: Path) -> None:
        self.spec, self.path, self.tokenizer = SPEC, path, None
        gen = torch.Generator().manual_seed(0)
        kv = SPEC.n_kv_heads * SPEC.head_dim
        shapes = {
            "embed": {"tok": (SPEC.vocab_size, SPEC.hidden)},
            "attn": {"norm_w": (SPEC.hidden,), "wq": (SPEC.hidden, SPEC.hidden), "wk": (kv, SPEC.hidden),
                     "wv": (kv, SPEC.hidden), "wo": (SPEC.hidden, SPEC.hidden)},
            "mlp": {"norm_w": (SPEC.hidden,), "w_gate": (SPEC.ffn, SPEC.hidden),
                    "w_up": (SPEC.ffn, SPEC.hidden), "w_down": (SPEC.hidden, SPEC.ffn)},
            "head": {"norm_w": (SPEC.hidden,), "w_out": (SPEC.vocab_size, SPEC.hidden)},
        }
        self.blocks = {
            block: {name: torch.randn(shape, generator=gen) for name, shape in shapes[_part(block)].items()}
            for block in SPEC.block_names()
        }

    def read_block(self, block: str) -> dict[str, torch.Tensor]:
        return dict(self.blocks[block])

    def block_nbytes(self, block: str) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks[block].values())


def _part(block: str) -> str:
    return block.split(".")[-1]


def _expected(tensors: dict[str, torch.Tensor], weights: str) -> dict[str, torch.Tensor]:
    """What a store converted with ``weights`` must return for fp32 ``tensors`` (quantized: parts).

    ``int4`` quantizes the layers' linear weights and keeps every other tensor (the LM head too) as
    the source gives it."""
    out = {}
    for name, tensor in tensors.items():
        if weights == "int4" and name.startswith("w") and name != "w_out" and tensor.ndim == 2:
            for part, value in quant.quantize(tensor, GROUP_SIZE).to_parts().items():
                out[f"{name}.{part}"] = value
        else:
            out[name] = tensor.to(torch.float16) if weights == "fp16" else tensor
    return out


def _flatten(tensors: dict) -> dict[str, torch.Tensor]:
    """Plain tensors as they are, QuantTensors as ``name.part`` entries."""
    out = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
        else:
            assert isinstance(value, quant.QuantTensor)
            out.update({f"{name}.{part}": t for part, t in value.to_parts().items()})
    return out


def _assert_bytes_equal(got: dict, want: dict[str, torch.Tensor]) -> None:
    got = _flatten(got)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert bytes(got[name].contiguous().view(torch.uint8).reshape(-1).numpy()) == bytes(
            tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        ), name


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> FakeSource:
    return FakeSource(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module", params=["keep", "fp16", "fp32", "int4"])
def store_dir(request, source, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("stores") / request.param
    return request.param, convert(source, out, weights=request.param, group_size=GROUP_SIZE)


def test_sync_read_back_byte_equal(source, store_dir):
    weights, path = store_dir
    with OffloadStore(path) as store:
        assert store.spec == SPEC and store.index.weights == weights
        for block in SPEC.block_names():
            _assert_bytes_equal(store.read_block(block), _expected(source.blocks[block], weights))
        store.verify()


@pytest.mark.parametrize("direct", [None, False])
def test_async_read_into_staging_views(source, store_dir, direct):
    weights, path = store_dir
    with OffloadStore(path, direct=direct) as store:
        buffers = [aligned_empty(store.max_block_nbytes) for _ in range(2)]

        async def stream():
            for i, block in enumerate(SPEC.block_names()):
                buffer = buffers[i % 2]
                got = await store.read_block_into(block, buffer, chunk_nbytes=8192, depth=3)
                _assert_bytes_equal(got, _expected(source.blocks[block], weights))
                for tensor in _flatten(got).values():  # zero-copy: views into the buffer
                    assert tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()

        asyncio.run(stream())
        if direct is False:
            assert store.direct is False


def test_direct_used_where_supported(store_dir):
    _, path = store_dir
    try:
        os.close(os.open(path / DATA_NAME, os.O_RDONLY | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    with OffloadStore(path) as store:
        asyncio.run(store.read_block_into("embed", aligned_empty(store.max_block_nbytes)))
        assert store.direct is supported


def test_falls_back_when_o_direct_refused(source, store_dir, monkeypatch):
    """A file system that refuses O_DIRECT (EINVAL) gets buffered reads, unless direct=True."""
    weights, path = store_dir
    real_open = os.open

    def no_direct_open(file, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused (test)")
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    with OffloadStore(path) as store:
        got = asyncio.run(store.read_block_into("head", aligned_empty(store.max_block_nbytes)))
        assert store.direct is False
        _assert_bytes_equal(got, _expected(source.blocks["head"], weights))
    with OffloadStore(path, direct=True) as store, pytest.raises(OSError):
        asyncio.run(store.read_block_into("head", aligned_empty(store.max_block_nbytes)))


def test_staging_buffer_checked(store_dir):
    _, path = store_dir
    with OffloadStore(path) as store:
        unaligned = aligned_empty(store.max_block_nbytes + 64)[64:]
        with pytest.raises(ValueError, match="4 KiB"):
            asyncio.run(store.read_block_into("embed", unaligned))
        with pytest.raises(ValueError, match="needs"):
            asyncio.run(store.read_block_into("embed", aligned_empty(16)))


class QuantSource(FakeSource):
    """A source that already hands out QuantTensors (as a GGUF file with keep_quant does)."""

    def read_block(self, block: str) -> dict:
        tensors = dict(self.blocks[block])
        if "wq" in tensors:
            tensors["wq"] = quant.quantize(tensors["wq"], 16)
        return tensors


@pytest.mark.parametrize("weights", ["keep", "fp16"])
def test_quant_source_kept_or_dequantized(tmp_path, weights):
    source = QuantSource(tmp_path)
    with OffloadStore(convert(source, tmp_path / "store", weights=weights)) as store:
        got = store.read_block("L0.attn")
        want = source.read_block("L0.attn")["wq"]
        if weights == "keep":
            assert isinstance(got["wq"], quant.QuantTensor) and got["wq"].group_size == 16
            _assert_bytes_equal({"wq": got["wq"]}, _flatten({"wq": want}))
        else:
            assert torch.equal(got["wq"], quant.dequantize(want).half())


def _copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (INDEX_NAME, DATA_NAME):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.fixture
def fp16_copy(source, tmp_path) -> Path:
    path = convert(source, tmp_path / "orig", weights="fp16")
    return _copy_store(path, tmp_path / "copy")


def test_missing_and_corrupt_index(fp16_copy, tmp_path):
    with pytest.raises(ModelFormatError, match="not a pipo offload store"):
        OffloadStore(tmp_path / "nowhere")
    (fp16_copy / INDEX_NAME).write_text('{"format": "pipo-store", "vers')
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        OffloadStore(fp16_copy)


def test_unknown_version(fp16_copy):
    index = json.loads((fp16_copy / INDEX_NAME).read_text())
    index["version"] = 99
    (fp16_copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="version 99"):
        OffloadStore(fp16_copy)


def test_malformed_index(fp16_copy):
    index = json.loads((fp16_copy / INDEX_NAME).read_text())
    index["blocks"][1]["tensors"][0]["shape"] = [3, 3]
    (fp16_copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="L0.attn"):
        OffloadStore(fp16_copy)


def test_truncated_blob(fp16_copy):
    data = fp16_copy / DATA_NAME
    os.truncate(data, data.stat().st_size - 4096)
    with pytest.raises(ModelFormatError, match="truncated: block 'head'"):
        OffloadStore(fp16_copy)


def test_checksum_mismatch_names_block(fp16_copy):
    with OffloadStore(fp16_copy) as store:
        entry = store.index.blocks[3]  # L1.attn
        offset = entry.offset_nbytes + entry.tensors[1].offset_nbytes + 5
    with open(fp16_copy / DATA_NAME, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0xFF]))
    with OffloadStore(fp16_copy) as store, pytest.raises(ModelFormatError, match="'L1.attn'.*checksum"):
        store.verify()


def test_failed_convert_leaves_nothing(source, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="test hook"):
        convert(source, parent / "store", weights="int4", group_size=GROUP_SIZE, fail_after_blocks=1)
    assert list(parent.iterdir()) == []


def test_existing_out_dir_refused_and_only_a_store_is_replaced(source, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    with pytest.raises(PipoError, match="already exists"):
        convert(source, out)
    with pytest.raises(PipoError, match="refusing to overwrite .*not a pipo store"):
        convert(source, out, overwrite=True)  # an empty directory is not a store either
    out.rmdir()
    convert(source, out, weights="keep")
    convert(source, out, weights="fp16", overwrite=True)
    assert OffloadStore(out).index.weights == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory) -> Path:
    """A tiny transformers-saved llama (fp32 safetensors) with a word-level HF tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    path = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    vocab = {word: i for i, word in enumerate(["<s>", "</s>", "<unk>", "hello", "world"])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}
    ))
    return path


@pytest.mark.parametrize("weights", ["keep", "int4"])
def test_hf_llama_store_matches_safetensors(hf_llama_dir, tmp_path, weights):
    from pipo.io.safetensors_dir import SafetensorsDir

    source = SafetensorsDir(hf_llama_dir)
    with OffloadStore(convert(source, tmp_path / "store", weights=weights, group_size=GROUP_SIZE)) as store:
        assert store.spec == source.spec and isinstance(store, WeightSource)
        assert isinstance(open_model(store.path), OffloadStore)
        assert store.source_fingerprint.path == str(hf_llama_dir.resolve())
        for block in source.spec.block_names():
            _assert_bytes_equal(store.read_block(block), _expected(source.read_block(block), weights))
        got, want = store.tokenizer, source.tokenizer
        assert got.encode("hello world unknown") == want.encode("hello world unknown") == [0, 3, 4, 2]
        assert (got.bos_id, got.eos_ids, got.add_bos) == (want.bos_id, want.eos_ids, want.add_bos)
        assert got.chat_template == want.chat_template


def _rss_nbytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class BigSource:
    """16 blocks of 2 MiB of random fp16: enough to see RSS grow if reads kept memory."""

    spec = ModelSpec(family="llama", vocab_size=1024, hidden=1024, n_layers=7, n_heads=8, n_kv_heads=8,
                     head_dim=128, ffn=1024, max_positions=64)
    path = None
    tokenizer = None

    def read_block(self, block: str) -> dict[str, torch.Tensor]:
        return {"w": torch.randn(1024, 1024, dtype=torch.float16)}


@pytest.mark.parametrize("direct", [None, False])
def test_streaming_keeps_rss_flat(tmp_path_factory, direct):
    path = convert(BigSource(), tmp_path_factory.mktemp("big") / "store")
    with OffloadStore(path, direct=direct) as store:
        blocks = store.spec.block_names()
        buffers = [aligned_empty(store.max_block_nbytes) for _ in range(2)]
        for buffer in buffers:
            buffer.fill_(0)  # fault the pages in before measuring

        async def stream(rounds: int) -> None:
            for i in range(rounds * len(blocks)):
                await store.read_block_into(blocks[i % len(blocks)], buffers[i % 2], chunk_nbytes=1 << 19)

        asyncio.run(stream(1))  # warm up the executor threads
        before = _rss_nbytes()
        asyncio.run(stream(3))
        grown = _rss_nbytes() - before
    total = 3 * len(blocks) * store.max_block_nbytes
    assert grown < 2 << 20, f"RSS grew {grown} bytes while streaming {total} bytes"


def test_int4_quantizes_8bit_layer_weights_but_keeps_4bit_ones_and_the_head(tmp_path):
    from tests.io.test_gguf import write_tiny_gguf

    source = open_model(write_tiny_gguf(tmp_path / "tiny.gguf"))  # ffn_down Q8_0, ffn_up Q4_0, embedding Q8_0
    with OffloadStore(convert(source, tmp_path / "store", weights="int4", group_size=64)) as store:
        mlp, head, want = store.read_block("L0.mlp"), store.read_block("head"), source.read_block("L0.mlp")
        assert mlp["w_down"].group_size == 64 and mlp["w_up"].group_size == 32
        assert all(torch.equal(a, b) for a, b in zip(mlp["w_up"].to_parts().values(), want["w_up"].to_parts().values()))
        assert type(head["w_out"]).__name__ == "Tensor"  # output.weight is F32 in the tiny file: kept dense


def test_what_appears_at_the_destination_during_a_convert_is_not_replaced(source, tmp_path, monkeypatch):
    from pipo.io import store_write

    out = tmp_path / "store"
    real = store_write._write_blocks

    def write_then_user_creates(*args):
        blocks = real(*args)
        out.mkdir()
        (out / "mine.txt").write_text("x")
        return blocks

    monkeypatch.setattr(store_write, "_write_blocks", write_then_user_creates)
    with pytest.raises(PipoError, match="not a pipo store"):
        convert(source, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"] and os.listdir(out) == ["mine.txt"]
