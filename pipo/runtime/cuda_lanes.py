"""CUDA lanes: every activity on its own CUDA stream; dependencies are events, not host waits.

:func:`cuda_lane` is the lane factory the engine uses on a GPU (``EngineOptions.lane_factory``):

- ``compute``, ``load_weight``, ``load_kv``, ``save_kv`` (and any lane name a new task kind
  brings): a :class:`StreamLane`. Its ``run(work, after)`` makes the lane's stream
  ``wait_event`` each predecessor's event (the host does not block), runs ``work`` on the
  event-loop thread under ``torch.cuda.stream(stream)`` (so every kernel and copy it issues is
  enqueued on that stream), records an event and returns it as the task's marker.
- ``disk``: a :class:`HostLane`. A disk read fills host memory, which the GPU may still be reading
  for the previous user of the buffer, so here the *host* waits for the predecessors' events, via
  :func:`wait_event` (in a worker thread, so the event loop keeps dispatching other lanes).

:func:`wait_event` is the only host wait on GPU work besides the engine reading the logits; nothing
in the runtime calls ``synchronize()``.

Ordering with the caller's stream. The engine puts a step's inputs (token ids, positions, masks) on
the device on its current stream before a run and reads the logits on it after the run. So a task
with no predecessors first makes its stream wait for the caller's stream, and the caller's stream
waits for every task's event: then reading the logits sees every write of the step, and the next
step's tasks (which have no predecessors from this step) start only after this step's GPU work,
e.g. the last SaveKV, is done. None of these waits blocks the host; a run costs about two extra
``cudaStreamWaitEvent`` calls per task (microseconds against a step of tens of milliseconds).

Tensor lifetimes across streams (what must hold, and why it does without ``record_stream``):
weight slots, KV slots, pinned host buffers and the KV home are allocated once per run set-up and
outlive every step; activations a task allocates are allocated on that task's own stream; the per-
step inputs are allocated on the caller's stream and freed only after a later step replaced them,
when the caller's stream has already waited for every task that read them. Non-blocking copies from
pinned memory are tracked by torch's pinned-memory allocator itself.

Timing (``timing=True``, or :func:`enable_timing`): each task also records a timing event before its
work; :meth:`StreamLane.intervals_ms` returns the (start, end) GPU times of the tasks in run order.
The compute lane's intervals give the GPU busy fraction (their union over the decode wall time).

For tests the CUDA module is a parameter: pass an object with ``Stream``, ``Event``, ``stream`` and
``current_stream`` like ``torch.cuda`` to exercise the logic on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Iterable, Sequence

from pipo.runtime.lanes import Lane, Work
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
    """What both CUDA lanes share: a stream, the caller ordering and optional timing events."""

    def __init__(self, name: str, *, device: Any = None, timing: bool = False, cuda=None):
        super().__init__(name)
        self.cuda = cuda or _torch_cuda()
        self.stream = self.cuda.Stream(device=device)
        self.timing = timing
        self.timed: list[tuple[Any, Any]] = []
        self.last_event: Any = None

    def _caller(self):
        return self.cuda.current_stream(self.stream.device)

    def _start_event(self):
        if not self.timing:
            return None
        event = self.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def _finish(self, start_event, caller) -> Any:
        """Record the task's event on the lane's stream; the caller's stream waits for it."""
        done = self.cuda.Event(enable_timing=self.timing)
        done.record(self.stream)
        if start_event is not None:
            self.timed.append((start_event, done))
        caller.wait_event(done)
        self.last_event = done
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


class StreamLane(_StreamBase):
    """Runs work enqueued on its own CUDA stream, ordered after its predecessors' events."""

    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Enqueue ``work`` after the events in ``after``; return the event ending it."""
        caller = self._caller()
        self._wait_for(after, caller)
        with self.cuda.stream(self.stream):
            start_event = self._start_event()
            result = work()
            if inspect.isawaitable(result):
                _close(result)
                raise TypeError(f"lane {self.name} runs only synchronous executors (a CUDA stream "
                                "context cannot span an await); put async work on the disk lane")
            return self._finish(start_event, caller)

    def _wait_for(self, after: Sequence[Any], caller) -> None:
        events = [m for m in after if is_event(m, self.cuda)]
        if not after:
            self.stream.wait_stream(caller)  # the step's inputs, and the previous step's work
        for event in events:
            self.stream.wait_event(event)


class HostLane(_StreamBase):
    """Runs host work (disk reads) on the event loop once its predecessors' events completed.

    Work may return an awaitable (aiofiles reads); it is awaited. Any GPU work the synchronous part
    issues goes on the lane's own stream, and the returned event covers it.
    """

    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Host-wait for ``after``'s events (off the loop thread), run ``work``, return an event."""
        caller = self._caller()
        await _wait_all(e for e in after if is_event(e, self.cuda))
        if not after:
            await _wait_all([_recorded(self.cuda, caller)])
        with self.cuda.stream(self.stream):
            start_event = self._start_event()
            result = work()
        if inspect.isawaitable(result):
            await result
        return self._finish(start_event, caller)


def _recorded(cuda, stream) -> Any:
    event = cuda.Event()
    event.record(stream)
    return event


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
    """The CUDA lane for a lane name: a host lane for ``disk``, a stream lane for all others."""
    cls = HostLane if name == DISK else StreamLane
    return cls(name, device=device, timing=timing, cuda=cuda)


def enable_timing(lanes: Iterable[Lane], on: bool = True) -> list[Lane]:
    """Switch timing events on (or off) for every CUDA lane in ``lanes``; return those lanes."""
    found = [lane for lane in lanes if isinstance(lane, _StreamBase)]
    for lane in found:
        lane.timing = on
        lane.reset_timing()
    return found
