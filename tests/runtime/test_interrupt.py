"""Ctrl-C during ``pipo generate --kv-offload``: exit 130 with one line, no asyncio noise.

The runtime cancels and awaits its lane workers (and drains thread lanes) on an interrupt, and the
engine cancels a step it started early, so nothing is left pending for asyncio to report at exit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _store_with_tokenizer(path: Path) -> Path:
    """A small random llama (compute-bound on CPU, long context) as a pipo store, with a character
    tokenizer over its 128 ids, so ``pipo generate -m PATH`` streams text for many seconds."""
    import tokenizers

    from pipo.bench.random_model import RandomModel
    from pipo.bench.workloads import SHAPES
    from pipo.io.store_write import convert
    from pipo.io.tokenizer import Tokenizer

    spec = dataclasses.replace(SHAPES["tiny-llama"], hidden=512, n_heads=8, n_kv_heads=4,
                               head_dim=64, ffn=2048, n_layers=4, vocab_size=128,
                               max_positions=4096)
    source = RandomModel(spec)
    vocab = {chr(i): i for i in range(spec.vocab_size)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    source.tokenizer = Tokenizer(backend, bos_id=None, eos_ids=(), add_bos=False)
    return convert(source, path)


# ``python -m pipo.cli`` as a terminal starts it: SIGINT unblocked and raising KeyboardInterrupt.
# A test run started where SIGINT is ignored (a background job of a non-interactive shell, nohup)
# hands that disposition to its children, and Python then never installs its handler: the child
# would ignore the Ctrl-C and finish its 4000 tokens (exit 0, nothing on stderr).
AS_FROM_A_TERMINAL = ("import runpy, signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "runpy.run_module('pipo.cli', run_name='__main__', alter_sys=True)")


@pytest.mark.timeout(120)
def test_ctrl_c_mid_generation_exits_130_with_one_line(tmp_path):
    model = _store_with_tokenizer(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, "generate", "hello", "-m", str(model),
         "-n", "4000", "--kv-offload"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=REPO)
    try:
        assert process.stdout.read(1), "no output before the process ended"  # generating now
        time.sleep(0.3)  # well inside the decode loop, most likely inside a step
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    text = err.decode()
    assert process.returncode == 130, text
    assert text.splitlines() == ["pipo: interrupted"], text
    assert "Task was destroyed" not in text and "Traceback" not in text
