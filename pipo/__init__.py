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


def load(path: str | Path | None = None, **options):
    """Open a model (``None``: the default model) and return an :class:`pipo.engine.Engine`.

    ``options`` are :class:`pipo.engine.EngineOptions` fields: ``device``, ``dtype``, ``weights``
    (``"auto"`` or ``"int4"``), ``device_memory`` (bytes), ``placement``, ``kv_offload``,
    ``schedule``, ``micro_batch``, ``n_weight_slots``, ``n_kv_slots``, ``trace``. A 4-bit GGUF is read
    4-bit: ``weights="int4"`` computes on its own blocks, ``"auto"`` dequantizes them at placement.
    """
    from pipo.engine import Engine, EngineOptions
    from pipo.io.source import open_model

    return Engine(open_model(path), EngineOptions(**options))


__all__ = ["load", "__version__"]
