"""The model description every other part of pipo reads: :class:`ModelSpec`.

A spec is a frozen record of the architecture (sizes, family, rope settings, special token ids). It is
pure Python (no torch) so graph builders and planners can use it without loading anything.

Blocks. A model is cut into *blocks*: the unit one LoadWeight task moves and one Compute task runs.
Block names: ``"embed"``, ``"L{i}.attn"``, ``"L{i}.mlp"`` for i in range(n_layers), ``"head"``.

Canonical tensor names inside a block (what every weight reader returns, whatever the file format):
- embed: ``tok`` [vocab, hidden]; opt only: ``pos`` [max_positions + 2, hidden] (learned positions).
- attn:  ``norm_w`` [hidden] (+ ``norm_b`` for LayerNorm), ``wq`` [n_heads*head_dim, hidden],
  ``wk``/``wv`` [n_kv_heads*head_dim, hidden], ``wo`` [hidden, n_heads*head_dim];
  optional biases ``bq``, ``bk``, ``bv``, ``bo``.
- mlp:   ``norm_w`` (+ ``norm_b``), ``w_up`` [ffn, hidden], ``w_down`` [hidden, ffn], gated families
  also ``w_gate`` [ffn, hidden]; optional biases ``b_up``, ``b_down`` (+ ``b_gate`` when gated).
- head:  ``norm_w`` (+ ``norm_b``), ``w_out`` [vocab, hidden] (the embedding matrix when tied).
Linear weights are stored as [out_features, in_features], as in torch.nn.Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "opt")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3.1 style rope frequency scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of a decoder-only transformer, independent of where its weights live.

    ``attention_bias`` / ``mlp_bias`` are the config's flags; which projections they switch on per
    family (qwen2: q/k/v but not o) is :mod:`pipo.ops.traits`' table. ``sliding_window`` is recorded
    from a mistral config (``None``: full attention) so callers can refuse longer contexts.
    """

    family: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_id: int | None = None
    name: str = ""
    sliding_window: int | None = None

    def block_names(self) -> list[str]:
        """All block names in execution order: embed, then attn/mlp per layer, then head."""
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [attn_block(layer), mlp_block(layer)]
        return names + ["head"]


def attn_block(layer: int) -> str:
    """Name of the attention block of ``layer``."""
    return f"L{layer}.attn"


def mlp_block(layer: int) -> str:
    """Name of the MLP block of ``layer``."""
    return f"L{layer}.mlp"


def block_layer(block: str) -> int | None:
    """Layer index of a block name (``"L3.mlp"`` -> 3), ``None`` for embed/head."""
    if block.startswith("L"):
        return int(block[1:].split(".", 1)[0])
    return None


def block_part(block: str) -> str:
    """Part of a block name: ``"embed"``, ``"attn"``, ``"mlp"`` or ``"head"``."""
    return block.split(".", 1)[1] if block.startswith("L") else block



NameRules = tuple[tuple[re.Pattern[str], str, str], ...]
_SHORT_GROUPS = {"weight": "w", "bias": "b", "out": "o", "output": "o"}


def compile_name_rules(rules: tuple[tuple[str, str, str], ...], prefix: str = "") -> NameRules:
    """Compile ``(regex, block template, name template)`` rules mapping file tensor names to blocks.

    Each regex (anchored, after ``prefix``) may capture named groups; :func:`match_name_rules`
    formats both templates with them, ``weight``/``bias`` shortened to ``w``/``b`` and
    ``out``/``output`` to ``o``: ``"{k}{p}"`` turns ``(k="weight", p="q")`` into ``"wq"``.
    """
    return tuple((re.compile(prefix + pattern + r"$"), block, name) for pattern, block, name in rules)


def match_name_rules(rules: NameRules, tensor_name: str) -> tuple[str, str] | None:
    """``(block, canonical name)`` for ``tensor_name``, or ``None`` when no rule matches."""
    for pattern, block_template, name_template in rules:
        match = pattern.match(tensor_name)
        if match:
            groups = {key: _SHORT_GROUPS.get(value, value) for key, value in match.groupdict().items()}
            return block_template.format(**groups), name_template.format(**groups)
    return None
