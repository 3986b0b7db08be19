"""Per-row KV batches: row slots with their own lengths, positions and KV regions, and rollback.

``batch = engine.open_batch(rows, max_len)`` gives ``rows`` row slots of up to ``max_len`` tokens
each. :meth:`Batch.admit` takes a free slot, :meth:`Batch.step` runs ONE weight pass in which every
listed row appends its tokens (a prompt chunk, a decode token, k draft tokens, in any mix) and
returns each row's logits; :meth:`Batch.truncate` rolls a row back, :meth:`Batch.free` releases its
slot at once. There is no left padding: a step's tokens are packed per micro-batch (see
:mod:`pipo.ops.rows`), padded only up to a token *bucket* (:func:`bucket_tokens`), and the padding
writes its KV into a trash slot (the cache's last position, past ``max_len``) that attention never
reads. Since a row's attention reads only its own positions below its length, rolling back is just
lowering the length; the next append overwrites the discarded entries.

Trees: ``step(feed, parents={row: [...]})`` appends a row's tokens as nodes of a token tree (see
:class:`OpenTree`): each new token sees the row's prefix and its own ancestors only, at position
prefix + depth. The tree stays open over further tree steps until :meth:`Batch.truncate` keeps a
path of it as the row's plain prefix.

Overlap: :meth:`Batch.submit` runs a step and returns a wait for its logits; :meth:`Batch.prefetch`
then starts the *next* step's leading loads (weights, KV) before the host samples. The next
:meth:`submit` finishes that run when its KV load ranges are the ones prefetched, else it cancels
it and runs afresh (same tokens either way). One step graph (a DAG of tasks, see :mod:`graphs`) is
compiled per phase and reused by every bucket: the DAG does not depend on token counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graphs import DECODE, PREFILL
from pipo.engine.context import StepContext
from pipo.engine.kv import micro_rows
from pipo.errors import GenerationError, PipoError
from pipo.ops.rows import TreeRows, pack_rows
from pipo.plan import Plan
from pipo.runtime.scheduler import Program, RunStats, Runtime, StartedRun

LOGITS = ("last", "all")


class BatchFull(PipoError):
    """Every row slot of the batch is taken."""


def bucket_tokens(n: int) -> int:
    """The padded token count of a micro-batch step of ``n`` tokens: the next power of two up to
    64, then the next multiple of 64 (at most 63 padding tokens, and few distinct shapes)."""
    if n <= 64:
        return 1 << max(n - 1, 0).bit_length()
    return -(-n // 64) * 64


class OpenTree:
    """A row's open token tree: the tokens appended by tree steps since slot ``base``.

    Parent indices count the tree's tokens from 0 (all earlier tree steps' tokens, then this step's,
    in order); -1 is the row's prefix (the slots below ``base``).
    """

    def __init__(self, base: int):
        self.base = base
        self.depths: list[int] = []
        self.paths: list[list[int]] = []  # per tree token: its ancestors' indices and its own

    def add(self, row: int, parents: list[int]) -> TreeRows:
        """Append tokens with ``parents``; their :class:`~pipo.ops.rows.TreeRows`."""
        first = len(self.depths)
        for i, parent in enumerate(parents):
            if not -1 <= parent < first + i:
                raise GenerationError(f"row {row}: tree token {first + i} has parent {parent}; a "
                                      f"parent is -1 (the prefix) or an earlier tree token")
        for i, parent in enumerate(parents):
            up = ([], -1) if parent < 0 else (self.paths[parent], self.depths[parent])
            self.paths.append(up[0] + [first + i])
            self.depths.append(up[1] + 1)
        ancestors = torch.zeros(len(parents), len(self.depths), dtype=torch.bool)
        for i, path in enumerate(self.paths[first:]):
            ancestors[i, path] = True
        return TreeRows(self.base, self.depths[first:], ancestors)


class Batch:
    """Row slots over one KV cache; see the module docstring. Made by ``Engine.open_batch``.

    ``program(phase)`` gives the compiled step graph; ``io`` moves inputs and logits
    (:mod:`pipo.engine.steps`); ``stats`` collects each step's RunStats when ``keep_stats``.
    """

    def __init__(self, runtime: Runtime, io, ctx: StepContext, plan: Plan, max_len: int,
                 program: Callable[[str], Program], keep_stats: bool = False):
        self.runtime, self.io, self.ctx, self.plan, self.program = runtime, io, ctx, plan, program
        self.max_len, self.keep_stats = max_len, keep_stats
        self.inline = False
        self.stats: list[RunStats] = []
        self._lengths: list[int | None] = [None] * plan.batch  # None: free slot
        self._pending: dict[int, list[int]] = {}
        self._trees: dict[int, OpenTree] = {}
        self._started: tuple[tuple, StartedRun] | None = None
        self._trash = plan.max_len  # the KV cache's trash slot (pipo.engine.kv.capacity)

    @property
    def rows(self) -> int:
        """Number of row slots."""
        return len(self._lengths)

    def admitted(self) -> list[int]:
        """Rows currently taken, ascending."""
        return [r for r, n in enumerate(self._lengths) if n is not None]

    def admit(self, prompt_ids: list[int] | None = None) -> int:
        """Take a free row slot (the lowest) with an empty KV; :class:`BatchFull` when none is free.

        ``prompt_ids``, when given, are fed to the row at the next :meth:`step` (before any tokens
        that step lists for it), so its prompt runs in the same pass as other rows' decode tokens.
        """
        row = next((r for r, n in enumerate(self._lengths) if n is None), None)
        if row is None:
            raise BatchFull(f"all {self.rows} row slots of the batch are taken; free a row first")
        self._lengths[row] = 0
        if prompt_ids:
            self._pending[row] = list(prompt_ids)
        return row

    def length(self, row: int) -> int:
        """Tokens in the row's KV (a pending prompt not yet included)."""
        return self._checked(row)

    def truncate(self, row: int, length: int) -> None:
        """Roll ``row`` back to its first ``length`` tokens: positions >= ``length`` are discarded.
        Closes the row's open tree: the kept slots become its plain prefix, so the kept part of a
        tree must be a path whose tokens sit at slot = position (a chain from the tree's start)."""
        current = self._checked(row)
        if not 0 <= length <= current:
            raise GenerationError(f"cannot truncate row {row} of {current} tokens to {length}")
        self._lengths[row] = length
        self._trees.pop(row, None)

    def free(self, row: int) -> None:
        """Release ``row``'s slot at once; the next :meth:`admit` may reuse it."""
        self._checked(row)
        self._lengths[row] = None
        self._pending.pop(row, None)
        self._trees.pop(row, None)

    def step(self, feed: dict[int, list[int]], logits: str = "last",
             parents: dict[int, list[int]] | None = None) -> dict[int, torch.Tensor]:
        """One weight pass appending ``feed[row]`` to each listed row; returns {row: logits [n,
        vocab]} (float32, host), n = 1 for ``"last"``, the row's new token count for ``"all"``.
        ``parents[row]`` makes the row's tokens tree nodes (one parent index per token, see
        :class:`OpenTree`); rows not in ``parents`` append a chain as usual."""
        return self.submit(feed, logits, parents)()

    def submit(self, feed: dict[int, list[int]], logits: str = "last",
               parents: dict[int, list[int]] | None = None
               ) -> Callable[[], dict[int, torch.Tensor]]:
        """Run the step of :meth:`step`; return a wait for its logits (call :meth:`prefetch` first
        to overlap the next step's loads with that wait)."""
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        feed = self._merge_pending(feed)
        layout = self._layout({row: len(ids) for row, ids in feed.items()})
        started = self._take_started(layout)
        self._set_inputs(feed, logits, layout, self._tree_rows(feed, parents or {}))
        stats = started.finish() if started else self._run(self.program(layout[0]))
        return self._finished(feed, logits, stats)

    def submit_prelude(self, rows: list[int], logits: str, program: Callable[[str], Program],
                       prelude) -> Callable[[], dict[int, torch.Tensor]]:
        """Like :meth:`submit`, but the tokens come from the run itself: ``program(phase)`` is a
        step graph whose leading compute tasks call ``prelude.step(index)`` (see
        :mod:`graphs.speculate`); the call that returns a feed ``{row: [ids]}`` (``rows`` only)
        hands the pass its tokens (or ``(feed, parents)`` for tree tokens, as :meth:`step`'s). The
        pass's leading loads run meanwhile."""
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        self._cancel_started()
        layout = self._layout(dict.fromkeys(rows, 1))
        self.ctx.kv_load_end = list(layout[1])
        fed: dict[int, list[int]] = {}

        def step(index: int) -> None:
            feed = prelude.step(index)
            if feed is not None:
                feed, parents = feed if isinstance(feed, tuple) else (feed, {})
                if sorted(feed) != sorted(rows):
                    raise GenerationError(f"a prelude fed rows {sorted(feed)}, not {sorted(rows)}")
                fed.update(self._merge_pending(feed))
                self._set_inputs(fed, logits, layout, self._tree_rows(fed, parents))

        self.ctx.prelude, self.ctx.rows = step, [None] * self.plan.n_micro
        try:
            stats = self._run(program(layout[0]))
        finally:
            self.ctx.prelude = None
        if not fed:
            raise GenerationError("the step's prelude tasks never handed it tokens")
        return self._finished(fed, logits, stats)

    def _finished(self, feed: dict[int, list[int]], logits: str, stats: RunStats
                  ) -> Callable[[], dict[int, torch.Tensor]]:
        """After a step's run: stats, lengths, and the wait for its logits split per row."""
        if self.keep_stats:
            self.stats.append(stats)
        for row, ids in feed.items():
            self._lengths[row] += len(ids)
        active = [m for m in range(self.plan.n_micro) if self.ctx.rows[m] is not None]
        wait = self.io.fetch(torch.cat([self.ctx.logits[m] for m in active]))
        counts = [(row, len(ids) if logits == "all" else 1) for row, ids in sorted(feed.items())]

        def split() -> dict[int, torch.Tensor]:
            host, out, at = wait(), {}, 0
            for row, n in counts:
                out[row], at = host[at:at + n], at + n
            return out

        return split

    def run_inline(self) -> None:
        """Run this batch's steps on the calling thread, task by task in program order, without
        the runtime: for a resident plan (weights and KV), e.g. a draft model stepped from inside
        a task of another engine's run (:mod:`pipo.engine.drafts`)."""
        if self.plan.streamed() or self.plan.kv_offloaded:
            raise GenerationError("inline steps need resident weights and a resident KV cache")
        self.inline = True

    def _run(self, program: Program) -> RunStats:
        if not self.inline:
            return self.runtime.run(program, self.ctx)
        for task, execute in zip(program.tasks, program.executors, strict=True):
            execute(task, self.ctx)
        return RunStats()

    def prefetch(self, counts: dict[int, int]) -> None:
        """Start the leading loads of a next step that appends ``counts[row]`` tokens per row."""
        self._cancel_started()
        layout = self._layout(counts)
        self.ctx.kv_load_end = list(layout[1])
        self._started = (layout, self.runtime.start(self.program(layout[0]), self.ctx))

    def close(self) -> None:
        """Cancel a started step, then wait until the device finished every copy of the batch. The
        KV cache stays with the engine until its next batch or ``Engine.close``."""
        self._cancel_started()
        self.io.barrier()
        self._lengths = [None] * len(self._lengths)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _checked(self, row: int) -> int:
        if not 0 <= row < self.rows or self._lengths[row] is None:
            raise GenerationError(f"row {row} is not admitted in this batch")
        return self._lengths[row]

    def _merge_pending(self, feed: dict[int, list[int]]) -> dict[int, list[int]]:
        merged = {row: self._pending.pop(row) + list(feed.get(row, []))
                  for row in list(self._pending)}
        merged.update({row: list(ids) for row, ids in feed.items() if row not in merged})
        if not merged:
            raise GenerationError("a step needs at least one row with tokens (or a pending prompt)")
        for row, ids in merged.items():
            if not ids:
                raise GenerationError(f"row {row}: a step must append at least one token")
            if self._checked(row) + len(ids) > self.max_len:
                raise GenerationError(f"row {row} would hold {self._lengths[row] + len(ids)} "
                                      f"tokens, more than the batch's max_len {self.max_len}")
        return merged

    def _tree_rows(self, feed: dict[int, list[int]], parents: dict[int, list[int]]
                   ) -> dict[int, TreeRows]:
        """Each tree row's :class:`TreeRows` for this step (its open tree extended); rows with an
        open tree must step as trees (a chain step would see every branch)."""
        out = {}
        for row, ids in feed.items():
            if row not in parents:
                if row in self._trees:
                    raise GenerationError(f"row {row} has an open token tree: truncate it to a "
                                          f"path first, or give the step's parents")
                continue
            if len(parents[row]) != len(ids) or row in self._pending:
                raise GenerationError(f"row {row}: give one parent per new token (and no pending "
                                      f"prompt in a tree step)")
            tree = self._trees.setdefault(row, OpenTree(self._lengths[row]))
            out[row] = tree.add(row, list(parents[row]))
        return out

    def _micro_of(self, row: int) -> tuple[int, int]:
        return divmod(row, self.plan.micro_batch)

    def _layout(self, counts: dict[int, int]) -> tuple:
        """(phase, KV load end per micro-batch) of a step with ``counts`` tokens per row."""
        active = {self._micro_of(row)[0] for row in counts}
        ends = []
        for m in range(self.plan.n_micro):
            rows = range(m * self.plan.micro_batch, m * self.plan.micro_batch + micro_rows(self.plan, m))
            ends.append(max((self._lengths[r] or 0) for r in rows) if m in active else 0)
        return (DECODE if any(ends) else PREFILL), tuple(ends)

    def _take_started(self, layout: tuple) -> StartedRun | None:
        if self._started is not None and self._started[0] == layout:
            started, self._started = self._started[1], None
            return started
        self._cancel_started()
        return None

    def _cancel_started(self) -> None:
        started, self._started = self._started, None
        if started is not None:
            started[1].cancel()

    def _set_inputs(self, feed: dict[int, list[int]], logits: str, layout: tuple,
                    trees: dict[int, TreeRows]) -> None:
        """Pack each micro-batch's tokens and upload them; micro-batches without tokens get None."""
        ctx, io, n_micro = self.ctx, self.io, self.plan.n_micro
        per_micro: list[list] = [[] for _ in range(n_micro)]
        per_tree: list[list] = [[] for _ in range(n_micro)]
        for row, ids in sorted(feed.items()):
            m, local = self._micro_of(row)
            per_micro[m].append((local, self._lengths[row], ids))
            per_tree[m].append(trees.get(row))
        ctx.kv_load_end = list(layout[1])
        ctx.ids, ctx.rows, ctx.logit_index, ctx.kv_save = [], [], [], []
        ctx.hidden, ctx.logits, ctx.attn_inputs = {}, {}, {}
        for m, entries in enumerate(per_micro):
            if not entries:
                ctx.ids.append(None), ctx.rows.append(None), ctx.logit_index.append(None)
                ctx.kv_save.append((0, 0))
                continue
            tokens = [t for _, _, ids in entries for t in ids]
            bucket = bucket_tokens(len(tokens))
            rows = pack_rows([(local, start, len(ids)) for local, start, ids in entries], bucket,
                             self._trash, micro_rows(self.plan, m), per_tree[m])
            ctx.ids.append(io.upload(torch.tensor([tokens + [0] * (bucket - len(tokens))])))
            ctx.rows.append(rows.to(io.upload))
            ctx.logit_index.append(io.upload(_logit_index(entries, logits)))
            lo = min(start for _, start, _ in entries)
            ctx.kv_save.append((lo, rows.end - lo))


def _logit_index(entries: list, logits: str) -> torch.Tensor:
    """Packed indices of the tokens whose logits are wanted: each row's last, or all real ones."""
    ends = torch.tensor([len(ids) for _, _, ids in entries]).cumsum(0)
    return ends - 1 if logits == "last" else torch.arange(int(ends[-1]))
