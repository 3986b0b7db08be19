"""Bytes each transfer task moves, for the link throttle (``--link-gbps``)."""

from __future__ import annotations

from pipo.engine.kv import micro_rows
from pipo.runtime.tasks import LoadKV, LoadWeight, SaveKV


def transfer_nbytes(task, ctx) -> int:
    """Bytes ``task`` copies between host and device in the step ``ctx`` describes (0: none)."""
    if isinstance(task, LoadWeight):
        weights = ctx.weights
        if task.block in weights.host:
            return weights.host[task.block][0].nbytes
        return weights.source.block_nbytes(task.block)
    if isinstance(task, (LoadKV, SaveKV)):
        spec, plan = ctx.spec, ctx.kv.plan
        per_position = 2 * spec.n_kv_heads * spec.head_dim * ctx.weights.dtype.itemsize
        if isinstance(task, LoadKV):
            positions = ctx.kv_load_end[task.micro]
        else:
            positions = ctx.kv_save[task.micro][1]
        return micro_rows(plan, task.micro) * positions * per_position
    return 0
