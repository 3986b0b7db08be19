"""A progress line while a model's blocks are read for the first time (stderr, only on a terminal).

Loading the default model takes about a second; a bigger one much longer. The line names the model
and counts blocks; it is drawn by tqdm (imported only when stderr is a terminal) and erased when the
last block has been read, so the generated text starts on a clean line.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable


class LoadProgress:
    """Counts the first read of each block; ``done(block)`` after each read."""

    def __init__(self, label: str, blocks: Iterable[str]) -> None:
        self._label = label
        self._left = set(blocks)
        self._total = len(self._left)
        self._bar: Any = None

    def done(self, block: str) -> None:
        """Record that ``block`` has been read; the line closes once every block has been."""
        if block not in self._left:
            return
        self._left.discard(block)
        if self._bar is None and self._left and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, desc=f"loading {self._label}", unit="block",
                             leave=False, file=sys.stderr)
        if self._bar is not None:
            self._bar.update(self._total - len(self._left) - self._bar.n)
            if not self._left:
                self._bar.close()
                self._bar = None
