"""The model math: one pure function per block kind (embed, attention, MLP, head).

Each function takes a block's weights dict ``w`` (canonical names, see :mod:`pipo.io.spec`), the
activations and the :class:`ModelSpec`; families differ only through :func:`traits_for`. Attention and
MLP blocks return the new hidden state *including* the residual, so the engine simply chains
``x = block(w, x, ...)``.

What the engine must honour:
- dtypes: computation runs in the dtype of ``x``; dense weights and the KV caches must already be in
  that dtype and on x's device (cast once at load time, not per call). Logits come back in fp32.
- KV cache layout: ``[batch, n_kv_heads, capacity, head_dim]`` per layer, one for k and one for v;
  a block writes cache positions ``start .. start+t-1`` in place and reads ``0 .. start+t-1``.
  Slot j of the cache holds the j-th token of the padded batch (pads included), so every row of a
  batch shares ``start``.
- masks: ``key_mask`` [b, >= start+t] is True for real tokens, False for left padding.
  ``positions`` [b, t] are absolute token positions (see :func:`positions_from_mask`).
- a left-pad query sees at least itself, so pad rows stay finite and never poison the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipo.io.spec import ModelSpec
from pipo.ops.linear import linear
from pipo.ops.rope import apply_rope, rope_tables
from pipo.ops.traits import traits_for

__all__ = ["embed", "attention_block", "mlp_block", "head", "norm", "attention_mask",
           "attention_inputs", "AttentionInputs", "fuse_projections", "positions_from_mask", "rope_tables"]

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """What every attention block of one step shares: the grouped mask and the rope angles.

    ``mask`` [b, 1, group*t, start+t] (query heads sharing a KV head folded into the query axis,
    see :func:`_grouped_attention`); ``cos``/``sin`` [b, 1, t, head_dim] at this step's positions,
    ``None`` for learned-position families. Built once per step and micro-batch, not per layer.
    """

    mask: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def attention_inputs(key_mask: torch.Tensor, start: int, t: int, positions: torch.Tensor,
                     spec: ModelSpec, rope: Rope | None, dtype: torch.dtype) -> AttentionInputs:
    """The :class:`AttentionInputs` of a step (see :func:`attention_block` for the arguments)."""
    b = key_mask.shape[0]
    group = spec.n_heads // spec.n_kv_heads
    mask = attention_mask(key_mask, start, t)                          # [b, 1, t, end]
    mask = mask.expand(b, group, t, start + t).reshape(b, 1, group * t, start + t)
    if rope is None or traits_for(spec).positions != "rope":
        return AttentionInputs(mask, None, None)
    cos, sin = rope
    c = cos[positions].unsqueeze(1).to(dtype)                          # [b, 1, t, head_dim]
    s = sin[positions].unsqueeze(1).to(dtype)                          # [b, 1, t, head_dim]
    return AttentionInputs(mask, c, s)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions [b, T] (int64) of a left-padded batch from its mask [b, T] (True = real).

    The first real token of each row is position 0; pads get position 0 too (they are masked).
    """
    positions = mask.long().cumsum(dim=-1) - 1                         # [b, T]
    return positions.clamp(min=0)                                      # [b, T]


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
        x = tok.rows(ids)                                              # [b, t, hidden] fp32 (a Q8 table)
    if t.positions == "learned":
        x = x + F.embedding(positions + t.position_offset, w["pos"])   # [b, t, hidden]
    return x


def attention_mask(key_mask: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """Which cache slots each new query may attend to: [b, 1, t, start+t] bool (True = attend).

    Query i sits at cache slot start+i and sees slots <= its own that hold real tokens, plus always
    its own slot: a left-pad query would otherwise see nothing and softmax would return NaN.
    """
    end = start + t
    key_idx = torch.arange(end, device=key_mask.device)               # [end]
    query_idx = start + torch.arange(t, device=key_mask.device)       # [t]
    causal = key_idx[None, :] <= query_idx[:, None]                   # [t, end]
    own = key_idx[None, :] == query_idx[:, None]                      # [t, end]
    allowed = (causal & key_mask[:, None, :end].bool()) | own         # [b, t, end]
    return allowed.unsqueeze(1)                                        # [b, 1, t, end]


def attention_block(w: dict, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    start: int, positions: torch.Tensor, key_mask: torch.Tensor,
                    spec: ModelSpec, rope: Rope | None,
                    prepared: AttentionInputs | None = None) -> torch.Tensor:
    """Pre-norm self-attention with a KV cache and residual: x [b, t, hidden] -> [b, t, hidden].

    Writes the new keys/values into ``k_cache``/``v_cache`` [b, n_kv_heads, capacity, head_dim] at
    slots start..start+t-1 (in place), then attends over slots 0..start+t-1. ``rope`` is the
    (cos, sin) pair from :func:`rope_tables` for rope families, ``None`` otherwise. ``prepared``
    (from :func:`attention_inputs`) saves rebuilding the mask and angles in every layer. The
    projections are ``wq``/``wk``/``wv`` or one fused ``wqkv`` (see :func:`fuse_projections`).
    """
    b, t, _ = x.shape
    nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    prep = prepared or attention_inputs(key_mask, start, t, positions, spec, rope, x.dtype)
    h = norm(w, x, spec)                                               # [b, t, hidden]
    q, k, v = _rotated_heads(w, h, prep, nh, nkv, hd)                  # [b, nh|nkv, t, hd]
    end = start + t
    k_cache[:, :, start:end] = k                                       # cache [b, nkv, capacity, hd]
    v_cache[:, :, start:end] = v                                       # cache [b, nkv, capacity, hd]
    out = _grouped_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], prep.mask)  # [b, nh, t, hd]
    out = out.transpose(1, 2).reshape(b, t, nh * hd)                   # [b, t, nh*hd]
    return x + linear(out, w["wo"], w.get("bo"))                       # [b, t, hidden]


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


def _rotated_heads(w: dict, h: torch.Tensor, prep: AttentionInputs, nh: int, nkv: int,
                   hd: int) -> tuple[torch.Tensor, ...]:
    """q, k (rope applied) and v of h [b, t, hidden] as [b, heads, t, hd] views.

    With one fused ``wqkv`` the q and k heads are rotated together, in one pass over the product's
    [b, t, nh + nkv, hd] slice (the same elementwise math as rotating each, in half the ops).
    """
    b, t, _ = h.shape
    cos = sin = None
    if prep.cos is not None:
        cos, sin = prep.cos.transpose(1, 2), prep.sin.transpose(1, 2)  # [b, t, 1, hd]
    if "wqkv" in w:
        heads = linear(h, w["wqkv"], w.get("bqkv")).view(b, t, nh + 2 * nkv, hd)  # [b, t, heads, hd]
        qk, v = heads[:, :, :nh + nkv], heads[:, :, nh + nkv:]           # [b, t, nh+nkv | nkv, hd]
        if cos is not None:
            qk = apply_rope(qk, cos, sin)                                # [b, t, nh+nkv, hd]
        q, k = qk[:, :, :nh], qk[:, :, nh:]                              # [b, t, nh | nkv, hd]
    else:
        q, k, v = (linear(h, w[f"w{n}"], w.get(f"b{n}")).view(b, t, -1, hd) for n in "qkv")
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)      # [b, t, nh | nkv, hd]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)       # [b, heads, t, hd]


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention with grouped kv heads, scale 1/sqrt(head_dim), without copying k/v.

    q [b, nh, t, hd], k/v [b, nkv, T, hd], mask [b, 1, group*t, T] -> [b, nh, t, hd]. The nh/nkv
    query heads sharing a kv head are folded into the query-length axis, so every SDPA backend sees
    plain multi-head attention over the cache as it is (no repeat of a possibly long cache).
    """
    b, nh, t, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(b, nkv, (nh // nkv) * t, hd)                        # [b, nkv, group*t, hd]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask,
                                         scale=1.0 / math.sqrt(hd))     # [b, nkv, group*t, hd]
    return out.reshape(b, nh, t, hd)                                   # [b, nh, t, hd]


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
