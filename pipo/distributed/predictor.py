"""The stateful callable of ``ray.data.Dataset.map_batches``: one engine per worker.

Ray Data builds one :class:`PipoPredictor` per worker (an actor), calls it once per batch of rows
and drops it when the worker ends. Nothing here imports Ray: the class is plain Python, so it also
runs (and is tested) without the extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipo.engine.options import EngineOptions
from pipo.errors import PipoError
from pipo.ops.sampling import SamplingParams

# the columns a batch gains, besides the ones it came with
OUTPUT_COLUMNS = ("completion", "prompt_tokens", "completion_tokens", "error")


@dataclass(frozen=True)
class GenerationConfig:
    """What every worker needs to open its engine and generate; pickled to each worker.

    ``model`` is a path that must name the same model on every node (``None``: the default model,
    installed with pipo); ``options`` are the engine options of ``pipo generate`` (device,
    placement, memory caps, schedule, ...); ``threads`` the CPU threads of each worker (``None``:
    torch's default, which Ray sets to the worker's CPUs).
    """

    model: str | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = False
    system: str | None = None
    threads: int | None = None


class PipoPredictor:
    """Generates for each batch of rows: a ``prompt`` column in, completions out.

    A batch is a dict of equal-length arrays (Ray Data's ``"numpy"`` batch format). Every column is
    kept and these are added (see :data:`OUTPUT_COLUMNS`): ``completion`` (text), ``prompt_tokens``
    and ``completion_tokens`` (counts), ``error`` (empty, or why the row's prompt cannot be
    generated: empty, not text, too long for the context; its completion is then empty). Strings
    are never null, so every batch format reads them alike. Rows with an error do not stop the
    others; a failure of the whole batch (say, a plan that does not fit the device) raises.
    """

    def __init__(self, config: GenerationConfig):
        from pipo.cli_options import open_engine_with, set_threads

        set_threads(config.threads)
        self.config = config
        self.engine = open_engine_with(config.model, config.options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` with the output columns added."""
        from pipo.engine.text import generate_text

        prompts = [str(p) if isinstance(p, str) else p for p in batch["prompt"]]  # np.str_ too
        prompt_tokens, errors = self._check(prompts)
        completions = [""] * len(prompts)
        completion_tokens = [0] * len(prompts)
        valid = [row for row, error in enumerate(errors) if not error]
        if valid:
            c = self.config
            texts, result = generate_text(self.engine, [prompts[r] for r in valid],
                                          c.max_new_tokens, c.sampling, chat=c.chat,
                                          system=c.system)
            for row, text, tokens in zip(valid, texts, result.tokens):
                completions[row], completion_tokens[row] = text, len(tokens)
        return {**batch, "completion": np.array(completions, dtype=object),
                "prompt_tokens": np.array(prompt_tokens, dtype=np.int64),
                "completion_tokens": np.array(completion_tokens, dtype=np.int64),
                "error": np.array(errors, dtype=object)}

    def _check(self, prompts: list) -> tuple[list[int], list[str]]:
        from pipo.cli_batch import prompt_tokens

        counts, errors = [], []
        for prompt in prompts:
            try:
                counts.append(prompt_tokens(self.engine, prompt, self.config))
                errors.append("")
            except PipoError as exc:
                counts.append(0)
                errors.append(exc.for_cli())
        return counts, errors

    def close(self) -> None:
        """Release the engine (lanes, weights, KV cache); safe to call twice."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def __del__(self):
        # Ray Data drops the callable when its worker ends gracefully
        self.close()

