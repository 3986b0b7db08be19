"""Tree speculation (``--draft-budget N``): a token tree verified in ONE target pass.

Each round the draft builds a :class:`~pipo.engine.draft_tree.DraftTree` of up to N tokens after
the last committed token, depth-first with the most likely child first. The target appends the
*pending* tokens (committed, but without KV in place: at least the last one) as a chain and then
the tree, as one tree step (``Batch.step(..., parents=...)``: every node sees the prefix and its
ancestors only); the accepted path follows the target's own choice from the root
(:func:`~pipo.engine.draft_tree.accepted_path`): its argmax when greedy, so the output is
token-identical to plain greedy; a draw from its distribution p (after temperature / top-k / top-p)
when sampling, so the output has the target's distribution exactly. The draft only shapes the
tree, its probabilities never enter acceptance.

KV after the pass: a node's KV sits at slot = prefix + its index but belongs at prefix + its depth,
so only the accepted path's leading nodes with index = depth - 1 (the first-child chain, the usual
case) are in place. The row is truncated to them (the rest of the tree, rejected nodes included, is
discarded: resident, offloaded and disk KV alike, as truncation only lowers the length), and the
other accepted tokens are re-fed as the pending chain of the next round's pass, which is link-bound,
so they are almost free. Moving KV entries instead would need a copy per KV tier; re-feeding needs
none. The draft keeps only the committed tokens' KV (``ModelDraft.rollback``).

Depth: a round drafts with up to ``k_max`` draft steps; when ``adaptive``, 2 + the exponential
average of accepted tree tokens per round, rounded up (a shallow, wider tree when the draft is
often wrong; the same N tokens either way).
"""

from __future__ import annotations

import math
import time

from pipo.engine.draft_tree import DraftTree, TreeBuilder, accepted_path
from pipo.engine.speculate_dag import DraftPrograms
from pipo.ops.sampling import probabilities

EMA = 0.5  # weight of the running average of accepted tokens per round (chains and trees)


def in_place(path: list[int]) -> int:
    """How many leading accepted nodes sit at slot = position (node index = depth - 1)."""
    n = 0
    while n < len(path) and path[n] == n:
        n += 1
    return n


def target_choice(logits, sampling, generator):
    """``choose(i)`` for :func:`accepted_path` over the tree's logits rows (row 0: the root): the
    argmax when greedy, else one draw from the target's distribution at that row."""
    if sampling.greedy:
        best = logits.argmax(dim=-1).tolist()
        return best.__getitem__

    def draw(i: int) -> int:
        p = probabilities(logits[i:i + 1], sampling)                   # [1, V]
        return int(p.multinomial(1, generator=generator))

    return draw


def tree_feed(pending: list[int], tree: DraftTree) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the round's target step: the pending chain, then the tree under its
    last token."""
    last = len(pending) - 1
    parents = list(range(-1, last)) + [last if p < 0 else p + len(pending) for p in tree.parents]
    return pending + tree.tokens, parents


class TreeRound:
    """A model draft's tree as the prelude of the verify pass (``Batch.submit_prelude``): draft
    step i is one :class:`TreeBuilder` pass; the last hands the pass its tree step."""

    def __init__(self, builder: TreeBuilder, row: int, pending: list[int]):
        self.builder, self.row, self.pending = builder, row, pending
        self.tree = DraftTree()
        self.draft_s = 0.0

    def step(self, index: int):
        """Draft pass ``index``; after the last, ``({row: tokens}, {row: parents})``."""
        t0 = time.perf_counter()
        self.builder.step()
        self.draft_s += time.perf_counter() - t0
        if index < self.builder.steps - 1:
            return None
        self.tree = self.builder.result()
        tokens, parents = tree_feed(self.pending, self.tree)
        return {self.row: tokens}, {self.row: parents}


def drafts_in_dag(spec) -> bool:
    """Whether tree rounds draft inside the verify pass's DAG (a model draft and ``overlap``)."""
    return spec.overlap and hasattr(spec.draft, "tree_root")


def draft_and_verify(spec, batch, row: int, seq: list[int], pending: list[int], depth: int,
                     programs: DraftPrograms, sampling):
    """One round: (tree, target logits [len(pending) + len(tree), V], draft seconds)."""
    draft = spec.draft
    if depth and hasattr(draft, "tree_root"):
        builder = TreeBuilder(draft, seq, spec.budget, depth, sampling)
        if drafts_in_dag(spec):
            round_ = TreeRound(builder, row, pending)
            wait = batch.submit_prelude([row], "all",
                                        lambda phase: programs.get(batch.plan, phase, depth), round_)
            return round_.tree, wait()[row], round_.draft_s
        t0 = time.perf_counter()
        for _ in range(depth):
            builder.step()
        tree, draft_s = builder.result(), time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        tree = draft.propose_tree(seq, spec.budget, depth) if depth else DraftTree()
        draft_s = time.perf_counter() - t0
    tokens, parents = tree_feed(pending, tree)
    return tree, batch.step({row: tokens}, logits="all", parents={row: parents})[row], draft_s


def tree_rounds(spec, batch, row: int, seq: list[int], token: int, max_new: int, out: list[int],
                emit, stats, sampling, generator) -> None:
    """Generate after the prompt's first token ``token`` until EOS or ``max_new`` tokens in
    ``out`` (``seq``: the committed sequence, extended in place; ``stats``: a SpecStats)."""
    eos = set(spec.spec.eos_ids)
    pending: list[int] = []
    steps, ema = spec.k_max, float(spec.k)
    while token not in eos and len(out) < max_new:
        commit([token], out, seq, eos, max_new, emit)
        pending.append(token)
        if len(out) == max_new:
            break
        depth = max(0, min(steps, max_new - len(out) - 1))
        kept = batch.length(row)
        t0 = time.perf_counter()
        tree, logits, draft_s = draft_and_verify(spec, batch, row, seq, pending, depth,
                                                 spec._programs, sampling)
        stats.draft_s += draft_s
        stats.verify_s.setdefault(len(tree), []).append(
            time.perf_counter() - t0 - (0.0 if drafts_in_dag(spec) else draft_s))
        path, token = accepted_path(tree, target_choice(logits[len(pending) - 1:], sampling,
                                                        generator))
        keep = in_place(path)
        batch.truncate(row, kept + len(pending) + keep)  # the rest of the tree's KV is discarded
        stats.passes += 1
        stats.drafted += len(tree)
        stats.accepted += len(path)
        pending = [tree.tokens[i] for i in path[keep:]]  # accepted, KV not in place: re-fed
        stop = commit([tree.tokens[i] for i in path], out, seq, eos, max_new, emit)
        token = token if stop is None else stop
        spec.draft.rollback(seq)
        if spec.adaptive and len(tree):
            ema = EMA * ema + (1 - EMA) * len(path)
            steps = max(1, min(spec.k_max, math.ceil(ema) + 2))


def commit(accepted: list[int], out: list[int], seq: list[int], eos: set[int], max_new: int,
           emit) -> int | None:
    """Append a round's ``accepted`` tokens to ``out`` and ``seq`` (emitting each), chain or tree,
    until an EOS token or ``max_new`` tokens in ``out``: the token that stopped it, else ``None``."""
    for token in accepted:
        if token in eos or len(out) >= max_new:
            return token
        out.append(token)
        emit(token)
        seq.append(token)
    return None
