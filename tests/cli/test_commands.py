"""The CLI's happy paths: generate (streamed and JSONL batch), info, graph, convert, verify."""

from __future__ import annotations

import json

import pytest

from pipo.cli import main
from tests.e2e.conftest import build_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-happy")
    build_model("llama", path)
    return path


@pytest.mark.slow
def test_generate_streams_paris(capsys):
    assert main(["generate", "The capital of France is", "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


@pytest.mark.slow
def test_chat_prompt_answers(capsys):
    assert main(["generate", "--chat", "What is the capital of France?", "-n", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_jsonl_batch_keeps_fields_and_order(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "The capital of France is", "id": "a"}\n\n'
                   '{"prompt": "1, 2, 3, 4,", "id": "b"}\n')
    assert main(["generate", "--input", str(src), "--output", str(out), "-n", "6",
                 "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert "Paris" in rows[0]["completion"] and "5" in rows[1]["completion"]


def test_info_shows_architecture_and_plan(tiny_llama, capsys):
    assert main(["info", str(tiny_llama), "--device-memory", "400KB", "--batch", "2",
                 "--max-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "llama: 2 layers, hidden 64" in out
    assert "blocks resident" in out and "blocks host" in out


@pytest.mark.parametrize("suffix", [".json", ".dot", ".png"])
def test_graph_writes_each_format(tiny_llama, tmp_path, suffix, capsys):
    target = tmp_path / f"step{suffix}"
    assert main(["graph", str(tiny_llama), "--placement", "host", "--kv-offload",
                 "--max-len", "64", "-o", str(target)]) == 0
    assert target.stat().st_size > 100
    if suffix == ".json":
        from pipo.runtime.graph import check_graph, graph_from_json

        check_graph(graph_from_json(json.loads(target.read_text())))


def test_convert_verify_and_generate_from_store(tiny_llama, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["convert", str(tiny_llama), str(store), "--weights", "fp32"]) == 0
    assert main(["verify", str(store)]) == 0
    assert "checksums match" in capsys.readouterr().out
    blob = store / "blocks.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_graph_layers_picks_the_drawn_layers_and_refuses_missing_ones(tiny_llama, tmp_path, capsys):
    target = tmp_path / "one_layer.png"
    assert main(["graph", str(tiny_llama), "--layers", "1", "--max-len", "64", "-o",
                 str(target)]) == 0
    assert target.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["graph", str(tiny_llama), "--layers", "0,5", "-o", str(tmp_path / "g.png")]) == 2
    assert capsys.readouterr().err == "pipo: error: --layers 5: the model has layers 0-1\n"
    with pytest.raises(SystemExit):
        main(["graph", str(tiny_llama), "--layers", "first"])
    assert "invalid layer list 'first'" in capsys.readouterr().err


def test_generate_threads_sets_torch_and_numba_threads(tmp_path, monkeypatch, capsys):
    import numba
    import torch

    from tests.cli.tiny_text_model import build_text_model

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("torch", n)))
    monkeypatch.setattr(numba, "set_num_threads", lambda n: calls.append(("numba", n)))
    model = build_text_model(tmp_path / "model")
    assert main(["generate", "--model", str(model), "hi", "-n", "2", "--threads", "1"]) == 0
    assert calls == [("torch", 1), ("numba", 1)]
