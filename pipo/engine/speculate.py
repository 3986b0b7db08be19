"""Speculative decoding on a per-row :class:`~pipo.engine.batch.Batch`: draft k, verify in one pass.

Each round a draft (:mod:`pipo.engine.drafts`) proposes up to k tokens after the committed
sequence; the target appends the last committed token and the k drafts in ONE multi-token step
(``logits="all"``: the same weight stream serves all k+1 positions) and accepts a prefix:

- greedy: draft i is accepted while it equals the target's argmax after drafts < i; the target's
  argmax after the accepted prefix is added (so the output is token-identical to plain greedy);
- sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023): accept draft x with
  probability min(1, p(x) / q(x)); at the first rejection draw from norm(max(0, p - q)); when all
  are accepted draw one more from p. The output distribution is the target's (``p`` after the same
  temperature / top-k / top-p as plain sampling; a deterministic draft has q one-hot).

With a model draft, the round's draft steps are compute tasks in the verify pass's step DAG
(:mod:`pipo.engine.speculate_dag`), so they run while the pass's first weights stream in.
Rejected positions are discarded with ``Batch.truncate`` in the target and in the draft. k adapts
to the running acceptance: k = 1 + the exponential average of accepted drafts per round, rounded
up, within 1..``k_max``.

With a ``budget`` (``--draft-budget N``) rounds verify a token tree of up to N drafts and depth
``k_max`` instead (:mod:`pipo.engine.speculate_tree`), greedy or sampling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from pipo.engine.loop import Generation
from pipo.engine.speculate_dag import DraftPrograms, verify_with_drafting
from pipo.engine.speculate_tree import EMA, commit, tree_rounds
from pipo.ops.sampling import SamplingParams, make_generator, probabilities

GREEDY = SamplingParams()


@dataclass
class SpecStats:
    """What speculation did: target passes, drafted and accepted tokens, and time per phase.

    ``verify_s`` maps a round's draft count k to the verify-pass seconds of each such round (with
    drafting in the DAG: the whole run, draft steps included, since they overlap the loads).
    """

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    draft_s: float = 0.0
    verify_s: dict[int, list[float]] = field(default_factory=dict)

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per target pass (the prefill pass included)."""
        return self.generated / self.passes if self.passes else 0.0

    def add(self, other: SpecStats) -> None:
        """Accumulate ``other`` into this record."""
        self.passes += other.passes
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.generated += other.generated
        self.draft_s += other.draft_s
        for k, times in other.verify_s.items():
            self.verify_s.setdefault(k, []).extend(times)


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
           sampling: SamplingParams, generator: torch.Generator) -> tuple[int, int]:
    """(accepted drafts n, the token after them) from the target's logits [len(drafts)+1, V]."""
    if sampling.greedy:
        best = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    p = probabilities(logits, sampling)                                # [k+1, V]
    for i, token in enumerate(drafts):
        q_i = q[i] if q is not None else _one_hot(token, p.shape[-1])
        ratio = float(p[i, token]) / max(float(q_i[token]), 1e-30)
        if float(torch.rand((), generator=generator)) < min(1.0, ratio):
            continue
        residual = (p[i] - q_i).clamp(min=0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def _one_hot(token: int, vocab: int) -> torch.Tensor:
    out = torch.zeros(vocab)
    out[token] = 1.0
    return out


def _pick(logits: torch.Tensor, sampling: SamplingParams, generator) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits[None], sampling)[0], 1, generator=generator))


class Speculator:
    """Speculative generation with ``engine`` (the target) and ``draft``; k drafts per round at
    first, adapted within 1..``k_max`` when ``adaptive``; with ``budget`` N, rounds draft a tree
    of up to N tokens and depth ``k_max`` instead. Has ``generate_ids`` / ``generate`` like an
    :class:`~pipo.engine.Engine` (prompts run one after another), so the CLI uses either alike.
    """

    def __init__(self, engine, draft, k: int = 4, adaptive: bool = True, k_max: int = 8,
                 overlap: bool = True, budget: int | None = None):
        if budget is not None and budget < 1:
            raise ValueError(f"a draft budget must be at least 1, got {budget}")
        self.budget = budget
        self.engine, self.draft, self.k, self.adaptive = engine, draft, k, adaptive
        self.overlap, self._programs = overlap, DraftPrograms(engine)
        self.k_max = max(k, k_max) if adaptive else k
        self.tokenizer, self.spec = engine.tokenizer, engine.spec
        self.stats = SpecStats()
        self.step_stats: list = []

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int,
                     sampling: SamplingParams = GREEDY, *, on_step=None,
                     keep_logits: bool = False) -> Generation:
        """New tokens per prompt, as ``Engine.generate_ids`` (``on_step`` gets each new token)."""
        sampling.validate()
        self.engine._check_request(prompts, max_new_tokens)
        generator = make_generator(sampling)
        result = None
        for row, prompt in enumerate(prompts):
            def emit(token, row=row):
                if on_step is not None:
                    fresh = [None] * len(prompts)
                    fresh[row] = token
                    on_step(fresh)
            tokens, plan, seconds = self._one(prompt, max_new_tokens, sampling, generator, emit)
            if result is None:
                result = Generation(tokens=[], plan=plan)
            result.tokens.append(tokens)
            result.decode_s += seconds
        return result

    def generate(self, prompts, max_new_tokens: int = 64,
                 sampling: SamplingParams = GREEDY, *, chat: bool = False,
                 system: str | None = None, on_text=None):
        """As ``Engine.generate``, speculatively."""
        from pipo.engine.text import complete

        return complete(self, prompts, max_new_tokens, sampling, chat=chat, system=system,
                        on_text=on_text)

    def _one(self, prompt: list[int], max_new: int, sampling, generator, emit):
        """Generate after one prompt; returns (tokens, plan, seconds)."""
        t0 = time.perf_counter()
        stats = SpecStats()
        tree = self.budget is not None
        room = self.budget + 2 * self.k_max + 2 if tree else self.k_max + 1
        if hasattr(self.draft, "reserve"):  # a model draft holds the same tokens
            self.draft.reserve(len(prompt) + max_new + room)
        batch = self.engine.open_batch(1, len(prompt) + max_new + room)
        out: list[int] = []
        try:
            row = batch.admit()
            token = _pick(batch.step({row: prompt})[row][-1], sampling, generator)
            stats.passes += 1
            self.draft.reset(prompt)
            seq = list(prompt)
            rounds = tree_rounds if tree else chain_rounds
            rounds(self, batch, row, seq, token, max_new, out, emit, stats, sampling, generator)
        finally:
            batch.close()
        self.step_stats = batch.stats  # per target run, with the engine's trace option
        stats.generated = len(out)
        self.stats.add(stats)
        return out, batch.plan, time.perf_counter() - t0

    def __getattr__(self, name: str):
        """Everything else (``plan_for``, ``source``, ...) is the target engine's."""
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    @property
    def overlap_ok(self) -> bool:
        """Whether rounds draft inside the verify pass's DAG (a model draft and ``overlap``)."""
        return self.overlap and hasattr(self.draft, "step_once")

    def _round(self, batch, row: int, seq: list[int], token: int, k: int, sampling, generator):
        """Draft up to ``k`` tokens and verify them: (drafts, q, logits [n+1, V], draft seconds).
        With :attr:`overlap_ok` both happen in one run of the target's step DAG."""
        if k and self.overlap_ok:
            return verify_with_drafting(batch, self._programs, self.draft, row, seq, token, k,
                                        sampling, generator)
        t0 = time.perf_counter()
        drafts, q = self.draft.propose(seq, k, sampling, generator) if k else ([], None)
        draft_s = time.perf_counter() - t0
        return drafts, q, batch.step({row: [token, *drafts]}, logits="all")[row], draft_s

    def close(self) -> None:
        """Close the draft and the target engine."""
        self.draft.close()
        self.engine.close()

    def __enter__(self) -> Speculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chain_rounds(spec: Speculator, batch, row: int, seq: list[int], token: int, max_new: int,
                 out: list[int], emit, stats: SpecStats, sampling, generator) -> None:
    """Chain rounds after the prompt's first token ``token`` until EOS or ``max_new`` tokens in
    ``out`` (``seq``: the committed sequence, extended in place): draft k, verify them in one pass,
    keep the accepted prefix's KV, adapt k."""
    eos = set(spec.spec.eos_ids)
    k, ema = spec.k, float(spec.k)
    while token not in eos and len(out) < max_new:
        commit([token], out, seq, eos, max_new, emit)
        if len(out) == max_new:
            break
        want = max(0, min(k, max_new - len(out) - 1))
        kept = batch.length(row)
        t0 = time.perf_counter()
        drafts, q, logits, draft_s = spec._round(batch, row, seq, token, want, sampling, generator)
        stats.draft_s += draft_s
        stats.verify_s.setdefault(len(drafts), []).append(
            time.perf_counter() - t0 - (0.0 if spec.overlap_ok else draft_s))
        n, token = accept(logits, drafts, q, sampling, generator)
        batch.truncate(row, kept + 1 + n)  # the rejected drafts' KV is discarded
        stats.passes += 1
        stats.drafted += len(drafts)
        stats.accepted += n
        stop = commit(drafts[:n], out, seq, eos, max_new, emit)
        token = token if stop is None else stop
        spec.draft.rollback(seq)
        if spec.adaptive and drafts:
            ema = EMA * ema + (1 - EMA) * n
            k = max(1, min(spec.k_max, math.ceil(ema) + 1))
