"""The default executors of the four task kinds, registered in the global table.

Each reads its keys from the task and its tensors from the :class:`StepContext`.
"""

from __future__ import annotations

from pipo.engine.context import StepContext
from pipo.io.spec import block_layer, block_part
from pipo.ops import layers
from pipo.ops.rows import row_attention_block
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
    ctx.kv.load(task.layer, task.micro, task.slot, ctx.kv_load_end[task.micro])


@executor(SaveKV)
def save_kv(task: SaveKV, ctx: StepContext) -> None:
    """This step's KV entries of (layer, micro) -> host cache."""
    ctx.kv.save(task.layer, task.micro, task.slot, *ctx.kv_save[task.micro])


@executor(Compute)
def compute(task: Compute, ctx: StepContext) -> None:
    """Run one block for one micro-batch's packed tokens, chaining its hidden state; a micro-batch
    without tokens this step is skipped (its weights still came in for the others)."""
    m, part = task.micro, block_part(task.block)
    if part == "attn":  # also marks the KV slot as holding (layer, m) for its SaveKV
        k, v = ctx.kv.for_compute(block_layer(task.block), m, task.kv_slot)
    if ctx.rows[m] is None:
        return
    w = ctx.weights.block(task.block, task.slot)
    if part == "embed":
        ctx.hidden[m] = layers.embed(w, ctx.ids[m], ctx.rows[m].positions[None], ctx.spec)
    elif part == "attn":
        x = ctx.hidden[m]
        prep = ctx.attention_inputs(m, k.dtype)  # the cache's dtype: x may be an fp32 residual
        ctx.hidden[m] = row_attention_block(w, x, k, v, prep, ctx.spec)
    elif part == "mlp":
        ctx.hidden[m] = layers.mlp_block(w, ctx.hidden[m], ctx.spec)
    else:
        ctx.logits[m] = layers.head(w, ctx.hidden[m][0, ctx.logit_index[m]], ctx.spec)
