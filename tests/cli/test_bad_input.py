"""Bad input through the CLI: one clear message on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipo.cli import main
from pipo.io.default_model import default_model_path
from tests.e2e.conftest import build_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-llama")
    build_model("llama", path)
    return path


def fails_with(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_path(capsys):
    fails_with(capsys, ["info", "/no/such/model"], "no such file or directory")


def test_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    fails_with(capsys, ["info", str(tmp_path)], "not a model directory")
    fails_with(capsys, ["info", str(tmp_path / "notes.txt")], "not a model")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    fails_with(capsys, ["info", str(tmp_path)], "gpt2", "llama", "mistral", "qwen2", "opt")


def test_truncated_safetensors(capsys, tiny_llama, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_llama / name).read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    fails_with(capsys, ["generate", "--model", str(tmp_path), "hi"], "model.safetensors")


def test_corrupt_safetensors_header(capsys, tiny_llama, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!}" * 3)
    fails_with(capsys, ["info", str(tmp_path)], "model.safetensors")


def test_truncated_gguf(capsys, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[:3_000_000])
    fails_with(capsys, ["info", str(broken)], "broken.gguf")


def test_not_a_gguf(capsys, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a gguf file at all" * 100)
    fails_with(capsys, ["info", str(fake)], "fake.gguf")


def test_kv_disk_directory_must_exist(capsys, tiny_llama, tmp_path):
    fails_with(capsys, ["info", str(tiny_llama), "--kv-disk", str(tmp_path / "nope")],
               "no such directory")


@pytest.mark.parametrize("device", ["foo", "cuda:x", "cuda"])
def test_unusable_device(capsys, tiny_llama, device):
    fails_with(capsys, ["info", str(tiny_llama), "--device", device], "device")


def test_int4_needs_an_int4_store(capsys, tiny_llama, tmp_path):
    assert main(["convert", str(tiny_llama), str(tmp_path / "store"), "--weights", "fp32"]) == 0
    fails_with(capsys, ["info", str(tmp_path / "store"), "--placement", "disk", "--weights",
                        "int4"], "--weights int4")


def test_budget_too_small(capsys, tiny_llama):
    fails_with(capsys, ["info", str(tiny_llama), "--device-memory", "1KiB"], "too small")


def test_prompt_beyond_context(capsys):
    fails_with(capsys, ["generate", "hello", "-n", "9000"], "exceeds the model's context of 8192")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--temperature", "-1", "emperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--top-k", "-3", "top_k")])
def test_invalid_sampling(capsys, flag, value, fragment):
    fails_with(capsys, ["generate", "hello", flag, value], fragment)


def test_bad_jsonl_input_leaves_no_output(capsys, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "ok"}\n{broken\n')
    fails_with(capsys, ["generate", "--input", str(src), "--output", str(out)], "in.jsonl:2")
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_convert_refuses_existing_directory(capsys, tiny_llama, tmp_path):
    fails_with(capsys, ["convert", str(tiny_llama), str(tmp_path)], "already exists")


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--device-memory", "lots"])
    assert exit_info.value.code == 2
    assert "invalid size" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipo.cli", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pipo: error: no such file or directory")
    assert "Traceback" not in proc.stderr
