"""Random-weight models of any shape, made in seconds: the benchmark's weight source.

:class:`RandomModel` follows the :class:`~pipo.io.source.WeightSource` protocol (``spec``,
``tokenizer=None``, ``path=None``, ``read_block``, ``block_nbytes``) with canonical tensor names
(:mod:`pipo.io.spec`). Weights are random normal fp16 values (never zeros: zeros hide indexing bugs
and can run faster than real data); to keep set-up fast one attention block and one MLP block are
drawn and every layer returns the same tensors. Callers only read weights, so sharing is safe.

With ``int4_group`` the linear weights are quantized once (``pipo.ops.quant.quantize``) and handed
out as ``QuantTensor``, which the engine keeps 4-bit as it does for GGUF Q4 checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipo.io.spec import ModelSpec, block_part
from pipo.ops.traits import block_tensor_names, traits_for

WEIGHT_STD = 0.02  # OPT's init scale: activations stay well inside fp16 over dozens of layers
QUANTIZABLE = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
PARTS = ("embed", "attn", "mlp", "head")


def tensor_shapes(spec: ModelSpec, part: str) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor of a block of kind ``part`` for ``spec``."""
    h, q_out, kv_out = spec.hidden, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = {"norm_w": (h,), "norm_b": (h,), "tok": (spec.vocab_size, h),
              "pos": (spec.max_positions + traits_for(spec).position_offset, h),
              "wq": (q_out, h), "wk": (kv_out, h), "wv": (kv_out, h), "wo": (h, q_out),
              "bq": (q_out,), "bk": (kv_out,), "bv": (kv_out,), "bo": (h,),
              "w_up": (spec.ffn, h), "w_gate": (spec.ffn, h), "w_down": (h, spec.ffn),
              "b_up": (spec.ffn,), "b_gate": (spec.ffn,), "b_down": (h,),
              "w_out": (spec.vocab_size, h)}
    return {name: shapes[name] for name in block_tensor_names(spec, part)}


def _draw(name: str, shape: tuple[int, ...], dtype: torch.dtype,
          generator: torch.Generator) -> torch.Tensor:
    """One random tensor: norm weights near 1, everything else N(0, WEIGHT_STD)."""
    t = torch.empty(shape, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=generator)
    return t.add_(1.0) if name == "norm_w" else t


class RandomModel:
    """A weight source of random weights for ``spec`` (fp16 by default; int4 with ``int4_group``)."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float16, seed: int = 0,
                 int4_group: int | None = None):
        self.spec = spec
        self.tokenizer = None
        self.path: Path | None = None
        self.int4_group = int4_group
        generator = torch.Generator().manual_seed(seed)
        self._parts: dict[str, dict[str, Any]] = {}
        for part in PARTS:
            if part == "head" and spec.tie_embeddings:
                continue
            self._parts[part] = {name: _draw(name, shape, dtype, generator)
                                 for name, shape in tensor_shapes(spec, part).items()}
        if spec.tie_embeddings:
            head = {name: _draw(name, shape, dtype, generator)
                    for name, shape in tensor_shapes(spec, "head").items() if name != "w_out"}
            self._parts["head"] = {**head, "w_out": self._parts["embed"]["tok"]}
        if int4_group:
            self._quantize(int4_group)
        self._nbytes = {part: _nbytes(tensors) for part, tensors in self._parts.items()}

    def _quantize(self, group_size: int) -> None:
        from pipo.ops.quant import quantize

        for part in ("attn", "mlp"):
            tensors = self._parts[part]
            for name in QUANTIZABLE:
                if name in tensors:
                    tensors[name] = quantize(tensors[name].float(), group_size=group_size)

    def read_block(self, block: str) -> dict[str, Any]:
        """The tensors of ``block`` (shared by all layers: read them, never write them)."""
        return dict(self._parts[block_part(block)])

    def block_nbytes(self, block: str) -> int:
        """Bytes :meth:`read_block` returns for ``block``."""
        return self._nbytes[block_part(block)]

    @property
    def max_block_nbytes(self) -> int:
        """The largest block's bytes."""
        return max(self._nbytes.values())

    def total_nbytes(self) -> int:
        """Bytes of the whole model as if every layer had its own weights."""
        return sum(self.block_nbytes(b) for b in self.spec.block_names())


def _nbytes(tensors: dict[str, Any]) -> int:
    total = 0
    for value in tensors.values():
        total += value.nbytes if not isinstance(value, torch.Tensor) else \
            value.numel() * value.element_size()
    return total
