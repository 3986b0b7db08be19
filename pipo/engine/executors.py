"""The default executors of the four task kinds, registered in the global table.

Each reads its keys from the task and its tensors from the :class:`StepContext`.
"""

from __future__ import annotations

from pipo.engine.context import StepContext
from pipo.io.spec import block_layer, block_part
from pipo.ops import layers
from pipo.runtime.registry import executor
from pipo.runtime.tasks import DISK, Compute, LoadKV, LoadWeight, ReadBlock, SaveKV


@executor(LoadWeight)
def load_weight(task: LoadWeight, ctx: StepContext):
    """Host or staged block -> weight slot; an unstaged disk block is read straight into the slot
    asynchronously (awaited on the disk lane)."""
    if task.lane == DISK:
        return ctx.weights.load_from_disk(task.block, task.slot)
    return ctx.weights.load(task.block, task.slot)


@executor(ReadBlock)
def read_block(task: ReadBlock, ctx: StepContext):
    """Disk block -> host staging buffer (awaited on the disk lane)."""
    return ctx.weights.read_staged(task.block, task.staging)


@executor(LoadKV)
def load_kv(task: LoadKV, ctx: StepContext) -> None:
    """Host KV of (layer, micro) -> KV slot."""
    ctx.kv.load(task.layer, task.micro, task.slot, ctx.start)


@executor(SaveKV)
def save_kv(task: SaveKV, ctx: StepContext) -> None:
    """This step's KV entries of (layer, micro) -> host cache."""
    ctx.kv.save(task.layer, task.micro, task.slot, ctx.start, ctx.t)


@executor(Compute)
def compute(task: Compute, ctx: StepContext) -> None:
    """Run one block for one micro-batch, chaining the micro-batch's hidden state."""
    w = ctx.weights.block(task.block, task.slot)
    m, part = task.micro, block_part(task.block)
    if part == "embed":
        ctx.hidden[m] = layers.embed(w, ctx.ids[m], ctx.positions[m], ctx.spec)
    elif part == "attn":
        layer = block_layer(task.block)
        k, v = ctx.kv.for_compute(layer, m, task.kv_slot)
        x = ctx.hidden[m]
        ctx.hidden[m] = layers.attention_block(
            w, x, k, v, ctx.start, ctx.positions[m], ctx.key_mask[m], ctx.spec, ctx.rope,
            prepared=ctx.attention_inputs(m, k.dtype))  # the cache's dtype: x may be an fp32 residual
    elif part == "mlp":
        ctx.hidden[m] = layers.mlp_block(w, ctx.hidden[m], ctx.spec)
    else:
        x = ctx.hidden[m] if ctx.all_logits else ctx.hidden[m][:, -1]  # [rows, (t,) hidden]
        ctx.logits[m] = layers.head(w, x, ctx.spec)
