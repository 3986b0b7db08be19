"""pipo: pipelined offloading inference for large language models on small GPUs (and CPUs).

Python use::

    import pipo
    engine = pipo.load()                        # the default model (SmolLM2-135M-Instruct GGUF)
    print(engine.generate("The capital of France is", max_new_tokens=16))

Custom pipelines use the runtime directly: ``pipo.runtime.Runtime().run(graph, ctx)``.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path | None = None, *, speculate: str = "off", draft_tokens: int = 4,
         draft_budget: int | None = None, draft_group_size: int = 128, **options):
    """Open a model (``None``: the default model) and return an :class:`pipo.engine.Engine`.

    ``options`` are :class:`pipo.engine.EngineOptions` fields: ``device``, ``dtype``, ``weights``
    (``"auto"`` or ``"int4"``), ``device_memory`` (bytes), ``placement``, ``kv_offload``,
    ``schedule``, ``micro_batch``, ``n_weight_slots``, ``n_kv_slots``, ``trace``. A 4-bit GGUF is read
    4-bit: ``weights="int4"`` computes on its own blocks, ``"auto"`` dequantizes them at placement.

    ``speculate`` (as ``pipo generate --speculate``): ``"off"`` (default), ``"int4"``, ``"ngram"``,
    a draft model's path, or ``"auto"`` (the planner decides per request); anything but ``off``
    returns a speculating wrapper with the engine's ``generate`` / ``generate_ids`` (greedy output
    identical to plain, sampling with the target's distribution). ``draft_tokens``, ``draft_budget``
    and ``draft_group_size`` are ``--draft-tokens``, ``--draft-budget``, ``--draft-group-size``.
    """
    from pipo.engine import Engine, EngineOptions
    from pipo.engine.speculating import speculating
    from pipo.io.source import open_model

    engine = Engine(open_model(path), EngineOptions(**options))
    try:
        return speculating(engine, speculate, draft_tokens=draft_tokens,
                           draft_budget=draft_budget, draft_group_size=draft_group_size)
    except BaseException:
        engine.close()
        raise


__all__ = ["load", "__version__"]
