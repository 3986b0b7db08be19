"""The link throttle: the token bucket's arithmetic, and a capped lane never beats its cap."""

from __future__ import annotations

import pytest

from pipo.runtime import GraphBuilder, Runtime, ThreadLane
from pipo.runtime.tasks import LOAD_WEIGHT
from pipo.runtime.throttle import ThrottledLane, TokenBucket
from tests.runtime.toy import Step, step_ctx, step_table


def test_the_bucket_books_transfers_back_to_back_without_burst_credit():
    bucket = TokenBucket(1e6)  # 1 MB/s
    assert bucket.reserve(500_000, now=10.0) == (10.0, 10.5)
    assert bucket.reserve(250_000, now=10.1) == (10.5, 10.75)  # queued behind the first
    assert bucket.reserve(1_000_000, now=20.0) == (20.0, 21.0)  # idle time saved nothing
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_a_throttled_lane_takes_at_least_bytes_over_bandwidth_per_task():
    nbytes, bps = 200_000, 20e6  # 10 ms per task at the cap
    factory = lambda name: (ThrottledLane(ThreadLane(name), bps, lambda task, ctx: nbytes)  # noqa: E731
                            if name == LOAD_WEIGHT else ThreadLane(name))
    b = GraphBuilder()
    previous: list[str] = []
    for label in "abc":
        previous = [b.add(Step(label, lane=LOAD_WEIGHT), after=previous)]
    ctx = step_ctx()
    with Runtime(executors=step_table(), lane_factory=factory, trace=True) as runtime:
        stats = runtime.run(b.graph, ctx)
    assert ctx.ran == ["a", "b", "c"]  # the work itself ran, in order
    for record in stats.records:
        assert record.end_s - record.start_s >= nbytes / bps
    assert stats.wall_s >= 3 * nbytes / bps
