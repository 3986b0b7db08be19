"""Length bucketing for a batch job, and putting finished rows back in input order (pure).

A batch is generated left-padded to its longest prompt, so a batch that mixes a 5-token prompt
with a 300-token one spends most of its prefill on padding (and its numerics on padded rows).
:func:`length_buckets` groups rows of equal token length into whole batches first; the rows left
over are batched with their neighbours in length. Batches go out longest first, so the workers
finish on short batches instead of waiting for one long straggler.

Rows come back in whatever order the workers finish; :class:`InputOrder` releases them in input
order and refuses a row seen twice, so a job's output has every row exactly once.
"""

from __future__ import annotations

from collections import defaultdict


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices of ``lengths`` in batches of ``batch_size``.

    Rows of equal length fill whole batches where they can; the rest are batched in order of
    length. Every batch holds exactly ``batch_size`` rows except possibly the last one, which holds
    the shortest rows left over; the full batches come longest first. Within a batch, rows keep
    their input order.
    """
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    full, rest = [], []
    for length in sorted(by_length, reverse=True):
        rows = by_length[length]
        whole = len(rows) - len(rows) % batch_size
        full += [rows[i:i + batch_size] for i in range(0, whole, batch_size)]
        rest += rows[whole:]
    full += [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)]
    partial = [b for b in full if len(b) < batch_size]  # at most one: rest's shortest rows
    full = [b for b in full if len(b) == batch_size]
    full.sort(key=lambda b: max(lengths[i] for i in b), reverse=True)
    return full + partial


class InputOrder:
    """Finished rows, released in input order: row i only once rows 0 .. i-1 were released."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.released = 0
        self._held: dict[int, object] = {}

    def add(self, index: int, row) -> list:
        """Take row ``index``; return the rows now ready, in order (often none)."""
        if not 0 <= index < self.n_rows:
            raise ValueError(f"row {index} is not one of the {self.n_rows} input rows")
        if index < self.released or index in self._held:
            raise ValueError(f"row {index} came back twice")
        self._held[index] = row
        ready = []
        while self.released in self._held:
            ready.append(self._held.pop(self.released))
            self.released += 1
        return ready

    @property
    def complete(self) -> bool:
        """Every row was released."""
        return self.released == self.n_rows
