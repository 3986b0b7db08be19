"""The task-graph runtime: tasks, graph checks, executors, lanes and the scheduler.

Public API: :class:`Runtime` (``Runtime().run(graph, ctx)``), the task kinds, :class:`GraphBuilder`,
:func:`check_graph`, :func:`executor` / :class:`Executors`, and the lane classes.
"""

from pipo.runtime.graph import GraphBuilder, GraphError, check_graph, graph_from_json, graph_to_json
from pipo.runtime.lanes import Lane, LoopLane, ThreadLane
from pipo.runtime.registry import EXECUTORS, Executors, UnknownTaskKind, executor
from pipo.runtime.scheduler import Program, RunStats, Runtime, TaskRecord
from pipo.runtime.tasks import Compute, LoadKV, LoadWeight, ReadBlock, SaveKV, Task

__all__ = [
    "Compute", "EXECUTORS", "Executors", "GraphBuilder", "GraphError", "Lane", "LoadKV",
    "LoadWeight", "LoopLane", "Program", "ReadBlock", "RunStats", "Runtime", "SaveKV", "Task", "TaskRecord",
    "ThreadLane", "UnknownTaskKind", "check_graph", "executor", "graph_from_json", "graph_to_json",
]
