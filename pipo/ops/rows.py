"""Attention over per-row KV: the tokens of a step packed 1-D, each row with its own length.

A step of a micro-batch carries ``T`` tokens (a bucket: the real tokens, then padding), packed
one after another, grouped by row. Each token has a row (its micro-batch row), a position (the
row's own 0..len-1 numbering: rope and learned positions use it) and a KV-write index (the cache
slot it writes: its position, or the *trash* slot ``capacity - 1`` for padding, which attention
never reads). Projections, MLPs and the head run on the packed ``[1, T, hidden]`` tensor without
any padding; only attention lays the real tokens out per row, ``[R, t_max]`` (``R`` = rows in
the step, ``t_max`` = most tokens of one row), against each row's own cache prefix, with a mask
from the query slots: key slot ``j`` is visible to a query written at slot ``s`` iff ``j <= s``.

Trees (speculative decoding's token trees): a row's tokens may form a tree over an *open tree* that
starts at the row's slot ``base``: each token has a depth (position = ``base`` + depth) and sees the
slots below ``base`` plus its ancestors and itself (:class:`TreeRows`). A chain is the case with
one token per depth; rows without a tree take the plain rule above, and a step with no tree builds
no extra mask.

KV cache layout: ``[rows, n_kv_heads, capacity, head_dim]`` per layer, one for k and one for v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipo.io.spec import ModelSpec
from pipo.ops.layers import norm
from pipo.ops.linear import linear
from pipo.ops.rope import apply_rope
from pipo.ops.traits import traits_for

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TreeRows:
    """One row's new tokens as nodes of an open tree that starts at cache slot ``base``.

    ``depths`` [n] per new token (its position is ``base`` + depth); ``ancestors`` [n, W] bool, W =
    the row's tree width so far (the slots ``base .. base + W - 1``, this step's tokens last):
    whether each new token sees that tree slot (its ancestors and itself).
    """

    base: int
    depths: list[int]
    ancestors: torch.Tensor


@dataclass(frozen=True)
class PackedRows:
    """Where the packed tokens of one micro-batch's step go (index tensors, all int64).

    ``positions`` [T] per token (padding: 0); ``kv_row`` / ``kv_slot`` [T] the cache row and slot
    each token writes (padding: the trash slot); ``step_rows`` [R] the micro-batch rows in the step;
    ``q_row`` / ``q_col`` [n] where each of the ``n`` real tokens sits in the ``[R, t_max]`` query
    layout; ``query_pos`` [R, t_max] that layout's KV slots (unused places: 0); ``end`` the cache
    prefix attention reads; ``all_rows`` when ``step_rows`` is every row in order (no gather).
    ``tree_base`` [R, 1, 1] / ``ancestors`` [R, t_max, W]: where each row's open tree starts and which
    of its slots each query sees (:class:`TreeRows`; rows without a tree see all of them); both
    ``None`` in a step without trees.
    """

    positions: torch.Tensor
    kv_row: torch.Tensor
    kv_slot: torch.Tensor
    step_rows: torch.Tensor
    q_row: torch.Tensor
    q_col: torch.Tensor
    query_pos: torch.Tensor
    end: int
    all_rows: bool
    tree_base: torch.Tensor | None = None
    ancestors: torch.Tensor | None = None

    @property
    def n_real(self) -> int:
        """Real (not padding) tokens."""
        return self.q_row.shape[0]

    def to(self, upload) -> PackedRows:
        """The same layout with every tensor passed through ``upload`` (host -> device)."""
        fields = {k: (upload(v) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return PackedRows(**fields)


def pack_rows(feed: list[tuple[int, int, int]], bucket: int, trash: int, n_rows: int,
              trees: list[TreeRows | None] | None = None) -> PackedRows:
    """The layout of ``feed`` = [(row, start, n_tokens), ...] (rows ascending, each row's tokens at
    KV slots start..start+n-1, and positions the same unless ``trees[i]`` gives the i-th row's
    tokens tree depths), padded to ``bucket`` tokens; ``n_rows`` rows in the micro-batch."""
    trees = trees or [None] * len(feed)
    positions, slots, kv_row, q_row, q_col = [], [], [], [], []
    t_max = max(n for _, _, n in feed)
    query_pos = torch.zeros(len(feed), t_max, dtype=torch.long)
    for i, ((row, start, n), tree) in enumerate(zip(feed, trees, strict=True)):
        positions += range(start, start + n) if tree is None else [tree.base + d for d in tree.depths]
        slots += range(start, start + n)
        kv_row += [row] * n
        q_row += [i] * n
        q_col += range(n)
        query_pos[i, :n] = torch.arange(start, start + n)
    n_pad = bucket - len(positions)
    if n_pad < 0:
        raise ValueError(f"{len(positions)} tokens do not fit a bucket of {bucket}")
    rows = [r for r, _, _ in feed]
    return PackedRows(
        positions=torch.tensor(positions + [0] * n_pad, dtype=torch.long),
        kv_row=torch.tensor(kv_row + [rows[0]] * n_pad, dtype=torch.long),
        kv_slot=torch.tensor(slots + [trash] * n_pad, dtype=torch.long),
        step_rows=torch.tensor(rows, dtype=torch.long),
        q_row=torch.tensor(q_row, dtype=torch.long), q_col=torch.tensor(q_col, dtype=torch.long),
        query_pos=query_pos, end=max(s + n for _, s, n in feed),
        all_rows=rows == list(range(n_rows)), **_tree_fields(trees, t_max))


def _tree_fields(trees: list[TreeRows | None], t_max: int) -> dict:
    """``tree_base`` [R, 1, 1] and ``ancestors`` [R, t_max, W] of a step's rows; {} without trees.
    Rows without a tree (and unused query places) see every tree slot: the slot rule decides."""
    if all(t is None for t in trees):
        return {}
    width = max(t.ancestors.shape[1] for t in trees if t is not None)
    ancestors = torch.ones(len(trees), t_max, width, dtype=torch.bool)
    base = torch.zeros(len(trees), 1, 1, dtype=torch.long)
    for i, tree in enumerate(trees):
        if tree is not None:
            n, w = tree.ancestors.shape
            ancestors[i, :n, :w] = tree.ancestors
            ancestors[i, :n, w:] = False
            base[i] = tree.base
    return {"tree_base": base, "ancestors": ancestors}


@dataclass(frozen=True)
class RowAttentionInputs:
    """What every attention block of one step shares (built once per step and micro-batch).

    ``mask`` [R, 1, group*t_max, end] (query heads sharing a KV head folded into the query axis);
    ``cos``/``sin`` [1, 1, T, head_dim] at the packed tokens' positions, ``None`` without rope.
    """

    rows: PackedRows
    mask: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def row_attention_inputs(rows: PackedRows, spec: ModelSpec, rope: Rope | None,
                         dtype: torch.dtype) -> RowAttentionInputs:
    """The :class:`RowAttentionInputs` of ``rows``."""
    group = spec.n_heads // spec.n_kv_heads
    r, t_max = rows.query_pos.shape
    keys = torch.arange(rows.end, device=rows.query_pos.device)        # [end]
    mask = keys[None, None, :] <= rows.query_pos[:, :, None]           # [R, t_max, end]
    if rows.ancestors is not None:
        mask = mask & _tree_visible(rows, keys)                       # [R, t_max, end]
    mask = mask.unsqueeze(1).expand(r, group, t_max, rows.end).reshape(r, 1, group * t_max, rows.end)
    if rope is None or traits_for(spec).positions != "rope":
        return RowAttentionInputs(rows, mask, None, None)
    cos, sin = rope
    c = cos[rows.positions][None, None].to(dtype)                      # [1, 1, T, head_dim]
    s = sin[rows.positions][None, None].to(dtype)                      # [1, 1, T, head_dim]
    return RowAttentionInputs(rows, mask, c, s)


def _tree_visible(rows: PackedRows, keys: torch.Tensor) -> torch.Tensor:
    """[R, t_max, end]: key slots below each row's tree base, and the tree slots it sees."""
    r, t_max, width = rows.ancestors.shape
    rel = keys[None, None, :] - rows.tree_base                         # [R, 1, end]
    seen = rows.ancestors.gather(2, rel.clamp(0, width - 1).expand(r, t_max, keys.shape[0]))
    return (rel < 0) | seen                                            # [R, t_max, end]


def row_attention_block(w: dict, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        prep: RowAttentionInputs, spec: ModelSpec) -> torch.Tensor:
    """Pre-norm self-attention with residual over per-row caches: x [1, T, hidden] -> same.

    Writes each token's key/value into ``k_cache``/``v_cache`` [rows, nkv, capacity, hd] at
    (``kv_row``, ``kv_slot``), then each real token attends to its own row's slots up to its position.
    Padding tokens get a zero attention output (their hidden states are never read).
    """
    _, t, _ = x.shape
    rows = prep.rows
    nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    h = norm(w, x, spec)                                               # [1, T, hidden]
    q, k, v = _rotated_heads(w, h, prep, nh, nkv, hd)                  # [1, nh|nkv, T, hd]
    k_cache[rows.kv_row, :, rows.kv_slot] = k[0].transpose(0, 1)       # scatter [T, nkv, hd]
    v_cache[rows.kv_row, :, rows.kv_slot] = v[0].transpose(0, 1)       # scatter [T, nkv, hd]
    if rows.all_rows:
        keys, values = k_cache[:, :, :rows.end], v_cache[:, :, :rows.end]  # [R, nkv, end, hd] views
    else:
        keys = k_cache[rows.step_rows, :, :rows.end]                   # [R, nkv, end, hd] gathered
        values = v_cache[rows.step_rows, :, :rows.end]                 # [R, nkv, end, hd] gathered
    r, t_max = rows.query_pos.shape
    n = rows.n_real
    queries = q.new_zeros(r, t_max, nh, hd)                            # [R, t_max, nh, hd]
    queries[rows.q_row, rows.q_col] = q[0, :, :n].transpose(0, 1)      # real tokens in place
    out = _grouped_attention(queries.transpose(1, 2), keys, values, prep.mask)  # [R, nh, t_max, hd]
    packed = out.transpose(1, 2)[rows.q_row, rows.q_col]               # [n, nh, hd]
    if n < t:
        packed = torch.cat([packed, packed.new_zeros(t - n, nh, hd)])  # [T, nh, hd]
    return x + linear(packed.reshape(1, t, nh * hd), w["wo"], w.get("bo"))  # [1, T, hidden]


def _rotated_heads(w: dict, h: torch.Tensor, prep: RowAttentionInputs, nh: int, nkv: int,
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
