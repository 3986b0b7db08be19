"""Draft proposers for speculative decoding (:mod:`pipo.engine.speculate`).

A draft proposes up to ``k`` tokens that continue the committed sequence, with the probabilities
it drew them from (``None``: a deterministic draft, i.e. one-hot). Three kinds:

- :class:`NgramDraft` (``ngram``): prompt lookup, no model. It continues the latest earlier
  occurrence of the sequence's last n tokens (n = 3, 2, 1: the longest that matches); as a tree
  (``--draft-budget``), the continuations of several earlier matches, merged.
- :class:`ModelDraft` (``MODEL``): a separate small model with the same vocabulary, resident, with
  its own one-row :class:`~pipo.engine.batch.Batch`; after verification its KV is rolled back to the
  part of its drafted sequence the target committed (``Batch.truncate``).
- ``int4``: a :class:`ModelDraft` over the target's own weights re-quantized group-wise to int4
  (:class:`Int4Weights`: int4 blocks of the source are dequantized first, so a 4-bit checkpoint is
  re-grouped, e.g. group 128 over a checkpoint's group 32), resident; the embedding and head are the
  target's own tensors where the target keeps them resident (shared, not copied).

With a budget (``--draft-budget N``) a model draft builds a token tree instead of a chain
(:class:`~pipo.engine.draft_tree.TreeBuilder`: :meth:`ModelDraft.tree_root`, then tree steps of
its batch, :meth:`ModelDraft.tree_step`); its KV keeps only the committed tokens afterwards.

Model drafts step their batch *inline* (``Batch.run_inline``), so a draft step can run as a compute
task inside the target's verification run (the step DAG of :mod:`pipo.engine.speculate`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipo.engine.draft_tree import DraftTree, trie
from pipo.engine.engine import Engine
from pipo.engine.options import EngineOptions
from pipo.errors import ModelFormatError, PipoError
from pipo.io.q8 import to_dense
from pipo.ops.quant import INT4_GROUP_SIZES
from pipo.ops.sampling import SamplingParams, probabilities

NGRAM_MAX = 3


class DraftError(PipoError):
    """A draft cannot be used with this target."""


class NgramDraft:
    """Prompt-lookup drafting: continue the latest earlier match of the last n tokens."""

    name = "ngram"

    def reset(self, prompt: list[int]) -> None:
        """Start a new sequence (nothing to keep)."""

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator
                ) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` tokens following the longest suffix match; (tokens, None: one-hot)."""
        return next(self._continuations(tokens, k), []), None

    def propose_tree(self, tokens: list[int], budget: int, depth: int) -> DraftTree:
        """The continuations (up to ``depth`` tokens) of the latest matches, longest suffix first,
        merged into a tree of at most ``budget`` nodes."""
        found: list[list[int]] = []
        for cont in self._continuations(tokens, depth):
            if cont not in found:
                found.append(cont)
            if sum(map(len, found)) >= budget:
                break
        return trie(found, budget)

    def _continuations(self, tokens: list[int], k: int):
        """Up to ``k`` tokens after each earlier occurrence of the last n tokens: n = 3, 2, 1, the
        latest occurrence first."""
        for n in range(min(NGRAM_MAX, len(tokens) - 1), 0, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == suffix:
                    yield tokens[start + n:start + n + k]

    def rollback(self, committed: list[int]) -> None:
        """Nothing to roll back."""

    def close(self) -> None:
        """Nothing to release."""


class ModelDraft:
    """Drafting with a resident model (``engine``) of the target's vocabulary; one row."""

    def __init__(self, engine: Engine, vocab_size: int, max_len: int, name: str = "model"):
        if engine.spec.vocab_size != vocab_size:
            engine.close()
            raise DraftError(f"the draft model's vocabulary has {engine.spec.vocab_size} tokens, "
                             f"the target's {vocab_size}: a draft must share the target's tokenizer")
        self.engine, self.name = engine, name
        self._open(max_len)

    def _open(self, max_len: int) -> None:
        """A fresh one-row batch of ``max_len`` tokens, stepped inline; its KV holds nothing."""
        self.batch = self.engine.open_batch(1, max_len)
        self.batch.run_inline()
        self.row = self.batch.admit()
        self.kv_tokens: list[int] = []  # what the draft's KV holds, a prefix of the sequence

    def reset(self, prompt: list[int]) -> None:
        """Start a new sequence: empty the draft's KV."""
        self.batch.truncate(self.row, 0)
        self.kv_tokens = []

    def reserve(self, max_len: int) -> None:
        """Let the draft's KV hold ``max_len`` tokens (a new, empty batch when it holds fewer)."""
        if max_len <= self.batch.max_len:
            return
        self.batch.close()
        self._open(max_len)

    def propose(self, tokens: list[int], k: int, sampling: SamplingParams, generator
                ) -> tuple[list[int], torch.Tensor | None]:
        """``k`` tokens drawn one by one from the draft (argmax when greedy) and their
        distributions [k, vocab] (``None`` when greedy)."""
        self.begin(tokens, sampling, generator)
        for _ in range(k):
            self.step_once()
        return self.result()

    def begin(self, tokens: list[int], sampling: SamplingParams, generator) -> None:
        """Start a round after the committed ``tokens`` (then :meth:`step_once`, :meth:`result`)."""
        self._feed, self._sampling, self._generator = tokens[len(self.kv_tokens):], sampling, generator
        self._drafted, self._dists = [], []

    def step_once(self) -> int:
        """Draft one more token: one pass of the draft model."""
        logits = self.batch.step({self.row: self._feed})[self.row]    # [1, vocab]
        self.kv_tokens += self._feed
        if self._sampling.greedy:
            token = int(logits[-1].argmax())
        else:
            q = probabilities(logits, self._sampling)                  # [1, vocab]
            token = int(torch.multinomial(q, 1, generator=self._generator))
            self._dists.append(q[0])
        self._drafted.append(token)
        self._feed = [token]
        return token

    def result(self) -> tuple[list[int], torch.Tensor | None]:
        """This round's drafted tokens and their distributions (``None`` when greedy)."""
        return list(self._drafted), (torch.stack(self._dists) if self._dists else None)

    def tree_root(self, tokens: list[int]) -> torch.Tensor:
        """Sync the draft's KV with the committed ``tokens``: the log-probabilities [1, vocab] of
        the token after them (the tree's root)."""
        feed = tokens[len(self.kv_tokens):]
        logits = self.batch.step({self.row: feed})[self.row]            # [1, vocab]
        self.kv_tokens = list(tokens)
        return logits.float().log_softmax(-1)

    def tree_step(self, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """One tree step: ``tokens`` as nodes of the draft's open tree (``parents``: earlier nodes
        of this round's tree, -1 the root); their children's log-probabilities [n, vocab]."""
        logits = self.batch.step({self.row: tokens}, logits="all",
                                 parents={self.row: parents})[self.row]  # [n, vocab]
        return logits.float().log_softmax(-1)

    def rollback(self, committed: list[int]) -> None:
        """Keep only the KV of the drafted sequence's prefix that ``committed`` shares (a round's
        tree nodes are never kept)."""
        n = 0
        for a, b in zip(self.kv_tokens, committed):
            if a != b:
                break
            n += 1
        self.batch.truncate(self.row, n)
        self.kv_tokens = self.kv_tokens[:n]

    def close(self) -> None:
        """Close the draft's batch and engine."""
        self.batch.close()
        self.engine.close()


class Int4Weights:
    """The blocks of ``source`` as dense tensors (int4 parts dequantized), for re-quantizing at the
    draft's group size; embed/head are ``shared``'s tensors where given (the target's resident ones).
    """

    def __init__(self, source, shared: dict[str, dict]):
        self.spec, self.tokenizer, self._source, self._shared = (source.spec, source.tokenizer,
                                                                 source, shared)

    def read_block(self, block: str) -> dict:
        """The block's tensors: shared ones as they are, others dequantized to fp32 tensors."""
        if block in self._shared:
            return dict(self._shared[block])
        return {name: to_dense(value) for name, value in self._source.read_block(block).items()}


def int4_draft(target: Engine, group_size: int, max_len: int) -> ModelDraft:
    """The ``int4`` draft of ``target``: its weights at int4 group ``group_size``, resident, computing
    in the int4 path's own dtype (bf16 on the CPU, torch's int4 kernel; fp16 on CUDA) whatever the
    target computes in: the draft only proposes, the target decides (an fp32 draft on the CPU would
    take the slow generic int4 routine, ~4x the time per token)."""
    if group_size not in INT4_GROUP_SIZES:
        raise DraftError(f"--draft-group-size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    target.open_batch(1, 1).close()  # places the target's weights, to share its embed / head
    resident = target._weights.resident
    shared = {b: resident[b] for b in ("embed", "head") if b in resident}
    options = EngineOptions(device=target.options.device, weights="int4", group_size=group_size,
                            placement="resident")
    engine = Engine(Int4Weights(target.source, shared), options)
    return ModelDraft(engine, target.spec.vocab_size, max_len, name=f"int4-g{group_size}")


def model_draft(target: Engine, model: str, max_len: int) -> ModelDraft:
    """The draft of a separate model at path ``model`` (resident, the target's device and dtype)."""
    from pipo.io.source import open_model

    options = EngineOptions(device=target.options.device, dtype=target.options.dtype,
                            placement="resident")
    return ModelDraft(Engine(open_model(model), options), target.spec.vocab_size, max_len,
                      name="model")


def make_draft(kind: str, target: Engine, max_len: int, group_size: int = 128):
    """The draft named by ``--speculate``: ``ngram``, ``int4`` or a model path."""
    if kind == "ngram":
        return NgramDraft()
    if kind == "int4":
        return int4_draft(target, group_size, max_len)
    if not Path(kind).exists():
        raise ModelFormatError(f"--speculate {kind}: neither a draft kind (auto, int4, ngram, off) "
                               f"nor an existing model path")
    return model_draft(target, kind, max_len)
