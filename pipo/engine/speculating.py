"""Speculation as an option of a model: ``pipo.load(..., speculate=...)`` and ``--speculate``.

:func:`speculating` wraps an engine for a ``speculate`` value:

- ``off``: the engine itself;
- ``int4``, ``ngram`` or a model path: a :class:`~pipo.engine.speculate.Speculator` with that draft
  (a model draft's KV grows to each request's length, :meth:`ModelDraft.reserve`);
- ``auto``: an :class:`AutoSpeculator`, which asks the planner on every request
  (:func:`planned_kind`: int4 at batch 1 when the decode step is link-bound and the draft fits the
  caps, else off, see :mod:`pipo.planner.speculation`) and runs it speculatively or plainly.
"""

from __future__ import annotations

from dataclasses import replace

from pipo.engine import drafts, speculate
from pipo.engine.drafts import DraftError
from pipo.engine.speculate import GREEDY, Speculator
from pipo.ops.sampling import SamplingParams

AUTO, OFF = "auto", "off"
DRAFT_LEN = 256  # a model draft's first KV length in tokens; a longer request grows it


def speculating(engine, speculate: str = OFF, *, draft_tokens: int = 4,
                draft_budget: int | None = None, draft_group_size: int = 128):
    """``engine`` speculating per ``speculate`` (see the module docstring); ``draft_tokens``: the
    first rounds' k (adapted within 1..2k), ``draft_budget``: a token tree of up to N tokens per
    round instead of a chain, ``draft_group_size``: the int4 draft's group (32, 64 or 128)."""
    if draft_tokens < 1 or (draft_budget is not None and draft_budget < 1):
        raise DraftError(f"draft_tokens and draft_budget must be at least 1, got {draft_tokens} "
                         f"and {draft_budget}")
    if speculate == OFF:
        return engine
    args = dict(draft_tokens=draft_tokens, draft_budget=draft_budget,
                draft_group_size=draft_group_size)
    if speculate == AUTO:
        return AutoSpeculator(engine, **args)
    return speculator(engine, speculate, DRAFT_LEN, **args)


def speculator(engine, kind: str, max_len: int, *, draft_tokens: int, draft_budget: int | None,
               draft_group_size: int) -> Speculator:
    """A Speculator over ``engine`` with the ``kind`` draft (first sized for ``max_len`` tokens).
    The draft and the class are looked up when called (tests and tools may wrap them)."""
    draft = drafts.make_draft(kind, engine, max_len, group_size=draft_group_size)
    return speculate.Speculator(engine, draft, k=draft_tokens, k_max=2 * draft_tokens,
                                budget=draft_budget)


def planned_kind(engine, max_len: int, batch: int, new_tokens: int, group_size: int) -> str:
    """The planner's speculation for this request (``int4`` or ``off``); with int4 the target
    runs within the device memory the draft leaves (``engine.options.device_memory``)."""
    from pipo.planner.engine_plan import speculation_for

    new_tokens = min(new_tokens, max_len - 1)
    decision = speculation_for(engine, batch, max_len, prompt_len=max_len - new_tokens,
                               new_tokens=new_tokens, group_size=group_size)
    if decision.device_memory is not None:
        engine.options = replace(engine.options, device_memory=decision.device_memory)
    return decision.kind


class AutoSpeculator:
    """``speculate="auto"``: each request is planned (batch = its number of prompts) and runs with
    the int4 draft when the planner turns speculation on, else on the plain engine. ``kind`` is
    the last request's decision. Has ``generate_ids`` / ``generate`` like an Engine; everything else
    is the engine's."""

    def __init__(self, engine, *, draft_tokens: int, draft_budget: int | None,
                 draft_group_size: int):
        self.engine, self.kind = engine, None
        self._args = dict(draft_tokens=draft_tokens, draft_budget=draft_budget,
                          draft_group_size=draft_group_size)
        self._options = engine.options  # the user's caps; a decision may lower the device cap
        self._speculator: Speculator | None = None

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int,
                     sampling: SamplingParams = GREEDY, *, on_step=None, keep_logits: bool = False):
        """New tokens per prompt, as ``Engine.generate_ids``, speculatively when planned so."""
        self.engine._check_request(prompts, max_new_tokens)
        budget = self._args["draft_budget"] or 0
        max_len = (max(map(len, prompts)) + max_new_tokens + 4 * self._args["draft_tokens"]
                   + budget + 2)
        self.engine.options = self._options
        self.kind = planned_kind(self.engine, max_len, len(prompts), max_new_tokens,
                                 self._args["draft_group_size"])
        if self.kind == OFF:
            return self.engine.generate_ids(prompts, max_new_tokens, sampling, on_step=on_step,
                                            keep_logits=keep_logits)
        if self._speculator is None:
            self._speculator = speculator(self.engine, self.kind, max_len, **self._args)
        return self._speculator.generate_ids(prompts, max_new_tokens, sampling, on_step=on_step)

    def generate(self, prompts, max_new_tokens: int = 64, sampling: SamplingParams = GREEDY, *,
                 chat: bool = False, system: str | None = None, on_text=None):
        """As ``Engine.generate``, speculatively when the planner says so."""
        from pipo.engine.text import complete

        return complete(self, prompts, max_new_tokens, sampling, chat=chat, system=system,
                        on_text=on_text)

    @property
    def stats(self):
        """The speculation statistics so far (``None`` before a request speculated)."""
        return self._speculator.stats if self._speculator is not None else None

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def close(self) -> None:
        """Close the draft (if one was made) and the engine."""
        if self._speculator is not None:
            self._speculator.close()
        else:
            self.engine.close()

    def __enter__(self) -> AutoSpeculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
