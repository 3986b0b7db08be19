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

    Biases: ``attention_bias`` means q/k/v projections carry biases (``bq``, ``bk``, ``bv``);
    ``o_bias`` means the output projection does (``bo``): llama with ``attention_bias`` and OPT set
    both, qwen2 sets only ``attention_bias``. ``mlp_bias`` covers ``b_up``/``b_down`` (and ``b_gate``
    for gated families). ``sliding_window`` is recorded from the config (mistral); ``None`` means
    full attention.
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
    o_bias: bool = False
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


# Families whose norms are LayerNorm (weight + bias) rather than RMSNorm (weight only).
LAYERNORM_FAMILIES = frozenset({"opt"})
# Families with a gated (SwiGLU) MLP: w_gate beside w_up.
GATED_FAMILIES = frozenset({"llama", "mistral", "qwen2"})
# Families with learned absolute positions (embed block carries ``pos``) instead of rope.
LEARNED_POSITION_FAMILIES = frozenset({"opt"})


def expected_tensor_names(spec: ModelSpec, block: str) -> frozenset[str]:
    """Canonical tensor names a complete ``block`` of ``spec`` holds (see the module docstring)."""
    part = block_part(block)
    norm = {"norm_w", "norm_b"} if spec.family in LAYERNORM_FAMILIES else {"norm_w"}
    if part == "embed":
        return frozenset({"tok", "pos"} if spec.family in LEARNED_POSITION_FAMILIES else {"tok"})
    if part == "head":
        return frozenset(norm | {"w_out"})
    if part == "attn":
        names = norm | {"wq", "wk", "wv", "wo"}
        names |= {"bq", "bk", "bv"} if spec.attention_bias else set()
        return frozenset(names | ({"bo"} if spec.o_bias else set()))
    if part == "mlp":
        gated = spec.family in GATED_FAMILIES
        names = norm | {"w_up", "w_down"} | ({"w_gate"} if gated else set())
        if spec.mlp_bias:
            names |= {"b_up", "b_down"} | ({"b_gate"} if gated else set())
        return frozenset(names)
    raise ValueError(f"unknown block name {block!r}")
