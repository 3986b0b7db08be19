"""Token trees for speculative decoding (``--draft-budget N``): building, ordering, accepting.

A :class:`DraftTree` holds up to N drafted tokens after the last committed token (the *root*),
each with a parent (-1: the root), ordered depth-first with each node's most likely child first:
the path the target most often accepts is then the tree's first nodes, whose KV sits at slot =
position and is kept in place (:mod:`pipo.engine.speculate_tree`).

- :class:`TreeBuilder`: a model draft's tree, SpecExec-style (Svirschevski et al. 2024): every
  draft step evaluates the ``width`` most probable unexpanded candidates (by cumulative draft
  probability under the request's temperature / top-k / top-p, at any depth) as one tree step of
  the draft's own batch; their top children join the candidates. It stops at N nodes or ``steps`` draft steps.
- :func:`trie`: several continuations (ngram's earlier matches) merged into one tree.
- :func:`accepted_path`: walk down from the root following the target's own choice at each node
  (its argmax when greedy, a sample from its distribution when sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipo.ops.sampling import SamplingParams, probabilities


@dataclass
class DraftTree:
    """Drafted tokens with parents (-1: the root, else an earlier index), depth-first ordered."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        """Indices of ``node``'s children (-1: the root's), in order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def depth(self) -> int:
        """Nodes on the longest root-to-leaf path."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 + (depths[p] if p >= 0 else 0))
        return max(depths, default=0)


def depth_first(tokens: list[int], parents: list[int], scores: list[float]) -> DraftTree:
    """The tree of ``tokens`` / ``parents`` (any topological order) reordered depth-first, each
    node's children by descending ``scores``."""
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    out, index = DraftTree(), {}
    stack = [(c, -1) for c in sorted(kids.get(-1, []), key=lambda c: scores[c])]
    while stack:
        node, parent = stack.pop()
        index[node] = len(out.tokens)
        out.tokens.append(tokens[node])
        out.parents.append(parent)
        stack += [(c, index[node]) for c in sorted(kids.get(node, []), key=lambda c: scores[c])]
    return out


def trie(continuations: list[list[int]], budget: int) -> DraftTree:
    """Continuations merged by shared prefixes (earlier ones first), at most ``budget`` nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    for sequence in continuations:
        node = -1
        for token in sequence:
            if (node, token) not in child:
                if len(tokens) == budget:
                    break
                child[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child[node, token]
    return depth_first(tokens, parents, [-i for i in range(len(tokens))])


def accepted_path(tree: DraftTree, choose) -> tuple[list[int], int]:
    """(accepted node indices root-down, the target's token after them): ``choose(i)`` is the
    target's token after node ``i - 1`` (``choose(0)``: after the root), asked for the nodes on the
    walk only. A child whose token the target chose is accepted, so every emitted token is the
    target's own choice given the tokens before it: argmax for greedy (token-identical to plain
    greedy) and a draw from p for sampling (the target's distribution exactly; the tree only
    decides how many of the draws one pass can make, as in SpecExec)."""
    path, node = [], -1
    while True:
        best = choose(node + 1)
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == best), None)
        if nxt is None:
            return path, best
        path.append(nxt)
        node = nxt


class TreeBuilder:
    """A model draft's :class:`DraftTree`, one draft step at a time (greedy drafting: top tokens).

    ``draft`` is a :class:`~pipo.engine.drafts.ModelDraft`; ``step()`` runs one draft pass (the
    first syncs the draft with the committed tokens and evaluates the root); ``result()`` the tree.
    """

    def __init__(self, draft, tokens: list[int], budget: int, steps: int,
                 sampling: SamplingParams | None = None):
        self.draft, self.tokens, self.budget, self.steps = draft, tokens, budget, steps
        self.sampling = sampling or SamplingParams()  # greedy
        self.width = max(1, math.ceil(budget / steps))
        self.nodes: list[tuple[int, int, float]] = []  # (token, parent, cumulative log-prob)
        self.candidates: list[tuple[float, int, int]] = []  # (-log-prob, token, parent)
        self.done = 0

    def step(self) -> None:
        """One draft pass: evaluate the root, then the best ``width`` candidates (at most
        ``steps`` passes and ``budget`` nodes; candidates that fill the budget join the tree
        unevaluated; later calls do nothing)."""
        if self.done >= self.steps:
            return
        if self.done == 0:
            self._expand([-1], self.draft.tree_root(self.tokens))
        else:
            fresh = self._take(min(self.width, self.budget - len(self.nodes)))
            # children of nodes that fill the budget could never join the tree: leave them
            # unevaluated; the draft's open tree holds the evaluated nodes in node order
            if fresh and len(self.nodes) < self.budget:
                self._expand(fresh, self.draft.tree_step([self.nodes[i][0] for i in fresh],
                                                         [self.nodes[i][1] for i in fresh]))
        self.done += 1

    def result(self) -> DraftTree:
        """The tree: the evaluated nodes plus the best remaining candidates, up to the budget."""
        self._take(self.budget - len(self.nodes))
        tokens, parents, scores = zip(*self.nodes) if self.nodes else ((), (), ())
        return depth_first(list(tokens), list(parents), list(scores))

    def _take(self, n: int) -> list[int]:
        """Move the ``n`` best candidates into the tree; their node indices."""
        self.candidates.sort()
        taken, self.candidates = self.candidates[:max(n, 0)], self.candidates[max(n, 0):]
        start = len(self.nodes)
        self.nodes += [(token, parent, -neg) for neg, token, parent in taken]
        return list(range(start, len(self.nodes)))

    def _expand(self, nodes: list[int], logprobs) -> None:
        """Each evaluated node's ``width`` most probable children join the candidates."""
        for node, row in zip(nodes, self._shaped(logprobs), strict=True):
            base = self.nodes[node][2] if node >= 0 else 0.0
            top = row.topk(min(self.width, row.shape[-1]))
            self.candidates += [(-(base + float(v)), int(t), node)
                                for v, t in zip(top.values, top.indices, strict=True)
                                if math.isfinite(float(v))]

    def _shaped(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The draft's log-probabilities under the sampling in use (temperature, top-k, top-p:
        the distribution the target's choices are drawn from); as they are when greedy."""
        if self.sampling.greedy:
            return logprobs
        return probabilities(logprobs, self.sampling).log()
