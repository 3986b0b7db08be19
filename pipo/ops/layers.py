"""The model math outside attention: one pure function per block kind (embed, MLP, head), the
shared pre-norm, and the q/k/v and gate/up fusion applied at load time.

Each function takes a block's weights dict ``w`` (canonical names, see :mod:`pipo.io.spec`), the
activations and the :class:`ModelSpec`; families differ only through :func:`traits_for`. MLP (and
attention, :func:`pipo.ops.rows.row_attention_block`) blocks return the new hidden state
*including* the residual, so the engine simply chains ``x = block(w, x, ...)``. Attention, the KV
cache and masks live in :mod:`pipo.ops.rows`.

What the engine must honour:
- dtypes: computation runs in the dtype of ``x``; dense weights and the KV caches must already be in
  that dtype and on x's device (cast once at load time, not per call). Logits come back in fp32.
- tokens: a step's tokens are packed 1-D, ``x`` [1, T, hidden], grouped by row and padded to a
  bucket (see :mod:`pipo.ops.rows`); :func:`embed` takes each token's own position in its row
  (``PackedRows.positions``), not a shared offset.
- KV cache: ``[rows, n_kv_heads, capacity, head_dim]`` per layer (k and v); each token writes its
  row's slot at its position (``PackedRows.kv_row`` / ``kv_slot``), padding writes the trash slot
  ``capacity - 1``, which attention never reads; a query at position ``p`` sees its row's slots
  ``0 .. p`` (:func:`pipo.ops.rows.row_attention_inputs` builds that mask once per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipo.io.spec import ModelSpec
from pipo.ops.linear import linear
from pipo.ops.traits import traits_for

__all__ = ["concat_rows", "embed", "fuse_projections", "head", "mlp_block", "norm"]


def norm(w: dict, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The block's pre-norm (RMSNorm or LayerNorm per the family) of x [..., hidden]."""
    if traits_for(spec).norm == "layer":
        return F.layer_norm(x, x.shape[-1:], w["norm_w"], w.get("norm_b"), spec.norm_eps)  # [..., hidden]
    if x.dtype == torch.float32:  # one fused kernel; same math as below in fp32
        return F.rms_norm(x, x.shape[-1:], w["norm_w"], spec.norm_eps)  # [..., hidden]
    x32 = x.float()                                                    # [..., hidden] fp32 for the mean
    variance = x32.pow(2).mean(dim=-1, keepdim=True)                   # [..., 1]
    normed = (x32 * torch.rsqrt(variance + spec.norm_eps)).to(x.dtype)  # [..., hidden]
    return w["norm_w"] * normed                                        # [..., hidden]


def embed(w: dict, ids: torch.Tensor, positions: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Token (and, for learned-position families, position) embeddings: ids [b, t] -> x [b, t, hidden]."""
    t = traits_for(spec)
    tok = w["tok"]
    if isinstance(tok, torch.Tensor):
        x = F.embedding(ids, tok)                                      # [b, t, hidden]
    else:
        x = tok.rows(ids)                                              # [b, t, hidden] (StoredRows)
    if t.positions == "learned":
        x = x + F.embedding(positions + t.position_offset, w["pos"])   # [b, t, hidden]
    return x


def fuse_projections(w: dict) -> dict:
    """The block with q/k/v (and gate/up) matrices concatenated into one matrix each.

    Fewer, larger matrix products: 4 per layer instead of 7. Only when every part is present and
    of one kind (dense tensors of one dtype, or int4 with one group size); otherwise unchanged.
    """
    out = dict(w)
    for parts, fused in ((("wq", "wk", "wv"), "wqkv"), (("w_gate", "w_up"), "w_gate_up")):
        biases = tuple("b" + p[1:] for p in parts)
        if not all(p in w for p in parts) or any(b in w for b in biases) and \
                not all(b in w for b in biases):
            continue
        matrix = concat_rows([w[p] for p in parts])
        if matrix is None:
            continue
        out[fused] = matrix
        if biases[0] in w:
            out["b" + fused[1:]] = torch.cat([w[b] for b in biases])
        for name in parts + biases:
            out.pop(name, None)
    return out


def concat_rows(matrices: list) -> object | None:
    """Stack [out_i, in] matrices into one [sum out_i, in] (dense or int4); None if they differ."""
    if all(isinstance(m, torch.Tensor) for m in matrices):
        same = len({(m.dtype, m.shape[1], m.device) for m in matrices}) == 1
        return torch.cat(matrices) if same else None
    from pipo.ops.quant import QuantTensor

    if not all(isinstance(m, QuantTensor) for m in matrices) or \
            len({(m.group_size, m.shape[1]) for m in matrices}) != 1:
        return None
    parts = {k: torch.cat([m.to_parts()[k] for m in matrices]) for k in QuantTensor.tensor_fields}
    rows = sum(m.shape[0] for m in matrices)
    return QuantTensor.from_parts(parts, (rows, matrices[0].shape[1]), matrices[0].group_size)


def mlp_block(w: dict, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Pre-norm feed-forward with residual: x [b, t, hidden] -> [b, t, hidden]."""
    h = norm(w, x, spec)                                               # [b, t, hidden]
    if "w_gate_up" in w:
        gate, up = linear(h, w["w_gate_up"], w.get("b_gate_up")).chunk(2, dim=-1)  # 2 x [b, t, ffn]
        act = F.silu(gate) * up                                        # [b, t, ffn]
    elif traits_for(spec).mlp == "gated_silu":
        up = linear(h, w["w_up"], w.get("b_up"))                       # [b, t, ffn]
        act = F.silu(linear(h, w["w_gate"], w.get("b_gate"))) * up     # [b, t, ffn]
    else:
        up = linear(h, w["w_up"], w.get("b_up"))                       # [b, t, ffn]
        act = F.relu(up)                                               # [b, t, ffn]
    return x + linear(act, w["w_down"], w.get("b_down"))              # [b, t, hidden]


def head(w: dict, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Final norm and LM head: x [b, (t,) hidden] (the last hidden state, or every position for
    perplexity) -> logits [b, (t,) vocab] fp32."""
    h = norm(w, x, spec)                                               # [b, (t,) hidden]
    return linear(h, w["w_out"]).float()                               # [b, (t,) vocab]
