"""The task-graph runtime: tasks, graph checks, executors, lanes and the scheduler.

Public API: :class:`Runtime` (``Runtime().run(graph, ctx)``; ``Runtime().start(graph, ctx)`` for a
run whose leading loads go ahead while the caller works, completed by :meth:`StartedRun.finish`),
the task kinds, :class:`GraphBuilder`, :func:`check_graph`, :func:`executor` / :class:`Executors`,
and the lane classes (with their run-boundary hooks and :class:`RunInfo`).
"""

from pipo.runtime.graph import GraphBuilder, GraphError, check_graph, graph_from_json, graph_to_json
from pipo.runtime.lanes import Lane, LoopLane, RunInfo, ThreadLane
from pipo.runtime.registry import EXECUTORS, Executors, UnknownTaskKind, executor
from pipo.runtime.scheduler import Program, RunStats, Runtime, StartedRun, TaskRecord
from pipo.runtime.tasks import Compute, LoadKV, LoadWeight, ReadBlock, SaveKV, Task

__all__ = [
    "Compute", "EXECUTORS", "Executors", "GraphBuilder", "GraphError", "Lane", "LoadKV",
    "LoadWeight", "LoopLane", "Program", "ReadBlock", "RunInfo", "RunStats", "Runtime", "SaveKV",
    "StartedRun", "Task", "TaskRecord", "ThreadLane", "UnknownTaskKind", "check_graph", "executor",
    "graph_from_json", "graph_to_json",
]
