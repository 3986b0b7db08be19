"""The run context: every tensor a step's executors read or write, and the per-step values.

Tasks hold only keys; executors find the data here. The engine fills the per-step fields before
each run of the same compiled step graph, in two groups (:mod:`pipo.engine.steps`): ``start`` and
``t`` before the step is started, since its leading loads (LoadWeight, ReadBlock, LoadKV: no compute
precedes them) read them while the host still samples the previous token; the token ids, positions,
masks and attention inputs only after sampling, so only tasks after a compute may read those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipo.engine.kv import KVCache
from pipo.engine.weights import PlacedWeights
from pipo.io.spec import ModelSpec
from pipo.ops.layers import AttentionInputs, attention_inputs


@dataclass
class StepContext:
    """State shared by the executors of one generation; per-step fields change every step."""

    spec: ModelSpec
    weights: PlacedWeights
    kv: KVCache
    rope: tuple[torch.Tensor, torch.Tensor] | None
    start: int = 0
    t: int = 0
    ids: list[torch.Tensor] = field(default_factory=list)        # per micro: [rows, t]
    positions: list[torch.Tensor] = field(default_factory=list)  # per micro: [rows, t]
    key_mask: list[torch.Tensor] = field(default_factory=list)   # per micro: [rows, max_len]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # per micro: [rows, t, hidden]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # per micro: [rows, vocab]
    attn_inputs: dict[int, AttentionInputs] = field(default_factory=dict)  # per micro, this step
    all_logits: bool = False  # the head at every position ([rows, t, vocab]; perplexity), not the last

    def attention_inputs(self, micro: int, dtype: torch.dtype) -> AttentionInputs:
        """Mask and rope angles of micro-batch ``micro`` for this step, built on first use."""
        if micro not in self.attn_inputs:
            self.attn_inputs[micro] = attention_inputs(
                self.key_mask[micro], self.start, self.t, self.positions[micro], self.spec,
                self.rope, dtype)
        return self.attn_inputs[micro]
