"""Link emulation: a token bucket that caps a transfer lane at a chosen bandwidth (``--link-gbps``).

:class:`ThrottledLane` wraps any lane. Each task it runs moves ``nbytes_of(task, ctx)`` bytes (the
work callable is the scheduler's ``partial(executor, task, ctx)``); the bucket lets a lane move at
most ``bps`` bytes per second: a transfer of n bytes that starts at time s (or when the previous
one's allowance ran out, if later) is allowed to end no earlier than that plus ``n / bps``.

- CPU (thread) lanes finish their work when ``run`` returns, so the work itself is padded: after
  the copy, the lane's thread sleeps until the allowed end (not the event loop, which may be busy
  computing), and successors see exactly the capped speed.
- CUDA lanes only enqueue; the lane waits on the host until the bucket allows the next transfer
  before enqueuing it, so the copy stream carries at most ``bps`` on average (successors of the
  *last* copy of a burst may see it early by up to one transfer's time).
The bucket holds no burst credit: an idle lane does not save up bandwidth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from pipo.runtime.lanes import Lane, Work


class TokenBucket:
    """Bandwidth ``bps`` (bytes/s) with no burst: :meth:`reserve` books a transfer, returns its
    allowed (start, end) on the ``time.perf_counter`` clock."""

    def __init__(self, bps: float):
        if not bps > 0:
            raise ValueError(f"bandwidth must be positive, got {bps}")
        self.bps = bps
        self._free_at = 0.0

    def reserve(self, nbytes: int, now: float) -> tuple[float, float]:
        """Book ``nbytes`` starting no earlier than ``now``; (allowed start, allowed end)."""
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.bps
        return start, self._free_at


class ThrottledLane(Lane):
    """``inner`` with its transfers capped by a :class:`TokenBucket` (see the module docstring).

    ``enqueue_only``: ``inner`` returns before its work is done (a CUDA stream lane): pace the
    enqueues instead of padding each task's end.
    """

    def __init__(self, inner: Lane, bps: float, nbytes_of: Callable[[Any, Any], int],
                 enqueue_only: bool = False):
        super().__init__(inner.name)
        self.inner, self.bucket, self.nbytes_of = inner, TokenBucket(bps), nbytes_of
        self.enqueue_only = enqueue_only

    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Run ``work`` on the inner lane within the bucket's allowance."""
        task, ctx = getattr(work, "args", (None, None))[:2]
        nbytes = self.nbytes_of(task, ctx) if task is not None else 0
        if self.enqueue_only:
            start, _ = self.bucket.reserve(nbytes, time.perf_counter())
            delay = start - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await self.inner.run(work, after)
        return await self.inner.run(partial(self._padded, work, nbytes), after)

    def _padded(self, work: Work, nbytes: int) -> Any:
        """``work``, then a sleep (on the lane's own thread) until the bucket's allowed end."""
        _, end = self.bucket.reserve(nbytes, time.perf_counter())
        result = work()
        delay = end - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return result

    def begin_run(self, run):
        """Delegated to the inner lane."""
        return self.inner.begin_run(run)

    def resume_run(self, run):
        """Delegated to the inner lane."""
        return self.inner.resume_run(run)

    def end_run(self, run, markers) -> None:
        """Delegated to the inner lane."""
        self.inner.end_run(run, markers)

    def close(self) -> None:
        """Close the inner lane."""
        self.inner.close()
