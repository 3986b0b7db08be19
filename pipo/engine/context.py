"""The run context: every tensor a step's executors read or write, and the per-step values.

Tasks hold only keys; executors find the data here. A :class:`~pipo.engine.batch.Batch` fills the
per-step fields before each run of a compiled step graph, in two groups: ``kv_load_end`` before the
step is started, since its leading loads (LoadWeight, ReadBlock, LoadKV: no compute precedes them)
read it while the host still samples the previous token; the token ids, row layouts, KV save ranges
and logit indices only after sampling, so only tasks after a compute may read those.

Per micro-batch (lists indexed by micro): ``ids`` [1, T] packed token ids, ``rows`` their
:class:`~pipo.ops.rows.PackedRows` (``None``: the micro-batch has no tokens this step and its
computes are skipped), ``kv_load_end`` how many cached positions a LoadKV copies, ``kv_save`` the
(start, count) of positions a SaveKV copies back, ``logit_index`` [n] the packed tokens whose
logits the head computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipo.engine.kv import KVCache
from pipo.engine.weights import PlacedWeights
from pipo.io.spec import ModelSpec
from pipo.ops.rows import PackedRows, RowAttentionInputs, row_attention_inputs


@dataclass
class StepContext:
    """State shared by the executors of one batch; per-step fields change every step."""

    spec: ModelSpec
    weights: PlacedWeights
    kv: KVCache
    rope: tuple[torch.Tensor, torch.Tensor] | None
    kv_load_end: list[int] = field(default_factory=list)            # per micro
    kv_save: list[tuple[int, int]] = field(default_factory=list)    # per micro: (start, count)
    ids: list[torch.Tensor | None] = field(default_factory=list)    # per micro: [1, T]
    rows: list[PackedRows | None] = field(default_factory=list)     # per micro
    logit_index: list[torch.Tensor | None] = field(default_factory=list)  # per micro: [n]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)   # per micro: [1, T, hidden]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)   # per micro: [n, vocab]
    attn_inputs: dict[int, RowAttentionInputs] = field(default_factory=dict)  # per micro
    prelude: Callable[[int], None] | None = None  # what a DraftStep task calls (Batch.submit_prelude)

    def attention_inputs(self, micro: int, dtype: torch.dtype) -> RowAttentionInputs:
        """Mask and rope angles of micro-batch ``micro`` for this step, built on first use."""
        if micro not in self.attn_inputs:
            self.attn_inputs[micro] = row_attention_inputs(self.rows[micro], self.spec, self.rope,
                                                           dtype)
        return self.attn_inputs[micro]
