"""The loading progress line: drawn only on a terminal, erased after the last block."""

from __future__ import annotations

import io

from pipo.io import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal(monkeypatch):
    blocks = ["embed", "L0.attn", "head"]
    for stream, drawn in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(progress.sys, "stderr", stream)
        bar = progress.LoadProgress("tiny", blocks)
        for block in blocks + ["embed"]:  # a second read of a block counts nothing
            bar.done(block)
        text = stream.getvalue()
        assert ("loading tiny" in text) == drawn, text
        assert bar._bar is None
