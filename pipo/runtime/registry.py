"""The one lookup from task kind to executor.

An executor is ``fn(task, ctx)``: it does the work of one task using the run context ``ctx`` and
returns ``None``, or an awaitable for lanes that run on the event loop (disk reads with aiofiles).
Lookup walks the class hierarchy, so a subclass of a kind inherits its executor, and fails loudly
for a kind nobody registered. Tests and tools can layer their own executors over the defaults with
:meth:`Executors.child` without touching the global table.
"""

from __future__ import annotations

from typing import Any, Callable

from pipo.runtime.tasks import Task

ExecutorFn = Callable[[Task, Any], Any]


class UnknownTaskKind(LookupError):
    """No executor is registered for a task kind."""


class Executors:
    """A table from task class to executor, optionally falling back to a parent table."""

    def __init__(self, parent: Executors | None = None):
        self._table: dict[type, ExecutorFn] = {}
        self._parent = parent

    def register(self, kind: type[Task], fn: ExecutorFn | None = None):
        """Register ``fn`` for ``kind``; usable as ``@executors.register(Kind)``."""
        if not (isinstance(kind, type) and issubclass(kind, Task)):
            raise TypeError(f"executor kinds must be Task subclasses, got {kind!r}")

        def add(f: ExecutorFn) -> ExecutorFn:
            self._table[kind] = f
            return f

        return add if fn is None else add(fn)

    def find(self, kind: type[Task]) -> ExecutorFn | None:
        """The executor for ``kind`` (or its nearest registered base class), else ``None``."""
        for cls in kind.__mro__:
            if cls in self._table:
                return self._table[cls]
        return self._parent.find(kind) if self._parent else None

    def lookup(self, kind: type[Task]) -> ExecutorFn:
        """Like :meth:`find` but raises :class:`UnknownTaskKind` naming the kind."""
        fn = self.find(kind)
        if fn is None:
            raise UnknownTaskKind(
                f"no executor registered for task kind {kind.__name__}; "
                f"register one with @executor({kind.__name__})"
            )
        return fn

    def child(self) -> Executors:
        """A new table whose lookups fall back to this one."""
        return Executors(parent=self)


EXECUTORS = Executors()


def executor(kind: type[Task]):
    """Decorator registering an executor for ``kind`` in the default table."""
    return EXECUTORS.register(kind)
