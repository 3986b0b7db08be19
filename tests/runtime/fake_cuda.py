"""A fake ``torch.cuda`` for CPU tests of the CUDA lanes: it logs every call and tracks ordering.

Every stream keeps the set of *work labels* it is ordered after (``deps``): work enqueued on a stream
is ordered after the stream's earlier work and after whatever the stream waited for. Recording an
event captures the stream's set; ``wait_event`` adds the event's set to the waiting stream;
``wait_stream`` adds the other stream's set. :meth:`FakeCuda.enqueue` marks a piece of work (a task,
the caller's input upload) as enqueued on the current stream and remembers what it is ordered after,
so a test can compare that with the graph: no missing order (a race on a GPU) and no extra order (a
lost overlap). ``pending=True`` makes new events incomplete until a host wait, so host waits show
up in the log as ``("host_wait", event)``.
"""

from __future__ import annotations

import contextlib
from typing import Any


class FakeCuda:
    """Just enough of ``torch.cuda`` for the lanes and the step loop; everything lands in ``log``."""

    def __init__(self, device: Any = "cuda:0", pending: bool = False):
        self.log: list[tuple] = []
        self.device = device
        self.after: dict[Any, frozenset] = {}  # work label -> labels it is ordered after
        self.devices_asked: list[Any] = []
        self._n_streams = 0
        self.caller = self.Stream(device)
        self.caller.name = "caller"
        self._current = self.caller
        self._clock = 0.0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.stream, self.time_ms, self.timing = None, None, enable_timing
                self.done, self.deps = not pending, frozenset()
                fake.log.append(("new_event", self))

            def record(self, stream=None):
                fake._clock += 1.0
                self.stream, self.time_ms = stream or fake._current, fake._clock
                self.deps = frozenset(self.stream.deps)
                self.done = not pending
                fake.log.append(("record", self.stream.name, self))

            def query(self):
                return self.done

            def synchronize(self):
                fake.log.append(("host_wait", self))
                self.done = True

            def elapsed_time(self, other):
                return other.time_ms - self.time_ms

        self.Event = Event

    def Stream(self, device=None):  # noqa: N802 - torch.cuda's spelling
        stream = _FakeStream(self, f"s{self._n_streams}", device or self.device)
        self._n_streams += 1
        self.log.append(("stream", stream.name, stream.device))
        return stream

    def current_stream(self, device=None):
        self.devices_asked.append(device)
        return self._current

    @contextlib.contextmanager
    def stream(self, s):
        previous, self._current = self._current, s
        try:
            yield
        finally:
            self._current = previous

    def enqueue(self, label: Any) -> None:
        """Work ``label`` is enqueued on the current stream now."""
        stream = self._current
        self.after[label] = frozenset(stream.deps)
        stream.deps.add(label)
        self.log.append(("run", label, stream.name))

    def events(self, kind: str, stream: str | None = None) -> list:
        """The events of log entries of ``kind`` ("record", "host_wait"), optionally on a stream."""
        return [e[-1] for e in self.log if e[0] == kind and (stream is None or e[1] == stream)]


class _FakeStream:
    def __init__(self, fake: FakeCuda, name: str, device: Any):
        self.fake, self.name, self.device = fake, name, device
        self.deps: set = set()

    def wait_event(self, event):
        self.deps |= event.deps
        self.fake.log.append(("wait", self.name, event))

    def wait_stream(self, other):
        self.deps |= other.deps
        self.fake.log.append(("wait_stream", self.name, other.name))
