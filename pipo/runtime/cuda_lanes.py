"""CUDA lanes: every activity on its own CUDA stream; dependencies are events, not host waits.

:func:`cuda_lane` is the lane factory the engine uses on a GPU (``EngineOptions.lane_factory``
binds it to the engine's device, so streams and events live on ``cuda:N``):

- ``compute``, ``load_weight``, ``load_kv``, ``save_kv`` (and any lane name a new task kind
  brings): a :class:`StreamLane`. Its ``run(work, after)`` makes the lane's stream
  ``wait_event`` each event in ``after`` (the host does not block), runs ``work`` on the
  event-loop thread under ``torch.cuda.stream(stream)`` (so every kernel and copy it issues is
  enqueued on that stream), records an event and returns it as the task's marker.
- ``disk``: a :class:`HostLane`. A disk read fills host memory, which the GPU may still be reading
  for the previous user of the buffer, so here the *host* waits for the events in ``after``, via
  :func:`wait_event` (in a worker thread, so the event loop keeps dispatching other lanes).

:func:`wait_event` is the only host wait on GPU work besides the engine reading the logits; nothing
in the runtime calls ``synchronize()``.

Ordering with the caller's stream (the run-boundary hooks of :class:`~pipo.runtime.lanes.Lane`).
The engine puts a step's inputs (token ids, positions, masks) on the device on its current stream
before a run and reads the logits on it after the run. When a run begins, one event is recorded on
the caller's stream (shared by the lanes of one device through ``RunInfo.shared``) and the run's
root tasks wait on it: they follow the inputs and everything the caller's stream was ordered after,
and nothing else of their own step. When a started run is finished, a second caller event orders
the tasks released then (those right after the prefix) after the inputs uploaded in between. When
the run ends, the caller's stream waits on the events of the run's sink tasks, once each: every
task is an ancestor of a sink, so reading the logits sees every write of the step, and the next
step's roots (ordered after the next begin event) start only after this step's GPU work, e.g. its
last SaveKV. None of these waits blocks the host; per task a run costs one ``wait_event`` per graph
edge and one event record.

Events are reused: a lane hands out the events of its pool in order within a run and starts over
when the next run begins. That is safe because every wait on an event (a successor's
``wait_event``, the caller's ``end_run`` wait, the disk lane's host wait) is issued within the run
that recorded it, and CUDA waits bind to the record that precedes them. Timing events are never
reused.

Tensor lifetimes across streams (what must hold, and why it does without ``record_stream``):
weight slots, KV slots, pinned host buffers and the KV home are allocated once per run set-up and
outlive every step; activations a task allocates are allocated on that task's own stream; the per-
step inputs are allocated on the caller's stream and freed only after a later step replaced them,
when the caller's stream has already waited for every task that read them. Non-blocking copies from
pinned memory are tracked by torch's pinned-memory allocator itself.

Timing (``timing=True``, or :func:`enable_timing`): each task also records a timing event before its
work; :meth:`StreamLane.intervals_ms` returns the (start, end) GPU times of the tasks in run order,
and ``timed_runs`` the run id of each (``RunStats.run_id``), to pick one step's intervals.
The compute lane's intervals give the GPU busy fraction (their union over the decode wall time).

For tests the CUDA module is a parameter: pass an object with ``Stream``, ``Event``, ``stream`` and
``current_stream`` like ``torch.cuda`` to exercise the logic on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Iterable, Sequence

from pipo.runtime.lanes import Lane, RunInfo, Work
from pipo.runtime.tasks import DISK


def _torch_cuda():
    import torch

    return torch.cuda


def is_event(marker: Any, cuda=None) -> bool:
    """True when ``marker`` is an event of the CUDA module ``cuda`` (default ``torch.cuda``)."""
    cuda = cuda or _torch_cuda()
    return isinstance(marker, cuda.Event)


def wait_event(event: Any) -> None:
    """Block the host until ``event`` completed (no-op for ``None`` or a completed event).

    The one host wait on GPU work in the runtime: used by the disk lane before it overwrites a host
    buffer, and by tools reading timing events.
    """
    if event is not None and not event.query():
        event.synchronize()


class _StreamBase(Lane):
    """What both CUDA lanes share: a stream, the run boundaries, pooled and timing events."""

    def __init__(self, name: str, *, device: Any = None, timing: bool = False, cuda=None):
        super().__init__(name)
        self.cuda = cuda or _torch_cuda()
        self.stream = self.cuda.Stream(device=device)
        self.timing = timing
        self.timed: list[tuple[Any, Any]] = []
        self.timed_runs: list[int] = []
        self._event_type = self.cuda.Event
        self._pool: list[Any] = []
        self._next_event = 0
        self._run_id = 0

    def _caller(self):
        return self.cuda.current_stream(self.stream.device)

    def begin_run(self, run: RunInfo) -> Any:
        """Start reusing the event pool; return the run's begin event on the caller's stream."""
        self._next_event, self._run_id = 0, run.id
        return self._caller_event(run, "begin")

    def resume_run(self, run: RunInfo) -> Any:
        """Return the run's resume event on the caller's stream (after the caller's uploads)."""
        return self._caller_event(run, "resume")

    def end_run(self, run: RunInfo, markers: Sequence[Any]) -> None:
        """Order the caller's stream after ``markers`` (this lane's sink events)."""
        caller = self._caller()
        for marker in markers:
            if isinstance(marker, self._event_type):
                caller.wait_event(marker)

    def _caller_event(self, run: RunInfo, part: str) -> Any:
        """One event per run, part and device, shared by the lanes of the run."""
        key = ("cuda-caller", part, id(self.cuda), self.stream.device)
        event = run.shared.get(key)
        if event is None:
            event = run.shared[key] = self.cuda.Event()
            event.record(self._caller())
        return event

    def _start_event(self):
        if not self.timing:
            return None
        event = self.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def _finish(self, start_event) -> Any:
        """Record the task's event on the lane's stream and return it."""
        if start_event is not None:
            done = self.cuda.Event(enable_timing=True)
            self.timed.append((start_event, done))
            self.timed_runs.append(self._run_id)
        elif self._next_event < len(self._pool):
            done = self._pool[self._next_event]
            self._next_event += 1
        else:
            done = self.cuda.Event()
            self._pool.append(done)
            self._next_event += 1
        done.record(self.stream)
        return done

    def intervals_ms(self, reference: Any = None) -> list[tuple[float, float]]:
        """(start, end) of each timed task in ms since ``reference`` (default: the first start).

        Waits (host) for the last timed task to finish, via :func:`wait_event`.
        """
        if not self.timed:
            return []
        wait_event(self.timed[-1][1])
        reference = reference or self.timed[0][0]
        return [(reference.elapsed_time(s), reference.elapsed_time(e)) for s, e in self.timed]

    def reset_timing(self) -> None:
        """Forget the timing events recorded so far."""
        self.timed.clear()
        self.timed_runs.clear()


class StreamLane(_StreamBase):
    """Runs work enqueued on its own CUDA stream, ordered after the events in ``after``."""

    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Enqueue ``work`` after the events in ``after``; return the event ending it."""
        stream, event_type = self.stream, self._event_type
        for marker in after:
            if isinstance(marker, event_type):
                stream.wait_event(marker)
        with self.cuda.stream(stream):
            start_event = self._start_event()
            result = work()
            if result is not None and inspect.isawaitable(result):
                _close(result)
                raise TypeError(f"lane {self.name} runs only synchronous executors (a CUDA stream "
                                "context cannot span an await); put async work on the disk lane")
            return self._finish(start_event)


class HostLane(_StreamBase):
    """Runs host work (disk reads) on the event loop once the events in ``after`` completed.

    A root task's ``after`` holds the run's begin event, so the host waits for the caller's stream
    as it was when the run began, not for other tasks of the run. Work may return an awaitable
    (aiofiles reads); it is awaited. Any GPU work the synchronous part issues goes on the lane's own
    stream, and the returned event covers it.
    """

    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Host-wait for ``after``'s events (off the loop thread), run ``work``, return an event."""
        await _wait_all(e for e in after if isinstance(e, self._event_type))
        with self.cuda.stream(self.stream):
            start_event = self._start_event()
            result = work()
        if result is not None and inspect.isawaitable(result):
            await result
        return self._finish(start_event)


async def _wait_all(events: Iterable[Any]) -> None:
    """Wait until every event completed, blocking a worker thread rather than the event loop."""
    pending = [e for e in events if not e.query()]
    if pending:
        loop = asyncio.get_running_loop()
        for event in pending:
            await loop.run_in_executor(None, wait_event, event)


def _close(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # an un-awaited coroutine would warn


def cuda_lane(name: str, *, timing: bool = False, device: Any = None, cuda=None) -> Lane:
    """The CUDA lane for a lane name on ``device`` (default: the current one): a host lane for
    ``disk``, a stream lane for all others."""
    cls = HostLane if name == DISK else StreamLane
    return cls(name, device=device, timing=timing, cuda=cuda)


def enable_timing(lanes: Iterable[Lane], on: bool = True) -> list[Lane]:
    """Switch timing events on (or off) for every CUDA lane in ``lanes``; return those lanes."""
    found = [lane for lane in lanes if isinstance(lane, _StreamBase)]
    for lane in found:
        lane.timing = on
        lane.reset_timing()
    return found
