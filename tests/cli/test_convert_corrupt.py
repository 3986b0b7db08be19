"""Corrupt GGUF tensor data (NaN scales): ``generate`` and ``convert`` refuse it naming the tensor."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pipo.errors import PipoError
from pipo.io.default_model import default_model_path
from pipo.io.gguf_parse import parse_gguf

CORRUPT_TENSOR = "blk.3.ffn_up.weight"  # Q4_1 in the default model
FP16_NAN = b"\x00\x7e"


@pytest.fixture(scope="module")
def corrupt_gguf(tmp_path_factory):
    """A copy of the default GGUF with a NaN scale in the 5th block of one tensor."""
    try:
        source = default_model_path()
    except PipoError as err:
        pytest.skip(str(err))
    path = tmp_path_factory.mktemp("corrupt") / "model.gguf"
    shutil.copyfile(source, path)
    tensor = parse_gguf(path).tensors[CORRUPT_TENSOR]
    assert tensor.type_name == "Q4_1"
    with open(path, "r+b") as file:
        file.seek(tensor.offset + 4 * 20)  # Q4_1 blocks are 20 bytes, the fp16 scale first
        file.write(FP16_NAN)
    return path


def run_pipo(*argv):
    return subprocess.run([sys.executable, "-m", "pipo.cli", *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_nan_weights_are_refused_naming_the_tensor(corrupt_gguf, tmp_path, command):
    if command == "generate":
        proc = run_pipo("generate", "--model", str(corrupt_gguf), "-n", "2", "Hello")
    else:
        proc = run_pipo("convert", str(corrupt_gguf), str(tmp_path / "store"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pipo: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert CORRUPT_TENSOR in proc.stderr and "NaN" in proc.stderr
    assert "Warning" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []
